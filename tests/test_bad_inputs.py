"""Bad inputs: each gives a QctfeaError naming the file, the scan and what to change.

Every test feeds one bad input to the real step (``qctfea.steps_*``) or library
function and checks the error (or warning) message for (a) the file or input
concerned, (b) the patient/timepoint context of steps that take one and (c) the
fix. The synthetic scan of ``conftest.demo_scan`` is reused; nothing is meshed
or solved.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import pixels

from qctfea import cli
from qctfea.steps import fea as steps_fea
from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.steps import model as steps_model
from qctfea.errors import QctfeaError
from qctfea.cohort.samples import dxa_value, read_sample_sheet

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "verse_tptbox_L3"


def _has(err, *parts) -> str:
    """The error's message, after checking that it holds every part."""
    msg = str(err.value if hasattr(err, "value") else err)
    for part in parts:
        assert str(part) in msg, f"{part!r} not in message: {msg}"
    return msg


def _write_like(arr: np.ndarray, ref_path: Path, out: Path) -> Path:
    ref = sitk.ReadImage(str(ref_path))
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(out), True)
    return out


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- 1. stray and truncated files in a DICOM series ----------------------------------------


@pytest.fixture
def dicom_copy(demo_scan, tmp_path) -> Path:
    folder = tmp_path / "dicom"
    shutil.copytree(demo_scan["src"] / "dicom", folder)
    return folder


def test_stray_file_in_series_is_skipped_with_a_warning(demo_scan, dicom_copy, tmp_path):
    ctx = demo_scan["context"]
    (dicom_copy / "notes.txt").write_text("scanned on the old console\n")
    with pytest.warns(UserWarning, match="skipped 1 file") as rec:
        steps_imaging.ingest(source=dicom_copy, out_image=tmp_path / "ct.nii.gz",
                             out_json=tmp_path / "scan.json", context=ctx)
    msg = _has(next(w.message for w in rec if "skipped" in str(w.message)),
               ctx, dicom_copy, "1 not DICOM: notes.txt", "remove them from the folder")
    assert "Traceback" not in msg
    scan = json.loads((tmp_path / "scan.json").read_text())["scan"]
    assert scan["n_files_skipped"] == 1 and scan["n_slices"] == scan["n_files_read"]
    np.testing.assert_array_equal(_array(tmp_path / "ct.nii.gz"),
                                  _array(demo_scan["results"] / "ct.nii.gz"))


def test_folder_caches_and_snakemake_marker_are_ignored_without_a_warning(demo_scan, dicom_copy,
                                                                         tmp_path):
    """Files every folder may hold (Snakemake's directory() marker, the Finder's cache) are
    not slices and not the user's mistake: left out silently (dicomslices.IGNORED_FILE_NAMES)."""
    for name in (".snakemake_timestamp", ".DS_Store"):
        (dicom_copy / name).write_bytes(b"\x00\x01 not a slice")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps_imaging.ingest(source=dicom_copy, out_image=tmp_path / "ct.nii.gz",
                             out_json=tmp_path / "scan.json", context=demo_scan["context"])
    scan = json.loads((tmp_path / "scan.json").read_text())["scan"]
    assert scan["n_files_skipped"] == 0 and scan["n_slices"] == scan["n_files_read"]
    np.testing.assert_array_equal(_array(tmp_path / "ct.nii.gz"),
                                  _array(demo_scan["results"] / "ct.nii.gz"))


@pytest.mark.parametrize("cut", ["pixel data", "header"])
def test_truncated_dicom_file_is_refused_naming_it(demo_scan, dicom_copy, tmp_path, cut):
    """Choice (documented in qctfea.imaging.dicomio): a truncated slice is an error, not skipped,
    since skipping it would silently drop a slice from the stack."""
    ctx = demo_scan["context"]
    victim = sorted(dicom_copy.glob("*.dcm"))[20]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if cut == "pixel data" else data[:700])
    with pytest.raises(QctfeaError) as err:
        steps_imaging.ingest(source=dicom_copy, out_image=tmp_path / "ct.nii.gz",
                             out_json=tmp_path / "scan.json", context=ctx)
    _has(err, ctx, victim.name, "truncated", "replace")
    assert not (tmp_path / "ct.nii.gz").exists() and not (tmp_path / "scan.json").exists()


# --- 2. empty images ------------------------------------------------------------------------


def _run_calibrate(scan, ct, labels, out: Path, cfg=None, label=23):
    steps_imaging.calibrate(ct_path=ct, labels_path=labels, out_density=out / "density.nii.gz",
                            out_json=out / "calibration.json", out_png=out / "calibration.png",
                            cfg=cfg or {}, context=scan["context"], label=label)


def _run_mask(scan, ct, labels, out: Path, cfg=None):
    steps_vertebra.mask(ct_path=ct, labels_path=labels, out_parts=out / "vertebra.nii.gz",
                        out_json=out / "vertebra.json", cfg=cfg or {}, context=scan["context"])


def _run_ingest(scan, ct, labels, out: Path):
    steps_imaging.ingest(source=ct, out_image=out / "ct.nii.gz", out_json=out / "scan.json",
                         context=scan["context"])


# The mask step reads only the CT's grid (its values come in through ingest and calibrate).
@pytest.mark.parametrize("step", ["ingest", "calibrate"])
def test_ct_with_all_voxels_equal_is_refused(demo_scan, tmp_path, step):
    r = demo_scan["results"]
    blank = _write_like(np.zeros_like(_array(r / "ct.nii.gz")), r / "ct.nii.gz",
                        tmp_path / "blank.nii.gz")
    run = _run_calibrate if step == "calibrate" else _run_ingest
    with pytest.raises(QctfeaError) as err:
        run(demo_scan, blank, demo_scan["src"] / "labels.nii.gz", tmp_path)
    _has(err, demo_scan["context"], blank, "is empty", "same value (0 HU)",
         "image column of the sample sheet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.nii.gz"]


