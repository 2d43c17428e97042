"""Nonlinear mechanics verification (docs/nonlinear.md): each against an independent answer.

* elasto-plastic bar: yield force = yield stress x area, flat plateau (perfect
  plasticity), hardening slope = the closed-form elasto-plastic tangent;
* offset-yield rule on the bar's curve;
* patch test on a distorted mesh (elastic and fully plastic uniform states);
* a cylinder bonded in an elastic block and pulled out: stiffness converges
  under refinement to a refined reference;
* 1 vs 2 MPI ranks identical to 1e-6 (bar here; vertebra in test_fea).
"""
import json
import sys

import dolfinx_solver  # noqa: F401  (before dolfinx or petsc4py)
import numpy as np
import pytest

from conftest import REPO, run, venv_bin

L, W = 10.0, 4.0
E, NU, SY = 1000.0, 0.3, 2.0


def _bar(hardening=0.0, n=(3, 3, 8), constitutive="plasticity"):
    import dolfinx
    from mpi4py import MPI

    from qctfea.fea.plasticity import PlasticModel

    mesh = dolfinx.mesh.create_box(MPI.COMM_WORLD, [[0, 0, 0], [W, W, L]], list(n),
                                   dolfinx.mesh.CellType.tetrahedron)
    nc = mesh.topology.index_map(3).size_global
    return PlasticModel(mesh, np.full(nc, E), np.full(nc, NU), np.full(nc, SY), hardening,
                        constitutive), mesh


def _uniaxial_supports(m, mesh, w=W):
    """Rollers: bottom z = 0 and top z-displaced (free lateral contraction), rigid modes pinned."""
    import dolfinx

    top = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: np.isclose(x[2], L))
    bot = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: np.isclose(x[2], 0))
    o = dolfinx.mesh.locate_entities_boundary(
        mesh, 0, lambda x: np.isclose(x[0], 0) & np.isclose(x[1], 0) & np.isclose(x[2], 0))
    ox = dolfinx.mesh.locate_entities_boundary(
        mesh, 0, lambda x: np.isclose(x[0], w) & np.isclose(x[1], 0) & np.isclose(x[2], 0))
    fixed = [(dolfinx.fem.locate_dofs_topological(m.V.sub(2), 2, bot), 2),
             (dolfinx.fem.locate_dofs_topological(m.V, 0, o), None),
             (dolfinx.fem.locate_dofs_topological(m.V.sub(1), 0, ox), 1)]
    loaded = (dolfinx.fem.locate_dofs_topological(m.V.sub(2), 2, top), 2)
    return fixed, loaded


def _run_bar(hardening=0.0, rule="peak", dmax=0.05, increments=10, constitutive="plasticity",
             tension=False, **failure):
    from qctfea.fea.plasticity import NonlinearParams

    m, mesh = _bar(hardening, constitutive=constitutive)
    fixed, loaded = _uniaxial_supports(m, mesh)
    failure = {"failure_strain": None, "tensile_strength_ratio": None, **failure}
    # equilibrium far tighter than the default (1e-4): the checks are closed forms to 1e-6
    p = NonlinearParams(increments=increments, strength_rule=rule, plateau_tangent_ratio=-1.0,
                        stop_drop_fraction=1.0, integration="newton", newton_rtol=1e-6,
                        nonlocal_length_mm=None, **failure)
    return m, m.run(fixed, loaded, np.array([0, 0, 1.0 if tension else -1.0]), dmax, p,
                    offset_displacement=0.002 * L)


@pytest.mark.parametrize("constitutive", ["plasticity", "damage"])
def test_bar_yield_force_and_flat_plateau(constitutive):
    """Perfect plasticity and the stress-capped damage model: F_y = sigma_y A (within 1 %),
    then flat; k0 = E A / L."""
    _, r = _run_bar(constitutive=constitutive)
    A = W * W
    assert r.initial_stiffness_n_per_mm == pytest.approx(E * A / L, rel=5e-3)
    post = [p for p in r.curve if p.displacement_mm > 1.2 * SY / E * L]
    assert len(post) >= 5
    for p in post:
        assert p.force_n == pytest.approx(SY * A, rel=1e-2)
    # a flat plateau to the maximum displacement (stopping rules off): the largest force
    assert r.peak_force_n == pytest.approx(SY * A, rel=1e-2)
    # Flat: the last increments differ by far less than one elastic step.
    assert abs(post[-1].force_n - post[0].force_n) < 1e-3 * SY * A
    assert all(p.newton_iterations <= 8 for p in r.curve)  # inexact Newton


def test_bar_hardening_slope_closed_form():
    """Linear hardening H = h E: post-yield slope = A/L * E H / (E + H)."""
    h = 0.1
    _, r = _run_bar(hardening=h)
    A, H = W * W, h * E
    post = [p for p in r.curve if p.displacement_mm > 1.2 * SY / E * L]
    slope = (post[-1].force_n - post[0].force_n) / (post[-1].displacement_mm
                                                   - post[0].displacement_mm)
    assert slope == pytest.approx(A / L * E * H / (E + H), rel=1e-2)
    d = r.curve[-1].displacement_mm
    assert r.curve[-1].force_n == pytest.approx(SY * A + A / L * E * H / (E + H)
                                                * (d - SY / E * L), rel=1e-3)


