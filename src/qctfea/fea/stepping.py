"""Load stepping of the nonlinear analysis: displacement control, path following through
the peak, the stop rules, and the solver of one increment.

Method and sources: docs/nonlinear.md; the element law is in :mod:`qctfea.fea.plasticity`
(``PlasticModel``, whose ``run`` calls :func:`follow_path`).

Displacement control in increments. ``integration: imex`` (the default): the damage of an
increment is extrapolated from the last two increments and the increment is one linear
solve with the secant stiffness (Oliver, Huespe & Cante, CMAME 2008;197:1865); the
damage committed is then the implicit one of the new strains, and the step follows the
extrapolation's damage error. The solve starts from the last increment scaled
to the new step and stops when the (unpreconditioned) CG residual is a fraction
``IMEX_KSP_SAFETY`` of what the equilibrium test allows; the secant matrix is assembled by
DOLFINx's native CSR assembler and handed to PETSc by COO (:class:`SecantMatrix`).
``integration: newton``: each increment is solved by PETSc's SNES (Newton with the full
step, ``snes_linesearch_type basic``; inexact Newton: the Krylov tolerance follows the
Newton residual, Eisenstat & Walker, ``snes_ksp_ew``) with the consistent tangent
(non-symmetric for damage: GMRES; GAMG with the rigid body near-nullspace). When a linear
solve fails, the increment is retried with a symmetric, positive semi-definite tangent;
when Newton still fails, the step is halved (down to ``min_increment_fraction`` of the
base step). After easy increments the step grows back. The reaction force is read from
the assembled internal-force vector at the loaded nodes.

Initial stiffness k0: the first increment is a probe of ``PROBE_FRACTION`` of the
displacement range; its secant is k0.

Strength and the peak (``strength_rule``): the run follows the force-displacement curve
until it has peaked, and reports a strength only then (``peak_reached``):

* the force fell ``stop_drop_fraction`` below the largest force (the falling branch was
  traced past the peak);
* the curve flattened below ``plateau_tangent_ratio`` x k0 and stayed below that slope
  over ``peak_confirm_fraction`` of the displacement range, whatever the step (a
  plateau, the limit load, or the falling branch; a transient flattening that rises again
  is not a peak);
* collapse: equilibrium is lost even at the smallest step after the tangent had fallen
  below ``collapse_tangent_ratio`` x k0 (the curve had flattened; a snap-back that
  displacement control cannot follow). The peak is then within one increment of the
  largest converged force.

Otherwise (Newton failed while the curve still rose steeply, or the maximum
displacement was reached while it still rose) ``peak_reached`` is False, the strength is
None and ``stop_reason`` says why: the caller refuses the result.

Strength = the largest force (``peak``, the default) or the 0.2 %-offset yield point
(``offset``: where the curve crosses ``F = k0 (d - offset)``; Crawford, Cann & Keaveny,
Bone 2003;33:744); both are reported when reached, with the whole curve.
"""

# Long on purpose (about 640 lines): one algorithm, the path following of a load case (step
# control, peak detection, strength rules, stop reasons), whose parts share the walk's state;
# split, each part would reach into the others.

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dolfinx_solver  # noqa: F401  (orders MPI ahead of the compiled bindings)
import dolfinx
import dolfinx.fem.petsc
import numpy as np
from mpi4py import MPI
from petsc4py import PETSc

from qctfea.fea.elasticity import (
    DEFAULT_PETSC_OPTIONS,
    FALLBACK_PETSC_OPTIONS,
    build_nullspace,
    clear_options,
)
from qctfea.errors import QctfeaError

if TYPE_CHECKING:
    from qctfea.fea.plasticity import NonlinearParams, PlasticModel