def test_zero_byte_ct_file_is_refused(demo_scan, tmp_path):
    empty = tmp_path / "ct.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(QctfeaError) as err:
        _run_calibrate(demo_scan, empty, demo_scan["src"] / "labels.nii.gz", tmp_path,
                       {"method": "fixed", "slope": 1, "intercept": 0})
    _has(err, demo_scan["context"], empty, "cannot be read as an image",
         "check that the file is complete")


def test_empty_label_map_is_refused_by_mask(demo_scan, tmp_path):
    src = demo_scan["src"]
    blank = _write_like(np.zeros_like(_array(src / "labels.nii.gz")), src / "labels.nii.gz",
                        tmp_path / "labels.nii.gz")
    with pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, demo_scan["results"] / "ct.nii.gz", blank, tmp_path)
    _has(err, demo_scan["context"], blank, "label map is empty", "segmentation of this scan")


def test_label_map_without_the_vertebra_is_refused_at_ingest(demo_scan, tmp_path):
    """The workflow's first step reads the label map too: one without the target vertebra
    (here its L4, label 23, relabelled 24) raises naming the labels present; as the workflow
    runs it (record_refusal) the message is recorded in scan.json with a one-voxel
    placeholder image, and the inputs' gate (accept_scan) fails with it. The scan's own
    label map passes the gate, which records its acquisition."""
    src = demo_scan["src"]
    labels = _array(src / "labels.nii.gz")
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert 23 in present
    moved = _write_like(np.where(labels == 23, 24, labels), src / "labels.nii.gz",
                        tmp_path / "labels.nii.gz")
    kw = dict(source=src / "dicom", out_image=tmp_path / "ct.nii.gz",
              out_json=tmp_path / "scan.json", context=demo_scan["context"],
              labels_path=moved, mask_cfg={"label": 23})
    with pytest.raises(QctfeaError) as err:
        steps_imaging.ingest(**kw)
    after = sorted({24 if v == 23 else v for v in present})
    _has(err, demo_scan["context"], moved, "label 23 is not in the label map",
         f"labels present: {after}", "set mask.label")
    steps_imaging.ingest(**kw, record_refusal=True)
    rec = json.loads((tmp_path / "scan.json").read_text())
    assert rec["refused"] == str(err.value) and "scan" not in rec
    assert sitk.ReadImage(str(tmp_path / "ct.nii.gz")).GetSize() == (1, 1, 1)
    with pytest.raises(QctfeaError) as gate:
        steps_imaging.accept_scan(scan_json=tmp_path / "scan.json", out_json=tmp_path / "ok.json",
                                  context=demo_scan["context"])
    assert str(gate.value) == str(err.value) and not (tmp_path / "ok.json").exists()
    steps_imaging.ingest(**{**kw, "labels_path": src / "labels.nii.gz"}, record_refusal=True)
    steps_imaging.accept_scan(scan_json=tmp_path / "scan.json", out_json=tmp_path / "ok.json",
                              context=demo_scan["context"])
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["scan"]["size"] == list(sitk.ReadImage(str(tmp_path / "ct.nii.gz")).GetSize())


def test_folder_without_vertebra_masks_says_what_to_give(demo_scan, tmp_path):
    """A folder is read as TotalSegmentator's one mask per structure (test_label_folder);
    one without any vertebrae_<level> file is refused, naming both accepted forms."""
    folder = tmp_path / "segmentations"
    folder.mkdir()
    shutil.copy(demo_scan["src"] / "labels.nii.gz", folder / "liver.nii.gz")
    with pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, demo_scan["results"] / "ct.nii.gz", folder, tmp_path)
    _has(err, demo_scan["context"], folder, "is a folder", "no vertebrae_<level> file", "--ml",
         "multilabel file", "labels column of the sample sheet")


def test_vertebra_cut_by_the_scan_or_a_cropped_label_map_is_refused(demo_scan, tmp_path):
    """The scan range ends inside the vertebra (the CT cropped 6 slices above its lowest
    voxel), or the label map is cropped through it (the CT complete): either way part of the
    vertebra is missing and the scan is refused, naming the edge; the complete scan passes."""
    r, src, ctx = demo_scan["results"], demo_scan["src"], demo_scan["context"]
    ct = sitk.ReadImage(str(r / "ct.nii.gz"))
    labels = sitk.ReadImage(str(src / "labels.nii.gz"))
    z = np.flatnonzero((sitk.GetArrayViewFromImage(labels) == 23).any(axis=(1, 2)))
    size = list(ct.GetSize())
    cut = [0, 0, int(z[0]) + 6]
    short_ct = sitk.RegionOfInterest(ct, [size[0], size[1], size[2] - cut[2]], cut)
    sitk.WriteImage(short_ct, str(tmp_path / "short_ct.nii.gz"))
    with pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, tmp_path / "short_ct.nii.gz", src / "labels.nii.gz", tmp_path)
    _has(err, ctx, "short_ct.nii.gz", "is cut by the edge", "inferior (",
         "of its largest section", "hold the whole vertebra")
    # As the workflow runs it (record_refusal): the message in vertebra.json with a one-voxel
    # placeholder, and the label map's gate (accept_vertebra) fails with it.
    steps_vertebra.mask(ct_path=tmp_path / "short_ct.nii.gz", labels_path=src / "labels.nii.gz",
                        out_parts=tmp_path / "vertebra.nii.gz",
                        out_json=tmp_path / "vertebra.json", cfg={}, context=ctx,
                        record_refusal=True)
    assert json.loads((tmp_path / "vertebra.json").read_text())["refused"] == str(err.value)
    assert sitk.ReadImage(str(tmp_path / "vertebra.nii.gz")).GetSize() == (1, 1, 1)
    with pytest.raises(QctfeaError) as gate:
        steps_vertebra.accept_vertebra(vertebra_json=tmp_path / "vertebra.json",
                                       out_json=tmp_path / "ok.json", context=ctx)
    assert str(gate.value) == str(err.value) and not (tmp_path / "ok.json").exists()
    short_labels = sitk.RegionOfInterest(labels, [size[0], size[1], size[2] - cut[2]], cut)
    sitk.WriteImage(short_labels, str(tmp_path / "short_labels.nii.gz"))
    with pytest.warns(UserWarning, match="another grid"), pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, r / "ct.nii.gz", tmp_path / "short_labels.nii.gz", tmp_path)
    _has(err, ctx, "short_labels.nii.gz (on its own grid)", "inferior (", "is cut by the edge")
    _run_mask(demo_scan, r / "ct.nii.gz", src / "labels.nii.gz", tmp_path)  # complete: passes
    steps_vertebra.accept_vertebra(vertebra_json=tmp_path / "vertebra.json",
                                   out_json=tmp_path / "ok.json", context=ctx)
    vox = np.prod(ct.GetSpacing()) / 1000  # cm³
    parts = _array(tmp_path / "vertebra.nii.gz")
    assert json.loads((tmp_path / "ok.json").read_text())["body_volume_cm3"] == pytest.approx(
        (parts == 1).sum() * vox + (parts == 3).sum() * vox)


