"""Phantomless (tissue-reference) calibration: synthetic volumes and the real L3 sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from qctfea import steps
from qctfea.calibration import (REFERENCE_MG_CM3, TissueSpec, find_tissues,
                                phantomless_calibration)
from qctfea.provenance import QctfeaError, read_json

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "verse_tptbox_L3"
SPACING = (1.5, 1.5, 1.5)
A, B = 0.75, -3.0  #: true calibration rho = B + A * HU (mg/cm³)
CTX = "patient PX, timepoint T0 (synthetic.nii.gz)"


def _hu(tissue: str) -> float:
    """HU of a tissue whose density is its default reference: HU = (rho - b) / a."""
    return (REFERENCE_MG_CM3[tissue] - B) / A


def _volume(air: bool = True, muscle: bool = True, seed: int = 0):
    """(z, y, x) HU volume: air border, a fat layer, a muscle block and a labelled bone
    cylinder (label 22, 250 HU), with white noise of 20 HU; and its label map."""
    shape = (40, 64, 64)
    hu = np.full(shape, _hu("fat"), np.float32)
    if air:
        border = np.ones(shape, bool)
        border[:, 8:-8, 8:-8] = False
        hu[border] = _hu("air")
    if muscle:
        hu[:, 16:-16, 16:-16] = _hu("muscle")
    zz, yy, xx = np.indices(shape)
    bone = (yy - 32) ** 2 + (xx - 32) ** 2 <= 6**2
    hu[bone] = 250.0
    hu += np.random.default_rng(seed).normal(0.0, 20.0, shape).astype(np.float32)
    labels = np.where(bone, 22, 0).astype(np.uint8)
    return hu, labels


def test_synthetic_recovers_known_line():
    hu, labels = _volume()
    masks: dict = {}
    cal = phantomless_calibration(hu, SPACING, labels, TissueSpec(), CTX, 22, masks)
    found = {t["name"]: t for t in cal.tissues if t["found"]}
    assert set(found) == {"air", "fat", "muscle"} and set(masks) == set(found)
    assert cal.method == "phantomless"
    assert cal.slope == pytest.approx(A, rel=0.01)
    assert abs(cal.intercept - B) <= 1.0
    assert cal.r2 > 0.999
    for t in found.values():
        assert t["n_voxels"] >= 50 and abs(t["median_hu"] - _hu(t["name"])) < 3
    # No tissue voxel lies near the labelled bone.
    near = ndimage.distance_transform_edt(labels == 0, sampling=SPACING) <= 3.0
    assert not any((m & near).any() for m in masks.values())


def test_without_air_fat_and_muscle_suffice():
    hu, labels = _volume(air=False)
    cal = phantomless_calibration(hu, SPACING, labels, TissueSpec(), CTX, 22)
    state = {t["name"]: t["found"] for t in cal.tissues}
    assert state == {"air": False, "fat": True, "muscle": True}
    assert cal.slope == pytest.approx(A, rel=0.01)
    assert abs(cal.intercept - B) <= 1.0


def test_one_tissue_is_refused_naming_context_and_missing():
    hu, labels = _volume(air=False, muscle=False)
    with pytest.raises(QctfeaError) as err:
        phantomless_calibration(hu, SPACING, labels, TissueSpec(), CTX, 22)
    msg = str(err.value)
    for part in (CTX, "at least 2 reference tissues", "missing: air, muscle", "fat (",
                 "calibration.phantomless.tissues", "calibration.method: fixed"):
        assert part in msg, (part, msg)


def test_blood_only_with_a_label_and_cortical_bone_on_request():
    hu, labels = _volume()
    spec = TissueSpec(tissues=["fat", "blood", "cortical_bone"])
    tissues = {t["name"]: t for t in find_tissues(hu, SPACING, labels, spec, CTX, 22)}
    assert not tissues["blood"]["found"] and not tissues["cortical_bone"]["found"]
    labels = labels.copy()
    labels[:, 20:28, 40:48] = 7  # a "vessel" inside the muscle block
    hu[:, 20:28, 40:48] = 40.0
    spec = TissueSpec(tissues=["fat", "blood"], blood_label=7, erosion_mm=0.0)
    blood = find_tissues(hu, SPACING, labels, spec, CTX, 22)[1]
    assert blood["found"] and blood["n_voxels"] == 40 * 64


def test_config_is_checked():
    with pytest.raises(QctfeaError, match="at least 2 different tissues"):
        steps.params_from(TissueSpec, {"tissues": ["fat", "bone"]}, "calibration.phantomless")
    with pytest.raises(QctfeaError, match="low < high"):
        steps.params_from(TissueSpec, {"fat_hu": [-30, -190]}, "calibration.phantomless")
    spec = steps.params_from(TissueSpec, {"reference_mg_cm3": {"fat": -90}},
                             "calibration.phantomless")
    assert spec.reference_mg_cm3["fat"] == -90.0 and spec.reference_mg_cm3["muscle"] == 39.0
    assert REFERENCE_MG_CM3 == {"air": -780.0, "fat": -78.0, "muscle": 39.0, "blood": 31.2,
                                "cortical_bone": 1170.0}


def test_phantom_scan_records_tissues(demo_scan):
    """A phantom calibration also records the tissues with their calibrated density."""
    cal = read_json(demo_scan["results"] / "calibration.json")
    assert cal["method"] == "phantom"
    t = {x["name"]: x for x in cal["tissues"] if x["found"]}
    assert abs(t["fat"]["median_hu"] + 95) < 5 and abs(t["muscle"]["median_hu"] - 45) < 5
    for x in t.values():
        assert x["calibrated_mg_cm3"] == pytest.approx(
            cal["intercept"] + cal["slope"] * x["median_hu"])


def test_real_sample_l3(tmp_path):
    if not REAL.is_dir():
        pytest.skip(f"real sample {REAL} absent")
    ctx = "patient verse, timepoint L3"
    out = tmp_path
    steps.calibrate(REAL / "ct.nii.gz", REAL / "vertebrae.nii.gz", out / "density.nii.gz",
                    out / "calibration.json", out / "calibration.png",
                    {"method": "phantomless"}, ctx, 22)
    cal = read_json(out / "calibration.json")
    assert cal["method"] == "phantomless"
    assert 0.5 <= cal["slope"] <= 1.2
    assert (out / "calibration.png").stat().st_size > 0
    dens = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "density.nii.gz")))
    lab_img = sitk.ReadImage(str(REAL / "vertebrae.nii.gz"))
    l3 = sitk.GetArrayFromImage(lab_img) == 22
    roi = ndimage.distance_transform_edt(l3, sampling=lab_img.GetSpacing()[::-1]) > 3.0
    median = float(np.median(dens[roi]))
    used = [t for t in cal["tissues"] if t["found"]]
    print(f"real L3: slope {cal['slope']:.4f}, intercept {cal['intercept']:.2f}, "
          f"R² {cal['r2']:.4f}, tissues "
          + ", ".join(f"{t['name']} {t['median_hu']:.0f} HU ({t['n_voxels']} vx)" for t in used)
          + f"; L3 median density {median:.1f} mg/cm³ ({int(roi.sum())} voxels)")
    assert {t["name"] for t in used} >= {"fat", "muscle"}
    assert 50 <= median <= 300