def test_bar_offset_rule():
    """The 0.2 % offset line crosses the plateau at sigma_y A and stops the run there."""
    _, r = _run_bar(rule="offset", increments=20)
    assert r.offset_yield_n == pytest.approx(SY * W * W, rel=1e-2)
    assert r.strength_n == r.offset_yield_n
    assert r.offset_yield_displacement_mm == pytest.approx((SY / E + 0.002) * L, rel=2e-2)
    assert r.stop_reason == "offset yield point reached"
    assert r.curve[-1].displacement_mm < 0.05  # stopped early


def _softening_bar(nz=10, crack_band=1.0, tension=False, dmax=0.1, increments=20,
                   return_model=False, rest_yield=np.inf, **kw):
    """A bar (length L, cubic cells of side a = L / nz, 2 x 2 cells across) whose middle
    layer of cells yields at SY and softens; the rest stays elastic. ν = 0 and roller
    supports: uniaxial stress. ``rest_yield``: yield stress of the other cells (infinite:
    elastic). Returns (result, a, cross-section area)."""
    import dolfinx
    from mpi4py import MPI

    from qctfea.fea.plasticity import NonlinearParams, PlasticModel

    a = L / nz
    w = 2 * a
    mesh = dolfinx.mesh.create_box(MPI.COMM_WORLD, [[0, 0, 0], [w, w, L]], [2, 2, nz],
                                   dolfinx.mesh.CellType.tetrahedron)
    n_local = mesh.topology.index_map(3).size_local
    nc = mesh.topology.index_map(3).size_global
    mid = dolfinx.mesh.compute_midpoints(mesh, 3, np.arange(n_local, dtype=np.int32))
    zc = np.zeros(nc)
    zc[np.asarray(mesh.topology.original_cell_index)[:n_local]] = mid[:, 2]
    zc = MPI.COMM_WORLD.allreduce(zc, MPI.SUM)
    z0 = L / 2 - (a / 2 if nz % 2 else 0.0)
    ys = np.where((zc > z0) & (zc < z0 + a), SY, rest_yield)
    p = NonlinearParams(**{"increments": increments, "failure_strain": EPS_F,
                           "integration": "newton", "min_increment_fraction": 1 / 16,
                           # closed-form checks to 1e-6: equilibrium far tighter than 1e-4
                           "newton_rtol": 1e-6,
                           "softening_strain": EPS_SOFT, "crack_band_mm": crack_band,
                           "tensile_strength_ratio": None, "stop_drop_fraction": 0.6,
                           # follow the falling branch (no stop on the first falling step)
                           "plateau_tangent_ratio": -np.inf,
                           "residual_fraction": RES,
                           # the local law and its crack band (the nonlocal average:
                           # test_nonlocal)
                           "nonlocal_length_mm": None, **kw})
    m = PlasticModel(mesh, np.full(nc, E), np.zeros(nc), ys, 0.0, "damage", p)
    fixed, loaded = _uniaxial_supports(m, mesh, w)
    r = m.run(fixed, loaded, np.array([0, 0, 1.0 if tension else -1.0]), dmax)
    return (r, a, w * w, m) if return_model else (r, a, w * w)


EPS_F, EPS_SOFT, RES = 0.004, 0.05, 0.01


def _bar_curve(a, crack_band, area, sy=SY, ratio=1.0, soft=EPS_SOFT):
    """Analytic force-displacement curve of the softening bar, parametrised by the weak
    layer's strain: the layer's law (docs/nonlinear.md) and the elastic rest in series."""
    ey = sy / E
    scale = crack_band / a if crack_band else 1.0
    es = ey + (EPS_F - ey) * scale
    er = es + soft * scale
    # equivalent strain of the layer, to where the residual stiffness would carry σ_y again
    k = np.linspace(0, 0.95 * sy / (RES * E), 400001)
    s = np.where(k <= ey, E * k, np.where(k <= es, sy, np.clip(sy * (er - k) / (er - es), 0,
                                                                None)))
    s = np.maximum(s, np.where(k > ey, RES * E * k, 0.0))  # the residual stiffness
    # uniaxial: tension cracks on σ1 / ratio, so the layer's strain is ratio x κ
    sig, eps = ratio * s, ratio * k
    u = sig * (L - a) / E + eps * a
    return u, sig * area