# --- 3. images on grids that do not overlap -------------------------------------------------


@pytest.mark.parametrize("step", ["calibrate", "mask"])
def test_label_map_not_overlapping_the_ct(demo_scan, tmp_path, step):
    labels = sitk.ReadImage(str(demo_scan["src"] / "labels.nii.gz"))
    labels.SetOrigin(tuple(np.array(labels.GetOrigin()) + 500.0))
    far = tmp_path / "labels_far.nii.gz"
    sitk.WriteImage(labels, str(far), True)
    run = _run_calibrate if step == "calibrate" else _run_mask
    with pytest.raises(QctfeaError) as err, pytest.warns(UserWarning, match="another grid"):
        run(demo_scan, demo_scan["results"] / "ct.nii.gz", far, tmp_path)
    _has(err, demo_scan["context"], far, "does not overlap the CT",
         "give the label map of this scan")


def test_density_and_parts_on_different_grids(demo_scan, tmp_path):
    r = demo_scan["results"]
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    small = tmp_path / "vertebra_cropped.nii.gz"
    sitk.WriteImage(parts[:, :, 5:], str(small), True)
    with pytest.raises(QctfeaError) as err:
        steps_imaging.bmd(density_path=r / "density.nii.gz", parts_path=small,
                          screws_path=r / "screws.json", out_json=tmp_path / "bmd.json", cfg={},
                          context=demo_scan["context"])
    _has(err, demo_scan["context"], small, r / "density.nii.gz", "different grids",
         "from the same scan")


# --- 4. masks empty after processing (the absent label: test_imaging.py) --------------------


def test_vertebra_too_small_for_a_body(demo_scan, tmp_path):
    """A 3 x 3 x 3 voxel label is no vertebra (0.02 cm³): refused by its volume, naming the
    label keys and the voxel spacing (a header whose spacing is wrong shrinks a vertebra);
    allowed any volume (an end-capped specimen), the body search refuses it."""
    src = demo_scan["src"]
    lab = _array(src / "labels.nii.gz")
    z, y, x = np.argwhere(lab == 23).mean(axis=0).astype(int)
    tiny = np.zeros_like(lab)
    tiny[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = 23
    path = _write_like(tiny, src / "labels.nii.gz", tmp_path / "labels_tiny.nii.gz")
    sp = sitk.ReadImage(str(demo_scan["results"] / "ct.nii.gz")).GetSpacing()
    with pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, demo_scan["results"] / "ct.nii.gz", path, tmp_path)
    _has(err, demo_scan["context"], path, f"label 23 holds {27 * np.prod(sp) / 1e3:.2f} cm³",
         "outside a whole vertebra's 1-200 cm³", "mask.label", "voxel spacing")
    with pytest.raises(QctfeaError) as err:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("qctfea.imaging.masks.VERTEBRA_CM3", (0.0, 1e9))
            _run_mask(demo_scan, demo_scan["results"] / "ct.nii.gz", path, tmp_path)
    _has(err, demo_scan["context"], path, "no vertebral body found",
         "lower mask.body_opening_mm",  # the 3 x 3 x 3 voxels' span, a hint at a bad header
         "spans " + " x ".join(f"{3 * v:.0f}" for v in sp) + " mm", "voxel spacing")


def test_trabecular_roi_empty_after_margin(demo_scan, tmp_path):
    labels = demo_scan["src"] / "labels.nii.gz"
    with pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, demo_scan["results"] / "ct.nii.gz", labels, tmp_path,
                  {"trabecular_margin_mm": 30})
    _has(err, demo_scan["context"], labels, "trabecular ROI is empty",
         "lower mask.trabecular_margin_mm")
    assert not (tmp_path / "vertebra.nii.gz").exists()


def test_bmd_on_parts_without_trabecular_roi(demo_scan, tmp_path):
    r = demo_scan["results"]
    parts = _array(r / "vertebra.nii.gz")
    parts[parts == 3] = 1
    path = _write_like(parts, r / "vertebra.nii.gz", tmp_path / "vertebra.nii.gz")
    with pytest.raises(QctfeaError) as err:
        steps_imaging.bmd(density_path=r / "density.nii.gz", parts_path=path,
                          screws_path=r / "screws.json", out_json=tmp_path / "bmd.json", cfg={},
                          context=demo_scan["context"])
    _has(err, demo_scan["context"], path, "no trabecular ROI", "rerun the mask step")
    assert not (tmp_path / "bmd.json").exists()


