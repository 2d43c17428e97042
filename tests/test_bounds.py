"""Stiffness bounds (qctfea.fea.bounds) against the closed forms of a prism between bonded
platens: columns in uniaxial stress give E A / H, the axial-only field gives M A / H (M the
constrained modulus lambda + 2 mu), and layers add in series. The bounds of the real and
demo models against their solves are checked in tests/test_real_workflow.py and
tests/test_fea.py."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qctfea.fea.bounds import compression_bounds
from qctfea.model.tags import TAG_BODY

E1, E2, NU = 300.0, 120.0, 0.3


def _box(nx=10, ny=8, nz=12, size=(10.0, 8.0, 12.0)):
    """A box of linear tetrahedra (each cube in the 6 tetrahedra of its main diagonal)."""
    axes = [np.linspace(0.0, s, n + 1) for s, n in zip(size, (nx, ny, nz))]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    idx = np.arange(len(points)).reshape(nx + 1, ny + 1, nz + 1)
    cells = []
    for perm in itertools.permutations(range(3)):
        path = [np.zeros(3, int)]
        for k in perm:
            step = path[-1].copy()
            step[k] = 1
            path.append(step)
        cells.append(np.stack([idx[p[0]:p[0] + nx, p[1]:p[1] + ny, p[2]:p[2] + nz].reshape(-1)
                               for p in path], axis=1))
    return points, np.concatenate(cells)


def _grid_squares_inside(rot, size=(10.0, 8.0), ray_mm=0.5):
    """Area (mm²) of the lower bound's squares of rays (every ``ray_mm`` across the axis,
    from half a step inside the footprint's extent) whose four corner rays pass inside the
    section of the box turned by ``rot``: a point-in-rectangle count in the box's own frame,
    not the bound's ray tracing through the tetrahedra."""
    from qctfea.fea.bounds import _lateral_basis  # the grid's orientation across the axis

    e1, e2 = _lateral_basis(rot.apply([0.0, 0.0, 1.0]))
    corners = rot.apply([[x, y, 0.0] for x in (0.0, size[0]) for y in (0.0, size[1])])
    gu, gv = (np.arange(c.min() + ray_mm / 2, c.max(), ray_mm)
              for c in (corners @ e1, corners @ e2))
    rays = (gu[:, None, None] * e1 + gv[None, :, None] * e2).reshape(-1, 3)
    x, y, _ = rot.inv().apply(rays).reshape(len(gu), len(gv), 3).transpose(2, 0, 1)
    inside = (x > 0) & (x < size[0]) & (y > 0) & (y < size[1])
    squares = inside[:-1, :-1] & inside[1:, :-1] & inside[:-1, 1:] & inside[1:, 1:]
    return float(squares.sum() * ray_mm ** 2)


def _constrained(e, nu):
    return e * (1 - nu) / ((1 + nu) * (1 - 2 * nu))


@pytest.mark.parametrize("turned", [False, True])
def test_bounds_of_a_two_layer_prism_are_the_closed_forms(turned):
    """Lower half E1, upper half E2 (Poisson's ratio 0.3): columns in series give
    A / (H1 / E1 + H2 / E2) over the columns' area, the axial field A / (H1 / M1 + H2 / M2)
    over the whole section; in the scanner's axes and turned by 25 degrees about a skew axis
    (the body's axis then skew too)."""
    points, cells = _box()
    z = points[cells].mean(axis=1)[:, 2]
    youngs = np.where(z < 6.0, E1, E2)
    poisson = np.full(len(cells), NU)
    tags = np.full(len(cells), TAG_BODY)
    axis, centroid = np.array([0.0, 0.0, 1.0]), np.array([5.0, 4.0, 6.0])
    rot = Rotation.identity()
    if turned:
        rot = Rotation.from_rotvec(np.radians(25.0) * np.array([1.0, 2.0, 0.5]) / np.sqrt(5.25))
        points, axis, centroid = rot.apply(points), rot.apply(axis), rot.apply(centroid)
    b = compression_bounds(points, cells, tags, youngs, poisson, axis, centroid,
                           zone_fraction=0.25, angle_deg=45.0, ray_mm=0.5)
    area = 10.0 * 8.0
    assert b["superior_nodes"] == b["inferior_nodes"] == 11 * 9
    assert b["upper_n_per_mm"] == pytest.approx(
        area / (6.0 / _constrained(E1, NU) + 6.0 / _constrained(E2, NU)), rel=1e-9)
    # the columns' squares: every grid square of the section whose corners are inside it
    assert 0.8 * area <= b["column_area_mm2"] <= area
    columns = _grid_squares_inside(rot)
    if not turned:  # rays 0.25 mm in from the faces, 0.5 mm apart: 19 x 15 squares
        assert columns == (10.0 - 0.5) * (8.0 - 0.5) == 71.25
    assert b["column_area_mm2"] == pytest.approx(columns, rel=1e-12)
    assert b["lower_n_per_mm"] == pytest.approx(columns / (6.0 / E1 + 6.0 / E2), rel=1e-9)