def test_softening_bar_traces_the_falling_branch_exactly():
    """Past the peak: every converged point of the curve on the analytic curve (1e-5 of the
    peak), the force falls to below half the peak, strength = σ_y A."""
    r, a, area = _softening_bar()
    u, f = _bar_curve(a, 1.0, area)
    assert np.all(np.diff(u) > 0)  # no snap-back: displacement control can follow
    for p in r.curve:
        assert abs(p.force_n - np.interp(p.displacement_mm, u, f)) < 1e-5 * SY * area
    assert r.peak_reached and r.stop_reason == "force fell below the peak"
    assert r.strength_n == pytest.approx(SY * area, rel=1e-6)
    assert min(p.force_n for p in r.curve if p.displacement_mm > r.displacement_at_peak_mm) \
        < 0.5 * SY * area


def test_flags_at_the_peak_are_those_of_the_peak_increment(tmp_path):
    """The fields file's ``yielded_at_peak`` and ``failed_at_peak`` are the state at the
    curve's largest force, not at the end of the run: the bar followed until its weak layer
    has fully softened (past κ = ε_r) has, at the peak, that layer yielded and nothing
    failed; at the end the layer failed. Both as written to the XDMF/HDF5 fields file."""
    import h5py

    r, a, area, m = _softening_bar(stop_drop_fraction=0.999, return_model=True)
    n = m.mesh.topology.index_map(3).size_local
    layer = np.isfinite(m.c_sy[:n])  # the weak layer; the rest never yields
    peak = max(r.curve, key=lambda p: p.force_n)
    assert layer.sum() == 2 * 2 * 6 and peak.force_n == pytest.approx(SY * area, rel=1e-6)
    assert (peak.yielded_cells, peak.failed_cells) == (24, 0)
    assert r.curve[-1].failed_cells == 24  # the run went on until the layer failed
    assert np.array_equal(m.peak_flags["yielded_at_peak"][:n], layer)
    assert not m.peak_flags["failed_at_peak"][:n].any()
    assert np.array_equal(m.failed[:n], layer)
    m.write_fields(tmp_path / "f.xdmf")
    with h5py.File(tmp_path / "f.h5") as f:
        got = {k: f[f"Function/{k}"][next(iter(f[f"Function/{k}"]))][:].ravel()
               for k in ("failed", "yielded", "failed_at_peak", "yielded_at_peak")}
    assert got["failed_at_peak"].sum() == 0
    assert got["yielded_at_peak"].sum() == got["failed"].sum() == got["yielded"].sum() == 24


def test_softening_bar_in_tension_cracks_at_the_tensile_strength():
    ratio = 0.5
    r, a, area = _softening_bar(tension=True, tensile_strength_ratio=ratio)
    u, f = _bar_curve(a, 1.0, area, ratio=ratio)
    for p in r.curve:
        assert abs(p.force_n - np.interp(p.displacement_mm, u, f)) < 1e-5 * SY * area
    assert r.strength_n == pytest.approx(ratio * SY * area, rel=1e-6)


def test_imex_bar_follows_the_analytic_curve_past_the_peak():
    """The default integration (imex: extrapolated damage, one linear solve per increment):
    the strength within 6 % of σ_y A (the damage lags by one increment: the peak
    overshoots, here a whole layer yields at once, the worst case), every point within 8 %
    of the peak force of the analytic curve, the falling branch traced below half the peak;
    one Krylov solve per increment."""
    r, a, area = _softening_bar(integration="imex", min_increment_fraction=0.25, increments=80)
    u, f = _bar_curve(a, 1.0, area)
    assert r.strength_n == pytest.approx(SY * area, rel=0.06)
    for p in r.curve:
        assert abs(p.force_n - np.interp(p.displacement_mm, u, f)) < 0.08 * SY * area
    assert min(p.force_n for p in r.curve if p.displacement_mm > r.displacement_at_peak_mm) \
        < 0.5 * SY * area
    assert r.newton_iterations <= r.increments + r.step_cuts
    # memory: no growth over the increments (solver objects are reused, not re-created);
    # the peak (getrusage, over the process' life) is not below the resident set read from
    # /proc (which also counts shared pages: 2 MB slack)
    assert r.increments > 30
    assert r.rss_end_mb - r.rss_after_first_increment_mb < 5.0
    assert r.peak_rss_mb > r.rss_end_mb - 2.0 and r.peak_rss_mb > 50.0


def _heterogeneous_block(params):
    """A block (8 x 8 x 16 mm, 4 x 4 x 8 boxes of tetrahedra) of random density, E ∝ ρ²
    and σ_y ∝ ρ^1.5 as in bone, between bonded platens: yield spreads cell by cell and the
    load redistributes, as in a vertebra."""
    import dolfinx
    from mpi4py import MPI

    from qctfea.fea.plasticity import PlasticModel

    w, h = 8.0, 16.0
    mesh = dolfinx.mesh.create_box(MPI.COMM_WORLD, [[0, 0, 0], [w, w, h]], [4, 4, 8],
                                   dolfinx.mesh.CellType.tetrahedron)
    nc = mesh.topology.index_map(3).size_global
    rho = np.random.default_rng(3).uniform(0.5, 1.5, nc)
    m = PlasticModel(mesh, 1000.0 * rho ** 2, np.full(nc, 0.3), 5.0 * rho ** 1.5, 0.0,
                     "damage", params)
    top = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: np.isclose(x[2], h))
    bot = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: np.isclose(x[2], 0))
    fixed = [(dolfinx.fem.locate_dofs_topological(m.V, 2, bot), None)]
    loaded = (dolfinx.fem.locate_dofs_topological(m.V, 2, top), None)
    return m.run(fixed, loaded, np.array([0, 0, -1.0]), 0.05 * h, params)


