"""Longitudinal registration (docs/registration.md): a known rigid motion is recovered, the QC gates
work, and the workflow's follow-up models use the baseline mesh."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

import pixels
from conftest import imaging_steps


def _moved(img, tx, interp):
    return sitk.Resample(img, img, tx, interp, 0, img.GetPixelID())


def _known_motion(ref):
    """Euler transform (about the image centre): 3, -2, 2.5 degrees; 2.5, -1.5, 1.0 mm."""
    centre = ref.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2 for s in ref.GetSize()])
    t = sitk.Euler3DTransform()
    t.SetCenter(centre)
    t.SetRotation(*np.deg2rad([3.0, -2.0, 2.5]))
    t.SetTranslation([2.5, -1.5, 1.0])
    return t


def _vertebra_errors(tx, T, dens, parts) -> list[float]:
    """Distances (mm) between ``tx`` and T^-1 (the registration that undoes T) at every 500th
    voxel of the vertebra."""
    pts = np.argwhere(sitk.GetArrayFromImage(parts) > 0)[::500][:, ::-1]
    err = []
    for idx in pts:
        p = dens.TransformIndexToPhysicalPoint([int(i) for i in idx])
        err.append(np.linalg.norm(np.subtract(tx.TransformPoint(p),
                                              T.GetInverse().TransformPoint(p))))
    return err


def test_known_rigid_motion_is_recovered(demo_scan):
    """The scan moved by a known rigid transform T (follow-up(q) = baseline(T q), made by
    resampling the baseline through T) is registered back: points mapped by the result agree
    with T within 0.3 mm over the vertebra, and the masks overlap (Dice > 0.95) after
    registration."""
    from qctfea.imaging import registration as reg

    r = demo_scan["results"]
    dens = sitk.ReadImage(str(r / "density.nii.gz"), sitk.sitkFloat32)
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    T = _known_motion(dens)
    moving = _moved(dens, T, sitk.sitkLinear)
    moving_mask = _moved(parts, T, sitk.sitkNearestNeighbor)
    tx, info = reg.register_rigid(dens, parts, moving, moving_mask, reg.RegistrationParams())
    # baseline(p) = follow-up(T^-1 p): the registration (baseline(p) = follow-up(tx p)) is T^-1.
    err = _vertebra_errors(tx, T, dens, parts)
    print("registration error over the vertebra: max", max(err), "mm; info", info)
    assert max(err) < 0.3
    assert info["dice_before"] < 0.85 < 0.95 < info["dice_after"]
    # The same images again give the same transform bit for bit (ITK's threads would add
    # their partial sums in another order: 1e-13 apart here, up to 3e-9 on other scans)
    for _ in range(2):
        again, _ = reg.register_rigid(dens, parts, moving, moving_mask,
                                      reg.RegistrationParams())
        assert again.GetParameters() == tx.GetParameters()


def test_dice_gates(demo_scan):
    from qctfea.imaging import registration as reg
    from qctfea.errors import QctfeaError

    p = reg.RegistrationParams()
    assert reg.check_dice({"dice_after": 0.97, "dice_before": 0.5}, p, "x") is None
    assert "Dice after registration 0.800" in reg.check_dice(
        {"dice_after": 0.8, "dice_before": 0.5}, p, "patient P01, timepoint M12")
    with pytest.raises(QctfeaError, match="patient P01, timepoint M12: registration to "
                                          "baseline failed: vertebra Dice 0.500"):
        reg.check_dice({"dice_after": 0.5, "dice_before": 0.4}, p, "patient P01, timepoint M12")


def test_register_step_writes_density_on_baseline_grid(demo_scan, tmp_path):
    from qctfea.steps import imaging as steps_imaging

    r = demo_scan["results"]
    dens = sitk.ReadImage(str(r / "density.nii.gz"), sitk.sitkFloat32)
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    T = _known_motion(dens)
    sitk.WriteImage(_moved(dens, T, sitk.sitkLinear), str(tmp_path / "d.nii.gz"))
    sitk.WriteImage(_moved(parts, T, sitk.sitkNearestNeighbor),
                    str(tmp_path / "p.nii.gz"))
    out = {k: tmp_path / f"out.{k}" for k in ("nii.gz", "json", "tfm", "png")}
    steps_imaging.register(fixed_density=r / "density.nii.gz", fixed_parts=r / "vertebra.nii.gz",
                           moving_density=tmp_path / "d.nii.gz", moving_parts=tmp_path / "p.nii.gz",
                           out_density=out["nii.gz"], out_json=out["json"], out_tfm=out["tfm"],
                           out_png=out["png"], cfg={}, context="patient P01, timepoint M24",
                           screws_path=r / "screws.json")
    back = sitk.ReadImage(str(out["nii.gz"]))
    assert back.GetSize() == dens.GetSize() and back.GetOrigin() == dens.GetOrigin()
    trab = sitk.GetArrayFromImage(parts) == 3
    a, b = sitk.GetArrayFromImage(dens)[trab], sitk.GetArrayFromImage(back)[trab]
    # Trabecular vBMD survives the round trip (two linear interpolations) within 1 mg/cm³.
    assert abs(a.mean() - b.mean()) < 1.0
    info = json.loads(out["json"].read_text())
    assert info["dice_after"] > 0.95 and info["warning"] is None
    # Accuracy at the points that matter: the screws' entry and tip.
    assert info["points"] == "screws" and len(info["points_mm"]) == 4
    assert info["converged"] and info["point_spread_mm"] < 0.2
    assert max(info["point_motion_mm"]) > 1.0  # the known motion moved them
    # The transform written maps points as T^-1 does (the registration that undoes T).
    assert max(_vertebra_errors(sitk.ReadTransform(str(out["tfm"])), T, dens, parts)) < 0.3
    # The picture, in both views: the follow-up's outline before registration (red) off the
    # baseline's by the known motion, after it (yellow) on the baseline's (lime, drawn
    # first and so hidden under it), and the screws' points (cyan).
    for view in pixels.registration_outlines(out["png"]):
        off = ndimage.distance_transform_edt(~view["yellow"])  # pixels from the yellow outline
        assert view["yellow"].sum() > 300 and view["red"].sum() > 300
        assert np.mean(off[view["red"]] > 3) > 0.3
        assert view["lime"].sum() < 0.05 * view["yellow"].sum()
        assert (off[view["lime"]] <= 2).all() and view["cyan"].any()


def test_registration_outside_the_gates_is_recorded_for_the_gate_rule(demo_scan, tmp_path):
    """Gates no registration passes (vertebra Dice at least 0.999): called as the CLI does, the
    step raises naming the scan and the Dice; as the workflow does (record_refusal), it
    writes every output with the refusal in registration.json, and the gate
    (accept_registration) then fails with that message; a registration within the gates
    passes the gate, which records its Dice."""
    from qctfea.steps import imaging as steps_imaging
    from qctfea.errors import QctfeaError

    r = demo_scan["results"]
    dens = sitk.ReadImage(str(r / "density.nii.gz"), sitk.sitkFloat32)
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    T = _known_motion(dens)
    sitk.WriteImage(_moved(dens, T, sitk.sitkLinear), str(tmp_path / "d.nii.gz"))
    sitk.WriteImage(_moved(parts, T, sitk.sitkNearestNeighbor), str(tmp_path / "p.nii.gz"))
    out = {k: tmp_path / f"out.{k}" for k in ("nii.gz", "json", "tfm", "png")}
    where = "patient P01, timepoint M24"
    args = dict(fixed_density=r / "density.nii.gz", fixed_parts=r / "vertebra.nii.gz",
                moving_density=tmp_path / "d.nii.gz", moving_parts=tmp_path / "p.nii.gz",
                out_density=out["nii.gz"], out_json=out["json"], out_tfm=out["tfm"],
                out_png=out["png"], context=where)
    strict = {"min_dice_fail": 0.999, "min_dice_warn": 0.9995}
    with pytest.raises(QctfeaError, match=f"{where}: registration to baseline failed: "
                                          r"vertebra Dice 0\.9\d\d < 0\.999"):
        steps_imaging.register(**args, cfg=strict)
    assert not out["json"].exists()
    steps_imaging.register(**args, cfg=strict, record_refusal=True)
    rec = json.loads(out["json"].read_text())
    assert rec["refused"].startswith(f"{where}: registration to baseline failed: vertebra Dice")
    assert 0.95 < rec["dice_after"] < 0.999
    assert out["nii.gz"].is_file() and out["png"].is_file() and out["tfm"].is_file()
    with pytest.raises(QctfeaError) as exc:
        steps_imaging.accept_registration(registration_json=out["json"],
                                          out_json=tmp_path / "ok.json", context=where)
    assert str(exc.value) == rec["refused"] and not (tmp_path / "ok.json").exists()
    steps_imaging.register(**args, cfg={}, record_refusal=True)
    rec = json.loads(out["json"].read_text())
    assert "refused" not in rec
    steps_imaging.accept_registration(registration_json=out["json"],
                                      out_json=tmp_path / "ok.json", context=where)
    assert json.loads((tmp_path / "ok.json").read_text())["dice_after"] == rec["dice_after"]


def test_a_registration_that_fails_outright_is_recorded_for_the_gate_rule(demo_scan, tmp_path,
                                                                          monkeypatch):
    """SimpleITK's own failure (here the one a follow-up without the vertebra in view gives,
    raised by the optimiser) is, as the workflow runs it, a refusal like a Dice below the gate:
    every output written (the follow-up density untransformed, an identity transform), the
    message in registration.json, and accept_registration fails with it."""
    from qctfea.steps import imaging as steps_imaging
    from qctfea.errors import QctfeaError
    from qctfea.imaging import registration as reg

    def fails(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageRegistrationMethod_Execute: "
                           "All samples map outside moving image buffer")

    monkeypatch.setattr(reg, "register_rigid", fails)
    r = demo_scan["results"]
    out = {k: tmp_path / f"out.{k}" for k in ("nii.gz", "json", "tfm", "png")}
    where = "patient P01, timepoint M24"
    args = dict(fixed_density=r / "density.nii.gz", fixed_parts=r / "vertebra.nii.gz",
                moving_density=r / "density.nii.gz", moving_parts=r / "vertebra.nii.gz",
                out_density=out["nii.gz"], out_json=out["json"], out_tfm=out["tfm"],
                out_png=out["png"], context=where, cfg={})
    with pytest.raises(QctfeaError, match="registration to baseline failed .*All samples map "
                                          "outside moving image buffer.*exclude the scan"):
        steps_imaging.register(**args)
    assert not out["json"].exists()
    steps_imaging.register(**args, record_refusal=True)
    rec = json.loads(out["json"].read_text())
    assert "All samples map outside moving image buffer" in rec["refused"]
    assert rec["refused"].startswith(f"{where}: registration to baseline failed")
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(out["nii.gz"])))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(r / "density.nii.gz")))
    np.testing.assert_allclose(a, b, atol=1e-3)  # identity: the density as it was
    pixels.assert_registration_at_identity(out["png"])
    with pytest.raises(QctfeaError) as exc:
        steps_imaging.accept_registration(registration_json=out["json"],
                                          out_json=tmp_path / "ok.json", context=where)
    assert str(exc.value) == rec["refused"]


def test_follow_up_registered_to_generator_truth(demo_scan, tmp_path):
    """Two visits of one synthetic patient (the generator moves the patient between them):
    the registration maps baseline points onto the same anatomical points of the follow-up
    as the generator's true poses do, within 0.5 mm over the vertebra and 0.5 degrees."""
    from qctfea.imaging import registration as reg
    from qctfea.demo.synth import CENTRE, rotation_matrix, generate_scan

    src = tmp_path / "P01" / "M00"
    truth0 = generate_scan(src, "P01", "M00", 0.0, seed=7)
    r0 = tmp_path / "results"
    imaging_steps(src, r0, "patient P01, timepoint M00")
    r1, truth1 = demo_scan["results"], demo_scan["truth"]
    fixed = sitk.ReadImage(str(r0 / "density.nii.gz"), sitk.sitkFloat32)
    fixed_mask = sitk.ReadImage(str(r0 / "vertebra.nii.gz"))
    tx, info = reg.register_rigid(fixed, fixed_mask,
                                  sitk.ReadImage(str(r1 / "density.nii.gz"), sitk.sitkFloat32),
                                  sitk.ReadImage(str(r1 / "vertebra.nii.gz")),
                                  reg.RegistrationParams())

    def pose(t):  # anatomical point a -> scanner point centre + R a
        p = t["pose"]
        return (rotation_matrix(np.asarray(p["rotation_deg"])),
                CENTRE + np.asarray(p["translation_mm"]))

    (R0, c0), (R1, c1) = pose(truth0), pose(truth1)
    pts = np.argwhere(sitk.GetArrayFromImage(fixed_mask) > 0)[::400][:, ::-1]
    err = []
    for idx in pts:
        w0 = np.array(fixed.TransformIndexToPhysicalPoint([int(i) for i in idx]))
        w1 = c1 + R1 @ (R0.T @ (w0 - c0))
        err.append(np.linalg.norm(np.subtract(tx.TransformPoint(tuple(w0)), w1)))
    # Rotation error: the angle of (registered rotation)^T (true rotation R1 R0^T).
    Rt = R1 @ R0.T
    Rr = np.asarray(reg.as_euler(tx).GetMatrix()).reshape(3, 3)
    angle = np.degrees(np.arccos(np.clip((np.trace(Rr.T @ Rt) - 1) / 2, -1, 1)))
    print("error against the generator's poses: max", max(err), "mm, mean", np.mean(err),
          "mm, rotation", angle, "deg;", info)
    assert max(err) < 0.5 and angle < 0.5
    assert info["dice_after"] > info["dice_before"]