#: Newton (SNES) and its linear solves. GAMG keeps its prolongators between Newton steps
#: (the sparsity never changes); damaged elements make one smoothing step too weak, so the
#: smoother is 2 Chebyshev steps with scalar Jacobi. (3x3 point-block Jacobi took 3-7 % fewer
#: CG iterations and 0.3-2 % less time on the demo, but GAMG's coarse levels can hold a
#: singular aggregate block, which breaks it: elasticity.SINGULAR_BLOCK_RATIO,
#: docs/performance.md; the linear solve checks for these blocks, the nonlinear one, whose
#: hierarchy PETSc builds inside Newton, avoids them.) GAMG drops graph
#: connections weaker than 0.02 of the diagonal when it aggregates (the linear default
#: keeps all): aggregates that follow the stiff bone and the screw, not the soft and the failed
#: elements (demo P01 M00: 21 % fewer CG iterations, docs/nonlinear.md). The Krylov
#: tolerance is set per Newton step by Eisenstat-Walker (``snes_ksp_ew``).
NONLINEAR_PETSC_OPTIONS = {
    **DEFAULT_PETSC_OPTIONS, **FALLBACK_PETSC_OPTIONS,
    "pc_gamg_reuse_interpolation": True,
    "snes_type": "newtonls", "snes_linesearch_type": "basic", "snes_ksp_ew": True,
    "snes_ksp_ew_rtol0": 0.1, "snes_ksp_ew_rtolmax": 0.5,
}



#: imex: an increment whose damage error exceeds this x imex_damage_tolerance is redone
IMEX_REJECT = 3.0

#: imex: the preconditioner built at the probe serves every increment; after a Krylov solve
#: that took more than this many iterations it is rebuilt once (``_IncrementSolver``; the
#: demo's increments take 6-17 with the probe's)
IMEX_PC_REBUILD_ITERATIONS = 40

#: imex: from the second increment on, CG starts from the last increment scaled to the
#: new step and stops at an absolute (unpreconditioned) residual of this x newton_rtol x
#: the internal force, so that the equilibrium test passes after the one linear solve
#: (docs/nonlinear.md)
IMEX_KSP_SAFETY = 0.3

#: An increment that took at most this many Newton iterations lets the next step grow 1.5x
#: (inexact Newton needs about 5 on an elastic increment).
GROW_BELOW_ITERATIONS = 8

#: The first increment, a probe of this fraction of the range, measures the initial stiffness.
PROBE_FRACTION = 1.0e-3


@dataclass
class CurvePoint:
    displacement_mm: float
    force_n: float
    newton_iterations: int
    yielded_cells: int
    failed_cells: int = 0


@dataclass
class NonlinearResult:
    curve: list = field(default_factory=list)
    rule: str = "peak"
    strength_n: float | None = None
    peak_force_n: float = 0.0
    offset_yield_n: float | None = None
    offset_yield_displacement_mm: float | None = None
    displacement_at_peak_mm: float = 0.0
    initial_stiffness_n_per_mm: float = 0.0
    peak_reached: bool = False
    stop_reason: str = ""
    increments: int = 0
    step_cuts: int = 0
    newton_iterations: int = 0
    ksp_iterations: int = 0
    linear_fallbacks: int = 0
    #: imex: preconditioner set-ups after the probe's (IMEX_PC_REBUILD_ITERATIONS)
    preconditioner_rebuilds: int = 0
    #: seconds of one linear solve of the model (the probe increment's Newton step)
    linear_solve_s: float = 0.0
    n_dofs: int = 0
    n_cells: int = 0
    mpi_ranks: int = 1
    seconds: dict = field(default_factory=dict)
    #: memory, largest over the ranks (MB): peak resident set of the process, and the
    #: resident set after the first increment and at the end (growth with increments)
    peak_rss_mb: float = 0.0
    rss_after_first_increment_mb: float = 0.0
    rss_end_mb: float = 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k not in ("curve", "rule")}
        d["newton_iterations_per_increment"] = (
            self.newton_iterations / self.increments if self.increments else 0.0)
        # the nonlinear solve's cost in units of one linear solve of the same model, measured
        # in the same run (docs/performance.md)
        d["cost_in_linear_solves"] = (self.seconds.get("total", 0.0) / self.linear_solve_s
                                      if self.linear_solve_s else None)
        d["curve"] = [vars(p) for p in self.curve]
        return d