def test_imex_peak_converges_to_the_implicit_solution():
    """imex against the fully implicit solution (Newton, steps down to 1/100 of the base
    step) on a heterogeneous block: the default steps within 2 % of Newton's peak, and
    with 20x tighter step control within 1 %. The scheme is consistent: a finer step
    approaches the implicit answer. Committing max(extrapolated, implicit) damage instead
    (the update used until 2026-12-05) ratcheted damage in cells that stopped loading and
    converged 20 % below it (245 vs 307 N; docs/nonlinear.md)."""
    from qctfea.fea.plasticity import NonlinearParams

    local = {"nonlocal_length_mm": None}  # Newton has no nonlocal tangent
    newton = _heterogeneous_block(NonlinearParams(integration="newton", increments=100,
                                                  min_increment_fraction=0.01, **local))
    default = _heterogeneous_block(NonlinearParams(**local))
    fine = _heterogeneous_block(NonlinearParams(imex_damage_tolerance=0.001,
                                                min_increment_fraction=0.01, **local))
    assert newton.strength_n is not None and newton.increments > 10
    assert default.strength_n == pytest.approx(newton.strength_n, rel=0.02)
    assert fine.strength_n == pytest.approx(newton.strength_n, rel=0.01)
    assert fine.increments > 3 * default.increments


def test_stale_imex_preconditioner_is_rebuilt(monkeypatch):
    """imex keeps the probe's preconditioner and rebuilds it once after a Krylov solve over
    IMEX_PC_REBUILD_ITERATIONS: with the bound at 0 every increment that needed CG rebuilds
    it (PETSc's PCSetUp events grow, preconditioner_rebuilds counts them), and the curve is
    the same within the equilibrium tolerance (a preconditioner changes the iterations, not
    the solution)."""
    from petsc4py import PETSc

    from qctfea.fea import stepping

    PETSc.Log.begin()
    setups = PETSc.Log.Event("PCSetUp")

    def run():
        before = setups.getPerfInfo()["count"]
        r, _, area = _softening_bar(integration="imex", min_increment_fraction=0.25,
                                    increments=80)
        return r, setups.getPerfInfo()["count"] - before, area

    kept, n_kept, area = run()
    monkeypatch.setattr(stepping, "IMEX_PC_REBUILD_ITERATIONS", 0)
    rebuilt, n_rebuilt, _ = run()
    assert kept.preconditioner_rebuilds == 0
    assert rebuilt.preconditioner_rebuilds > 5
    # every rebuild but possibly the last (scheduled after the final increment) set the
    # preconditioner up again
    assert n_rebuilt - n_kept >= rebuilt.preconditioner_rebuilds - 1
    assert rebuilt.increments == kept.increments
    f0 = np.array([p.force_n for p in kept.curve])
    f1 = np.array([p.force_n for p in rebuilt.curve])
    assert np.abs(f1 - f0).max() < 1e-3 * SY * area


def test_imex_error_rests_on_clapeyron():
    """The imex step control (``imex_error``) measures the damage error as a fraction of
    the work sum (1 - D) ε:C:ε V, which by Clapeyron's theorem is the reaction force times
    the displacement at equilibrium. Checked on the softening bar past its peak (Newton, so
    the state is in equilibrium with the committed damage), over all ranks."""
    from mpi4py import MPI

    r, a, area, m = _softening_bar(return_model=True)
    n_owned = m.mesh.topology.index_map(3).size_local
    work = MPI.COMM_WORLD.allreduce(float(((1 - m.D_n) * m._w_el * m.c_vol)[:n_owned].sum()),
                                    MPI.SUM)
    last = r.curve[-1]
    assert last.force_n < 0.6 * SY * area  # on the falling branch: the layer is damaged
    assert work == pytest.approx(last.force_n * last.displacement_mm, rel=1e-5)
    # and the error of an exact damage is zero
    assert m.imex_error(m.D_n) == pytest.approx(0.0, abs=1e-12)


def _half_drop_displacement(r):
    """Displacement where the falling branch first reaches half the peak force."""
    peak = max(p.force_n for p in r.curve)
    post = [p for p in r.curve if p.displacement_mm >= r.displacement_at_peak_mm]
    for p0, p1 in zip(post, post[1:]):
        if p1.force_n <= 0.5 * peak:
            t = (p0.force_n - 0.5 * peak) / (p0.force_n - p1.force_n)
            return p0.displacement_mm + t * (p1.displacement_mm - p0.displacement_mm)
    raise AssertionError("the force never fell to half the peak")


