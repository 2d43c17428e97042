"""A voxel-FE-benchmark style input: density already in mg/cm³, a label map with trabecular
bone, cortical bone and PMMA end caps (configurable ids), meshed with our tetrahedra; the
compression platens load the caps. Checked against springs in series."""
from __future__ import annotations

import json

import dolfinx_solver  # noqa: F401  (before dolfinx or petsc4py)
import numpy as np
import pytest
import SimpleITK as sitk

import pixels
from qctfea.steps import fea as steps_fea
from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.steps import model as steps_model
from qctfea.model.materials import MaterialParams, modulus_mpa
from qctfea.model.meshing import read_mesh
from qctfea.model.tags import BONE_TAGS, TAG_CAP

R, H, T = 10.0, 14.0, 3.0  # bone cylinder radius and height, cap thickness (mm)
RHO = 200.0  # mg/cm³ everywhere in the bone


def _specimen(tmp_path):
    """0.5 mm grid: trabecular core (label 1), cortical rim 1 mm (label 2), caps (label 3)."""
    h = 0.5
    n_xy, n_z = int(2 * (R + 3) / h), int((H + 2 * T + 4) / h)
    z, y, x = np.indices((n_z, n_xy, n_xy)) * h
    x, y, z = x - (R + 3), y - (R + 3), z - 2.0
    r = np.hypot(x, y)
    lab = np.zeros((n_z, n_xy, n_xy), np.uint8)
    inside = r <= R
    lab[inside & (z >= T) & (z < T + H)] = 1
    lab[(r > R - 1.0) & inside & (z >= T) & (z < T + H)] = 2
    lab[inside & (((z >= 0) & (z < T)) | ((z >= T + H) & (z < H + 2 * T)))] = 3
    dens = np.where(np.isin(lab, (1, 2)), RHO, 0.0).astype(np.float32)
    for arr, name in ((dens, "density_in.nii.gz"), (lab, "labels.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((h, h, h))
        img.SetOrigin((-(R + 3), -(R + 3), -2.0))
        sitk.WriteImage(img, str(tmp_path / name))


def _model(tmp_path, with_caps):
    """The specimen through the calibration, mask, mesh and materials steps."""
    _specimen(tmp_path)
    t, ctx = tmp_path, "patient B01, timepoint M00"
    mask_cfg = {"bone_labels": [1, 2], "body_opening_mm": 3.0}
    if with_caps:
        mask_cfg["cap_labels"] = [3]
    # Data already in mg/cm³: fixed calibration, slope 1, intercept 0.
    steps_imaging.calibrate(ct_path=t / "density_in.nii.gz", labels_path=None,
                            out_density=t / "density.nii.gz", out_json=t / "cal.json",
                            out_png=t / "cal.png", cfg={"method": "fixed", "slope": 1.0,
                                                        "intercept": 0.0},
                            context=ctx, label=1)
    steps_vertebra.mask(ct_path=t / "density_in.nii.gz", labels_path=t / "labels.nii.gz",
                        out_parts=t / "vertebra.nii.gz", out_json=t / "vertebra.json", cfg=mask_cfg,
                        context=ctx)
    v = json.loads((t / "vertebra.json").read_text())
    assert v["caps_volume_cm3"] == pytest.approx(
        (2 * np.pi * R**2 * T / 1000) if with_caps else 0.0, rel=0.03)
    (t / "screws.json").write_text(json.dumps({"screws": []}))
    steps_model.mesh(parts_path=t / "vertebra.nii.gz", screws_path=t / "screws.json",
                     out_mesh=t / "mesh.xdmf", out_json=t / "mesh.json",
                     cfg={"voxel_mm": 0.5, "bone_cell_size_mm": 2.5, "facet_distance_mm": 0.2},
                     context=ctx)
    mat = {"poisson_bone": 0.0, "cap_poisson": 0.0, "cap_modulus_mpa": 2500.0}
    steps_model.materials(mesh_path=t / "mesh.xdmf", density_path=t / "density.nii.gz",
                          screws_path=t / "screws.json", out_npz=t / "materials.npz",
                          out_json=t / "materials.json", cfg=mat, context=ctx)
    return v


@pytest.mark.parametrize("with_caps", [True, False])
def test_capped_specimen_compression_matches_springs_in_series(tmp_path, with_caps):
    _model(tmp_path, with_caps)
    t, ctx = tmp_path, "patient B01, timepoint M00"
    pts, cells, tags = read_mesh(t / "mesh.xdmf")
    npz = np.load(t / "materials.npz")
    if with_caps:
        assert (tags == TAG_CAP).any() and np.all(npz["youngs_mpa"][tags == TAG_CAP] == 2500.0)
    steps_fea.solve(case="compression", mesh_path=t / "mesh.xdmf",
                    materials_path=t / "materials.npz", mask_json=t / "vertebra.json",
                    screws_path=t / "screws.json",
                    out_json=t / "compression.json", loads_cfg={"analysis": "linear"},
                    solver_cfg={}, context=ctx)
    k = json.loads((t / "compression.json").read_text())["stiffness_n_per_mm"]
    # Springs in series with the meshed cross-section (nu = 0: uniaxial, exact for P1):
    x = pts[cells]
    vol = np.abs(np.einsum("ij,ij->i", x[:, 1] - x[:, 0],
                           np.cross(x[:, 2] - x[:, 0], x[:, 3] - x[:, 0]))) / 6
    area = vol[np.isin(tags, BONE_TAGS)].sum() / H
    e_bone = modulus_mpa(np.array([RHO]), MaterialParams())[0]
    compliance = H / (e_bone * area) + (2 * T / (2500.0 * area) if with_caps else 0.0)
    assert k == pytest.approx(1.0 / compliance, rel=0.03)


def test_a_solve_that_fails_is_recorded_and_the_gate_refuses_the_scan(tmp_path):
    """A linear solve that does not converge (here: one Krylov iteration allowed) is the
    scan's failure, not the workflow's: the result records it (no strength, the reason), the
    curve files exist for the checkpoint, and accept_strength refuses the scan naming it."""
    from qctfea.errors import QctfeaError

    _model(tmp_path, False)
    t, ctx = tmp_path, "patient B01, timepoint M00"
    steps_fea.solve(case="compression", mesh_path=t / "mesh.xdmf",
                    materials_path=t / "materials.npz", mask_json=t / "vertebra.json",
                    screws_path=t / "screws.json", out_json=t / "compression.json",
                    loads_cfg={"analysis": "linear"}, solver_cfg={"ksp_max_it": 1},
                    context=ctx, out_curve=t / "curve.csv", out_plot=t / "curve.png")
    res = json.loads((t / "compression.json").read_text())
    assert res["strength_n"] is None and res["failed"]
    assert "linear solve did not converge" in res["stop_reason"]
    assert "DIVERGED_MAX_IT after 1 iterations" in res["stop_reason"]
    assert (t / "curve.csv").read_text().strip() == "displacement_mm,force_n"
    pixels.assert_curve_without_result(t / "curve.png", res["stop_reason"])
    with pytest.raises(QctfeaError, match=r"patient B01, timepoint M00, compression .*solve "
                                          r"failed: linear solve did not converge.*exclude"):
        steps_fea.accept_strength(result_paths=[t / "compression.json"],
                                  out_json=t / "strength.json", context=ctx)
    assert not (t / "strength.json").exists()