def _rss_mb(comm) -> tuple[float, float]:
    """(peak, current) resident set size of this process in MB, the largest over the ranks
    (Linux: getrusage's ru_maxrss in kB, /proc/self/statm in pages)."""
    import os
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        now = float("nan")
    return comm.allreduce(peak, MPI.MAX), comm.allreduce(now, MPI.MAX)


@dataclass
class _Walk:
    """Where :meth:`PlasticModel.run` is on the displacement path."""
    base: float  #: base step
    step: float  #: next step
    offset: float  #: offset of the offset-yield line (inf: none)
    imex: bool
    d: float = 0.0  #: converged displacement
    h_last: float | None = None  #: last converged step
    tangent: float = np.inf  #: slope of the last converged increment
    #: (d, F) where the curve first flattened below the plateau slope, until confirmed
    flat_from: tuple | None = None


def _peaked(walk: _Walk, res: NonlinearResult, prev: CurvePoint, force: float, h: float,
            params: NonlinearParams) -> bool:
    """The offset crossing and the stop tests of the module docstring after one converged
    increment (sets peak_reached and stop_reason); True when the run ends."""
    k0, d, offset = res.initial_stiffness_n_per_mm, walk.d, walk.offset
    if res.offset_yield_n is None and force < k0 * (d - offset):
        # Crossing of the curve with the offset line between prev and this point.
        g0 = prev.force_n - k0 * (prev.displacement_mm - offset)
        g1 = force - k0 * (d - offset)
        t = g0 / (g0 - g1)
        res.offset_yield_n = prev.force_n + t * (force - prev.force_n)
        res.offset_yield_displacement_mm = prev.displacement_mm + t * h
        if params.strength_rule == "offset":
            res.peak_reached = True
            res.stop_reason = "offset yield point reached"
            return True
    peak = max(p.force_n for p in res.curve)
    if force < (1 - params.stop_drop_fraction) * peak:
        res.peak_reached, res.stop_reason = True, "force fell below the peak"
        return True
    limit = params.plateau_tangent_ratio * k0
    if walk.flat_from is None:
        if walk.tangent < limit:
            walk.flat_from = (prev.displacement_mm, prev.force_n)
        return False
    # A flat or falling stretch is a peak only when it lasts: the secant from where the
    # curve flattened must stay below the plateau slope over peak_confirm_fraction of the
    # displacement range, whatever the step (a transient flattening, when many cells
    # yield at once and the load redistributes, rises again; docs/nonlinear.md)
    d0, f0 = walk.flat_from
    if (force - f0) / (d - d0) >= limit:
        walk.flat_from = None
        return False
    if d - d0 >= params.peak_confirm_fraction * walk.base * params.increments * (1 - 1e-9):
        res.peak_reached = True
        res.stop_reason = ("force fell after the peak" if force < peak
                           else "plateau (limit load reached)")
        return True
    return False


def _next_step(walk: _Walk, err: float | None, its: int, params: NonlinearParams) -> float:
    """Step after a converged increment: imex follows the work error (shrink above the
    tolerance, grow below half of it), Newton grows after easy increments."""
    h_min = walk.base * params.min_increment_fraction
    if walk.imex:
        tol = params.imex_damage_tolerance
        if err > tol:
            return max(walk.step * max(0.3, 0.8 * tol / err), h_min)
        if err < 0.5 * tol:
            return min(walk.step * 1.5, walk.base)
        return walk.step
    if its <= GROW_BELOW_ITERATIONS:
        return min(walk.step * 1.5, walk.base)
    return walk.step