# --- 5. screw trajectories leaving the bone -------------------------------------------------


def _shifted_landmarks(scan, tmp_path: Path, dz: float) -> Path:
    lm = json.loads((scan["src"] / "landmarks.json").read_text())
    for side in ("left", "right"):
        for key in ("entry_mm", "target_mm"):
            lm[side][key] = (np.array(lm[side][key]) + [0.0, 0.0, dz]).tolist()
    path = tmp_path / f"landmarks_{dz:g}.json"
    path.write_text(json.dumps(lm))
    return path


def test_screws_breaching_the_pedicle_roof_are_refused_with_grade_and_direction(demo_scan,
                                                                               tmp_path):
    """Landmarks 8 mm too high: each screw's top runs above its pedicle's roof by
    8 + r - (pedicle half-height) (the generator's elliptic pedicle, r = 3.25 mm): grade C or
    D, superior, on both sides; the screws step fails naming the scan, the landmarks file,
    both sides and what to do, and writes no screws file."""
    from qctfea.demo.synth import patient_anatomy

    anat = patient_anatomy(7, "P01")  # the conftest scan's seed and patient
    expected = 8.0 + 6.5 / 2 - anat.pedicle_half_height
    lm = _shifted_landmarks(demo_scan, tmp_path, 8.0)
    out = tmp_path / "screws.json"
    with pytest.raises(QctfeaError) as err:
        steps_model.plan_screws(landmarks_path=lm,
                                parts_path=demo_scan["results"] / "vertebra.nii.gz", out_json=out,
                                cfg={}, context=demo_scan["context"])
    _has(err, demo_scan["context"], lm, "left screw grade", "right screw grade",
         "superior", "planning.max_grade = B", "landmarks")
    breaches = [float(x) for x in re.findall(r"grade [CD] \(Gertzbein-Robbins\): ([\d.]+) mm "
                                             r"outside the bone, superior", str(err.value))]
    assert len(breaches) == 2, str(err.value)
    assert breaches == pytest.approx([expected] * 2, abs=0.6), (breaches, expected)
    assert not out.exists()


def test_screw_entirely_outside_the_vertebra_is_refused(demo_scan, tmp_path):
    lm = _shifted_landmarks(demo_scan, tmp_path, 500.0)
    parts = demo_scan["results"] / "vertebra.nii.gz"
    with pytest.raises(QctfeaError) as err:
        steps_model.plan_screws(landmarks_path=lm, parts_path=parts,
                                out_json=tmp_path / "screws.json", cfg={},
                                context=demo_scan["context"])
    _has(err, demo_scan["context"], lm, parts, "left screw", "does not enter the vertebra",
         "physical (DICOM LPS) coordinates")
    assert not (tmp_path / "screws.json").exists()


# --- 6. calibration phantom -----------------------------------------------------------------


@pytest.mark.usefixtures("real_scans")
def test_phantom_not_found_in_real_ct(demo_scan, tmp_path):
    """The real TPTBox CT has no phantom in view (README of the sample)."""
    with pytest.raises(QctfeaError) as err:
        _run_calibrate(demo_scan, REAL / "ct.nii.gz", REAL / "vertebrae.nii.gz", tmp_path,
                       {"phantom": {"preset": "demo_k2hpo4"}}, label=22)
    _has(err, demo_scan["context"], REAL / "ct.nii.gz", "no calibration phantom found",
         "calibration.method: fixed")
    assert not (tmp_path / "density.nii.gz").exists()


def test_phantom_fit_below_fail_r2(demo_scan, tmp_path):
    """Rod densities that do not match the phantom: R² 0.63 < fail_r2 0.90."""
    ct = demo_scan["results"] / "ct.nii.gz"
    cfg = {"phantom": {"rod_densities_mg_cm3": [0, 50, 100, 150, 1000]}}
    with pytest.raises(QctfeaError) as err:
        _run_calibrate(demo_scan, ct, demo_scan["src"] / "labels.nii.gz", tmp_path, cfg)
    _has(err, demo_scan["context"], ct, "is below calibration.phantom.fail_r2 = 0.9",
         "-> 1000", "calibration.phantom.rod_densities_mg_cm3")
    assert not (tmp_path / "density.nii.gz").exists()
    # As the workflow runs it (record_refusal): the refusal is recorded with its picture and
    # a density of zeros, and the gate (accept_calibration) fails with the message.
    steps_imaging.calibrate(ct_path=ct, labels_path=demo_scan["src"] / "labels.nii.gz",
                            out_density=tmp_path / "density.nii.gz",
                            out_json=tmp_path / "calibration.json",
                            out_png=tmp_path / "calibration.png", cfg=cfg,
                            context=demo_scan["context"], label=23, record_refusal=True)
    rec = json.loads((tmp_path / "calibration.json").read_text())
    assert rec["refused"] == str(err.value) and rec["slope"] is None
    assert not _array(tmp_path / "density.nii.gz").any()
    pixels.assert_calibration_refusal(tmp_path / "calibration.png", rec["refused"], ct)
    with pytest.raises(QctfeaError) as gate:
        steps_imaging.accept_calibration(calibration_json=tmp_path / "calibration.json",
                                         out_json=tmp_path / "ok.json",
                                         context=demo_scan["context"])
    assert str(gate.value) == str(err.value) and not (tmp_path / "ok.json").exists()
    steps_imaging.accept_calibration(calibration_json=demo_scan["results"] / "calibration.json",
                                     out_json=tmp_path / "ok.json", context=demo_scan["context"])
    assert json.loads((tmp_path / "ok.json").read_text())["slope"] == pytest.approx(
        json.loads((demo_scan["results"] / "calibration.json").read_text())["slope"])


