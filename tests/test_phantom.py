"""Phantom calibration variants against closed forms: a K2HPO4-in-water phantom (QCT PRO
equations) and rods measured at centres given in the config; the phantom named by a preset
or its rods, never assumed (docs/calibration.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pixels
import pytest
import SimpleITK as sitk

from qctfea.imaging.calibration import k2hpo4_water_fit, phantom_calibration
from qctfea.imaging.phantoms import PhantomSpec
from qctfea.errors import QctfeaError

from phantom_scene import real_l1_on_a_phantom

# Representative K2HPO4 and water-equivalent densities of a five-rod K2HPO4-in-water phantom
# (the layout of a Mindways Model 3; a real phantom's values come from its certificate).
K2HPO4 = [375.8, 157.0, 58.9, -53.4, -51.8]
WATER = [923.2, 1119.5, 1103.6, 1057.1, 1012.2]
X_RODS = [22, 41, 60, 79, 98]


def _scan(rod_hu):
    """30 slices of 120 x 120 px (1 mm): a patient disc and, apart from it, a phantom block
    (-200 HU) with five 12 mm rods of the given HU."""
    hu = np.full((30, 120, 120), -1000.0)
    yy, xx = np.indices((120, 120))
    patient = (xx - 60) ** 2 + (yy - 40) ** 2 <= 25**2
    hu[:, patient] = 40.0
    hu[:, 85:116, 8:113] = -200.0
    for x, v in zip(X_RODS, rod_hu, strict=True):
        hu[:, (xx - x) ** 2 + (yy - 100) ** 2 <= 6**2] = v
    mask = np.zeros(hu.shape, bool)
    mask[:, patient] = True
    return hu, mask


def test_k2hpo4_in_water_phantom_recovers_the_qct_pro_line():
    sigma_ref, beta_ref = 1.55, -1010.0  # HU - water = sigma_ref K2HPO4 + beta_ref
    rod_hu = [w + sigma_ref * k + beta_ref for k, w in zip(K2HPO4, WATER, strict=True)]
    hu, mask = _scan(rod_hu)
    spec = PhantomSpec(rod_densities_mg_cm3=K2HPO4, water_equivalent_mg_cm3=WATER,
                       rod_diameter_mm=12.0)
    cal = phantom_calibration(hu, (1.0, 1.0, 1.0), mask, spec, "patient P, timepoint T")
    sigma_ct, beta_ct = sigma_ref - 0.2174, beta_ref + 999.6
    assert cal.slope == pytest.approx(1 / sigma_ct, rel=1e-9)
    assert cal.intercept == pytest.approx(-beta_ct / sigma_ct, rel=1e-9)
    assert cal.r2 == pytest.approx(1.0, abs=1e-12)
    assert cal.coefficients["sigma_ref"] == pytest.approx(sigma_ref, rel=1e-9)
    # Rods matched to the definition by expected HU, not by K2HPO4 alone (rods D and E).
    by_x = {round(r["center_px"][0]): r for r in cal.rods}
    for x, k, w in zip(X_RODS, K2HPO4, WATER, strict=True):
        assert (by_x[x]["density_mg_cm3"], by_x[x]["water_mg_cm3"]) == (k, w)
    # The QC picture draws the rods at the HU their K2HPO4 would have in the patient's
    # tissue: on the line (their measured HU are not: the water content differs).
    from qctfea.imaging.calibration_plot import _rod_hu

    x, _ = _rod_hu(cal)
    rho = np.array([r["density_mg_cm3"] for r in cal.rods])
    np.testing.assert_allclose(cal.intercept + cal.slope * x, rho, atol=1e-6)
    raw = np.array([r["mean_hu"] for r in cal.rods])
    assert np.abs(cal.intercept + cal.slope * raw - rho).max() > 10
    # A plain straight line through the same rods would be wrong: the water content differs.
    with pytest.warns(UserWarning, match="R² = 0.92"):
        plain = phantom_calibration(hu, (1.0, 1.0, 1.0), mask,
                                    PhantomSpec(rod_densities_mg_cm3=K2HPO4, rod_diameter_mm=12.0))
    assert plain.r2 < 0.95


def test_rods_measured_at_given_centres():
    a, b = 0.8, -5.0  # density = b + a HU
    dens = [0.0, 50.0, 100.0, 150.0, 200.0]
    hu, mask = _scan([(d - b) / a for d in dens])
    spec = PhantomSpec(rod_densities_mg_cm3=dens, rod_diameter_mm=12.0,
                       rod_centres_mm=[[x, 100.0] for x in X_RODS])
    cal = phantom_calibration(hu, (1.0, 1.0, 1.0), mask, spec, "ctx",
                              [(float(x), 100.0) for x in X_RODS])
    assert cal.slope == pytest.approx(a, rel=1e-9) and cal.intercept == pytest.approx(b, abs=1e-6)
    assert all(r["given"] for r in cal.rods)


def test_rod_centres_in_physical_coordinates_through_the_step(tmp_path):
    """steps_imaging.calibrate converts rod_centres_mm through the image geometry (origin,
    spacing)."""
    from qctfea.steps import imaging as steps_imaging

    a, b = 0.75, 3.0
    dens = [0.0, 50.0, 100.0, 150.0, 200.0]
    hu, mask = _scan([(d - b) / a for d in dens])
    img = sitk.GetImageFromArray(hu.astype(np.float32))
    img.SetSpacing((0.5, 0.5, 1.0))
    img.SetOrigin((-30.0, 12.0, 100.0))
    lab = sitk.GetImageFromArray(mask.astype(np.uint8) * 23)
    lab.CopyInformation(img)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "labels.nii.gz"))
    centres = [[-30.0 + 0.5 * x, 12.0 + 0.5 * 100] for x in X_RODS]
    cfg = {"method": "phantom", "phantom": {"rod_densities_mg_cm3": dens,
                                            "rod_diameter_mm": 6.0, "rod_centres_mm": centres}}
    steps_imaging.calibrate(ct_path=tmp_path / "ct.nii.gz", labels_path=tmp_path / "labels.nii.gz",
                            out_density=tmp_path / "d.nii.gz", out_json=tmp_path / "c.json",
                            out_png=tmp_path / "c.png", cfg=cfg, context="ctx", label=23)
    import json

    c = json.loads((tmp_path / "c.json").read_text())
    assert c["slope"] == pytest.approx(a, rel=1e-6) and c["intercept"] == pytest.approx(b, abs=1e-4)


def test_phantom_definition_lengths_are_checked():
    with pytest.raises(QctfeaError, match="water_equivalent_mg_cm3 has 2 entries"):
        PhantomSpec(rod_densities_mg_cm3=K2HPO4, water_equivalent_mg_cm3=[1000.0, 1000.0])
    with pytest.raises(QctfeaError, match=r"rod_centres_mm: give \[x, y\]"):
        PhantomSpec(rod_densities_mg_cm3=[0.0, 100.0], rod_centres_mm=[[1.0], [2.0]])
    with pytest.raises(QctfeaError, match="sigma_CT"):
        k2hpo4_water_fit([{"density_mg_cm3": k, "mean_hu": w - 1000 + 0.1 * k,
                           "water_mg_cm3": w} for k, w in zip(K2HPO4, WATER, strict=True)])


# --- phantom presets: the phantom is named, never assumed ---------------------------------


def test_presets_define_their_phantoms_and_config_keys_override_them():
    import yaml

    from qctfea.imaging.phantoms import PHANTOM_PRESETS
    from qctfea.demo.synth import SynthParams

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow" / "schemas"
                             / "cohort.schema.yaml").read_text())
    enum = schema["properties"]["calibration"]["properties"]["phantom"]["properties"][
        "preset"]["enum"]
    assert set(enum) - {None} == set(PHANTOM_PRESETS)
    for name, p in PHANTOM_PRESETS.items():
        assert p["source"] and p["material"]
        spec = PhantomSpec(preset=name, rod_diameter_mm=p["rod_diameter_mm"] or 20.0)
        assert spec.rod_densities_mg_cm3 == p["rod_densities_mg_cm3"]
    # Mindways Model 3 rods with their water equivalents (the QCT PRO path).
    mw = PhantomSpec(preset="mindways_model3", rod_diameter_mm=20.0)
    assert mw.water_equivalent_mg_cm3 == [1012.25, 1056.95, 1103.57, 1119.52, 923.20]
    # The demo preset is the generator's phantom.
    demo = PhantomSpec(preset="demo_k2hpo4")
    assert demo.rod_densities_mg_cm3 == list(SynthParams().rod_densities_mg_cm3)
    assert demo.rod_diameter_mm == SynthParams().rod_diameter_mm
    # A certificate's values override the preset's.
    cert = PhantomSpec(preset="mindways_model3", rod_diameter_mm=20.0,
                       rod_densities_mg_cm3=K2HPO4, water_equivalent_mg_cm3=WATER)
    assert cert.rod_densities_mg_cm3 == K2HPO4 and cert.water_equivalent_mg_cm3 == WATER
    # No published diameter: measured in the scan, unless the rods' centres are given (the
    # core measured there needs the diameter).
    assert PhantomSpec(preset="qrm_bdc_6").rod_diameter_mm is None
    with pytest.raises(QctfeaError, match="rod_centres_mm needs calibration.phantom.rod_diam"):
        PhantomSpec(preset="qrm_bdc_3", rod_centres_mm=[[0, 0], [10, 0], [20, 0]])
    with pytest.raises(QctfeaError, match="not a known phantom.*mindways_model3"):
        PhantomSpec(preset="mindways")


def test_no_phantom_named_is_refused_listing_the_presets(tmp_path):
    from qctfea.steps import imaging as steps_imaging

    from qctfea.imaging.phantoms import PHANTOM_PRESETS

    with pytest.raises(QctfeaError) as err:
        PhantomSpec().require_defined()
    assert "no phantom named" in str(err.value)
    assert all(name in str(err.value) for name in PHANTOM_PRESETS)
    hu, mask = _scan([0.0, 60.0, 120.0, 180.0, 240.0])
    img = sitk.GetImageFromArray(hu.astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    lab = sitk.GetImageFromArray(mask.astype(np.uint8) * 23)
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(tmp_path / "labels.nii.gz"))
    with pytest.raises(QctfeaError, match="no phantom named.*demo_k2hpo4"):
        steps_imaging.calibrate(ct_path=tmp_path / "ct.nii.gz",
                                labels_path=tmp_path / "labels.nii.gz",
                                out_density=tmp_path / "d.nii.gz", out_json=tmp_path / "c.json",
                                out_png=tmp_path / "c.png", cfg={"method": "phantom"},
                                context="ctx", label=23)
    assert not (tmp_path / "d.nii.gz").exists()


def test_dry_run_of_a_phantom_cohort_naming_no_phantom_is_refused(tmp_path):
    """`snakemake -n` of a cohort whose calibration is the default method (phantom) without a
    phantom: refused while the workflow is parsed, the message listing the presets."""
    import yaml

    from qctfea.imaging.phantoms import PHANTOM_PRESETS
    from test_workflow import _dry_run_error

    def edit(d):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg.pop("calibration", None)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))

    msg = _dry_run_error(tmp_path, edit)
    assert "config.yaml: calibration.phantom: no phantom named" in msg, msg[-3000:]
    assert "no phantom named" in msg and "Job stats" not in msg, msg[-3000:]
    assert all(name in msg for name in PHANTOM_PRESETS), msg[-3000:]


def test_hydroxyapatite_phantom_needs_its_own_ash_relation(tmp_path):
    """A QRM BDC (hydroxyapatite) phantom with the materials' default (K2HPO4) conversion to
    ash density is refused at the dry-run, naming the keys to give; with both given the
    dry-run passes. The phantom's material is recorded with the calibration."""
    import yaml

    from conftest import REPO, run, venv_bin
    from test_workflow import _cohort, _dry_run_error

    from qctfea.imaging.phantoms import require_ash_relation

    def edit(d, materials=None):
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["calibration"] = {"method": "phantom", "phantom": {"preset": "qrm_bdc_6"}}
        if materials:
            cfg["materials"] = materials
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))

    msg = _dry_run_error(tmp_path / "a", edit)
    assert ("calibration.phantom (preset qrm_bdc_6) gives hydroxyapatite-equivalent density"
            in msg), msg[-3000:]
    assert "give materials.ash_slope and materials.ash_intercept" in msg, msg[-3000:]
    cd = _cohort(tmp_path / "b", "ha", 2)
    edit(cd / "ha", {"ash_slope": 0.877, "ash_intercept": 0.079})
    p = run([venv_bin("snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(tmp_path / "b"), "--configfile",
             str(REPO / "config" / "config.yaml"), "--config", "cohort=ha",
             f"cohorts_dir={cd}"], cwd=REPO, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert PhantomSpec(preset="mindways_model3").equivalent == "k2hpo4"
    assert PhantomSpec(rod_densities_mg_cm3=[0, 100]).equivalent == "k2hpo4"
    require_ash_relation(PhantomSpec(preset="mindways_model3"), {})  # K2HPO4: the default


# --- finding the rods in a clinical CT: a phantom under a real patient (tests/phantom_scene.py)

@pytest.mark.parametrize("case", ["gel pad, all labels", "dark rod, tilted, vertebra only",
                                  "10 mm rods, diameter not given"])
def test_rods_of_a_phantom_joined_to_a_real_patient_are_found(real_scans, case):
    """A phantom that touches the patient (gel pad), the scan's table, contrast-enhanced
    kidneys and aorta: the rods are found where they are, matched to their densities, and
    the calibration line is the true one (slope within 0.5 %, intercept within 1 mg/cm³).
    The finder before 2026-12-05 (the phantom as an object separate from the patient) found
    no rod in this scan. Second case: a water-like phantom body (0 HU) in which rods A and
    B are darker than the body (-66 and -23 HU), min_contrast_hu 15, the row tilted 4
    degrees, and only the vertebra labelled (a VerSe-like map: the kidneys and aorta are
    not excluded by a label). Third: 10 mm rods and no rod_diameter_mm (the preset gives
    none): the diameter is measured from the rods found, within 0.5 mm."""
    tilted, measured = case.startswith("dark"), case.startswith("10 mm")
    rod_mm = 10.0 if measured else 14.0
    hu, spacing, labels, (slope, intercept), centres = real_l1_on_a_phantom(
        real_scans, body_hu=0.0 if tilted else -120.0, tilt_deg=4.0 if tilted else 0.0,
        rod_mm=rod_mm)
    anatomy = labels == 31 if tilted else labels != 0
    spec = PhantomSpec(preset="mindways_model3", rod_diameter_mm=None if measured else 14.0,
                       **({"min_contrast_hu": 15.0} if tilted else {}))
    cal = phantom_calibration(hu, spacing, anatomy, spec, "T01 M00")
    assert all(r["diameter_mm"] == pytest.approx(rod_mm, abs=0.5) for r in cal.rods)
    assert cal.slope == pytest.approx(slope, rel=0.005)
    assert cal.intercept == pytest.approx(intercept, abs=1.0)
    for rod in cal.rods:
        cx, cy = centres[rod["density_mg_cm3"]]
        assert np.hypot((rod["center_px"][0] - cx) * spacing[0],
                        (rod["center_px"][1] - cy) * spacing[1]) < 0.5


def test_a_phantom_with_a_rod_not_seen_is_refused_naming_what_to_give(real_scans):
    """Rod B as dense as the phantom body: four rods in the row, the definition has five:
    refused, the message naming the rods seen and rod_centres_mm."""
    hu, spacing, labels, _, _ = real_l1_on_a_phantom(real_scans, body_hu=-120.0,
                                                      rod_hu_override={-53.40: -120.0})
    with pytest.raises(QctfeaError, match=r"T01 M00: no calibration phantom found: no row "
                                          r"of 5 rods of 14 mm.*rod_centres_mm"):
        phantom_calibration(hu, spacing, labels != 0,
                            PhantomSpec(preset="mindways_model3", rod_diameter_mm=14.0),
                            "T01 M00")


def test_reference_tissues_of_a_phantom_scan_leave_the_phantom_out(real_scans):
    """A phantom body that reads like fat (-100 HU, polyethylene-like) joined to the patient
    by a gel pad is part of the patient's connected body: the tissue search of a phantom
    calibration (its reference tissues in calibration.json) leaves the band along the
    rods' row out, so no fat voxel lies in the phantom; without the band, thousands do."""
    from qctfea.imaging import phantomless, phantomrods
    from qctfea.imaging.calibration import TissueSpec

    hu, spacing, labels, _, _ = real_l1_on_a_phantom(real_scans, body_hu=-100.0)
    cal = phantom_calibration(hu, spacing, labels != 0,
                              PhantomSpec(preset="mindways_model3", rod_diameter_mm=14.0), "T")
    sx, sy = spacing[0], spacing[1]
    yy, xx = np.indices(hu.shape[1:])
    slab = (np.abs(xx * sx - 256 * sx) <= 130) & (np.abs(yy * sy - 432 * sy) <= 14)
    band = phantomrods.phantom_band(hu.shape[1:], cal.rods, spacing)
    assert band[slab].all()
    for exclude, expect_in_slab in ((None, True), (band, False)):
        masks = {}
        phantomless.find_tissues(hu, spacing, labels, TissueSpec(tissues=["air", "fat"]), "T", 31,
                                 masks, exclude_zyx=exclude)
        in_slab = int(masks["fat"][:, slab].sum())
        assert (in_slab > 1000) is expect_in_slab, in_slab


def test_a_phantom_shorter_than_the_scan_is_measured_where_it_is(real_scans):
    """The phantom on 30 of the scan's 45 slices (air beside the table on the others): its
    rods are measured on those 30 slices only, and the line is the true one."""
    hu, spacing, labels, (slope, intercept), _ = real_l1_on_a_phantom(
        real_scans, body_hu=-120.0, phantom_slices=slice(10, 40))
    cal = phantom_calibration(hu, spacing, labels != 0,
                              PhantomSpec(preset="mindways_model3", rod_diameter_mm=14.0), "T")
    assert [r["n_slices"] for r in cal.rods] == [30] * 5
    assert cal.slope == pytest.approx(slope, rel=0.005)
    assert cal.intercept == pytest.approx(intercept, abs=1.0)


def test_anatomy_in_a_row_is_not_taken_for_a_phantom(real_scans):
    """The real L1 has no phantom. Asked for a three-rod phantom of 20 mm rods with only the
    vertebra labelled, the z-averaged scan holds three disks of rod size and contrast in a
    row inside the patient (bowel and vessels); the finder without the along-z check
    calibrated on them (R² 1.000). Their core means vary along z by tens of HU, a rod's by
    its noise: refused, saying so."""
    from qctfea.imaging import ingest

    ct = ingest.canonical_orientation(sitk.ReadImage(str(real_scans / "totalseg_L1/ct.nii.gz")))
    lab = ingest.canonical_orientation(
        sitk.ReadImage(str(real_scans / "totalseg_L1/labels.nii.gz")))
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    spec = PhantomSpec(preset="qrm_bdc_3", rod_diameter_mm=20.0, min_contrast_hu=15.0)
    with pytest.raises(QctfeaError, match="no calibration phantom found.*not a rod along z"):
        phantom_calibration(hu, ct.GetSpacing(), sitk.GetArrayFromImage(lab) == 31, spec, "T")


def test_a_real_scan_on_a_phantom_calibrates_through_the_workflow(real_scans, tmp_path):
    """The real L1 lying on the phantom (gel pad, table, contrast), as a cohort names it
    (preset mindways_model3, no rod diameter, TotalSegmentator labels), through Snakemake's
    ingest and calibrate rules: the true line, the rods' diameter measured, the phantom's
    reference tissues recorded, the picture written."""
    import json

    import yaml

    from conftest import REPO, run, venv_bin
    from qctfea.imaging import ingest

    hu, _, _, (slope, intercept), _ = real_l1_on_a_phantom(real_scans, body_hu=-120.0)
    ref = ingest.canonical_orientation(sitk.ReadImage(str(real_scans / "totalseg_L1/ct.nii.gz")))
    img = sitk.GetImageFromArray(np.round(hu).astype(np.int16))  # HU stored as integers
    img.CopyInformation(ref)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    c = tmp_path / "cohorts" / "phantom-l1"
    c.mkdir(parents=True)
    (c / "config.yaml").write_text(yaml.safe_dump({
        "samples": "samples.tsv",
        "calibration": {"method": "phantom", "phantom": {"preset": "mindways_model3"}},
        "mask": {"convention": "totalsegmentator", "vertebra": "L1"},
        "planning": {"method": "auto"}}))
    (c / "samples.tsv").write_text(
        "patient\ttimepoint\tmonths\timage\tlabels\n"
        f"T01\tM00\t0\t{tmp_path / 'ct.nii.gz'}\t{real_scans / 'totalseg_L1/labels.nii.gz'}\n")
    out = tmp_path / "results" / "phantom-l1" / "T01" / "M00"
    p = run([venv_bin("snakemake"), "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"),
             "--config", "cohort=phantom-l1", f"cohorts_dir={tmp_path / 'cohorts'}",
             "--show-failed-logs", str((out / "calibration.json").relative_to(tmp_path))],
            cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["method"] == "phantom"
    assert cal["slope"] == pytest.approx(slope, rel=0.005)
    assert cal["intercept"] == pytest.approx(intercept, abs=1.0)
    assert [round(r["diameter_mm"]) for r in cal["rods"]] == [14] * 5
    assert {t["name"] for t in cal["tissues"] if t["found"]} >= {"air", "fat", "muscle"}
    # The picture, read back as pixels: fat's and muscle's markers (tissues checked on the
    # line, not fitted) in the line panel in the order of their median HU and density (fat
    # left of and below muscle; the rods share air's colour, so air is not read), and the
    # tissues' voxels in the slice panel.
    line, _, voxels = pixels.calibration_panels(out / "calibration.png", effective=False)
    hu = {t["name"]: t["median_hu"] for t in cal["tissues"] if t["found"]}
    assert hu["fat"] < hu["muscle"]
    (xf, yf), (xm, ym) = line["fat"], line["muscle"]
    assert xf < xm and yf > ym  # image rows grow downwards
    assert voxels >= {"fat", "muscle"}