def _strength(res: NonlinearResult, params: NonlinearParams) -> None:
    """Peak force and, once the curve has peaked, the strength by ``strength_rule``."""
    peak = max(res.curve, key=lambda p: p.force_n)
    res.peak_force_n = peak.force_n
    res.displacement_at_peak_mm = peak.displacement_mm
    if not res.peak_reached:
        res.strength_n = None
    elif params.strength_rule == "offset" and res.offset_yield_n is not None:
        res.strength_n = res.offset_yield_n
    else:
        res.strength_n = peak.force_n
        if params.strength_rule == "offset":
            res.stop_reason += "; the offset line was not crossed: strength = peak force"


def follow_path(m: PlasticModel, fixed, loaded, direction: np.ndarray,
                max_displacement: float, offset_displacement: float | None = None,
                petsc_options: dict | None = None, prefix: str = "qctfea_nl_",
                progress=None) -> NonlinearResult:
    """Displace the ``loaded`` dofs along ``direction`` up to ``max_displacement``.

    ``fixed`` is a list of ``(dofs, component)`` held at zero and ``loaded`` one
    ``(dofs, component)``: ``component`` None means whole nodes (block dofs from
    ``locate_dofs_topological(V, ...)``), an int one displacement component (dofs
    from ``locate_dofs_topological(V.sub(i), ...)``; ``direction`` must then be
    that axis). Returns the force-displacement curve and, once the curve has peaked,
    the strength (module docstring). ``PlasticModel.run`` is the entry point.
    """
    params = m.params
    comm = m.mesh.comm
    t_start = time.perf_counter()
    res = NonlinearResult(rule=params.strength_rule, n_dofs=m.n_dofs(),
                          mpi_ranks=comm.size,
                          n_cells=m.mesh.topology.index_map(3).size_global)
    sec = {"assembly": 0.0, "solve": 0.0, "constitutive": 0.0}
    solver = _IncrementSolver(m, fixed, loaded, np.asarray(direction, float), params,
                              petsc_options, prefix, sec, res)
    walk = _Walk(base=max_displacement / params.increments,
                 step=max_displacement * PROBE_FRACTION,
                 offset=(offset_displacement if offset_displacement is not None
                         else np.inf),
                 imex=m.constitutive == "damage" and params.integration == "imex")
    res.curve.append(CurvePoint(0.0, 0.0, 0, 0))
    try:
        while walk.d < max_displacement * (1 - 1e-9):
            if _increment(m, solver, walk, res, max_displacement - walk.d, progress):
                break
        else:
            if walk.flat_from is not None:
                # flat to the end of the range: a plateau (limit load)
                res.peak_reached = True
                res.stop_reason = "plateau (limit load reached) at the maximum displacement"
            else:
                res.stop_reason = (
                    f"peak not reached: the maximum displacement ({max_displacement:.3g} "
                    f"mm) was reached while the force still rose at "
                    f"{walk.tangent / res.initial_stiffness_n_per_mm:.0%} of its initial "
                    "slope; raise the maximum displacement")
    finally:
        solver.destroy()
    if res.increments == 0:
        raise QctfeaError(f"nonlinear solve failed in the first increment: {res.stop_reason}; "
                          "check the boundary conditions, or raise loads.increments")
    _strength(res, params)
    res.seconds = {**sec, "total": time.perf_counter() - t_start}
    res.peak_rss_mb, res.rss_end_mb = _rss_mb(comm)
    return res