def test_phantom_fit_gate_from_config(demo_scan, tmp_path):
    """The demo fit (R² 0.99998) against a stricter gate set in the cohort config."""
    ct = demo_scan["results"] / "ct.nii.gz"
    cfg = {"phantom": {"preset": "demo_k2hpo4", "fail_r2": 0.999999, "warn_r2": 0.9999999}}
    with pytest.raises(QctfeaError) as err:
        _run_calibrate(demo_scan, ct, demo_scan["src"] / "labels.nii.gz", tmp_path, cfg)
    _has(err, demo_scan["context"], ct, "fail_r2 = 0.999999")


# --- 7. NaN or negative densities -----------------------------------------------------------


@pytest.fixture
def tiny_mesh(demo_scan, tmp_path) -> Path:
    """Two bone tetrahedra in the vertebral body: enough for the materials step."""
    from qctfea.model import meshing, tags

    c = np.array(json.loads((demo_scan["results"] / "vertebra.json").read_text())["centroid_mm"])
    pts = c + np.array([[0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4], [4, 4, 4]], float)
    path = tmp_path / "mesh" / "mesh.xdmf"
    meshing.write_mesh(path, pts, np.array([[0, 1, 2, 3], [1, 2, 3, 4]]),
                       np.full(2, tags.TAG_BODY))
    return path


def _nan_density(scan, tmp_path: Path, suffix: str = ".nii.gz") -> Path:
    r = scan["results"]
    dens = _array(r / "density.nii.gz")
    dens[10:12, 50:60, 50:60] = np.nan
    return _write_like(dens, r / "density.nii.gz", tmp_path / f"density_nan{suffix}")


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_nan_density_reaching_materials(demo_scan, tiny_mesh, tmp_path, suffix):
    """NIfTI too: ITK's reader turns NaN into 0 silently, so the step reads the file's bytes."""
    dens = _nan_density(demo_scan, tmp_path, suffix)
    out = tmp_path / "materials.npz"
    with pytest.raises(QctfeaError) as err:
        steps_model.materials(mesh_path=tiny_mesh, density_path=dens,
                              screws_path=demo_scan["results"] / "screws.json", out_npz=out,
                              out_json=tmp_path / "materials.json", cfg={},
                              context=demo_scan["context"])
    _has(err, demo_scan["context"], dens, "200 NaN or infinite voxel(s)",
         "rerun the calibrate step")
    assert not out.exists()


def test_nan_density_reaching_bmd(demo_scan, tmp_path):
    dens = _nan_density(demo_scan, tmp_path)
    r = demo_scan["results"]
    with pytest.raises(QctfeaError) as err:
        steps_imaging.bmd(density_path=dens, parts_path=r / "vertebra.nii.gz",
                          screws_path=r / "screws.json", out_json=tmp_path / "bmd.json", cfg={},
                          context=demo_scan["context"])
    _has(err, demo_scan["context"], dens, "NaN or infinite", "rerun the calibrate step")


def test_negative_bone_density_reaching_materials(demo_scan, tiny_mesh, tmp_path):
    """A calibration with the wrong sign: every element would silently get the E floor."""
    r = demo_scan["results"]
    dens = _write_like(-_array(r / "density.nii.gz"), r / "density.nii.gz",
                       tmp_path / "density_negative.nii.gz")
    with pytest.raises(QctfeaError) as err:
        steps_model.materials(mesh_path=tiny_mesh, density_path=dens, screws_path=r / "screws.json",
                              out_npz=tmp_path / "materials.npz",
                              out_json=tmp_path / "materials.json",
                              cfg={}, context=demo_scan["context"])
    _has(err, demo_scan["context"], dens, tiny_mesh, "median density of -",
         "the calibration is wrong", "calibration.json")
    assert not (tmp_path / "materials.npz").exists()


# --- 8. missing input files -----------------------------------------------------------------


def _missing_cases(scan, tmp: Path) -> dict:
    """step -> (call with one missing input, the missing path, the fix named)."""
    r, src, ctx = scan["results"], scan["src"], scan["context"]
    gone = tmp / "gone"
    for name in ("mesh.xdmf", "mesh.h5", "materials.npz"):  # present; screws.json is not
        (tmp / name).write_text("")
    return {
        "calibrate": (lambda: _run_calibrate(scan, gone / "ct.nii.gz", src / "labels.nii.gz",
                                             tmp),
                      gone / "ct.nii.gz", "run the ingest step first"),
        "mask": (lambda: _run_mask(scan, r / "ct.nii.gz", gone / "labels.nii.gz", tmp),
                 gone / "labels.nii.gz", "check the labels column of the sample sheet"),
        "plan_screws": (lambda: steps_model.plan_screws(landmarks_path=gone / "landmarks.json",
                                                        parts_path=r / "vertebra.nii.gz",
                                                        out_json=tmp / "screws.json", cfg={},
                                                        context=ctx),
                        gone / "landmarks.json", "check the landmarks column"),
        "bmd": (lambda: steps_imaging.bmd(density_path=r / "density.nii.gz",
                                          parts_path=r / "vertebra.nii.gz",
                                          screws_path=gone / "screws.json",
                                          out_json=tmp / "bmd.json", cfg={}, context=ctx),
                gone / "screws.json", "run the screws step first"),
        "mesh": (lambda: steps_model.mesh(parts_path=gone / "vertebra.nii.gz",
                                          screws_path=r / "screws.json", out_mesh=tmp / "mesh.xdmf",
                                          out_json=tmp / "mesh.json", cfg={}, context=ctx),
                 gone / "vertebra.nii.gz", "run the mask step first"),
        "materials": (lambda: steps_model.materials(mesh_path=gone / "mesh.xdmf",
                                                    density_path=r / "density.nii.gz",
                                                    screws_path=r / "screws.json",
                                                    out_npz=tmp / "materials.npz",
                                                    out_json=tmp / "materials.json", cfg={},
                                                    context=ctx),
                      gone / "mesh.xdmf", "run the mesh step first (rule mesh_vertebra)"),
        "solve": (lambda: steps_fea.solve(case="compression", mesh_path=gone / "mesh.xdmf",
                                          materials_path=r / "materials.npz",
                                          mask_json=r / "vertebra.json",
                                          screws_path=r / "screws.json",
                                          out_json=tmp / "compression.json", loads_cfg={},
                                          solver_cfg={}, context=ctx),
                  gone / "mesh.xdmf", "run the mesh step first"),
        "solve_pullout": (lambda: steps_fea.solve(case="pullout", mesh_path=tmp / "mesh.xdmf",
                                                  materials_path=tmp / "materials.npz",
                                                  mask_json=r / "vertebra.json",
                                                  screws_path=gone / "screws.json",
                                                  out_json=tmp / "pullout.json", loads_cfg={},
                                                  solver_cfg={}, context=ctx, side="left"),
                          gone / "screws.json", "run the screws step first"),
    }


