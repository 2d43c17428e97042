"""Phantomless calibration: the effective-energy model (Michalski 2020) against independent
numbers (xraydb element by element, the demo generator's truth, the phantom calibration of
the same scan), the tissue regression on synthetic volumes, and both on the real scans
(../shared/data/real: these tests fail, not skip, when the data are missing)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import pixels
from qctfea.imaging import attenuation
from qctfea import steps
from qctfea.steps import imaging as steps_imaging
from qctfea.imaging.calibration import REFERENCE_MG_CM3, TissueSpec
from qctfea.imaging.phantomless import find_tissues, phantomless_calibration
from qctfea.errors import QctfeaError
from qctfea.provenance import read_json

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
REAL = SHARED / "verse_tptbox_L3"
TOTALSEG = SHARED / "totalseg_L1"
REGRESSION = TissueSpec(model="tissue_regression")
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
    cal = phantomless_calibration(hu, SPACING, labels, REGRESSION, CTX, 22, masks)
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
    cal = phantomless_calibration(hu, SPACING, labels, REGRESSION, CTX, 22)
    state = {t["name"]: t["found"] for t in cal.tissues}
    assert state == {"air": False, "fat": True, "muscle": True, "blood": False}
    assert cal.slope == pytest.approx(A, rel=0.01)
    assert abs(cal.intercept - B) <= 1.0


def test_one_tissue_is_refused_naming_context_and_missing():
    hu, labels = _volume(air=False, muscle=False)
    with pytest.raises(QctfeaError) as err:
        phantomless_calibration(hu, SPACING, labels, REGRESSION, CTX, 22)
    msg = str(err.value)
    for part in (CTX, "at least 2 reference tissues", "missing: air, muscle, blood", "fat (",
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
    with pytest.raises(QctfeaError, match="effective_energy"):
        steps.params_from(TissueSpec, {"model": "michalski"}, "calibration.phantomless")
    with pytest.raises(QctfeaError, match="energy_range_kev"):
        steps.params_from(TissueSpec, {"energy_range_kev": [150, 40]}, "calibration.phantomless")
    spec = steps.params_from(TissueSpec, {"reference_mg_cm3": {"fat": -90}},
                             "calibration.phantomless")
    assert spec.reference_mg_cm3["fat"] == -90.0 and spec.reference_mg_cm3["muscle"] == 39.0
    assert REFERENCE_MG_CM3 == {"air": -780.0, "fat": -78.0, "muscle": 39.0, "blood": 31.2,
                                "cortical_bone": 1170.0}


def test_phantom_scan_records_tissues(demo_scan):
    """A phantom calibration also records the tissues with their calibrated density; the
    generator renders fat and muscle at their theoretical HU at the scan's energy."""
    cal = read_json(demo_scan["results"] / "calibration.json")
    assert cal["method"] == "phantom"
    t = {x["name"]: x for x in cal["tissues"] if x["found"]}
    true = demo_scan["truth"]["tissue_hu"]
    assert abs(t["fat"]["median_hu"] - true["fat"]) < 1.5
    assert abs(t["muscle"]["median_hu"] - true["muscle"]) < 1.5
    for x in t.values():
        assert x["calibrated_mg_cm3"] == pytest.approx(
            cal["intercept"] + cal["slope"] * x["median_hu"])


# --- effective-energy model -------------------------------------------------------------


def test_hu_model_against_xraydb_element_by_element():
    """Water 0 HU and air -1000 HU by construction; K2HPO4 HU per mg/cm³ and ICRU-44 muscle
    HU at 70 keV by hand from xraydb's elemental coefficients and the mixture rule
    (mu/rho = sum of mass fraction x elemental mu/rho), not through material_mu's parser."""
    import xraydb

    E = 70.0
    assert attenuation.theoretical_hu("water", E) == pytest.approx(0.0, abs=1e-9)
    assert attenuation.theoretical_hu("air", E) == pytest.approx(-1000.0, abs=1e-9)

    def mu_rho(fractions):
        return sum(w * float(xraydb.mu_elam(el, E * 1000.0)) for el, w in fractions.items())

    def fractions(atoms):
        m = {el: n * xraydb.atomic_mass(el) for el, n in atoms.items()}
        return {el: v / sum(m.values()) for el, v in m.items()}

    water = mu_rho(fractions({"H": 2, "O": 1}))
    k2hpo4 = mu_rho(fractions({"K": 2, "H": 1, "P": 1, "O": 4}))
    air = mu_rho(fractions({"N": 1.5616, "O": 0.419, "Ar": 9.34e-3, "C": 4.1e-4})) * 1.225e-3
    assert water == pytest.approx(0.193, abs=0.002)  # NIST XCOM water at 70 keV: 0.1929 cm²/g
    d = 0.2174
    k_hand = (k2hpo4 - d * water) / (water - air)
    assert attenuation.k2hpo4_hu_per_mg(E) == pytest.approx(k_hand, rel=2e-3)
    assert 1 / k_hand == pytest.approx(0.742, abs=0.01)  # mg/cm³ per HU at 70 keV
    muscle = mu_rho(attenuation.TISSUES["muscle"][0]) * 1.05
    assert attenuation.theoretical_hu("muscle", E) == pytest.approx(
        1000 * (muscle - water) / (water - air), abs=0.5)