def _vertebral_body(p: np.ndarray) -> np.ndarray:
    """Density (mg/cm³) of an analytic body at points ``p`` (..., 3) mm: a cylinder of radius
    15 mm and height 24 mm, a 1 mm cortical wall and 1.5 mm endplates of 700, inside them
    trabecular bone of 150 varying by ±30 across and ±20 along the axis."""
    x, z = p[..., 0], p[..., 2]
    r = np.hypot(x, p[..., 1])
    shell = np.where((r < 15) & (np.abs(z) < 12), 700.0, 0.0)
    return np.where((r < 14) & (np.abs(z) < 10.5),
                    150 + 30 * np.sin(x / 4) + 20 * np.cos(z / 3), shell)


def _render(origin, size, motion=None, spacing=(0.7, 0.7, 2.5), sub=(3, 3, 7)) -> sitk.Image:
    """The body rendered on a grid as a CT's voxels record it: each voxel the mean over
    ``sub`` points spread through its volume (partial volume); ``motion`` (matrix, centre,
    translation) moves the body first (a follow-up: the body seen at M p)."""
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    idx = np.stack([i, j, k], -1).reshape(-1, 3).astype(float)
    offsets = np.stack(np.meshgrid(*[(np.arange(s) + 0.5) / s - 0.5 for s in sub],
                                   indexing="ij"), -1).reshape(-1, 3)
    acc = np.zeros(len(idx))
    for o in offsets:
        pts = np.array(origin) + (idx + o) * np.array(spacing)
        if motion is not None:
            m, c, t = motion
            pts = (pts - c - t) @ m + c  # the body's own point seen here: M^-1 p
        acc += _vertebral_body(pts)
    out = sitk.GetImageFromArray((acc / len(offsets)).reshape(size[::-1]).astype(np.float32))
    out.CopyInformation(img)
    return out