@pytest.mark.parametrize("step", ["calibrate", "mask", "plan_screws", "bmd", "mesh",
                                  "materials", "solve", "solve_pullout"])
def test_missing_input_file_names_it_and_the_step_to_run(demo_scan, tmp_path, step):
    call, path, fix = _missing_cases(demo_scan, tmp_path)[step]
    with pytest.raises(QctfeaError) as err:
        call()
    _has(err, demo_scan["context"], f"{path} not found", fix)
    assert not (tmp_path / "gone").exists()


def test_mesh_without_its_h5_names_the_h5(demo_scan, tiny_mesh, tmp_path):
    r = demo_scan["results"]
    tiny_mesh.with_suffix(".h5").unlink()
    with pytest.raises(QctfeaError) as err:
        steps_model.materials(mesh_path=tiny_mesh, density_path=r / "density.nii.gz",
                              screws_path=r / "screws.json", out_npz=tmp_path / "materials.npz",
                              out_json=tmp_path / "materials.json", cfg={},
                              context=demo_scan["context"])
    _has(err, demo_scan["context"], f"mesh {tiny_mesh.with_suffix('.h5')} not found",
         "run the mesh step first")


def test_cli_solve_with_missing_mesh_is_one_line_not_a_traceback(demo_scan, tmp_path, capsys):
    r = demo_scan["results"]
    missing = tmp_path / "mesh.xdmf"
    code = cli.main(["solve", "compression", "--patient", "P01", "--timepoint", "M12",
                     "--mesh", str(missing), "--materials", str(tmp_path / "materials.npz"),
                     "--vertebra", str(r / "vertebra.json"), "--screws", str(r / "screws.json"),
                     "--out-json", str(tmp_path / "compression.json")])
    err = capsys.readouterr().err
    assert code == 2
    _has(err, "qctfea solve: error: patient P01, timepoint M12: mesh", f"{missing} not found",
         "run the mesh step first")
    assert "Traceback" not in err and "HDF5" not in err


# --- 9. sample sheets -----------------------------------------------------------------------

HEADER = "patient\ttimepoint\tmonths\timage\tlabels\tlandmarks\tdxa\n"


def _sheet(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "samples.tsv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def _row(patient="P01", timepoint="M00", months="0", image="img", labels="lab.nii.gz",
         landmarks="lm.json", dxa="") -> str:
    return "\t".join([patient, timepoint, months, image, labels, landmarks, dxa])


def test_sample_sheet_duplicate_scan_names_both_lines(tmp_path):
    sheet = _sheet(tmp_path, [_row(), _row(timepoint="M12", months="12"),
                              _row(months="0.5")])
    with pytest.raises(QctfeaError) as err:
        read_sample_sheet(sheet)
    _has(err, sheet, "duplicated patient x timepoint rows", "P01 M00 on lines 2, 4",
         "remove the extra row or correct its timepoint")


@pytest.mark.parametrize("column,value,expect", [
    ("months", "twelve", "line 2, column months: 'twelve' is not a number >= 0"),
    ("months", "inf", "line 2, column months: 'inf' is not a number >= 0"),
    ("dxa", "high", "line 2, column dxa: 'high' is neither an areal BMD > 0"),
    ("dxa", "-0.8", "line 2, column dxa: '-0.8' is neither an areal BMD > 0"),
    ("patient", "P 01", "line 2, column patient: 'P 01' is not a valid id"),
])
def test_sample_sheet_wrong_types_name_line_and_column(tmp_path, column, value, expect):
    sheet = _sheet(tmp_path, [_row(**{column: value})])
    with pytest.raises(QctfeaError) as err:
        read_sample_sheet(sheet)
    _has(err, sheet, expect)


def test_dxa_file_missing_or_without_the_key(tmp_path):
    with pytest.raises(QctfeaError) as err:
        dxa_value(str(tmp_path / "dxa.json"))
    _has(err, tmp_path / "dxa.json", "dxa column of the sample sheet", "not found")
    (tmp_path / "dxa.json").write_text('{"bmd": 0.8}')
    with pytest.raises(QctfeaError) as err:
        dxa_value(str(tmp_path / "dxa.json"))
    _has(err, tmp_path / "dxa.json", "key 'areal_bmd_g_cm2'")


