"""Nonlinear bone in DOLFINx: regularised softening damage (default) or von Mises plasticity.

Method and sources: docs/nonlinear.md. (Longer than the other modules, about 940 lines, on
purpose: the constitutive update, the increment solver and the path following with its
stop rules are one algorithm, and this file reads top to bottom as docs/nonlinear.md
describes it.) In short:

Two constitutive models (``constitutive``), both small strain, rate independent,
isotropic linear elastic (E and ν per element, from the material law) below the
element's yield stress ``σ_y`` (the law's uniaxial compressive yield stress):

* ``damage`` (the default): isotropic damage ``σ = (1 - D) C:ε`` driven by one history
  variable, the equivalent strain ``κ = max over the history of τ(C:ε) / E`` with
  ``τ = max(q, σ_1 / t)`` (``q`` the von Mises stress, ``σ_1`` the largest principal
  stress, ``t = tensile_strength_ratio``: bone cracks in tension at ``t σ_y``). For
  uniaxial stress ``κ`` is the strain. The element's stress-strain law in ``κ``:
  elastic to ``ε_y = σ_y / E``, a plateau at ``σ_y`` to the softening strain ``ε_s``, then a
  linear fall to zero at ``ε_r`` (the element keeps ``residual_fraction`` of its stiffness,
  so the system stays solvable). ``ε_s - ε_y`` and ``ε_r - ε_s`` are ``failure_strain -
  ε_y`` and ``softening_strain`` at the reference element size ``crack_band_mm``, scaled
  by ``crack_band_mm / h`` for an element of size ``h`` (the crack band of Bažant & Oh,
  Mater Struct 1983;16:155): the energy an element dissipates per unit area of a band
  one element wide is the same on every mesh, so the structure's strength does not
  depend on how finely it is meshed. The plateau's end at 1 % strain on the reference
  element follows the crushing strain of Bessho et al. (J Biomech 2007;40:1745).
  Why damage rather than plasticity: von Mises plastic flow is isochoric and linear
  tetrahedra lock under an isochoric constraint (measured on a cylinder pulled from a
  block: plasticity still rose at 2.5x the shear-cylinder limit); damage softens the
  volume too.
* ``plasticity``: von Mises yield surface ``f = q - (σ_y + H p) <= 0``, associated
  flow, linear isotropic hardening ``H = hardening_ratio * E`` (0: perfect
  plasticity); radial return (Simo & Hughes 1998, box 3.2) and the consistent tangent
  (Simo & Taylor 1985). Locks on linear tetrahedra (above); kept for comparisons.

Elements with infinite yield stress (screw, Keyak's no-yield range) stay elastic.
Discretisation: P1 displacement on tetrahedra; strain, stress and the internal
variables are constant per element (one quadrature point, exact for P1), updated
vectorised in numpy over the cells of the process (owned and ghost cells, so no
communication is needed and every rank holds the same state for a shared cell).

Solver: displacement control in increments. ``integration: imex`` (the default): the
damage of an increment is extrapolated from the last two increments and the increment is
one linear solve with the secant stiffness (Oliver, Huespe & Cante, CMAME 2008;197:1865);
the step follows the extrapolation's damage error. The solve starts from the last
increment scaled to the new step and stops when the (unpreconditioned) CG residual is a
fraction ``IMEX_KSP_SAFETY`` of what the equilibrium test allows. ``integration:
newton``: each increment is solved by PETSc's SNES
(Newton with the full step, ``snes_linesearch_type basic``; inexact Newton:
the Krylov tolerance follows the Newton residual, Eisenstat & Walker, ``snes_ksp_ew``)
with the consistent tangent (non-symmetric for damage: GMRES; GAMG with the rigid body
near-nullspace). When a linear solve fails, the increment is retried with a symmetric,
positive semi-definite tangent; when Newton still fails, the step is halved (down to
``min_increment_fraction`` of the base step). After easy increments the step grows back.
The reaction force is read from the assembled internal-force vector at the loaded nodes.

Initial stiffness k0: the first increment is a probe of ``PROBE_FRACTION`` of the
displacement range; its secant is k0.

Strength and the peak (``strength_rule``): the run follows the force-displacement curve
until it has peaked, and reports a strength only then (``peak_reached``):

* the force fell ``stop_drop_fraction`` below the largest force (the falling branch was
  traced past the peak);
* the curve flattened below ``plateau_tangent_ratio`` x k0 and stayed below that slope
  over ``PEAK_CONFIRM_STEPS`` smallest steps (a plateau, the limit load, or the falling
  branch; a transient flattening that rises again is not a peak);
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

from __future__ import annotations

import time
from dataclasses import dataclass, field

import dolfinx_solver  # noqa: F401  (orders MPI ahead of the compiled bindings)
import dolfinx
import dolfinx.fem.petsc
import numpy as np
import ufl
from mpi4py import MPI
from petsc4py import PETSc

from qctfea.fea.elasticity import (
    DEFAULT_PETSC_OPTIONS,
    ElasticModel,
    build_nullspace,
    clear_options,
)
from qctfea.errors import QctfeaError

#: Newton (SNES) and its linear solves. GAMG keeps its prolongators between Newton steps
#: (the sparsity never changes); damaged elements make one smoothing step too weak, so the
#: smoother is PETSc's 2 Chebyshev steps with scalar Jacobi (docs/performance.md). The
#: Krylov tolerance is set per Newton step by Eisenstat-Walker (``snes_ksp_ew``).
NONLINEAR_PETSC_OPTIONS = {
    **DEFAULT_PETSC_OPTIONS, "mg_levels_pc_type": "jacobi", "mg_levels_ksp_max_it": 2,
    "pc_gamg_reuse_interpolation": True,
    "snes_type": "newtonls", "snes_linesearch_type": "basic", "snes_ksp_ew": True,
    "snes_ksp_ew_rtol0": 0.1, "snes_ksp_ew_rtolmax": 0.5,
}


@dataclass
class NonlinearParams:
    increments: int = 25  #: base number of increments to the maximum displacement
    min_increment_fraction: float = 0.25  #: smallest step, as a fraction of the base step
    #: equilibrium: ‖free residual‖ <= rtol ‖internal force‖ (imex and Newton)
    newton_rtol: float = 1.0e-4
    newton_max_it: int = 25
    hardening_ratio: float = 0.0  #: H / E of yielding elements (0: perfectly plastic)
    stop_drop_fraction: float = 0.05  #: stop once F < (1 - this) * peak
    plateau_tangent_ratio: float = 0.02  #: stop once dF/dd < this * initial stiffness
    #: equilibrium lost at the smallest step after dF/dd fell below this x k0: collapse
    collapse_tangent_ratio: float = 0.1
    #: "offset": the offset yield force (see the module docstring); "peak": the maximum force
    strength_rule: str = "peak"
    #: damage: equivalent strain where softening begins, on the reference element (None:
    #: never; a plateau at the yield stress)
    failure_strain: float | None = 0.01
    #: damage: strain over which the stress falls from σ_y to zero, on the reference element
    softening_strain: float = 0.02
    #: damage: reference element size of the two strains above (mm); None: no scaling
    crack_band_mm: float | None = 2.0
    #: damage: cracking in tension at this x the yield stress (None: von Mises only)
    tensile_strength_ratio: float | None = 0.8
    #: damage: a fully softened element keeps this fraction of its stiffness
    residual_fraction: float = 0.01
    #: damage: "imex" (the damage of each increment extrapolated from the last two, then one
    #: linear solve; Oliver et al. 2008) or "newton" (implicit, Newton to equilibrium)
    integration: str = "imex"
    #: imex: the step shrinks when the extrapolated damage misses the damage the new strains
    #: give by more than this fraction of the strain energy (``_imex_error``), grows below
    #: half of it
    imex_damage_tolerance: float = 0.02

    def __post_init__(self):
        if self.strength_rule not in ("offset", "peak"):
            raise QctfeaError(f"loads.strength_rule must be 'offset' or 'peak', not "
                              f"{self.strength_rule!r}")
        if not 0 < self.residual_fraction < 1:
            raise QctfeaError(f"loads.residual_fraction must be in (0, 1), not "
                              f"{self.residual_fraction}")
        for name in ("failure_strain", "tensile_strength_ratio", "crack_band_mm"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise QctfeaError(f"loads.{name} must be positive or null, not {v}")
        if self.integration not in INTEGRATIONS:
            raise QctfeaError(f"loads.integration must be one of {list(INTEGRATIONS)}, not "
                              f"{self.integration!r}")
        if not self.softening_strain > 0:
            raise QctfeaError(f"loads.softening_strain must be positive, not "
                              f"{self.softening_strain}")


#: damage integration: explicit-implicit (one linear solve per increment) or Newton
INTEGRATIONS = ("imex", "newton")

#: ``plasticity``: von Mises return mapping; ``damage``: regularised softening damage
CONSTITUTIVE_MODELS = ("plasticity", "damage")

#: imex: an increment whose damage error exceeds this x imex_damage_tolerance is redone
IMEX_REJECT = 3.0

#: A flattening of the curve (slope below plateau_tangent_ratio x k0) ends the run once it
#: has lasted this many smallest steps (``_peaked``)
PEAK_CONFIRM_STEPS = 2

#: imex: the preconditioner is rebuilt every this many increments (``_IncrementSolver``)
IMEX_PC_LAG = 10

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
    # curve flattened must stay below the plateau slope over PEAK_CONFIRM_STEPS smallest
    # steps (a transient flattening, when many cells yield at once and the load
    # redistributes, rises again; docs/nonlinear.md)
    d0, f0 = walk.flat_from
    if (force - f0) / (d - d0) >= limit:
        walk.flat_from = None
        return False
    if d - d0 >= PEAK_CONFIRM_STEPS * walk.base * params.min_increment_fraction * (1 - 1e-9):
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


def largest_eigenvalue(a: np.ndarray) -> np.ndarray:
    """Largest eigenvalue of each symmetric 3 x 3 matrix of ``a`` (n, 3, 3), in closed form:
    the trigonometric solution of the characteristic cubic (Smith, Commun ACM 1961;4:168).

    Written out because numpy's batched ``eigvalsh`` calls LAPACK once per matrix: on the
    33k cells of a demo rank it took 20 ms, this 3 ms, and the imex loop evaluates it once
    per increment. Agrees with ``eigvalsh`` to about 1e-8 of the matrix's norm (the
    formula loses digits when two eigenvalues nearly coincide; test_plasticity)."""
    q = np.trace(a, axis1=1, axis2=2) / 3.0
    p1 = a[:, 0, 1] ** 2 + a[:, 0, 2] ** 2 + a[:, 1, 2] ** 2
    d0, d1, d2 = a[:, 0, 0] - q, a[:, 1, 1] - q, a[:, 2, 2] - q
    p = np.sqrt((d0 * d0 + d1 * d1 + d2 * d2 + 2.0 * p1) / 6.0)
    ps = np.where(p > 0, p, 1.0)
    # det(B) / 2 with B = (A - q I) / p
    a01, a02, a12 = a[:, 0, 1], a[:, 0, 2], a[:, 1, 2]
    det = (d0 * (d1 * d2 - a12 * a12) - a01 * (a01 * d2 - a12 * a02)
           + a02 * (a01 * a12 - d1 * a02))
    r = np.clip(det / (2.0 * ps ** 3), -1.0, 1.0)
    return q + 2.0 * p * np.cos(np.arccos(r) / 3.0)


def cell_sizes(mesh) -> np.ndarray:
    """Size h of every local cell (owned and ghost): ``(6 V)^(1/3)``, the edge of the cube of
    which the tetrahedron is one sixth (a box mesh's cube side)."""
    x = mesh.geometry.x
    g = mesh.geometry.dofmaps[0]
    n_all = mesh.topology.index_map(3).size_local + mesh.topology.index_map(3).num_ghosts
    p = x[g[:n_all]]
    vol = np.abs(np.linalg.det(p[:, 1:] - p[:, :1])) / 6.0
    return np.cbrt(6.0 * vol)


class PlasticModel(ElasticModel):
    """P1 damage or von Mises plasticity with element-wise E, ν and yield stress."""

    def __init__(self, mesh, youngs_mpa: np.ndarray, poisson: np.ndarray,
                 yield_mpa: np.ndarray, hardening_ratio: float = 0.0,
                 constitutive: str = "damage", params: NonlinearParams | None = None):
        super().__init__(mesh, youngs_mpa, poisson)
        if constitutive not in CONSTITUTIVE_MODELS:
            raise QctfeaError(f"loads.constitutive must be one of {CONSTITUTIVE_MODELS}, not "
                              f"{constitutive!r}")
        if constitutive == "damage" and hardening_ratio != 0:
            raise QctfeaError("loads.hardening_ratio must be 0 with loads.constitutive: damage "
                              "(its law is set by the failure and softening strains); use "
                              "plasticity for hardening")
        if hardening_ratio < 0:
            raise QctfeaError(
                f"loads.hardening_ratio = {hardening_ratio}: softening plasticity is not "
                "supported (use the damage model, whose softening is regularised); use 0 "
                "(perfect plasticity) or a positive hardening ratio")
        self.constitutive = constitutive
        self.params = params or NonlinearParams()
        V0 = dolfinx.fem.functionspace(mesh, ("DG", 0))
        W = dolfinx.fem.functionspace(mesh, ("DG", 0, (3, 3)))
        self.V0, self.W = V0, W
        n_all = (mesh.topology.index_map(3).size_local + mesh.topology.index_map(3).num_ghosts)
        cells = np.arange(n_all, dtype=np.int32)
        self._s_idx = V0.dofmap.list[cells, 0]  # scalar DG0 dof of each local cell
        self._t_idx = W.dofmap.list[cells, 0]  # tensor DG0 block of each local cell
        E = self.E.x.array[self._s_idx].copy()
        nu = self.nu.x.array[self._s_idx].copy()
        ys = np.asarray(yield_mpa, float)
        orig = np.asarray(mesh.topology.original_cell_index)[:n_all]
        self.c_E = E
        self.c_mu = E / (2 * (1 + nu))
        self.c_lmbda = E * nu / ((1 + nu) * (1 - 2 * nu))
        self.c_H = hardening_ratio * E
        self.c_sy = np.where(np.isfinite(ys[orig]), ys[orig], np.inf)
        self.hardening_ratio = hardening_ratio
        self._set_damage_law(self.params)
        # State: converged stress and plastic strain (plasticity); converged total strain
        # and equivalent strain (damage); trial quantities of the iterate.
        self.sig_n = np.zeros((n_all, 3, 3))
        self.p_n = np.zeros(n_all)
        self.dp = np.zeros(n_all)
        self.eps_n = np.zeros((n_all, 3, 3))
        self.k_n = np.zeros(n_all)
        self.k = np.zeros(n_all)
        self.D_n = np.zeros(n_all)
        self.D = np.zeros(n_all)
        self.k_prev = np.zeros(n_all)  # κ one increment before k_n (imex extrapolation)
        #: imex: the damage of the current increment, fixed (None: from the iterate's strain)
        self.fixed_D = None
        self.sig = dolfinx.fem.Function(W, name="stress")
        self.omega = dolfinx.fem.Function(V0, name="secant_factor")
        self.beta = dolfinx.fem.Function(V0, name="beta")
        self.P = dolfinx.fem.Function(W, name="tangent_p")
        self.M = dolfinx.fem.Function(W, name="tangent_m")
        self.omega.x.array[:] = 1.0
        #: use the symmetric positive semi-definite tangent (set for an increment when a
        #: linear solve with the consistent tangent fails)
        self.symmetric_tangent = False
        self.du = dolfinx.fem.Function(self.V, name="increment")
        self._eps_expr = dolfinx.fem.Expression(self.eps(self.du), W.element.interpolation_points)
        self._deps = dolfinx.fem.Function(W)
        mu, lmbda, beta, omega, P, M = self.mu, self.lmbda, self.beta, self.omega, self.P, self.M
        w, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)

        def sigma_tang(e):
            # dσ = ω C:e - (P:e) M - 2μβ dev(e), per cell (module docstring, docs/nonlinear.md)
            return (omega * (lmbda * ufl.tr(e) * ufl.Identity(3) + 2 * mu * e)
                    - ufl.inner(P, e) * M - 2 * mu * beta * ufl.dev(e))

        dx = ufl.dx(metadata={"quadrature_degree": 1})
        self.a_tangent = dolfinx.fem.form(ufl.inner(sigma_tang(self.eps(w)), self.eps(v)) * dx)
        #: imex: the secant stiffness ω C alone (the same matrix as a_tangent with P = M =
        #: β = 0, about half its assembly time)
        self.a_secant = dolfinx.fem.form(
            ufl.inner(omega * (lmbda * ufl.tr(self.eps(w)) * ufl.Identity(3)
                               + 2 * mu * self.eps(w)), self.eps(v)) * dx)
        self.f_internal = dolfinx.fem.form(ufl.inner(self.sig, self.eps(v)) * dx)

    def _set_damage_law(self, p: NonlinearParams) -> None:
        """Per cell: yield, softening-onset and zero-stress strains (crack-band scaled)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            self.c_ey = self.c_sy / self.c_E
        self.c_vol = cell_sizes(self.mesh) ** 3 / 6.0
        scale = (p.crack_band_mm / cell_sizes(self.mesh) if p.crack_band_mm is not None
                 else np.ones_like(self.c_E))
        if p.failure_strain is None:
            self.c_es = np.full_like(self.c_E, np.inf)
        else:
            self.c_es = self.c_ey + np.maximum(p.failure_strain - self.c_ey, 0.0) * scale
        self.c_er = self.c_es + p.softening_strain * scale
        self.tensile_ratio = p.tensile_strength_ratio
        self.residual = p.residual_fraction

    # --- constitutive update ------------------------------------------------------------
    def _set_cells(self, fn, values):
        if values.ndim == 1:
            fn.x.array[self._s_idx] = values
        else:
            fn.x.array.reshape(-1, 9)[self._t_idx] = values.reshape(-1, 9)
        fn.x.scatter_forward()

    def return_mapping(self) -> int:
        """Stress of the current iterate and the tangent data. Number of yielded cells."""
        self._deps.interpolate(self._eps_expr)
        de = self._deps.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3)
        de = 0.5 * (de + de.transpose(0, 2, 1))
        if self.constitutive == "damage":
            return self._damage_update(de)
        mu, lm, H = self.c_mu, self.c_lmbda, self.c_H
        tr = np.trace(de, axis1=1, axis2=2)
        eye = np.eye(3)
        sig_tr = self.sig_n + lm[:, None, None] * tr[:, None, None] * eye + 2 * mu[:, None, None] * de
        s = sig_tr - np.trace(sig_tr, axis1=1, axis2=2)[:, None, None] / 3.0 * eye
        q = np.sqrt(1.5 * np.einsum("nij,nij->n", s, s))
        f = q - (self.c_sy + H * self.p_n)
        plastic = f > 0
        qs = np.where(plastic, q, 1.0)
        dp = np.where(plastic, f / (3 * mu + H), 0.0)
        beta = np.where(plastic, 3 * mu * dp / qs, 0.0)
        N = np.where(plastic[:, None, None], s / qs[:, None, None], 0.0)
        kappa = np.where(plastic, 3 * mu / (3 * mu + H) - beta, 0.0)
        self.dp = dp
        self._set_cells(self.sig, sig_tr - beta[:, None, None] * s)
        self._set_cells(self.P, 3 * mu[:, None, None] * kappa[:, None, None] * N)
        self._set_cells(self.M, N)
        self._set_cells(self.beta, beta)
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int(plastic[:n_owned].sum()), MPI.SUM)

    def stress_cap(self, k: np.ndarray):
        """The damage law in the equivalent strain: allowed stress s(κ) and ds/dκ per cell."""
        E, sy, ey, es, er = self.c_E, self.c_sy, self.c_ey, self.c_es, self.c_er
        with np.errstate(invalid="ignore"):
            soft = (k > es) & (k < er)
            s = np.where(k <= ey, E * k, np.where(k <= es, sy, np.where(
                soft, sy * (er - k) / np.where(soft, er - es, 1.0), 0.0)))
            ds = np.where(k <= ey, E, np.where(soft, -sy / np.where(soft, er - es, 1.0), 0.0))
        return s, ds

    def _damage_update(self, de: np.ndarray) -> int:
        """``σ = (1 - D) C:ε``, ``D = 1 - s(κ) / (E κ)``; the consistent tangent's P and M."""
        eps = self.eps_n + de
        mu, lm, E = self.c_mu, self.c_lmbda, self.c_E
        eye = np.eye(3)
        tr = np.trace(eps, axis1=1, axis2=2)
        sig_e = lm[:, None, None] * tr[:, None, None] * eye + 2 * mu[:, None, None] * eps
        self._w_el = np.einsum("nij,nij->n", sig_e, eps)  # ε:C:ε (Clapeyron check, tests)
        self._sig_e = sig_e
        if self.fixed_D is not None:
            # imex: the extrapolated damage, fixed over the increment: a linear, symmetric
            # positive definite problem (secant stiffness). κ is not needed to solve it:
            # update_kappa() computes it once, at the converged iterate.
            D = self.fixed_D
            self.D = D
            self._set_cells(self.sig, (1.0 - D)[:, None, None] * sig_e)
            self._set_cells(self.omega, 1.0 - D)
            self._set_cells(self.P, np.zeros_like(sig_e))
            self._set_cells(self.M, np.zeros_like(sig_e))
            n_owned = self.mesh.topology.index_map(3).size_local
            return self.mesh.comm.allreduce(int((D[:n_owned] > 0).sum()), MPI.SUM)
        k, loading, tensile, q, s, vec = self._kappa(sig_e, vectors=not self.symmetric_tangent)
        D, floor, cap, dcap = self.damage_of(k)
        self.k = k
        self.D = D
        # dD/dκ on loading cells, ∂κ/∂ε = C:∂τ/∂σ̃ / E  (docs/nonlinear.md)
        with np.errstate(invalid="ignore", divide="ignore"):
            dD = np.where(loading & ~floor, (cap - dcap * k) / (E * k * k), 0.0)
        qs = np.where(q > 0, q, 1.0)
        if self.symmetric_tangent:
            # symmetric, positive semi-definite: the plateau's tangent (1-D)(C - 3μ N⊗N) on
            # von Mises loading cells, the secant (1-D) C elsewhere
            act = loading & ~tensile & ~floor
            N = s / qs[:, None, None]
            P = np.where(act[:, None, None], 3 * ((1 - D) * mu)[:, None, None] * N, 0.0)
            M = np.where(act[:, None, None], N, 0.0)
        else:
            dk = 3 * mu[:, None, None] * s / qs[:, None, None] / E[:, None, None]
            if tensile.any():
                n1 = vec[:, :, 2]
                dk_t = (lm[:, None, None] * eye + 2 * mu[:, None, None]
                        * np.einsum("ni,nj->nij", n1, n1)) / (self.tensile_ratio * E)[:, None, None]
                dk = np.where(tensile[:, None, None], dk_t, dk)
            P = dD[:, None, None] * dk
            M = np.where(loading[:, None, None], sig_e, 0.0)
        self._set_cells(self.sig, (1.0 - D)[:, None, None] * sig_e)
        self._set_cells(self.omega, 1.0 - D)
        self._set_cells(self.P, P)
        self._set_cells(self.M, M)
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int((D[:n_owned] > 0).sum()), MPI.SUM)

    def _kappa(self, sig_e: np.ndarray, vectors: bool):
        """Equivalent strain of trial stresses ``sig_e`` (never below the converged one):
        κ, loading cells, cells in tension, von Mises stress, deviator and (``vectors``)
        the principal directions (None otherwise: the closed-form largest principal stress,
        ``largest_eigenvalue``)."""
        E = self.c_E
        s = sig_e - np.trace(sig_e, axis1=1, axis2=2)[:, None, None] / 3.0 * np.eye(3)
        q = np.sqrt(1.5 * np.einsum("nij,nij->n", s, s))
        tau, vec = q, None
        tensile = np.zeros(len(q), bool)
        if self.tensile_ratio is not None:
            if vectors:
                w, vec = np.linalg.eigh(sig_e)
                s1 = w[:, 2] / self.tensile_ratio
            else:
                s1 = largest_eigenvalue(sig_e) / self.tensile_ratio
            tensile = s1 > q
            tau = np.where(tensile, s1, q)
        k_tr = tau / E
        bone = np.isfinite(self.c_sy)
        loading = bone & (k_tr >= self.k_n) & (k_tr > self.c_ey)
        return np.where(loading, k_tr, self.k_n), loading, tensile, q, s, vec

    def update_kappa(self) -> None:
        """imex: the equivalent strain of the last evaluated (converged) iterate."""
        self.k = self._kappa(self._sig_e, vectors=False)[0]

    def damage_of(self, k: np.ndarray):
        """Damage of equivalent strains ``k`` (never below the converged damage): D, whether
        D is at its cap 1 - residual_fraction, and the law's s(κ), ds/dκ."""
        E = self.c_E
        cap, dcap = self.stress_cap(k)
        with np.errstate(invalid="ignore", divide="ignore"):
            D = np.where(np.isfinite(self.c_sy) & (k > self.c_ey), 1.0 - cap / (E * k), 0.0)
        floor = D >= 1.0 - self.residual
        D = np.maximum(np.clip(D, 0.0, 1.0 - self.residual), self.D_n)
        return D, floor, cap, dcap

    def imex_damage(self, ratio: float) -> np.ndarray:
        """Extrapolated damage of the next increment: κ_n + ratio (κ_n - κ_{n-1}), ratio the
        next step over the last (Oliver, Huespe & Cante, CMAME 2008;197:1865)."""
        k = self.k_n + ratio * np.maximum(self.k_n - self.k_prev, 0.0)
        return self.damage_of(k)[0]

    def _imex_error(self, D_imex: np.ndarray) -> float:
        """Energy-weighted error of the extrapolated damage: sum over bone cells of all ranks
        of |D(κ_new) - D_imex| E κ² V over the sum of E κ² V, i.e. the fraction of the
        undamaged strain energy by which the extrapolation misjudged the damage (a cell that
        starts to yield in an increment always misses its first damage, but only the cells
        that carry the load move the force)."""
        n_owned = self.mesh.topology.index_map(3).size_local
        D_new = self.damage_of(self.k)[0][:n_owned]
        bone = np.isfinite(self.c_sy[:n_owned])
        w = (self.c_E * self.k ** 2 * self.c_vol)[:n_owned][bone]
        num = float(np.abs(D_new - D_imex[:n_owned])[bone] @ w)
        num, den = self.mesh.comm.allreduce(np.array([num, float(w.sum())]), MPI.SUM)
        return num / den if den > 0 else 0.0

    @property
    def failed(self) -> np.ndarray:
        """Damage model: fully softened elements (κ past the zero-stress strain)."""
        if self.constitutive != "damage":
            return np.zeros(len(self.c_sy), bool)
        return self.k_n >= self.c_er

    def n_failed(self) -> int:
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int(self.failed[:n_owned].sum()), MPI.SUM)

    def commit(self) -> None:
        """Accept the increment: u += du; the iterate's state becomes the converged state."""
        self.sig_n = self.sig.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3).copy()
        if self.constitutive == "damage":
            de = self._deps.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3)
            self.eps_n = self.eps_n + 0.5 * (de + de.transpose(0, 2, 1))
            self.k_prev = self.k_n
            self.k_n, self.D_n = self.k.copy(), self.D.copy()
        self.p_n = self.p_n + self.dp
        self.u.x.array[:] += self.du.x.array
        self.du.x.array[:] = 0.0

    def von_mises(self) -> np.ndarray:
        s = self.sig_n - np.trace(self.sig_n, axis1=1, axis2=2)[:, None, None] / 3 * np.eye(3)
        return np.sqrt(1.5 * np.einsum("nij,nij->n", s, s))

    # --- displacement-controlled analysis -----------------------------------------------
    def _bc(self, dofs, component, value):
        """A Dirichlet condition on block dofs (component None) or on one component's dofs."""
        if component is None:
            return dolfinx.fem.dirichletbc(value, dofs, self.V)
        return dolfinx.fem.dirichletbc(value, dofs, self.V.sub(component))

    def _rows(self, dofs, component):
        """Owned rows (unrolled dof indices) of a dof set."""
        n_owned = self.V.dofmap.index_map.size_local
        dofs = np.asarray(dofs)
        if component is None:
            own = dofs[dofs < n_owned]
            return (own[:, None] * 3 + np.arange(3)).ravel()
        return dofs[dofs < 3 * n_owned]

    def run(self, fixed, loaded, direction: np.ndarray, max_displacement: float,
            params: NonlinearParams | None = None, offset_displacement: float | None = None,
            petsc_options: dict | None = None,
            prefix: str = "qctfea_nl_", progress=None) -> NonlinearResult:
        """Displace the ``loaded`` dofs along ``direction`` up to ``max_displacement``.

        ``fixed`` is a list of ``(dofs, component)`` held at zero and ``loaded`` one
        ``(dofs, component)``: ``component`` None means whole nodes (block dofs from
        ``locate_dofs_topological(V, ...)``), an int one displacement component (dofs
        from ``locate_dofs_topological(V.sub(i), ...)``; ``direction`` must then be
        that axis). Returns the force-displacement curve and, once the curve has peaked,
        the strength (module docstring).
        """
        if params is not None and params is not self.params:
            self.params = params
            self._set_damage_law(params)
        params = self.params
        comm = self.mesh.comm
        t_start = time.perf_counter()
        res = NonlinearResult(rule=params.strength_rule, n_dofs=self.n_dofs(),
                              mpi_ranks=comm.size,
                              n_cells=self.mesh.topology.index_map(3).size_global)
        sec = {"assembly": 0.0, "solve": 0.0, "constitutive": 0.0}
        solver = _IncrementSolver(self, fixed, loaded, np.asarray(direction, float), params,
                                  petsc_options, prefix, sec, res)
        walk = _Walk(base=max_displacement / params.increments,
                     step=max_displacement * PROBE_FRACTION,
                     offset=(offset_displacement if offset_displacement is not None
                             else np.inf),
                     imex=self.constitutive == "damage" and params.integration == "imex")
        res.curve.append(CurvePoint(0.0, 0.0, 0, 0))
        try:
            while walk.d < max_displacement * (1 - 1e-9):
                if self._increment(solver, walk, res, max_displacement - walk.d, progress):
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

    def _increment(self, solver, walk, res, remaining: float, progress) -> bool:
        """One displacement increment of :meth:`run` (solve, imex check, commit, peak tests,
        next step). True when the run ends."""
        params = self.params
        h = min(walk.step, remaining)
        if walk.imex:
            self.fixed_D = self.imex_damage(h / walk.h_last if walk.h_last else 0.0)
        t_inc = time.perf_counter()
        ok, its, force, yielded, why = solver.increment(h)
        if res.increments == 0 and ok:
            # the elastic probe: the cost of one linear solve of this model (imex: one
            # Newton step, i.e. one assembly, preconditioner set-up and Krylov solve)
            res.linear_solve_s = (time.perf_counter() - t_inc) / max(its, 1)
        res.newton_iterations += its
        if not ok:
            return self._no_equilibrium(walk, res, h, why, progress)
        err = None
        if walk.imex:
            # the damage the new strains give against the extrapolated one: far off, the
            # increment is redone with a smaller step
            D_ex = self.fixed_D
            err = self._imex_error(D_ex)
            tol, h_min = params.imex_damage_tolerance, walk.base * params.min_increment_fraction
            if err > IMEX_REJECT * tol and h > h_min * (1 + 1e-9) and res.increments:
                self.du.x.array[:] = 0.0
                self.fixed_D = None
                res.step_cuts += 1
                walk.step = max(h * max(0.25, 0.8 * tol / err), h_min)
                return False
            self.fixed_D = None
            self.D = np.maximum(D_ex, self.damage_of(self.k)[0])
        self.commit()
        walk.h_last = h
        walk.d += h
        res.increments += 1
        prev = res.curve[-1]
        failed = self.n_failed()
        res.curve.append(CurvePoint(walk.d, force, its, yielded, failed))
        if progress:
            progress(f"  increment {res.increments}: d = {walk.d:.4f} mm, F = {force:.1f} N, "
                     f"{its} Newton, {yielded} yielded cells, {failed} softened"
                     + (f", damage error {err:.3g}" if walk.imex else ""))
        if res.increments == 1:
            res.rss_after_first_increment_mb = _rss_mb(self.mesh.comm)[1]
            # The probe increment (a small fraction of the range): initial stiffness.
            res.initial_stiffness_n_per_mm = force / walk.d
            walk.step = walk.base
            return False
        walk.tangent = (force - prev.force_n) / h
        if _peaked(walk, res, prev, force, h, params):
            return True
        walk.step = _next_step(walk, err, its, params)
        return False

    def _no_equilibrium(self, walk, res, h: float, why: str, progress) -> bool:
        """A failed increment: halve the step, or end the run (a collapse after the curve
        flattened, else no peak). True when the run ends."""
        params = self.params
        self.du.x.array[:] = 0.0
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
                f"{tangent / k0:.1%} of the initial slope ({self.n_failed()} "
                f"elements fully softened); " + res.stop_reason)
        elif res.increments:
            res.stop_reason = (
                f"peak not reached: {res.stop_reason}, while the curve still "
                f"rose at {tangent / k0:.0%} of its initial slope")
        return True

    # --- output -------------------------------------------------------------------------
    def write_fields(self, path) -> None:
        """Displacement (P1) and, per element, von Mises stress, plastic strain (plasticity)
        or damage, equivalent strain and softened flag (damage model), yielded flag."""
        vm = dolfinx.fem.Function(self.V0, name="von_mises_mpa")
        yl = dolfinx.fem.Function(self.V0, name="yielded")
        self._set_cells(vm, self.von_mises())
        fns = [vm]
        if self.constitutive == "damage":
            dm = dolfinx.fem.Function(self.V0, name="damage")
            ke = dolfinx.fem.Function(self.V0, name="equivalent_strain")
            fl = dolfinx.fem.Function(self.V0, name="failed")
            self._set_cells(dm, self.D_n)
            self._set_cells(ke, self.k_n)
            self._set_cells(fl, self.failed.astype(float))
            self._set_cells(yl, (self.D_n > 0).astype(float))
            fns += [dm, ke, fl]
        else:
            pe = dolfinx.fem.Function(self.V0, name="plastic_strain")
            self._set_cells(pe, self.p_n)
            self._set_cells(yl, (self.p_n > 0).astype(float))
            fns += [pe]
        fns.append(yl)
        self.u.name = "displacement_mm"
        with dolfinx.io.XDMFFile(self.mesh.comm, str(path), "w") as f:
            f.write_mesh(self.mesh)
            f.write_function(self.u)
            for fn in fns:
                f.write_function(fn)


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
        self.bcs = [model._bc(dofs, comp, np.zeros(3) if comp is None else 0.0)
                    for dofs, comp in fixed]
        self.bcs.append(model._bc(l_dofs, self.l_comp, self.g))
        self.bc_rows = np.unique(np.concatenate([model._rows(d, c)
                                                 for d, c in [*fixed, loaded]]))
        self.loaded_rows = model._rows(l_dofs, self.l_comp)
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
            # next ones: it is rebuilt every IMEX_PC_LAG increments (CG stays convergent
            # with any SPD preconditioner; measured in docs/nonlinear.md)
            opts = {**opts, "snes_ksp_ew": False, "ksp_rtol": 1.0e-8,
                    "snes_lag_preconditioner": IMEX_PC_LAG,
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
        self.res.ksp_iterations += int(self.snes.getLinearSolveIterations())
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