def test_crack_band_makes_the_falling_branch_mesh_objective():
    """Weak layer one element wide, elements of 1 and 0.5 mm: with the crack band the
    falling branch reaches half the peak at the same displacement (within 3 %, the
    elastic rest's share); without it, the finer mesh dissipates half the energy and
    falls over 25 % earlier. Both as the analytic curves say."""
    d = {}
    for cb in (1.0, None):
        for nz in (10, 20):
            r, a, area = _softening_bar(nz=nz, crack_band=cb, increments=40, dmax=0.06)
            d[cb, nz] = _half_drop_displacement(r)
            u, f = _bar_curve(a, cb, area)
            assert np.all(np.diff(u) > 0)  # no snap-back on either mesh
            i0 = np.flatnonzero(f >= f.max() * (1 - 1e-12)).max()  # end of the plateau
            fall = slice(i0, i0 + int(np.argmin(f[i0:])) + 1)  # to the residual branch
            # (within the interpolation between increments)
            assert d[cb, nz] == pytest.approx(np.interp(-0.5 * f.max(), -f[fall], u[fall]),
                                              rel=5e-3)
    assert abs(d[1.0, 20] / d[1.0, 10] - 1) < 0.03
    assert d[None, 20] / d[None, 10] < 0.75


def test_snap_back_is_a_collapse_after_the_peak():
    """A long elastic bar with a short, steep falling branch snaps back (the analytic
    displacement decreases on the falling branch): displacement control loses
    equilibrium after the peak. The rule calls it a collapse, strength = σ_y A."""
    r, a, area = _softening_bar(softening_strain=0.002, crack_band=None, dmax=0.05)
    u, _ = _bar_curve(a, None, area, soft=0.002)
    assert np.any(np.diff(u) < 0)  # snap-back in the analytic curve
    assert r.peak_reached and r.stop_reason.startswith("collapse")
    assert r.strength_n == pytest.approx(SY * area, rel=1e-3)


def test_rising_curve_reports_no_strength():
    """Stopped at a displacement before anything yields: "peak not reached", no strength."""
    r, _, _ = _softening_bar(dmax=0.01)
    assert not r.peak_reached and r.strength_n is None
    assert r.stop_reason.startswith("peak not reached")


def _stop_tests_on(points, **params):
    """The stop tests of a run (stepping's ``_peaked`` after every converged increment,
    then ``_strength``) fed a prescribed force-displacement curve: (d mm, F N) points from
    the first increment on (the first one's secant is k0), range 1 mm in 25 base steps."""
    from qctfea.fea.plasticity import NonlinearParams
    from qctfea.fea.stepping import CurvePoint, NonlinearResult, _peaked, _strength, _Walk

    p = NonlinearParams(**params)
    walk = _Walk(base=1.0 / p.increments, step=0.01, offset=np.inf, imex=False)
    res = NonlinearResult(curve=[CurvePoint(0.0, 0.0, 0, 0)])
    for d, force in points:
        prev, h = res.curve[-1], d - walk.d
        walk.d = d
        res.curve.append(CurvePoint(d, force, 1, 0))
        if len(res.curve) == 2:
            res.initial_stiffness_n_per_mm = force / d
            continue
        walk.tangent = (force - prev.force_n) / h
        if _peaked(walk, res, prev, force, h, p):
            break
    _strength(res, p)
    return res


def _curve_with_a_transient(flat_mm: float, rise_to: float | None = 360.0):
    """k0 = 1000 N/mm to 300 N at 0.3 mm, flat (±0.1 %) over ``flat_mm``, then up at a
    third of k0 to ``rise_to`` N and down 2 % per 0.01 mm step (None: flat to the end)."""
    d = np.round(np.arange(0.01, 1.0 + 1e-9, 0.01), 6)
    f = np.minimum(1000.0 * d, 300.0) * (1 + 1e-3 * np.sin(40 * d))
    if rise_to is not None:
        up = np.clip(d - 0.3 - flat_mm, 0, None)
        f = f + np.minimum(333.0 * up, rise_to - 300.0)
        top = 0.3 + flat_mm + (rise_to - 300.0) / 333.0
        f = f - rise_to * 0.02 * np.clip(np.ceil((d - top) / 0.01 - 1e-6), 0, None)
    return list(zip(d, f))


def test_a_transient_flattening_is_not_the_peak():
    """A flattening that lasts 3 % of the range and then rises to a higher peak: the run
    goes on to that peak (360 N) and stops on its falling branch; with the window of 2 %
    the flat stretch (300 N) would be taken for the peak, as it was on refined demo
    meshes (docs/mesh_convergence.md)."""
    r = _stop_tests_on(_curve_with_a_transient(0.03))
    assert r.peak_reached and r.strength_n == pytest.approx(360.0, rel=2e-3)
    assert r.displacement_at_peak_mm == pytest.approx(0.33 + 60 / 333, abs=0.011)
    r = _stop_tests_on(_curve_with_a_transient(0.03), peak_confirm_fraction=0.02)
    assert r.peak_reached and r.strength_n == pytest.approx(300.0, rel=2e-3)