def test_files_named_by_the_sheet_but_missing(demo_scan, tmp_path):
    """The sheet is read without the files (the demo rule writes them later); each step
    then names the missing file and the column of the sheet to correct."""
    ctx = demo_scan["context"]
    sheet = _sheet(tmp_path, [_row(image=str(tmp_path / "P01" / "dicom"),
                                   labels=str(tmp_path / "P01" / "labels.nii.gz"))])
    row = read_sample_sheet(sheet).iloc[0]
    with pytest.raises(QctfeaError) as err:
        steps_imaging.ingest(source=row["image"], out_image=tmp_path / "ct.nii.gz",
                             out_json=tmp_path / "scan.json", context=ctx)
    _has(err, ctx, row["image"], "not found", "image column of the sample sheet")
    with pytest.raises(QctfeaError) as err:
        _run_mask(demo_scan, demo_scan["results"] / "ct.nii.gz", row["labels"], tmp_path)
    _has(err, ctx, f"label map {row['labels']} not found", "labels column of the sample sheet")


# --- 9. an unexpected error in a gated step ---------------------------------------------------


def _gated_cases(scan, tmp: Path) -> dict:
    """gated step -> (what to make raise, the step called as the workflow calls it, its
    record, its gate called on the record)."""
    r, src, ctx = scan["results"], scan["src"], scan["context"]
    return {
        "ingest": ("qctfea.imaging.ingest.ingest",
                   lambda: steps_imaging.ingest(source=src / "dicom", out_image=tmp / "ct.nii.gz",
                                                out_json=tmp / "scan.json", context=ctx,
                                                record_refusal=True),
                   tmp / "scan.json",
                   lambda: steps_imaging.accept_scan(scan_json=tmp / "scan.json",
                                                     out_json=tmp / "ok.json", context=ctx)),
        "calibrate": ("qctfea.steps.imaging._calibration",
                      lambda: steps_imaging.calibrate(
                          ct_path=r / "ct.nii.gz", labels_path=src / "labels.nii.gz",
                          out_density=tmp / "density.nii.gz", out_json=tmp / "calibration.json",
                          out_png=tmp / "calibration.png", cfg={}, context=ctx, label=23,
                          record_refusal=True),
                      tmp / "calibration.json",
                      lambda: steps_imaging.accept_calibration(
                          calibration_json=tmp / "calibration.json", out_json=tmp / "ok.json",
                          context=ctx)),
        "mask": ("qctfea.steps.vertebra._mask",
                 lambda: steps_vertebra.mask(ct_path=r / "ct.nii.gz",
                                             labels_path=src / "labels.nii.gz",
                                             out_parts=tmp / "vertebra.nii.gz",
                                             out_json=tmp / "vertebra.json", cfg={}, context=ctx,
                                             record_refusal=True),
                 tmp / "vertebra.json",
                 lambda: steps_vertebra.accept_vertebra(vertebra_json=tmp / "vertebra.json",
                                                        out_json=tmp / "ok.json", context=ctx)),
        "screws": ("qctfea.model.planning.vertebra_anatomy",
                   lambda: steps_model.plan_screws(landmarks_path=src / "landmarks.json",
                                                   parts_path=r / "vertebra.nii.gz",
                                                   out_json=tmp / "screws.json", cfg={},
                                                   context=ctx, out_png=tmp / "screws.png",
                                                   record_refusal=True),
                   tmp / "screws.json",
                   lambda: steps_model.accept_screws(screws_path=tmp / "screws.json",
                                                     out_json=tmp / "ok.json", context=ctx)),
        "mesh": ("qctfea.steps.model._mesh",
                 lambda: steps_model.mesh(parts_path=r / "vertebra.nii.gz",
                                          screws_path=r / "screws.json",
                                          out_mesh=tmp / "mesh.xdmf", out_json=tmp / "mesh.json",
                                          cfg={}, context=ctx, out_png=tmp / "mesh.png",
                                          record_refusal=True),
                 tmp / "mesh.json",
                 lambda: steps_model.accept_mesh(mesh_json=tmp / "mesh.json",
                                                 out_json=tmp / "ok.json", context=ctx)),
        "registration": ("qctfea.imaging.registration.register_rigid",
                         lambda: steps_imaging.register(
                             fixed_density=r / "density.nii.gz", fixed_parts=r / "vertebra.nii.gz",
                             moving_density=r / "density.nii.gz",
                             moving_parts=r / "vertebra.nii.gz",
                             out_density=tmp / "density_baseline.nii.gz",
                             out_json=tmp / "registration.json", out_tfm=tmp / "rigid.tfm",
                             out_png=tmp / "registration.png", cfg={}, context=ctx,
                             record_refusal=True),
                         tmp / "registration.json",
                         lambda: steps_imaging.accept_registration(
                             registration_json=tmp / "registration.json",
                             out_json=tmp / "ok.json", context=ctx)),
    }


@pytest.mark.parametrize("step", ["ingest", "calibrate", "mask", "screws", "mesh",
                                  "registration"])
def test_an_unexpected_error_in_a_gated_step_is_the_scan_s_refusal(demo_scan, tmp_path,
                                                                   monkeypatch, caplog, step):
    """Any error of a gated step's own work (here an IndexError, as a real scan the code
    does not foresee might raise), run as the workflow runs it (record_refusal), is recorded
    as the scan's refusal, naming the scan, the step, the error and what to do, with the
    traceback in the log; the step's gate then fails the scan with that message, so that
    with --keep-going the cohort tables go on without it instead of having no tables. The
    step's every output is written (placeholders where nothing could be made)."""
    target, call, record, gate = _gated_cases(demo_scan, tmp_path)[step]

    def boom(*args, **kwargs):
        raise IndexError("index 7 is out of bounds for axis 0 with size 7")

    monkeypatch.setattr(target, boom)
    with caplog.at_level("ERROR"):
        call()
    msg = json.loads(record.read_text())["refused"]
    _has(msg, demo_scan["context"], f"the {step} step failed unexpectedly (IndexError: index 7 "
         "is out of bounds for axis 0 with size 7)", "traceback is in the step's log",
         "exclude the scan")
    assert "Traceback" in caplog.text and "in boom" in caplog.text
    with pytest.raises(QctfeaError) as err:
        gate()
    assert str(err.value) == msg and not (tmp_path / "ok.json").exists()
    # the rule's picture says why there is nothing to show: the message (the calibration's
    # beside the CT slice); the registration's, without a transform, the follow-up unmoved
    if step == "calibrate":
        pixels.assert_calibration_refusal(tmp_path / "calibration.png", msg,
                                          demo_scan["results"] / "ct.nii.gz")
    elif step in ("screws", "mesh"):
        pixels.assert_message_picture(tmp_path / f"{step}.png", msg)
    elif step == "registration":
        pixels.assert_registration_at_identity(tmp_path / "registration.png")