def _increment(m: PlasticModel, solver, walk, res, remaining: float, progress) -> bool:
    """One displacement increment of :meth:`run` (solve, imex check, commit, peak tests,
    next step). True when the run ends."""
    params = m.params
    h = min(walk.step, remaining)
    if walk.imex:
        m.fixed_D = m.imex_damage(h / walk.h_last if walk.h_last else 0.0)
    t_inc = time.perf_counter()
    ok, its, force, yielded, why = solver.increment(h)
    if res.increments == 0 and ok:
        # the elastic probe: the cost of one linear solve of this model (imex: one
        # Newton step, i.e. one assembly, preconditioner set-up and Krylov solve)
        res.linear_solve_s = (time.perf_counter() - t_inc) / max(its, 1)
    res.newton_iterations += its
    if not ok:
        return _no_equilibrium(m, walk, res, h, why, progress)
    err = None
    if walk.imex:
        # the damage the new strains give against the extrapolated one: far off, the
        # increment is redone with a smaller step
        D_ex = m.fixed_D
        err = m.imex_error(D_ex)
        tol, h_min = params.imex_damage_tolerance, walk.base * params.min_increment_fraction
        if err > IMEX_REJECT * tol and h > h_min * (1 + 1e-9) and res.increments:
            m.du.x.array[:] = 0.0
            m.fixed_D = None
            res.step_cuts += 1
            walk.step = max(h * max(0.25, 0.8 * tol / err), h_min)
            return False
        m.fixed_D = None
        # the implicit damage of the new strains is committed, not max(D_ex, D(κ)): an
        # extrapolation that overshoots (a cell that stops loading) would ratchet damage
        # the implicit solution never has (docs/nonlinear.md, "Which damage is committed")
        m.D = m.damage_of(m.k)[0]
    m.commit()
    walk.h_last = h
    walk.d += h
    res.increments += 1
    prev = res.curve[-1]
    failed = m.n_failed()
    if force >= max(p.force_n for p in res.curve):
        m.snapshot_peak()  # the elements that failed by the peak (the fields file)
    res.curve.append(CurvePoint(walk.d, force, its, yielded, failed))
    if progress:
        progress(f"  increment {res.increments}: d = {walk.d:.4f} mm, F = {force:.1f} N, "
                 f"{its} Newton, {yielded} yielded cells, {failed} softened"
                 + (f", damage error {err:.3g}" if walk.imex else ""))
    if res.increments == 1:
        res.rss_after_first_increment_mb = _rss_mb(m.mesh.comm)[1]
        # The probe increment (a small fraction of the range): initial stiffness.
        res.initial_stiffness_n_per_mm = force / walk.d
        walk.step = walk.base
        return False
    walk.tangent = (force - prev.force_n) / h
    if _peaked(walk, res, prev, force, h, params):
        return True
    walk.step = _next_step(walk, err, its, params)
    return False


def _no_equilibrium(m: PlasticModel, walk, res, h: float, why: str, progress) -> bool:
    """A failed increment: halve the step, or end the run (a collapse after the curve
    flattened, else no peak). True when the run ends."""
    params = m.params
    m.du.x.array[:] = 0.0
    res.step_cuts += 1
    walk.step = h / 2
    if progress:
        progress(f"  no equilibrium at d = {walk.d + h:.4f} mm ({why}); step "
                 f"{walk.step:.3g} mm")
    if walk.step >= walk.base * params.min_increment_fraction and res.increments > 0:
        return False
    k0, tangent = res.initial_stiffness_n_per_mm, walk.tangent
    res.stop_reason = (f"Newton did not converge at {walk.d + h:.4g} mm even "
                       f"with step {h:.3g} mm ({why})")
    if res.increments > 1 and tangent < params.collapse_tangent_ratio * k0:
        res.peak_reached = True
        res.stop_reason = (
            f"collapse: equilibrium lost after the curve flattened to "
            f"{tangent / k0:.1%} of the initial slope ({m.n_failed()} "
            f"elements fully softened); " + res.stop_reason)
    elif res.increments:
        res.stop_reason = (
            f"peak not reached: {res.stop_reason}, while the curve still "
            f"rose at {tangent / k0:.0%} of its initial slope")
    return True