def test_a_lasting_flattening_is_a_plateau_at_its_force():
    """Flat from 0.3 mm on: the run ends once the flat stretch has lasted
    ``peak_confirm_fraction`` of the range (0.05 mm), strength = the plateau's force."""
    r = _stop_tests_on(_curve_with_a_transient(0.0, rise_to=None))
    assert r.peak_reached and r.stop_reason.startswith(("plateau", "force fell after"))
    assert r.strength_n == pytest.approx(300.0, rel=2e-3)
    assert 0.35 - 1e-9 <= r.curve[-1].displacement_mm <= 0.37 + 1e-9


def test_damage_with_hardening_is_refused():
    from qctfea.errors import QctfeaError

    with pytest.raises(QctfeaError, match="hardening_ratio must be 0"):
        _bar(hardening=0.1, constitutive="damage")


def test_softening_is_refused():
    from qctfea.errors import QctfeaError

    with pytest.raises(QctfeaError, match="softening plasticity is not supported"):
        _bar(hardening=-0.05)


def _distorted_box():
    """Unit-cube-like box whose interior nodes are moved randomly (up to 30 % of h)."""
    import dolfinx
    from mpi4py import MPI

    mesh = dolfinx.mesh.create_box(MPI.COMM_SELF, [[0, 0, 0], [4, 4, 4]], [4, 4, 4],
                                   dolfinx.mesh.CellType.tetrahedron)
    x = mesh.geometry.x
    inner = np.all((x > 1e-9) & (x < 4 - 1e-9), axis=1)
    rng = np.random.default_rng(3)
    x[inner] += rng.uniform(-0.3, 0.3, size=(inner.sum(), 3))
    return mesh


def _patch_bcs(model):
    import dolfinx

    facets = dolfinx.mesh.exterior_facet_indices(model.mesh.topology)
    return dolfinx.fem.locate_dofs_topological(model.V, 2, facets)


@pytest.mark.parametrize("constitutive", ["plasticity", "damage"])
def test_patch_test_distorted_mesh_elastic_and_plastic(constitutive):
    """Linear boundary displacement u = G x on a distorted mesh: the FE solution is exact
    everywhere (elastic), and the fully plastic uniform state has q = sigma_y everywhere."""
    import dolfinx

    from qctfea.fea.elasticity import ElasticModel
    from qctfea.fea.plasticity import PlasticModel

    mesh = _distorted_box()
    mesh.topology.create_connectivity(2, 3)
    nc = mesh.topology.index_map(3).size_global
    G = np.array([[1.0, 0.3, 0.0], [0.1, -0.5, 0.2], [0.0, 0.4, 0.7]]) * 1e-3
    model = ElasticModel(mesh, np.full(nc, E), np.full(nc, NU))
    dofs = _patch_bcs(model)
    g = dolfinx.fem.Function(model.V)
    g.interpolate(lambda x: G @ x)
    model.solve([dolfinx.fem.dirichletbc(g, dofs)])
    exact = dolfinx.fem.Function(model.V)
    exact.interpolate(lambda x: G @ x)
    err = np.abs(model.u.x.array - exact.x.array).max()
    assert err < 1e-8 * np.abs(exact.x.array).max()

    # Plastic: pure shear-like deviatoric loading far past yield, uniform state.
    # Plastic: the exact (homogeneous) displacement G x applied in 5 increments. The
    # uniform state must be exact on the distorted mesh: q = sigma_y in every element and
    # the internal force vanishes at every interior node (equilibrium).
    from qctfea.fea.plasticity import NonlinearParams

    # damage: von Mises only (the tensile criterion would cap this state lower), on the
    # plateau (the state's equivalent strain is below the softening strain)
    pm = PlasticModel(mesh, np.full(nc, E), np.full(nc, NU), np.full(nc, SY),
                      constitutive=constitutive,
                      params=NonlinearParams(tensile_strength_ratio=None))
    gd = dolfinx.fem.Function(pm.V)
    Gp = 5.0 * G
    gd.interpolate(lambda x: Gp @ x)
    steps = 5
    for _ in range(steps):
        pm.du.x.array[:] = gd.x.array / steps
        pm.return_mapping()
        pm.commit()
    q = pm.von_mises()
    eps = 0.5 * (Gp + Gp.T)
    dev = eps - np.trace(eps) / 3 * np.eye(3)
    mu = E / (2 * (1 + NU))
    q_el = np.sqrt(1.5) * 2 * mu * np.linalg.norm(dev)
    assert q_el > 1.5 * SY  # the state is far past yield
    np.testing.assert_allclose(q, SY, rtol=1e-10)
    # Equilibrium of the uniform plastic state on the distorted mesh: interior residual ~ 0.
    import dolfinx.fem.petsc
    from petsc4py import PETSc

    b = dolfinx.fem.petsc.assemble_vector(pm.f_internal)
    b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
    arr = b.getArray().reshape(-1, 3).copy()
    arr[dofs] = 0.0
    assert np.abs(arr).max() < 1e-9 * SY