def _tissue_volume(energy: float, blood_hu: float | None, seed: int = 0):
    """The synthetic volume of the tests above with every tissue at its theoretical HU at
    ``energy`` and, when ``blood_hu`` is given, a labelled vessel (label 7) of that HU."""
    shape = (40, 64, 64)
    th = {t: float(attenuation.theoretical_hu(t, energy)) for t in ("air", "fat", "muscle")}
    hu = np.full(shape, th["fat"], np.float32)
    border = np.ones(shape, bool)
    border[:, 8:-8, 8:-8] = False
    hu[border] = th["air"]
    hu[:, 16:-16, 16:-16] = th["muscle"]
    zz, yy, xx = np.indices(shape)
    bone = (yy - 32) ** 2 + (xx - 32) ** 2 <= 6**2
    hu[bone] = 250.0
    labels = np.where(bone, 22, 0).astype(np.uint8)
    if blood_hu is not None:
        vessel = (yy - 24) ** 2 + (xx - 42) ** 2 <= 4**2
        hu[vessel] = blood_hu
        labels[vessel] = 7
    hu += np.random.default_rng(seed).normal(0.0, 10.0, shape).astype(np.float32)
    return hu, labels


@pytest.mark.parametrize("energy", [55.0, 70.0, 95.0])
def test_effective_energy_recovered_and_contrast_blood_left_out(energy):
    hu, labels = _tissue_volume(energy, blood_hu=400.0)
    spec = TissueSpec(blood_label=7)
    cal = phantomless_calibration(hu, SPACING, labels, spec, CTX, 22)
    ee = cal.effective_energy
    assert abs(ee["energy_kev"] - energy) <= 1.0
    blood = next(t for t in cal.tissues if t["name"] == "blood")
    assert blood["found"] and not blood["used"]
    assert blood["note"].startswith("contrast-enhanced, left out")
    assert cal.slope == pytest.approx(1 / attenuation.k2hpo4_hu_per_mg(energy), rel=0.03)
    assert abs(cal.intercept) < 2.0
    # Unenhanced blood (its theoretical HU) is fitted.
    hu, labels = _tissue_volume(energy, blood_hu=float(attenuation.theoretical_hu("blood", energy)))
    cal = phantomless_calibration(hu, SPACING, labels, spec, CTX, 22)
    blood = next(t for t in cal.tissues if t["name"] == "blood")
    assert blood["used"] and abs(blood["residual_hu"]) < 1.0
    assert cal.effective_energy["fit"]["n_tissues"] == 4


