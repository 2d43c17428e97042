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


def test_areal_bmd_of_a_uniform_box_in_a_permuted_image():
    """Uniform box: aBMD = rho x AP depth, BMC = rho x volume, area = coronal face, by hand."""
    from qctfea.imaging.bmd import areal_bmd

    # The image's axes are permuted and flipped (x superior, y right, z anterior) and its
    # voxels anisotropic: the AP axis is image z (2 mm voxels), not image y.
    rho = 150.0
    density = np.full((20, 30, 40), 1000.0)  # z, y, x; bone outside the mask must not count
    box = np.zeros(density.shape, bool)
    box[2:14, 3:23, 5:25] = True  # 12 x 2.0 mm AP, 20 x 1.3 mm lateral, 20 x 0.7 mm superior
    density[box] = rho
    img = sitk.Image([40, 30, 20], sitk.sitkFloat32)
    img.SetSpacing((0.7, 1.3, 2.0))
    # row-major; its columns, the image x, y and z axes in LPS: superior, right, anterior
    img.SetDirection((0, -1, 0, 0, 0, -1, 1, 0, 0))
    img.SetOrigin((5.0, -20.0, 300.0))
    a = areal_bmd(density, img, box)
    depth_cm, area_cm2 = 2.4, 2.6 * 1.4
    assert a["projected_area_cm2"] == pytest.approx(area_cm2, rel=1e-12)
    assert a["bmc_g"] == pytest.approx(rho * depth_cm * area_cm2 / 1000.0, rel=1e-12)
    assert a["areal_bmd_g_cm2"] == pytest.approx(rho * depth_cm / 1000.0, rel=1e-12)  # 0.36


def test_around_screw_vbmd_closed_forms_on_an_oblique_grid():
    """Screw + shell cylinder: count pi R² L / voxel, (r / R)², a linear density's centre."""
    # The cylinder (radius R = 3.25 + 2 mm, 30 mm long) on an oblique, anisotropic grid, its
    # axis oblique to the grid too: its voxel count is pi R² L / voxel volume; a density of 1
    # within the screw's radius r and 0 beyond averages (r / R)² over it; a density linear in
    # position averages its value at the cylinder's centre (100 mg/cm³). Tolerances: partial
    # volume, whether a voxel whose centre is near the surface counts, is a coin toss over
    # about 2400 surface voxels (1200 for r): about 0.3 % (0.6 %) of the count, and moves the
    # centroid by about 0.03 mm (end caps); asserted within 5 sd.
    from scipy.spatial.transform import Rotation

    from qctfea.imaging.bmd import around_screw_vbmd
    from qctfea.model.screw import Screw, ScrewSpec

    spacing = np.array([0.6, 0.8, 0.7])
    grid = Rotation.from_rotvec(np.radians(20.0) * np.array([1.0, -2.0, 2.0]) / 3).as_matrix()
    axis = np.array([0.3, 0.8, -0.5]) / np.linalg.norm([0.3, 0.8, -0.5])
    screw = Screw("left", np.array([12.0, -30.0, 400.0]), axis,
                  ScrewSpec(diameter_mm=6.5, length_mm=30.0))
    centre = screw.entry_mm + 15.0 * axis
    size = np.ceil(48.0 / spacing).astype(int)  # 48 mm across: the cylinder and a margin
    origin = centre - grid @ (spacing * (size - 1) / 2) + 0.29  # not centred on a voxel
    img = sitk.Image(size.tolist(), sitk.sitkUInt8)
    img.SetOrigin(origin.tolist())
    img.SetSpacing(spacing.tolist())
    img.SetDirection(grid.ravel().tolist())
    # voxel centres (z, y, x, 3) by SimpleITK, not by the code's own index arithmetic
    pts = sitk.GetArrayFromImage(sitk.PhysicalPointSource(
        sitk.sitkVectorFloat64, size.tolist(), origin.tolist(), spacing.tolist(),
        grid.ravel().tolist()))
    vertebra = np.ones(pts.shape[:3], bool)
    radial = np.linalg.norm(np.cross(pts - screw.entry_mm, axis), axis=-1)
    r, big_r, length = 3.25, 5.25, 30.0
    gradient = np.array([3.0, -2.0, 5.0])  # mg/cm³ per mm
    linear = 100.0 + (pts - centre) @ gradient

    mean, n = around_screw_vbmd(linear, img, vertebra, screw, 2.0)
    assert n == pytest.approx(np.pi * big_r ** 2 * length / np.prod(spacing), rel=0.015)
    assert mean == pytest.approx(100.0, abs=0.15 * np.linalg.norm(gradient))
    inner, n_inner = around_screw_vbmd((radial <= r).astype(float), img, vertebra, screw, 2.0)
    assert n_inner == n
    assert inner == pytest.approx((r / big_r) ** 2, rel=0.03)  # 0.383


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