def _cylinder_in_block_stiffness(cell_mm: float) -> tuple[float, int]:
    """A titanium cylinder bonded 20 mm deep into a 1 GPa block, pulled out: stiffness."""
    import dolfinx
    import SimpleITK as sitk
    from mpi4py import MPI

    from qctfea.fea.elasticity import ElasticModel, boundary_facets_of_tags, facet_midpoints
    from qctfea.imaging.masks import BODY
    from qctfea.model.meshing import MeshParams, generate_mesh, write_mesh
    from qctfea.model.tags import TAG_SCREW
    from qctfea.model.screw import Screw, ScrewSpec

    import tempfile

    img = sitk.Image([40, 40, 60], sitk.sitkUInt8) + BODY  # 20 x 20 x 30 mm at 0.5 mm
    img.SetSpacing([0.5, 0.5, 0.5])
    spec = ScrewSpec(diameter_mm=6.0, length_mm=20.0, head_length_mm=5.0)
    top = 59 * 0.5
    screw = Screw("left", np.array([9.75, 9.75, top]), np.array([0.0, 0.0, -1.0]), spec)
    params = MeshParams(voxel_mm=0.25, bone_cell_size_mm=cell_mm, screw_cell_size_mm=cell_mm,
                        facet_distance_mm=0.05, margin_mm=0.0, seed=1, peri_screw_mm=0.0)
    pts, cells, tags, _ = generate_mesh(img, [screw], params)
    with tempfile.TemporaryDirectory() as td:
        write_mesh(f"{td}/m.xdmf", pts, cells, tags)
        with dolfinx.io.XDMFFile(MPI.COMM_SELF, f"{td}/m.xdmf", "r") as f:
            mesh = f.read_mesh(name="mesh")
            ct = f.read_meshtags(mesh, name="cell_tags")
    mesh.topology.create_connectivity(2, 3)
    E_c = np.where(tags == TAG_SCREW["left"], 110000.0, 1000.0)
    model = ElasticModel(mesh, E_c, np.full(len(tags), 0.3))
    zmin = pts[:, 2].min()
    bot = dolfinx.mesh.locate_entities_boundary(mesh, 2, lambda x: x[2] < zmin + 0.2)
    sf = boundary_facets_of_tags(mesh, ct, [TAG_SCREW["left"]])
    s, _ = screw.axial_radial(facet_midpoints(mesh, sf))
    head = sf[s <= s.min() + 0.2]
    bd = dolfinx.fem.locate_dofs_topological(model.V, 2, bot)
    hd = dolfinx.fem.locate_dofs_topological(model.V, 2, head)
    d = 0.01
    model.solve([dolfinx.fem.dirichletbc(np.zeros(3), bd, model.V),
                 dolfinx.fem.dirichletbc(np.array([0, 0, d]), hd, model.V)])
    return model.reaction(hd, np.array([0, 0, 1.0])) / d, len(cells)


@pytest.mark.slow
def test_cylinder_pullout_converges_to_refined_reference(tmp_path):
    """The cylinder's pullout stiffness converges with the element size towards a finer
    reference (0.7 mm). The reference and the three coarser models are built and solved in
    two processes at once (about equal work, one per core)."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = [4.0, 2.0, 1.0]
    script = tmp_path / "cylinder.py"
    script.write_text(f"""
import sys, json
sys.path.insert(0, {str(REPO / 'tests')!r})
import dolfinx_solver
from test_plasticity import _cylinder_in_block_stiffness
json.dump([_cylinder_in_block_stiffness(float(h)) for h in sys.argv[2:]], open(sys.argv[1], 'w'))
""")
    groups = [[0.7], sizes]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda i: run([sys.executable, str(script),
                                             str(tmp_path / f"k{i}.json"),
                                             *map(str, groups[i])], cwd=REPO, timeout=600),
                              range(2)))
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    (k_ref, n_ref), = json.loads((tmp_path / "k0.json").read_text())
    ks = json.loads((tmp_path / "k1.json").read_text())
    errs = [abs(k - k_ref) / k_ref for k, _ in ks]
    print("cylinder pullout stiffness", [(h, round(k), n) for h, (k, n) in zip(sizes, ks)],
          "reference", round(k_ref), n_ref, "relative errors", errs)
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02


def test_nonlinear_bar_same_on_1_and_2_ranks(tmp_path):
    script = tmp_path / "bar.py"
    script.write_text(f"""