def test_demo_scan_effective_energy_and_vbmd_against_truth_and_phantom(demo_scan, tmp_path):
    """On a demo scan the effective-energy calibration recovers the generator's energy within
    3 keV, and its trabecular vBMD is within 3 mg/cm³ of the phantom calibration's."""
    r, src, truth = demo_scan["results"], demo_scan["src"], demo_scan["truth"]
    steps_imaging.calibrate(ct_path=r / "ct.nii.gz", labels_path=src / "labels.nii.gz",
                            out_density=tmp_path / "density.nii.gz",
                            out_json=tmp_path / "calibration.json",
                            out_png=tmp_path / "calibration.png", cfg={"method": "phantomless"},
                            context=demo_scan["context"], label=23)
    pl = read_json(tmp_path / "calibration.json")
    ph = read_json(r / "calibration.json")
    e_true = truth["effective_energy_kev"]
    assert 60.0 <= e_true <= 80.0
    assert abs(pl["effective_energy"]["energy_kev"] - e_true) <= 3.0
    assert {t["name"] for t in pl["tissues"] if t["used"]} == {"air", "fat", "muscle"}
    for t in pl["tissues"]:
        if t["used"]:
            assert abs(t["residual_hu"]) < 1.0 and "theoretical_hu" in t
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(r / "ct.nii.gz")))
    roi = sitk.GetArrayFromImage(sitk.ReadImage(str(r / "vertebra.nii.gz"))) == 3
    mean_hu = float(hu[roi].mean())
    v_pl = pl["intercept"] + pl["slope"] * mean_hu
    v_ph = ph["intercept"] + ph["slope"] * mean_hu
    print(f"demo P01 M12: E {pl['effective_energy']['energy_kev']:g} keV (truth {e_true:.2f}), "
          f"slope {pl['slope']:.4f} (phantom {ph['slope']:.4f}, truth "
          f"{truth['calibration']['slope']:.4f}); trabecular vBMD {v_pl:.2f} vs phantom "
          f"{v_ph:.2f} mg/cm³ (difference {v_pl - v_ph:+.2f})")
    assert abs(v_pl - v_ph) <= 3.0
    # The picture: in the line panel the three tissues' markers spaced along the HU axis as
    # their median HU and on one straight line (the fit has no residual); the effective
    # energy's line in the energy panel; each tissue's voxels in the slice panel.
    line, energy, voxels = pixels.calibration_panels(tmp_path / "calibration.png", effective=True)
    hu = {t["name"]: t["median_hu"] for t in pl["tissues"] if t["used"]}
    (xa, ya), (xf, yf), (xm, ym) = (line[t] for t in ("air", "fat", "muscle"))
    assert (xf - xa) / (xm - xa) == pytest.approx(
        (hu["fat"] - hu["air"]) / (hu["muscle"] - hu["air"]), abs=0.02)
    assert abs(ya + (ym - ya) * (xf - xa) / (xm - xa) - yf) < 2.0
    assert energy and voxels == {"air", "fat", "muscle"}


def _real(name: Path) -> Path:
    assert name.is_dir(), (f"real sample {name} is missing: the real-scan calibration tests "
                           "need ../shared/data/real (see its README)")
    return name


def test_real_sample_l3(tmp_path):
    """VerSe L3 (tight crop, no air): both models; fat and muscle only."""
    real = _real(REAL)
    ctx = "patient verse, timepoint L3"
    out = {}
    for model in ("effective_energy", "tissue_regression"):
        d = tmp_path / model
        d.mkdir()
        steps_imaging.calibrate(ct_path=real / "ct.nii.gz", labels_path=real / "vertebrae.nii.gz",
                                out_density=d / "density.nii.gz", out_json=d / "calibration.json",
                                out_png=d / "calibration.png",
                                cfg={"method": "phantomless", "phantomless": {"model": model}},
                                context=ctx, label=22)
        cal = read_json(d / "calibration.json")
        assert cal["method"] == "phantomless"
        assert {t["name"] for t in cal["tissues"] if t["used"]} == {"fat", "muscle"}
        # the picture: fat's and muscle's markers (no air's), fat's the lower HU and
        # density; the energy panel only for the effective-energy model; both in the slice
        line, energy, voxels = pixels.calibration_panels(
            d / "calibration.png", effective=model == "effective_energy")
        assert set(line) == voxels == {"fat", "muscle"}
        assert line["fat"][0] < line["muscle"][0] and line["fat"][1] > line["muscle"][1]
        assert energy == (model == "effective_energy")
        dens = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "density.nii.gz")))
        lab_img = sitk.ReadImage(str(real / "vertebrae.nii.gz"))
        l3 = sitk.GetArrayFromImage(lab_img) == 22
        roi = ndimage.distance_transform_edt(l3, sampling=lab_img.GetSpacing()[::-1]) > 3.0
        out[model] = (cal, float(np.median(dens[roi])))
    ee, med_ee = out["effective_energy"]
    tr, med_tr = out["tissue_regression"]
    print(f"real L3: effective energy {ee['effective_energy']['energy_kev']:g} keV, slope "
          f"{ee['slope']:.4f}, intercept {ee['intercept']:.2f} (L3 median {med_ee:.1f} mg/cm³);"
          f" tissue regression slope {tr['slope']:.4f}, intercept {tr['intercept']:.2f} "
          f"(L3 median {med_tr:.1f} mg/cm³)")
    assert ee["effective_energy"]["fit"]["n_tissues"] == 2
    # a 120 kVp effective energy (ICRP adipose: real fat at -101 HU; with ICRU-44 adipose
    # this scan came out at 54.5 keV and slope 0.51), and a slope near the tissue regression's
    assert 60.0 <= ee["effective_energy"]["energy_kev"] <= 80.0
    assert 0.7 <= tr["slope"] <= 0.95 and abs(ee["slope"] / tr["slope"] - 1) < 0.1
    # two tissues, no residual: the line's uncertainty from the tissue scatter (8 HU), normal;
    # tissue regression: var(slope) = (slope 8)² / Σ(x - x̄)² (docs/uncertainty.md)
    x = np.array([t["median_hu"] for t in tr["tissues"] if t["used"]])
    for cal in (ee, tr):
        assert cal["dof"] is None and "tissue_sd_hu" in cal["uncertainty_note"]
    assert np.sqrt(tr["covariance"][1][1]) == pytest.approx(
        tr["slope"] * 8.0 / np.sqrt(((x - x.mean()) ** 2).sum()), rel=1e-9)
    assert 0.05 < np.sqrt(ee["covariance"][1][1]) / ee["slope"] < 0.25  # 15 %: E from 2 tissues
    assert 50 <= med_tr <= 300 and 30 <= med_ee <= 300