class SecantMatrix:
    """A PETSc matrix of a bilinear form, assembled by DOLFINx into its native blocked CSR
    matrix and copied into PETSc with PETSc's COO interface (``MatSetValuesCOO``).

    DOLFINx's PETSc assembly inserts every cell's 12 x 12 block through
    ``MatSetValuesLocal``; on the demo model (33k cells per rank) that took 76 ms, the
    native assembly 28 ms and the COO copy 1 ms (docs/performance.md). The COO pattern is
    the CSR pattern of the owned rows (ghost rows are summed into their owners by
    ``scatter_reverse`` first), in the order of the CSR data: blocks of bs x bs, row-major.
    """

    def __init__(self, a):
        from dolfinx import la

        self.a = a
        self.csr = csr = dolfinx.fem.create_matrix(a, block_mode=la.BlockMode.compact)
        bs0, bs1 = csr.block_size
        rmap, cmap = csr.index_map(0), csr.index_map(1)
        n_rows = rmap.size_local
        indptr = csr.indptr
        n_blocks = int(indptr[n_rows])
        brow = rmap.local_to_global(np.repeat(np.arange(n_rows, dtype=np.int32),
                                              np.diff(indptr[:n_rows + 1])))
        bcol = cmap.local_to_global(np.asarray(csr.indices[:n_blocks], dtype=np.int32))
        ii, jj = np.meshgrid(np.arange(bs0), np.arange(bs1), indexing="ij")
        rows = (brow[:, None] * bs0 + ii.ravel()[None, :]).ravel()
        cols = (bcol[:, None] * bs1 + jj.ravel()[None, :]).ravel()
        self.n_data = n_blocks * bs0 * bs1
        comm = a.mesh.comm
        self.mat = PETSc.Mat().create(comm)
        self.mat.setSizes(((n_rows * bs0, rmap.size_global * bs0),
                           (cmap.size_local * bs1, cmap.size_global * bs1)), bsize=bs0)
        self.mat.setType(PETSc.Mat.Type.AIJ)
        self.mat.setPreallocationCOO(rows.astype(PETSc.IntType), cols.astype(PETSc.IntType))

    def assemble(self, bcs) -> None:
        """Assemble the form (Dirichlet rows and columns zeroed, 1 on their diagonal)."""
        self.csr.set_value(0.0)
        dolfinx.fem.assemble_matrix(self.csr, self.a, bcs=bcs)
        self.csr.scatter_reverse()
        self.mat.setValuesCOO(self.csr.data[:self.n_data])