import sys, json
sys.path.insert(0, {str(REPO / 'tests')!r})
import dolfinx_solver
from mpi4py import MPI
import numpy as np
from test_plasticity import _run_bar
from test_plasticity import _softening_bar, SY
_, r = _run_bar(hardening=0.05)
s, _, _ = _softening_bar()
i, _, _ = _softening_bar(integration="imex", min_increment_fraction=0.25, increments=80)
nl, _, _ = _softening_bar(nz=20, crack_band=None, increments=60, dmax=0.12,
                          rest_yield=SY / 0.95, integration="imex",
                          min_increment_fraction=0.25, nonlocal_length_mm=2.0)
if MPI.COMM_WORLD.rank == 0:
    json.dump([[p.force_n for p in r.curve + s.curve + i.curve],
               [p.force_n for p in nl.curve]], open(sys.argv[1], 'w'))
""")
    out = {}
    for n in (1, 2):
        o = tmp_path / f"f{n}.json"
        p = run([venv_bin("mpiexec"), "-n", str(n), sys.executable, str(script), str(o)],
                cwd=REPO, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        out[n] = [np.array(c) for c in json.loads(o.read_text())]
    np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-6)
    # the nonlocal average sums the ranks' grids in another order: equal to the solver's
    # tolerance on the falling branch
    np.testing.assert_allclose(out[2][1], out[1][1], rtol=1e-5)


def _secant_matrix_difference() -> float:
    """‖(A_COO - A_PETSc) x‖ / ‖A_PETSc x‖ for the secant form of a damaged bar with the
    bar's Dirichlet conditions (whole nodes and single components), x random."""
    import dolfinx
    import dolfinx.fem.petsc

    from qctfea.fea.stepping import SecantMatrix

    m, mesh = _bar(n=(4, 3, 9), constitutive="damage")
    rng = np.random.default_rng(7 + mesh.comm.rank)
    m.omega.x.array[:] = rng.uniform(0.01, 1.0, m.omega.x.array.size)
    m.omega.x.scatter_forward()  # one value per cell on every rank that holds it
    fixed, loaded = _uniaxial_supports(m, mesh)
    bcs = [m.dirichlet_bc(d, c, np.zeros(3) if c is None else 0.0)
           for d, c in [*fixed, loaded]]
    ref = dolfinx.fem.petsc.create_matrix(m.a_secant)
    dolfinx.fem.petsc.assemble_matrix(ref, m.a_secant, bcs=bcs)
    ref.assemble()
    coo = SecantMatrix(m.a_secant)
    coo.assemble(bcs)
    x = ref.createVecRight()
    x.setRandom()
    y_ref, y = ref.createVecLeft(), ref.createVecLeft()
    ref.mult(x, y_ref)
    coo.mat.mult(x, y)
    y.axpy(-1.0, y_ref)
    diff = y.norm() / y_ref.norm()
    assert coo.mat.getSizes() == ref.getSizes() and coo.mat.getBlockSize() == 3
    return diff


def test_secant_matrix_equals_dolfinx_petsc_assembly(tmp_path):
    """The imex Jacobian (DOLFINx CSR assembly copied into PETSc by COO) is the matrix
    DOLFINx's PETSc assembly gives, on 1 and 2 MPI ranks (ghost rows summed, Dirichlet
    rows and columns zeroed with 1 on the diagonal)."""
    assert _secant_matrix_difference() < 1e-13
    script = tmp_path / "secant.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import dolfinx_solver
from mpi4py import MPI
from test_plasticity import _secant_matrix_difference
d = _secant_matrix_difference()
if MPI.COMM_WORLD.rank == 0:
    open(sys.argv[1], 'w').write(repr(d))
""")
    out = tmp_path / "d.txt"
    p = run([venv_bin("mpiexec"), "-n", "2", sys.executable, str(script), str(out)],
            cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert float(out.read_text()) < 1e-13


def test_largest_eigenvalue_closed_form_matches_lapack():
    """The closed-form largest principal stress (imex κ update) against numpy's eigvalsh:
    random symmetric matrices, and the degenerate cases (all three or two eigenvalues
    equal, where the formula's arccos argument is at ±1)."""
    from qctfea.fea.plasticity import largest_eigenvalue

    rng = np.random.default_rng(3)
    a = rng.normal(size=(5000, 3, 3)) * rng.uniform(0.01, 100, (5000, 1, 1))
    a = a + a.transpose(0, 2, 1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3, 3)))
    special = [np.eye(3) * -4.0, np.diag([1.0, 2.0, 2.0]), np.diag([2.0, 2.0, 1.0]),
               q[0] @ np.diag([5.0, 5.0, -1.0]) @ q[0].T, np.zeros((3, 3)),
               q[1] @ np.diag([3.0, -2.0, -2.0]) @ q[1].T]
    a = np.concatenate([a, np.array(special)])
    ref = np.linalg.eigvalsh(a)[:, 2]
    scale = np.abs(a).max(axis=(1, 2)) + 1e-300
    assert np.max(np.abs(largest_eigenvalue(a) - ref) / scale) < 1e-8
    np.testing.assert_allclose(largest_eigenvalue(np.array(special)),
                               [-4.0, 2.0, 2.0, 5.0, 0.0, 3.0], atol=1e-7)