@pytest.mark.parametrize("given", [{"blood_label": 52}, {}], ids=["given", "by-convention"])
def test_real_sample_totalseg_l1_contrast_enhanced_aorta(tmp_path, given):
    """TotalSegmentator L1 with intravenous contrast: the aorta (v2 'total' label 52, about
    400 HU; the default blood label of mask.convention totalsegmentator when none is given)
    is recognised as contrast-enhanced and left out; air, fat and muscle fit."""
    real = _real(TOTALSEG)
    d = tmp_path
    steps_imaging.calibrate(ct_path=real / "ct.nii.gz", labels_path=real / "labels.nii.gz",
                            out_density=d / "density.nii.gz", out_json=d / "calibration.json",
                            out_png=d / "calibration.png",
                            cfg={"method": "phantomless", "phantomless": given},
                            context="patient totalseg, timepoint L1", label=31,
                            convention="totalsegmentator")
    cal = read_json(d / "calibration.json")
    t = {x["name"]: x for x in cal["tissues"]}
    assert t["blood"]["found"] and not t["blood"]["used"] and t["blood"]["median_hu"] > 300
    assert "contrast-enhanced, left out" in t["blood"]["note"]
    assert {n for n, x in t.items() if x["used"]} == {"air", "fat", "muscle"}
    ee = cal["effective_energy"]
    print(f"real TotalSegmentator L1: effective energy {ee['energy_kev']:g} keV, slope "
          f"{cal['slope']:.4f}, intercept {cal['intercept']:.2f}, fit a {ee['fit']['a']:.2f} "
          f"b {ee['fit']['b']:.4f} R² {ee['fit']['r2']:.6f}; aorta median "
          f"{t['blood']['median_hu']:.0f} HU")
    assert ee["fit"]["n_tissues"] == 3 and ee["fit"]["r2"] > 0.999
    assert 55.0 <= ee["energy_kev"] <= 80.0 and 0.55 <= cal["slope"] <= 0.85


def test_a_fixed_effective_energy_gives_the_line_of_that_energy():
    """A follow-up drawn at its baseline's energy: tissues whose HU are a + b HU_t(E) at
    E = 65 keV (a = 6, b = 1.01), muscle then lowered by 5 HU (as a soft kernel mixes the
    back muscles' fat in). Fitted to these tissues alone the energy moves off 65 keV and the
    slope with it; at the given 65 keV the slope is the closed form 1 / (b k(65)) within
    0.5 % and the energy these tissues alone give is recorded beside it."""
    from qctfea.imaging.phantomless import effective_energy_calibration

    E, a, b = 65.0, 6.0, 1.01
    hu = {t: a + b * float(attenuation.theoretical_hu(t, E)) for t in ("air", "fat", "muscle")}
    hu["muscle"] -= 5.0
    true_slope = 1.0 / (b * float(attenuation.k2hpo4_hu_per_mg(E)))

    def tissues():
        return [{"name": t, "found": True, "median_hu": v, "n_voxels": 1000}
                for t, v in hu.items()]

    spec = TissueSpec(tissues=["air", "fat", "muscle"])
    own = effective_energy_calibration(tissues(), spec, CTX)
    fixed = effective_energy_calibration(tissues(), spec, CTX,
                                         {"energy_kev": E, "from": "the baseline M00"})
    assert abs(own.effective_energy["energy_kev"] - E) >= 2.0
    assert abs(own.slope / true_slope - 1) > 0.03
    assert fixed.slope == pytest.approx(true_slope, rel=0.005)
    ee = fixed.effective_energy
    assert ee["energy_kev"] == E and ee["energy_from"] == "the baseline M00"
    assert ee["own_energy_kev"] == own.effective_energy["energy_kev"]
    assert own.effective_energy["energy_from"] == "this scan"