def test_a_moved_follow_up_on_the_baseline_grid_keeps_its_trabecular_density():
    """The follow-up's density goes onto the baseline grid (registration.resample_density)
    and is measured in the baseline's regions. An analytic vertebral body on 0.7 x 0.7 x
    2.5 mm voxels, the trabecular region 1.5 mm from the endplates (about half a slice), the
    follow-up the same body moved by a known motion (6.9 degrees, 1.9 mm) and rendered on
    its own grid: on the baseline grid, through the known motion, its trabecular mean is
    within 1 % of the baseline's own (linear interpolation: several per cent higher, the
    endplates mixed in).

    Measuring on the follow-up's own voxels instead (the region carried onto them as each
    voxel's fraction inside it, the densities never interpolated) reads higher still: a
    2.5 mm voxel on the region's edge holds endplate as well (docs/registration.md)."""
    from qctfea.imaging.registration import euler, resample_density

    rot = sitk.Euler3DTransform()
    rot.SetRotation(*np.radians([6.0, -3.0, 1.8]))
    m, c, t = np.array(rot.GetMatrix()).reshape(3, 3), np.zeros(3), np.array([1.3, -0.8, 1.1])
    to_followup = euler(c, m, t)  # baseline points to follow-up points, as registration's
    base = _render((-20.0, -20.0, -16.0), (58, 58, 14))
    follow = _render((-21.1, -19.6, -17.3), (62, 62, 15), motion=(m, c, t))
    arr = sitk.GetArrayFromImage(base)
    k, j, i = np.indices(arr.shape)
    pts = np.array(base.GetOrigin()) + np.stack([i, j, k], -1) * np.array(base.GetSpacing())
    roi = (np.hypot(pts[..., 0], pts[..., 1]) < 12) & (np.abs(pts[..., 2]) < 9)
    own = float(arr[roi].mean())
    assert 140 < own < 160  # the trabecular bone's, no cortex in the region
    on_grid = float(sitk.GetArrayFromImage(resample_density(follow, base, to_followup))[roi]
                    .mean())
    linear = float(sitk.GetArrayFromImage(sitk.Resample(follow, base, to_followup,
                                                        sitk.sitkLinear, 0.0))[roi].mean())
    mask = sitk.GetImageFromArray(roi.astype(np.float32))
    mask.CopyInformation(base)
    weight = sitk.GetArrayFromImage(sitk.Resample(mask, follow, to_followup.GetInverse(),
                                                  sitk.sitkLinear, 0.0))
    own_voxels = float((sitk.GetArrayFromImage(follow) * weight).sum() / weight.sum())
    print(f"trabecular mean: baseline {own:.2f}; follow-up on the baseline grid "
          f"{on_grid:.2f} ({on_grid / own - 1:+.2%}), linear {linear / own - 1:+.2%}, on "
          f"its own voxels {own_voxels / own - 1:+.2%}")
    assert abs(on_grid / own - 1) < 0.01
    assert linear / own - 1 > 0.02
    assert own_voxels / own - 1 > 0.02
