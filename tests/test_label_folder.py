"""A label map given as a folder of one mask per structure (TotalSegmentator without --ml):
the real TotalSegmentator-labelled L1 of ../shared/data/real split into such a folder gives
the same vertebra parts and the same phantomless calibration as its multilabel file."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, venv_bin
from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.errors import QctfeaError
from qctfea.imaging import labelfolder
from qctfea.imaging.masks import CONVENTIONS

#: TotalSegmentator v2 `total` names of some labels of the real L1's map (the test's own
#: data: the file names TotalSegmentator writes; the rest are written as structure_<id>).
NAMES = {**{v: f"vertebrae_{k}" for k, v in CONVENTIONS["totalsegmentator"].items()},
         5: "liver", 52: "aorta", 79: "spinal_cord", 25: "sacrum", 26: "vertebrae_S1",
         86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left",
         89: "iliopsoas_right"}


def _split(labels_path, folder):
    """One binary mask file per label of ``labels_path``, named as TotalSegmentator does."""
    img = sitk.ReadImage(str(labels_path))
    arr = sitk.GetArrayFromImage(img)
    folder.mkdir()
    for v in np.unique(arr[arr > 0]):
        m = sitk.GetImageFromArray((arr == v).astype(np.uint8))
        m.CopyInformation(img)
        sitk.WriteImage(m, str(folder / f"{NAMES.get(int(v), f'structure_{v}')}.nii.gz"))
    return arr


@pytest.fixture(scope="module")
def real_l1(real_l1_ingested, tmp_path_factory):
    """The ingested real L1 and its multilabel map split into a folder of masks."""
    root = tmp_path_factory.mktemp("l1")
    arr = _split(real_l1_ingested["src"] / "labels.nii.gz", root / "segmentations")
    return {**real_l1_ingested, "root": real_l1_ingested["root"], "folder": root / "segmentations",
            "labels": arr, "work": root}


def test_composed_folder_equals_the_multilabel_file_on_its_vertebrae_and_aorta(real_l1):
    image, structures = labelfolder.compose(real_l1["folder"], "totalsegmentator", "T01 M00")
    got = sitk.GetArrayFromImage(image)
    ref = real_l1["labels"]
    assert image.GetSize() == sitk.ReadImage(str(real_l1["src"] / "labels.nii.gz")).GetSize()
    for name, lab in structures.items():
        if lab < labelfolder.OTHER_FROM:  # vertebrae, aorta, muscles: the file's own ids
            assert np.array_equal(got == lab, ref == lab), name
    assert structures["vertebrae_L1"] == 31 and structures["aorta"] == 52
    assert labelfolder.muscle_labels("totalsegmentator", structures) == [86, 87, 88, 89]
    # every other structure labelled, each with its own label, none lost
    assert np.array_equal(got > 0, ref > 0)
    assert len(np.unique(got[got > 0])) == len(np.unique(ref[ref > 0]))


def test_mask_and_calibration_from_the_folder_equal_those_from_the_file(real_l1):
    r = real_l1["root"]
    cfg = {"convention": "totalsegmentator", "vertebra": "L1"}
    cal = {"method": "phantomless", "phantomless": {"blood_label": 52}}
    out = {}
    for kind, labels in (("file", real_l1["src"] / "labels.nii.gz"),
                         ("folder", real_l1["folder"])):
        d = real_l1["work"] / kind
        d.mkdir()
        steps_vertebra.mask(ct_path=r / "ct.nii.gz", labels_path=labels,
                            out_parts=d / "vertebra.nii.gz", out_json=d / "vertebra.json",
                            cfg=cfg, context="T01 M00")
        steps_imaging.calibrate(ct_path=r / "ct.nii.gz", labels_path=labels,
                                out_density=d / "density.nii.gz", out_json=d / "calibration.json",
                                out_png=d / "calibration.png", cfg=cal, context="T01 M00",
                                label=31, convention="totalsegmentator")
        out[kind] = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / "vertebra.nii.gz"))),
                     json.loads((d / "vertebra.json").read_text()),
                     json.loads((d / "calibration.json").read_text()))
    (pf, vf, cf), (pd_, vd, cd) = out["file"], out["folder"]
    assert pf.any() and np.array_equal(pf, pd_)
    assert vd["vertebra_volume_cm3"] == vf["vertebra_volume_cm3"]
    assert vd["label_structures"]["vertebrae_L1"] == 31 and vf["label_structures"] is None
    assert vd["label_qc"]["expected_neighbours"] == vf["label_qc"]["expected_neighbours"]
    assert vd["label_qc"]["expected_neighbours"]["above"]["touching"]
    assert cd["slope"] == cf["slope"] and cd["intercept"] == cf["intercept"]
    assert cd["tissues"] == cf["tissues"]
    assert any(t["name"] == "blood" for t in cd["tissues"]), cd["tissues"]


def test_folder_errors_name_the_folder_and_what_to_give(real_l1, tmp_path):
    r, folder = real_l1["root"], real_l1["folder"]
    with pytest.raises(QctfeaError, match="named mask.convention"):
        labelfolder.compose(folder, "custom", "T01 M00")
    with pytest.raises(QctfeaError, match="blood_label 7 is not a label"):
        steps_imaging.calibrate(ct_path=r / "ct.nii.gz", labels_path=folder,
                                out_density=tmp_path / "d.nii.gz", out_json=tmp_path / "c.json",
                                out_png=tmp_path / "c.png", context="T01 M00", label=31,
                                cfg={"method": "phantomless", "phantomless": {"blood_label": 7}},
                                convention="totalsegmentator")
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in ("vertebrae_L1.nii.gz", "liver.nii.gz"):
        (odd / f).write_bytes((folder / f).read_bytes())
    small = sitk.ReadImage(str(folder / "liver.nii.gz"))[:, :, :40]
    sitk.WriteImage(small, str(odd / "liver.nii.gz"))
    with pytest.raises(QctfeaError, match=r"is on another grid") as err:
        labelfolder.compose(odd, "totalsegmentator", "T01 M00")
    assert all(s in str(err.value) for s in ("T01 M00", "liver.nii.gz", "vertebrae_L1.nii.gz",
                                             "(512, 512, 45) against (512, 512, 40)"))


def test_workflow_accepts_a_folder_in_the_labels_column(real_l1, tmp_path):
    """Snakemake takes the folder as the rules' input (dry run of the real L1's cohort)."""
    import pandas as pd
    import yaml

    src = REPO / "config" / "cohorts" / "totalseg-l1"
    d = tmp_path / "cohorts" / "l1"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text((src / "config.yaml").read_text())
    sheet = pd.read_csv(src / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet["image"] = [str((REPO / v).resolve()) for v in sheet["image"]]
    sheet["labels"] = str(real_l1["folder"])
    sheet.to_csv(d / "samples.tsv", sep="\t", index=False)
    assert yaml.safe_load((d / "config.yaml").read_text())["mask"]["convention"] == \
        "totalsegmentator"
    p = subprocess.run(
        [venv_bin("snakemake"), "-n", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"),
         "--config", "cohort=l1", f"cohorts_dir={tmp_path / 'cohorts'}",
         "--until", "extract_vertebra", "calibrate_density", "-p"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=None)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "calibrate_density" in p.stdout and "extract_vertebra" in p.stdout
    # the rules that read the labels take the folder itself as an input
    for rule in ("calibrate_density", "extract_vertebra"):
        job = re.search(rf"(?:rule|checkpoint) {rule}:\n\s+input: ([^\n]*)", p.stdout)
        assert job and str(real_l1["folder"]) in job.group(1).split(", "), (rule, p.stdout)
