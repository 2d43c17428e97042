"""Imaging chain on a synthetic scan, checked against the generator's ground truth."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from qctfea.imaging.calibration import fit_line
from qctfea.errors import QctfeaError
from qctfea.provenance import read_json


def test_calibration_recovers_true_slope(demo_scan):
    cal = read_json(demo_scan["results"] / "calibration.json")
    true = demo_scan["truth"]["calibration"]
    assert cal["method"] == "phantom"
    assert len(cal["rods"]) == 5
    assert abs(cal["slope"] - true["slope"]) / true["slope"] < 0.02
    assert abs(cal["intercept"] - true["intercept"]) < 3.0
    assert cal["r2"] > 0.999


def test_trabecular_vbmd_matches_truth(demo_scan):
    bmd = read_json(demo_scan["results"] / "bmd.json")
    truth = demo_scan["truth"]["trabecular_vbmd_mg_cm3"]
    assert abs(bmd["trabecular_vbmd_mg_cm3"] - truth) < 5.0
    # Around the screw includes pedicle cortex: denser than trabecular bone.
    for side in ("left", "right"):
        assert bmd["around_screw_vbmd_mg_cm3"][side] > bmd["trabecular_vbmd_mg_cm3"]
    assert 0.3 < bmd["areal_bmd_g_cm2"] < 1.5


def test_fit_line_closed_form():
    hu = np.array([-5.0, 60.0, 130.0, 200.0])
    slope, intercept, r2 = fit_line(hu, 2.5 + 0.75 * hu)
    assert slope == pytest.approx(0.75, rel=1e-12)
    assert intercept == pytest.approx(2.5, rel=1e-12)
    assert r2 == pytest.approx(1.0)


def test_body_axis_and_volume(demo_scan):
    v = read_json(demo_scan["results"] / "vertebra.json")
    anat = demo_scan["truth"]["anatomy"]
    # Body height from the mask vs the generator's body height (voxel-centre extent).
    assert abs(v["height_mm"] - anat["body_height"]) < 2.5
    assert v["superior_axis"][2] > 0.99
    body_true = np.pi * anat["body_half_width"] * anat["body_half_depth"] * anat["body_height"]
    assert abs(v["body_volume_cm3"] * 1000 - body_true) / body_true < 0.1


def test_screws_inside_bone(demo_scan):
    s = read_json(demo_scan["results"] / "screws.json")
    lm = json.loads((demo_scan["src"] / "landmarks.json").read_text())
    for sc in s["screws"]:
        assert sc["breach"]["axis_outside_bone_mm"] < 1.0
        assert np.allclose(sc["entry_mm"], lm[sc["side"]]["entry_mm"])
        assert np.linalg.norm(np.subtract(sc["tip_mm"], sc["entry_mm"])) == pytest.approx(40.0)


def test_no_patient_identifiers_in_outputs(demo_scan):
    import pydicom

    ds = pydicom.dcmread(next((demo_scan["src"] / "dicom").iterdir()))
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber),
               str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)]
    for f in demo_scan["results"].iterdir():
        if f.suffix in (".json", ".png"):
            data = f.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"{s} leaked into {f.name}"
    img = sitk.ReadImage(str(demo_scan["results"] / "ct.nii.gz"))
    for k in img.GetMetaDataKeys():
        for s in secrets:
            assert s not in img.GetMetaData(k)


def test_wrong_label_names_context(demo_scan):
    from qctfea.steps import vertebra as steps_vertebra

    r = demo_scan["results"]
    with pytest.raises(QctfeaError, match=r"patient P01, timepoint M12.*label 28.*\[23\]"):
        steps_vertebra.mask(ct_path=r / "ct.nii.gz", labels_path=demo_scan["src"] / "labels.nii.gz",
                            out_parts=r / "x.nii.gz", out_json=r / "x.json", cfg={"label": 28},
                            context=demo_scan["context"])
    assert not (r / "x.nii.gz").exists() and not (r / "x.json").exists()


def test_metal_in_the_vertebra_refuses_the_scan(demo_scan, tmp_path):
    """A screw's worth of metal (3071 HU, a 12-bit scanner's ceiling) put into the demo
    vertebra's body refuses the mask step with the volume and the key to change; the scan as
    it is passes, its densest bone far below the threshold."""
    from qctfea.imaging import masks
    from qctfea.steps import vertebra as steps_vertebra

    r, ctx = demo_scan["results"], demo_scan["context"]
    labels = demo_scan["src"] / "labels.nii.gz"
    rec = read_json(r / "vertebra.json")["metal"]
    assert rec["voxels"] == 0 and rec["threshold_hu"] == 2800.0
    assert 300.0 < rec["max_hu"] < 2000.0  # the demo's cortex, not metal
    ct = sitk.ReadImage(str(r / "ct.nii.gz"))
    arr = sitk.GetArrayFromImage(ct)
    parts = sitk.GetArrayFromImage(sitk.ReadImage(str(r / "vertebra.nii.gz")))
    # a 3-voxel-wide rod through the body's middle, along its anterior-posterior extent
    z, y, x = (int(np.median(i)) for i in np.nonzero(parts == masks.TRABECULAR))
    rod = np.zeros(arr.shape, bool)
    ys = np.nonzero(np.isin(parts[z, :, x], [masks.BODY, masks.TRABECULAR]))[0]
    rod[z - 1:z + 2, ys.min():ys.max() + 1, x - 1:x + 2] = True
    arr[rod] = 3071
    metal = sitk.GetImageFromArray(arr)
    metal.CopyInformation(ct)
    sitk.WriteImage(metal, str(tmp_path / "ct.nii.gz"))
    expected_mm3 = float(rod.sum() * np.prod(ct.GetSpacing()))
    kw = dict(ct_path=tmp_path / "ct.nii.gz", labels_path=labels,
              out_parts=tmp_path / "vertebra.nii.gz", out_json=tmp_path / "vertebra.json",
              context=ctx)
    with pytest.raises(QctfeaError, match=rf"{ctx}: {expected_mm3:.0f} mm³ .* above 2800 HU "
                                          r"\(up to 3071 HU\): metal .*mask.metal_hu"):
        steps_vertebra.mask(cfg={}, **kw)
    steps_vertebra.mask(cfg={"metal_min_mm3": expected_mm3 + 1.0}, **kw)
    rec = read_json(tmp_path / "vertebra.json")["metal"]
    assert rec["volume_mm3"] == pytest.approx(expected_mm3, rel=1e-9)
    assert rec["max_hu"] == 3071.0
    steps_vertebra.mask(cfg={"metal_hu": None}, **kw)
    assert read_json(tmp_path / "vertebra.json")["metal"]["voxels"] == 0