def test_a_ray_that_leaves_the_body_is_no_column():
    """A notch cut from one side face to mid-height: rays under it leave the body and
    count for nothing, so the columns' area is the section less the notch's footprint."""
    points, cells = _box()
    c = points[cells].mean(axis=1)
    keep = ~((c[:, 0] < 4.0) & (np.abs(c[:, 2] - 6.0) < 1.0))
    cells = cells[keep]
    n = len(cells)
    b = compression_bounds(points, cells, np.full(n, TAG_BODY), np.full(n, E1),
                           np.full(n, NU), [0.0, 0.0, 1.0], [5.0, 4.0, 6.0],
                           zone_fraction=0.25, angle_deg=45.0, ray_mm=0.5)
    assert 0.8 * 6.0 * 8.0 <= b["column_area_mm2"] <= 6.0 * 8.0
    # rays at x = 0.25 ... 9.75 mm: those at x > 4 (12 of 20) are columns, 11 x 15 squares
    columns = (10.0 - 4.0 - 0.5) * (8.0 - 0.5)
    assert b["column_area_mm2"] == pytest.approx(columns, rel=1e-12)  # 41.25 mm²
    assert b["lower_n_per_mm"] == pytest.approx(columns * E1 / 12.0, rel=1e-9)  # 1031.25
    assert b["upper_n_per_mm"] < 10.0 * 8.0 * _constrained(E1, NU) / 12.0


def test_a_solve_whose_stiffness_leaves_its_bounds_is_refused(demo_model, tmp_path,
                                                              monkeypatch):
    """The solve step checks every result's stiffness against its model's bounds: the demo
    vertebra's linear compression lies within them (recorded with the result); the same
    solve made 3x too stiff (as a wrong solve would be) is refused naming the scan, the
    stiffness and the bounds, with no strength, and the solve gate fails the scan."""
    import json

    from qctfea.errors import QctfeaError
    from qctfea.fea import loadcases
    from qctfea.steps import fea as steps_fea

    r, ctx = demo_model["results"], demo_model["context"]
    kw = {"case": "compression", "mesh_path": r / "mesh.xdmf",
          "materials_path": r / "materials.npz", "mask_json": r / "vertebra.json",
          "screws_path": r / "screws.json", "loads_cfg": {"analysis": "linear"},
          "solver_cfg": {}, "context": ctx}
    good = steps_fea.solve(out_json=tmp_path / "good.json", **kw)
    b = good["stiffness_bounds"]
    assert b["within"] and b["lower_n_per_mm"] < good["stiffness_n_per_mm"] < b["upper_n_per_mm"]
    assert "refused" not in good and good["strength_n"] > 0
    solve = loadcases.solve_compression

    def too_stiff(*args, **kwargs):
        res = solve(*args, **kwargs)
        return {**res, "stiffness_n_per_mm": 3.0 * res["stiffness_n_per_mm"]}

    monkeypatch.setattr(loadcases, "solve_compression", too_stiff)
    out = tmp_path / "compression.json"
    bad = steps_fea.solve(out_json=out, **kw)
    rec = json.loads(out.read_text())
    assert rec["refused"] == bad["refused"] and rec["strength_n"] is None
    k = 3.0 * good["stiffness_n_per_mm"]
    for part in (ctx, f"stiffness {k:.0f} N/mm outside the bounds",
                 f"{b['lower_n_per_mm']:.0f}-{b['upper_n_per_mm']:.0f} N/mm",
                 "the solve is wrong", "exclude"):
        assert part in rec["refused"], (part, rec["refused"])
    with pytest.raises(QctfeaError, match="outside the bounds"):
        steps_fea.accept_strength(result_paths=[out], out_json=tmp_path / "ok.json",
                                  context=ctx)