def test_the_baseline_s_energy_is_taken_only_for_the_same_beam(tmp_path):
    """steps.imaging.baseline_energy: the baseline's energy when both scans record the same
    tube voltage and manufacturer, or neither records them; the scan's own (None, with a
    warning naming both values) when one differs or only one file records it, and when the
    baseline's calibration was refused."""
    import json

    from qctfea.steps.imaging import baseline_energy

    (tmp_path / "M00").mkdir()
    cal = tmp_path / "M00" / "calibration.json"

    def energy(own: dict, base: dict, record=None):
        cal.write_text(json.dumps(record or {"effective_energy": {"energy_kev": 66.5}}))
        (tmp_path / "own.json").write_text(json.dumps({"scan": own}))
        (tmp_path / "base.json").write_text(json.dumps({"scan": base}))
        return baseline_energy({"calibration": cal, "scan": tmp_path / "base.json",
                                "own_scan": tmp_path / "own.json"}, CTX)

    siemens = {"kvp": 120.0, "manufacturer": "SIEMENS"}
    assert energy(siemens, siemens) == {"energy_kev": 66.5,
                                        "from": "the baseline M00 (120 kVp)"}
    assert energy({}, {})["from"] == "the baseline M00 (kVp recorded in neither file)"
    for own, needle in (({**siemens, "kvp": 100.0}, r"tube voltage \(kVp\) 100.0, the "
                                                     r"baseline's \(M00\) 120.0"),
                        ({**siemens, "manufacturer": "GE"}, "manufacturer GE, the baseline's"),
                        ({"manufacturer": "SIEMENS"}, r"tube voltage \(kVp\) None")):
        with pytest.warns(UserWarning, match=needle):
            assert energy(own, siemens) is None
    assert energy(siemens, siemens, {"refused": "no fat found", "effective_energy": None}) is None


def test_a_follow_up_takes_its_baseline_s_effective_energy(real_l1_ingested, tmp_path):
    """The real L1 as baseline and, as its follow-up, the same CT through a soft kernel
    (Gaussian blur of 1.2 mm: the back muscles read 47 instead of 52 HU). On its own energy
    the follow-up's slope moved by about 10 %; at the baseline's (energy_from: baseline) it
    is within 1 % of the baseline's. A follow-up taken at another tube voltage keeps its own
    energy, with a warning."""
    import json

    real = _real(TOTALSEG)
    ct = sitk.ReadImage(str(real_l1_ingested["root"] / "ct.nii.gz"))
    blurred = sitk.SmoothingRecursiveGaussian(ct, 1.2)
    sitk.WriteImage(blurred, str(tmp_path / "soft.nii.gz"))
    for name, kvp in (("scan_b.json", 120.0), ("scan_f.json", 120.0), ("scan_100.json", 100.0)):
        (tmp_path / name).write_text(json.dumps({"scan": {"kvp": kvp}}))
    cfg = {"method": "phantomless", "phantomless": {"tissues": ["air", "fat", "muscle"],
                                                    "energy_from": "baseline"}}

    def calibrate(ct_path, name, baseline=None, **extra):
        (tmp_path / name).mkdir()
        out = tmp_path / name / "calibration.json"
        steps_imaging.calibrate(ct_path=ct_path, labels_path=real / "labels.nii.gz",
                                out_density=tmp_path / name / "density.nii.gz", out_json=out,
                                out_png=tmp_path / name / "calibration.png",
                                cfg={**cfg, **extra}, context=f"patient R, timepoint {name}",
                                label=31, convention="totalsegmentator", baseline=baseline)
        return read_json(out)

    base = calibrate(real_l1_ingested["root"] / "ct.nii.gz", "M00")
    link = {"calibration": tmp_path / "M00" / "calibration.json",
            "scan": tmp_path / "scan_b.json", "own_scan": tmp_path / "scan_f.json"}
    follow = calibrate(tmp_path / "soft.nii.gz", "M12", link)
    # the same follow-up taken at another voltage: its own energy, as energy_from: scan
    with pytest.warns(UserWarning, match=r"tube voltage \(kVp\) 100.0, the baseline's \(M00\) 120"):
        alone = calibrate(tmp_path / "soft.nii.gz", "M24",
                          {**link, "own_scan": tmp_path / "scan_100.json"})
    e0 = base["effective_energy"]["energy_kev"]
    print(f"real L1: baseline {e0:g} keV slope {base['slope']:.4f}; soft-kernel follow-up at "
          f"its own {alone['effective_energy']['energy_kev']:g} keV {alone['slope']:.4f}, at "
          f"the baseline's {follow['slope']:.4f}")
    assert alone["effective_energy"]["energy_from"] == "this scan"
    assert abs(alone["slope"] / base["slope"] - 1) > 0.05
    assert follow["slope"] == pytest.approx(base["slope"], rel=0.01)
    ee = follow["effective_energy"]
    assert ee["energy_kev"] == e0 and ee["energy_from"] == "the baseline M00 (120 kVp)"
    assert ee["own_energy_kev"] == alone["effective_energy"]["energy_kev"]