class _IncrementSolver:
    """One displacement increment by PETSc SNES on the increment ``du`` (module docstring)."""

    def __init__(self, model: PlasticModel, fixed, loaded, direction, params, petsc_options,
                 prefix, sec, res):
        self.m, self.params, self.sec, self.res = model, params, sec, res
        self.comm = comm = model.mesh.comm
        self.direction = direction
        l_dofs, self.l_comp = loaded
        self.g = dolfinx.fem.Constant(model.mesh,
                                      np.zeros(3) if self.l_comp is None else 0.0)
        self.bcs = [model.dirichlet_bc(dofs, comp, np.zeros(3) if comp is None else 0.0)
                    for dofs, comp in fixed]
        self.bcs.append(model.dirichlet_bc(l_dofs, self.l_comp, self.g))
        self.bc_rows = np.unique(np.concatenate([model.owned_rows(d, c)
                                                 for d, c in [*fixed, loaded]]))
        self.loaded_rows = model.owned_rows(l_dofs, self.l_comp)
        self.row_weight = (np.tile(direction, len(self.loaded_rows) // 3)
                           if self.l_comp is None
                           else np.full(len(self.loaded_rows), direction[self.l_comp]))
        self.imex = model.constitutive == "damage" and params.integration == "imex"
        self.a = model.a_secant if self.imex else model.a_tangent  # the Jacobian's form
        if self.imex:
            # assembled by DOLFINx into its own CSR matrix and copied into PETSc by COO
            # (SecantMatrix): the secant matrix is re-assembled every increment
            self.secant = SecantMatrix(self.a)
            self.A = self.secant.mat
        else:
            self.secant = None
            self.A = dolfinx.fem.petsc.create_matrix(self.a)
        self.A.setNearNullSpace(build_nullspace(model.V))
        self.b = dolfinx.fem.petsc.create_vector(model.V)
        self.r = self.b.duplicate()
        self.x = self.b.duplicate()
        opts = {**NONLINEAR_PETSC_OPTIONS, "snes_max_it": params.newton_max_it,
                "snes_rtol": 0.0, "snes_atol": 0.0, "snes_stol": 0.0,
                **(petsc_options or {})}
        if self.imex:
            # imex: one linear, symmetric positive definite solve per increment: CG, solved
            # tightly (Newton then stops after one step). The secant stiffness changes only
            # where damage grows, so the preconditioner built for one increment serves the
            # next ones: PETSc builds it once (lag -2: at the first chance, then never) and it
            # is rebuilt only after a slow Krylov solve (IMEX_PC_REBUILD_ITERATIONS; CG stays
            # convergent with any SPD preconditioner, a stale one costs iterations:
            # docs/nonlinear.md)
            opts = {**opts, "snes_ksp_ew": False, "ksp_rtol": 1.0e-8,
                    "snes_lag_preconditioner": -2,
                    "snes_lag_preconditioner_persists": True,
                    **(petsc_options or {})}
        elif model.constitutive == "damage":
            # The consistent damage tangent is not symmetric: GMRES instead of CG.
            opts = {"ksp_type": "gmres", "ksp_gmres_restart": 100,
                    "mg_levels_esteig_ksp_type": "gmres", **opts}
            if opts.get("ksp_type") == "cg":
                opts["ksp_type"] = "gmres"
        self.opts, self.prefix = opts, prefix
        po = PETSc.Options()
        for k, v in opts.items():
            po[prefix + k] = v
        snes = PETSc.SNES().create(comm)
        snes.setOptionsPrefix(prefix)
        snes.setFunction(self._F, self.b)
        snes.setJacobian(self._J, self.A)
        snes.setConvergenceTest(self._converged)
        snes.setFromOptions()
        snes.getKSP().setFromOptions()
        self.snes = snes
        self.force = 0.0
        self.yielded = 0
        self.norms = (np.inf, 1.0)
        #: imex: du and step of the last solved increment, the next one's predictor
        self.x_last = self.b.duplicate()
        self.h_last = None

    # SNES callbacks --------------------------------------------------------------------
    def _F(self, snes, x, F):
        m, sec = self.m, self.sec
        x.ghostUpdate(addv=PETSc.InsertMode.INSERT, mode=PETSc.ScatterMode.FORWARD)
        x.copy(m.du.x.petsc_vec)
        m.du.x.scatter_forward()
        t0 = time.perf_counter()
        self.yielded = m.return_mapping()
        sec["constitutive"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with F.localForm() as fl:
            fl.set(0.0)
        dolfinx.fem.petsc.assemble_vector(F, m.f_internal)
        with F.localForm() as fl, self.r.localForm() as rl:
            fl.copy(rl)
        self.r.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        arr = self.r.getArray(readonly=True)
        comm = self.comm
        self.force = comm.allreduce(float(arr[self.loaded_rows] @ self.row_weight), MPI.SUM)
        free = arr.copy()
        free[self.bc_rows] = 0.0
        self.norms = (np.sqrt(comm.allreduce(float(free @ free), MPI.SUM)),
                      np.sqrt(comm.allreduce(float(arr @ arr), MPI.SUM)))
        if self.imex and self.h_last is not None:
            # the Krylov solve that follows needs only what the equilibrium test asks
            snes.getKSP().setTolerances(
                atol=IMEX_KSP_SAFETY * self.params.newton_rtol * self.norms[1])
        dolfinx.fem.petsc.apply_lifting(F, [self.a], bcs=[self.bcs], x0=[x], alpha=-1.0)
        F.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        dolfinx.fem.petsc.set_bc(F, self.bcs, x0=x, alpha=-1.0)
        sec["assembly"] += time.perf_counter() - t0

    def _J(self, snes, x, J, P):
        t0 = time.perf_counter()
        if self.secant is not None:
            self.secant.assemble(self.bcs)
        else:
            J.zeroEntries()
            dolfinx.fem.petsc.assemble_matrix(J, self.a, bcs=self.bcs)
            J.assemble()
        self.sec["assembly"] += time.perf_counter() - t0

    def _converged(self, snes, it, norms):
        r_free, r_all = self.norms
        if not np.isfinite(r_free):
            return PETSc.SNES.ConvergedReason.DIVERGED_FNORM_NAN
        if it > 0 and r_free <= self.params.newton_rtol * max(r_all, 1e-30):
            return PETSc.SNES.ConvergedReason.CONVERGED_FNORM_RELATIVE
        if it >= self.params.newton_max_it:
            return PETSc.SNES.ConvergedReason.DIVERGED_MAX_IT
        return PETSc.SNES.ConvergedReason.ITERATING

    # -----------------------------------------------------------------------------------
    def _solve(self, step: float):
        self.g.value = (step * self.direction if self.l_comp is None
                        else step * self.direction[self.l_comp])
        # Start from du = 0 (the converged state): the first Newton step is the tangent
        # predictor. (Starting from the prescribed boundary values with the interior at rest
        # strains the first layer of elements far into softening, and Newton then stalls.)
        # imex: the last increment scaled to this step (the same boundary values; the
        # secant stiffness changed only where damage grew).
        if self.imex and self.h_last is not None:
            self.x_last.copy(self.x)
            self.x.scale(step / self.h_last)
        else:
            self.x.set(0.0)
        t0 = time.perf_counter()
        self.snes.solve(None, self.x)
        self.sec["solve"] += time.perf_counter() - t0
        ksp_its = int(self.snes.getLinearSolveIterations())
        self.res.ksp_iterations += ksp_its
        if self.imex and self.h_last is not None and ksp_its > IMEX_PC_REBUILD_ITERATIONS:
            # the preconditioner has gone stale: rebuild it at the next Jacobian, once.
            # petsc4py has no SNESSetLagPreconditioner; the options database holds lag -2
            # (rebuild at the next chance, then never again), which setFromOptions applies.
            # It re-reads the KSP's options too: atol is set again in _F before the next
            # solve, the norm type is kept (none in the options)
            self.snes.setFromOptions()
            self.res.preconditioner_rebuilds += 1
        reason = self.snes.getConvergedReason()
        return reason, int(self.snes.getIterationNumber())

    def increment(self, step: float):
        """Solve one increment; (converged, Newton iterations, force, yielded, why not)."""
        m = self.m
        m.symmetric_tangent = False
        reason, its = self._solve(step)
        if reason == PETSc.SNES.ConvergedReason.DIVERGED_LINEAR_SOLVE \
                and m.constitutive == "damage":
            # The consistent tangent is indefinite where elements soften: retry this
            # increment with the symmetric, positive semi-definite tangent.
            self.res.linear_fallbacks += 1
            m.symmetric_tangent = True
            reason, its2 = self._solve(step)
            its += its2
            m.symmetric_tangent = False
        ok = reason > 0
        if ok:
            # the state of the converged iterate (SNES evaluated F last at the solution)
            self.x.copy(m.du.x.petsc_vec)
            m.du.x.scatter_forward()
            if self.imex:
                m.update_kappa()
                if self.h_last is None:
                    # after the probe (the unit of cost_in_linear_solves, solved as before):
                    # the Krylov test on the true residual, the equilibrium test's norm
                    self.snes.getKSP().setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
                self.x.copy(self.x_last)
                self.h_last = step
        names = {v: k for k, v in vars(PETSc.SNES.ConvergedReason).items()
                 if isinstance(v, int)}
        return ok, its, self.force, self.yielded, names.get(reason, str(reason))

    def destroy(self):
        clear_options(self.prefix, self.opts)
        self.snes.destroy()
        for o in (self.A, self.b, self.r, self.x, self.x_last):
            o.destroy()