def test_a_planning_error_is_recorded_as_the_scan_s_refusal(demo_scan, tmp_path):
    """Landmarks 100 mm off the vertebra (another scan's): the screws step raises naming
    the scan and the fix; as the workflow runs it, the same message is the scan's refusal,
    which its gate (accept_screws) raises."""
    src, r, ctx = demo_scan["src"], demo_scan["results"], demo_scan["context"]
    lm = json.loads((src / "landmarks.json").read_text())
    for side in ("left", "right"):
        for key in ("entry_mm", "target_mm"):
            lm[side][key] = (np.array(lm[side][key]) + [0.0, 0.0, 100.0]).tolist()
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    kw = dict(landmarks_path=tmp_path / "lm.json", parts_path=r / "vertebra.nii.gz",
              out_json=tmp_path / "screws.json", cfg={}, context=ctx,
              out_png=tmp_path / "screws.png")
    with pytest.raises(QctfeaError) as err:
        steps_model.plan_screws(**kw)
    _has(err, ctx, "does not enter the vertebra", "landmarks of another scan do not fit")
    assert not (tmp_path / "screws.json").exists()
    steps_model.plan_screws(**kw, record_refusal=True)
    assert json.loads((tmp_path / "screws.json").read_text())["refused"] == str(err.value)
    with pytest.raises(QctfeaError) as gate:
        steps_model.accept_screws(screws_path=tmp_path / "screws.json",
                                  out_json=tmp_path / "ok.json", context=ctx)
    assert str(gate.value) == str(err.value)


def test_a_refused_materials_or_bmd_step_is_every_load_case_s_refusal(demo_scan, tiny_mesh,
                                                                      tmp_path, monkeypatch):
    """The materials and BMD steps run after the gates of the scan's inputs: as the workflow
    runs them (record_refusal), a failed check there (a calibration that gives the bone a
    negative density; no bone around a screw) is recorded as their refusal, and each load
    case given those records (``upstream``) records the refusal as its own without solving,
    with an empty curve, a picture saying why and placeholder fields; the solve gate
    (accept_strength) then fails the scan with the message, once."""
    r, ctx = demo_scan["results"], demo_scan["context"]
    dens = _write_like(-_array(r / "density.nii.gz"), r / "density.nii.gz",
                       tmp_path / "density_negative.nii.gz")
    steps_model.materials(mesh_path=tiny_mesh, density_path=dens, screws_path=r / "screws.json",
                          out_npz=tmp_path / "materials.npz",
                          out_json=tmp_path / "materials.json", cfg={}, context=ctx,
                          record_refusal=True)
    msg = _has(json.loads((tmp_path / "materials.json").read_text())["refused"], ctx,
               "median density of -", "the calibration is wrong")
    assert "youngs_mpa" not in np.load(tmp_path / "materials.npz")

    def no_bone(*args, **kwargs):
        raise QctfeaError(f"{ctx}: no bone voxels around the left screw; check the screws")

    monkeypatch.setattr("qctfea.imaging.bmd.measure_bmd", no_bone)
    steps_imaging.bmd(density_path=r / "density.nii.gz", parts_path=r / "vertebra.nii.gz",
                      screws_path=r / "screws.json", out_json=tmp_path / "bmd.json", cfg={},
                      context=ctx, out_png=tmp_path / "roi.png", record_refusal=True)
    bmd_msg = json.loads((tmp_path / "bmd.json").read_text())["refused"]
    assert bmd_msg == f"{ctx}: no bone voxels around the left screw; check the screws"
    pixels.assert_message_picture(tmp_path / "roi.png", bmd_msg)
    for upstream, expected in (([tmp_path / "materials.json", tmp_path / "bmd.json"], msg),
                               ([r / "bmd.json", tmp_path / "bmd.json"], bmd_msg)):
        results = []
        for case, side in (("compression", None), ("pullout", "left")):
            out = tmp_path / f"{case}.json"
            res = steps_fea.solve(case=case, side=side, mesh_path=tiny_mesh,
                                  materials_path=tmp_path / "materials.npz",
                                  mask_json=r / "vertebra.json", screws_path=r / "screws.json",
                                  out_json=out, loads_cfg={}, solver_cfg={}, context=ctx,
                                  out_curve=tmp_path / "curve.csv", out_plot=tmp_path / "c.png",
                                  out_fields=tmp_path / "fields.xdmf", upstream=upstream)
            rec = json.loads(out.read_text())
            assert res["refused"] == rec["refused"] == expected and rec["strength_n"] is None
            assert rec["stop_reason"] == f"not solved: {expected}"
            assert (tmp_path / "curve.csv").read_text().strip() == "displacement_mm,force_n"
            pixels.assert_curve_without_result(tmp_path / "c.png", rec["stop_reason"])
            assert (tmp_path / "fields.xdmf").is_file() and (tmp_path / "fields.h5").is_file()
            results.append(out)
        with pytest.raises(QctfeaError) as gate:
            steps_fea.accept_strength(result_paths=results, out_json=tmp_path / "ok.json",
                                      context=ctx)
        assert str(gate.value) == expected and not (tmp_path / "ok.json").exists()