def test_a_scan_not_in_hounsfield_units_is_refused_saying_so(tmp_path):
    """The real L1 written as stored pixel values (HU + 1024, the rescale intercept not
    applied, as some converters write it): air reads +24, fat about +920; no tissue falls in
    its HU window, and the refusal says the values are not Hounsfield units."""
    real = _real(TOTALSEG)
    img = sitk.ReadImage(str(real / "ct.nii.gz"))
    raw = sitk.Cast(img, sitk.sitkFloat32) + 1024.0
    sitk.WriteImage(raw, str(tmp_path / "raw.nii.gz"))
    with pytest.raises(QctfeaError, match=r"The scan holds no air.*not Hounsfield units.*-1024"):
        steps_imaging.calibrate(ct_path=tmp_path / "raw.nii.gz", labels_path=real / "labels.nii.gz",
                                out_density=tmp_path / "d.nii.gz", out_json=tmp_path / "c.json",
                                out_png=tmp_path / "c.png", cfg={"method": "phantomless"},
                                context="T01 M00", label=31)
    # (the same scan in HU calibrates: test_real_sample_totalseg_l1_contrast_enhanced_aorta)


def test_paraspinal_muscle_leaves_organs_in_front_out_in_any_axis_order():
    """Muscle behind the vertebra (40 HU) and an organ of muscle-window HU in front of it
    (85 HU, as a contrast-enhanced liver): the paraspinal region samples the muscle only,
    the whole body both; the same volume stored with its y axis flipped (direction
    diag(1, -1, 1)) gives the same sample."""
    shape = (40, 80, 64)
    hu = np.full(shape, -100.0, np.float32)
    zz, yy, xx = np.indices(shape)
    bone = (yy - 40) ** 2 + (xx - 32) ** 2 <= 6**2
    hu[:, 48:70, 12:52] = 40.0   # back muscles (y posterior)
    hu[:, 10:32, 12:52] = 85.0   # organ in front
    hu[bone] = 250.0
    hu += np.random.default_rng(1).normal(0.0, 10.0, shape).astype(np.float32)
    labels = np.where(bone, 22, 0).astype(np.uint8)
    spec = TissueSpec(tissues=["fat", "muscle"])

    def muscle(h, lab, direction, region="paraspinal"):
        sp = TissueSpec(tissues=["fat", "muscle"], muscle_region=region)
        return {t["name"]: t for t in find_tissues(h, SPACING, lab, sp, CTX, 22,
                                                   direction=direction)}["muscle"]

    para = muscle(hu, labels, None)
    body = muscle(hu, labels, None, "body")
    assert para["region"] == "paraspinal" and abs(para["median_hu"] - 40.0) < 1.5
    assert body["region"] == "body" and body["median_hu"] > 55.0
    flipped = muscle(hu[:, ::-1, :].copy(), labels[:, ::-1, :].copy(),
                     (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    assert flipped["region"] == "paraspinal"
    assert flipped["n_voxels"] == para["n_voxels"]
    assert flipped["median_hu"] == pytest.approx(para["median_hu"], abs=1e-6)
    assert spec.muscle_region == "paraspinal"  # the default


def test_real_l1_muscle_sample_does_not_depend_on_what_else_is_labelled(tmp_path):
    """The real contrast-enhanced L1 calibrated with TotalSegmentator's full label map
    (its back muscles declared muscle by the convention) and with only its vertebra
    labelled (as a VerSe-style map gives it): the paraspinal muscle sample gives the same
    effective energy within 1 keV and slope within 3 % (measured 63.5 / 64.5 keV, 0.645 /
    0.660: the fat sample changes too, no longer kept off the organs). Sampled over the
    whole body, the vertebra-only map takes liver, kidneys and spleen for muscle (65 HU
    instead of 51) and its slope falls 15 %."""
    real = _real(TOTALSEG)
    lab_img = sitk.ReadImage(str(real / "labels.nii.gz"))
    only = sitk.GetImageFromArray((sitk.GetArrayFromImage(lab_img) == 31).astype(np.uint8) * 31)
    only.CopyInformation(lab_img)
    sitk.WriteImage(only, str(tmp_path / "l1_only.nii.gz"))
    runs = {}
    for name, labels, conv, region in (
            ("full", real / "labels.nii.gz", "totalsegmentator", "paraspinal"),
            ("vertebra only", tmp_path / "l1_only.nii.gz", "custom", "paraspinal"),
            ("vertebra only, body", tmp_path / "l1_only.nii.gz", "custom", "body")):
        d = tmp_path / name.replace(" ", "_").replace(",", "")
        d.mkdir()
        steps_imaging.calibrate(
            ct_path=real / "ct.nii.gz", labels_path=labels, out_density=d / "density.nii.gz",
            out_json=d / "calibration.json", out_png=d / "calibration.png",
            cfg={"method": "phantomless",
                 "phantomless": {"tissues": ["air", "fat", "muscle"], "muscle_region": region}},
            context=f"patient totalseg, timepoint L1 ({name})", label=31, convention=conv)
        cal = read_json(d / "calibration.json")
        runs[name] = (cal["effective_energy"]["energy_kev"], cal["slope"],
                      {t["name"]: t for t in cal["tissues"]}["muscle"])
        print(f"real L1, {name}: {runs[name][0]:g} keV, slope {runs[name][1]:.4f}, muscle "
              f"{runs[name][2]['median_hu']:.1f} HU ({runs[name][2]['region']}, "
              f"{runs[name][2]['n_voxels']} voxels)")
    (e_full, s_full, m_full), (e_only, s_only, m_only), (_, s_body, m_body) = runs.values()
    assert m_full["region"] == m_only["region"] == "paraspinal"
    assert abs(e_full - e_only) <= 1.0 and abs(s_only / s_full - 1) < 0.03
    assert m_body["region"] == "body" and m_body["median_hu"] > 60.0
    assert s_body / s_full - 1 < -0.10


@pytest.mark.parametrize("case, used, tolerance", [
    ("VerSe L3", {"fat", "muscle"}, 0.05),  # padding around the turned grid is not air
    ("TotalSegmentator L1", {"air", "fat", "muscle"}, 0.01)])
def test_real_scan_on_a_coarse_turned_grid_calibrates_as_at_its_own(case, used, tolerance,
                                                                    tmp_path):
    """A real scan resampled to 3 mm voxels on a grid turned 12 degrees about x (padding at
    -1024 HU where the grid reaches beyond the scan, partial volume at every tissue's edge)
    calibrates (tissue regression) with the same tissues and within ``tolerance`` of the
    slope at its own resolution. Before padding was left out of air and tissues had to lie a
    voxel deep, the L3's slope fell 9 % (389 voxels of padding taken as air)."""
    _real(REAL)
    _real(TOTALSEG)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import calibration_check as cc

    (tmp_path / "own").mkdir()
    (tmp_path / "coarse").mkdir()
    own = cc.calibrate(case, None, None, 0.0, "tissue_regression", tmp_path / "own")
    coarse = cc.calibrate(case, (3.0, 3.0, 3.0), "x", 12.0, "tissue_regression",
                          tmp_path / "coarse")
    for cal in (own, coarse):
        assert {t["name"] for t in cal["tissues"] if t["used"]} == used, cal["tissues"]
    assert coarse["slope"] == pytest.approx(own["slope"], rel=tolerance)
