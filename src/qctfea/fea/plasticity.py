"""Nonlinear bone in DOLFINx: damage with element failure (default) or von Mises plasticity.

Two constitutive models (``constitutive``), both small strain, rate independent,
isotropic linear elastic (E and ν per element, from the material law) below the
element's yield stress ``σ_y`` (the law's uniaxial compressive yield stress):

* ``damage`` (the default): stress-capped isotropic damage, ``σ = (1 - D) C:ε`` with
  ``D = max over the history of (1 - σ_y / q(C:ε))`` (``q`` the von Mises stress), so the
  von Mises stress never exceeds ``σ_y`` (a perfectly plastic plateau in uniaxial
  loading) and the element softens in every mode, volume included. Element failure after
  Bessho et al. (J Biomech 2007;40:1745), the criteria of the CT-FEA method the published
  spine studies used: an element *crushes* when its minimum principal strain falls
  below ``-failure_strain`` (default 10,000 µε) and *cracks* when its maximum principal
  stress exceeds ``tensile_strength_ratio`` x σ_y (default 0.8); a failed element keeps
  ``residual_fraction`` (1 %) of its stiffness. Failure is checked after each converged
  increment; the released stress is re-equilibrated in the next increment
  (``max_failure_rounds`` > 0 re-solves at the same displacement first). The force then
  peaks and falls: strength = the peak force.
  Why not plasticity by default: von Mises plastic flow is isochoric, and linear
  tetrahedra lock under an isochoric constraint. Measured on a titanium cylinder
  (6 mm, 20 mm deep) bonded in a 1 GPa, σ_y = 2 MPa block (3 mm cells): plasticity
  still rose at 1089 N (2.5x the shear-cylinder limit) at 0.3 mm, the damage model
  reached its plateau at 719 N by 0.12 mm. On the demo vertebra plasticity gave
  pullout strengths of 1.8-3.0 kN, above any cadaver value; the damage model gives
  0.5-0.8 kN (docs in README, Known limits).
  Newton uses the exact tangent ``(1 - D)(C - 3μ (σ̃/q̃) ⊗ N)`` on loading cells (not
  symmetric: GMRES); where hydrostatic softening makes a linear solve fail, the
  increment continues with the tangent's symmetric part ``(1 - D)(C - 3μ N⊗N)``
  (positive semi-definite). When Newton cannot find equilibrium even at the smallest
  step after elements have failed, the vertebra has collapsed (snap-back that
  displacement control cannot follow): strength = the largest converged force, and
  ``stop_reason`` says so.
* ``plasticity``: von Mises yield surface ``f = q - (σ_y + H p) <= 0``, associated
  flow, linear isotropic hardening ``H = hardening_ratio * E`` (0: perfect
  plasticity); radial return (Simo & Hughes 1998, box 3.2) and the consistent tangent
  (Simo & Taylor 1985) in the form of Bleyer's FEniCS elasto-plasticity tutorial:

      C_ep : e = C : e - 3μ (3μ/(3μ+H) - β) (N : e) N - 2μ β dev(e),
      N = s_trial / q_trial,  β = 3μ Δp / q_trial  (both 0 on elastic cells),

  which gives quadratic convergence with CG. Softening plasticity is not offered (an
  indefinite tangent). Locks on linear tetrahedra (above).

Elements with infinite yield stress (screw, Keyak's no-yield range) stay elastic.
Discretisation: P1 displacement on tetrahedra; strain, stress and the internal
variables are constant per element (one quadrature point, exact for P1), updated
vectorised in numpy over the cells of the process (owned and ghost cells, so no
communication is needed and every rank holds the same state for a shared cell).

Loading is displacement controlled: a set of nodes is displaced along a
direction in increments; each increment is solved by Newton (linear solves:
Krylov + GAMG with the rigid body near-nullspace, the interpolation reused between
Newton steps). An increment whose Newton iteration does not converge is cut in half
(down to ``min_increment_fraction`` of the base increment); after easy increments the
step grows back. The reaction force is read from the assembled internal-force
vector at the loaded nodes (the discrete reaction).

Initial stiffness: the first increment is a probe of ``PROBE_FRACTION`` of
the displacement range (elastic but for a few floor-yield elements); its
secant is the initial stiffness k0.

Strength, two documented rules (``strength_rule``):

* ``peak`` (default): the maximum force. The run stops when the force has fallen
  ``stop_drop_fraction`` below the peak, when the tangent stiffness fell
  below ``plateau_tangent_ratio`` x k0 (a plateau or a falling curve), at collapse
  (above), or at ``max_displacement``; ``peak_reached`` says which (False: the curve
  still rose at the maximum displacement and the strength is a lower bound).
* ``offset``: the force where the curve crosses the line ``F = k0 (d - offset)``, the
  0.2 %-offset yield point of Crawford, Cann & Keaveny (Bone 2003;33:744). The offset
  displacement comes from the load case (``offset_strain`` times the body height for
  compression, times the screw's inserted length for pullout). The run stops once the
  line is crossed. Useful with ``plasticity``, whose locked curves keep rising.

Both values are reported when reached (``offset_yield_n``, ``peak_force_n``) together
with the whole curve.
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
    make_ksp,
)
from qctfea.provenance import QctfeaError

#: GAMG keeps its prolongators between Newton steps (the sparsity never changes).
# Damaged elements (modulus x residual fraction) make one smoothing step too weak: on demo
# P01 M00 (2 ranks) compression needed 3245 instead of 1752 CG iterations and 15 s instead of
# 13 s of solving with it, so the nonlinear solver keeps PETSc's 2 Chebyshev steps with scalar
# Jacobi (docs/performance.md).
NONLINEAR_PETSC_OPTIONS = {**DEFAULT_PETSC_OPTIONS, "mg_levels_pc_type": "jacobi",
                           "mg_levels_ksp_max_it": 2, "pc_gamg_reuse_interpolation": True}


@dataclass
class NonlinearParams:
    increments: int = 25  #: base number of increments to the maximum displacement
    min_increment_fraction: float = 1.0 / 8  #: smallest step, as a fraction of the base step
    newton_rtol: float = 1.0e-6  #: ‖free residual‖ <= rtol ‖internal force‖
    newton_max_it: int = 15
    hardening_ratio: float = 0.0  #: H / E of yielding elements (0: perfectly plastic)
    stop_drop_fraction: float = 0.05  #: stop once F < (1 - this) * peak
    plateau_tangent_ratio: float = 0.02  #: stop once dF/dd < this * initial stiffness
    #: "offset": the offset yield force (see the module docstring); "peak": the maximum force
    strength_rule: str = "peak"
    #: damage model, element failure (Bessho et al. 2007): minimum principal strain below
    #: -failure_strain (crushing) ... (None: never)
    failure_strain: float | None = 0.01
    #: ... or maximum principal stress above this x the yield stress (cracking; None: never)
    tensile_strength_ratio: float | None = 0.8
    #: a failed element keeps this fraction of its stiffness
    residual_fraction: float = 0.01
    #: failure cascades re-solved at one displacement before the increment is recorded
    max_failure_rounds: int = 0

    def __post_init__(self):
        if self.strength_rule not in ("offset", "peak"):
            raise QctfeaError(f"loads.strength_rule must be 'offset' or 'peak', not "
                              f"{self.strength_rule!r}")
        if self.max_failure_rounds < 0:
            raise QctfeaError(f"max_failure_rounds must be >= 0, not {self.max_failure_rounds}")
        if not 0 < self.residual_fraction < 1:
            raise QctfeaError(f"loads.residual_fraction must be in (0, 1), not "
                              f"{self.residual_fraction}")
        for name in ("failure_strain", "tensile_strength_ratio"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise QctfeaError(f"loads.{name} must be positive or null, not {v}")


#: ``plasticity``: von Mises return mapping; ``damage``: stress-capped isotropic damage
CONSTITUTIVE_MODELS = ("plasticity", "damage")

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
    rule: str = "offset"
    strength_n: float = 0.0
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
    n_dofs: int = 0
    n_cells: int = 0
    mpi_ranks: int = 1
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "strength_n": self.strength_n,
            "peak_force_n": self.peak_force_n,
            "offset_yield_n": self.offset_yield_n,
            "offset_yield_displacement_mm": self.offset_yield_displacement_mm,
            "displacement_at_peak_mm": self.displacement_at_peak_mm,
            "initial_stiffness_n_per_mm": self.initial_stiffness_n_per_mm,
            "peak_reached": self.peak_reached,
            "stop_reason": self.stop_reason,
            "increments": self.increments,
            "step_cuts": self.step_cuts,
            "newton_iterations": self.newton_iterations,
            "newton_iterations_per_increment": (
                self.newton_iterations / self.increments if self.increments else 0.0),
            "ksp_iterations": self.ksp_iterations,
            "n_dofs": self.n_dofs,
            "n_cells": self.n_cells,
            "mpi_ranks": self.mpi_ranks,
            "seconds": self.seconds,
            "curve": [vars(p) for p in self.curve],
        }


class PlasticModel(ElasticModel):
    """P1 von Mises elasto-plasticity with element-wise E, ν and yield stress."""

    def __init__(self, mesh, youngs_mpa: np.ndarray, poisson: np.ndarray,
                 yield_mpa: np.ndarray, hardening_ratio: float = 0.0,
                 constitutive: str = "plasticity"):
        super().__init__(mesh, youngs_mpa, poisson)
        if constitutive not in CONSTITUTIVE_MODELS:
            raise QctfeaError(f"loads.constitutive must be one of {CONSTITUTIVE_MODELS}, not "
                              f"{constitutive!r}")
        if constitutive == "damage" and hardening_ratio != 0:
            raise QctfeaError("loads.hardening_ratio must be 0 with loads.constitutive: damage "
                              "(the stress cap is the yield stress); use plasticity for hardening")
        self.constitutive = constitutive
        V0 = dolfinx.fem.functionspace(mesh, ("DG", 0))
        W = dolfinx.fem.functionspace(mesh, ("DG", 0, (3, 3)))
        self.V0, self.W = V0, W
        n_all = (mesh.topology.index_map(3).size_local + mesh.topology.index_map(3).num_ghosts)
        cells = np.arange(n_all, dtype=np.int32)
        self._s_idx = V0.dofmap.list[cells, 0]  # scalar DG0 dof of each local cell
        self._t_idx = W.dofmap.list[cells, 0]  # tensor DG0 block of each local cell
        # Cell arrays (cell order) of the material.
        E = self.E.x.array[self._s_idx].copy()
        nu = self.nu.x.array[self._s_idx].copy()
        ys = np.asarray(yield_mpa, float)
        orig = np.asarray(mesh.topology.original_cell_index)[:n_all]
        self.c_mu = E / (2 * (1 + nu))
        self.c_lmbda = E * nu / ((1 + nu) * (1 - 2 * nu))
        self.c_H = hardening_ratio * E
        if hardening_ratio < 0:
            raise QctfeaError(
                f"loads.hardening_ratio = {hardening_ratio}: softening is not supported (the "
                "tangent becomes indefinite and CG cannot solve it); use 0 (perfect plasticity) "
                "or a positive hardening ratio")
        self.c_sy = np.where(np.isfinite(ys[orig]), ys[orig], np.inf)
        self.hardening_ratio = hardening_ratio
        # State: converged stress and plastic strain; trial quantities of the iterate.
        self.sig_n = np.zeros((n_all, 3, 3))
        self.p_n = np.zeros(n_all)
        self.dp = np.zeros(n_all)
        # Damage model state: converged total strain and damage; the iterate's damage.
        self.eps_n = np.zeros((n_all, 3, 3))
        self.D_n = np.zeros(n_all)
        self.D = np.zeros(n_all)
        self.failed = np.zeros(n_all, bool)
        self.sig = dolfinx.fem.Function(W, name="stress")
        self.N = dolfinx.fem.Function(W, name="flow_direction")
        self.beta = dolfinx.fem.Function(V0, name="beta")
        self.omega = dolfinx.fem.Function(V0, name="secant_factor")
        self.kappa = dolfinx.fem.Function(V0, name="flow_factor")
        self.omega.x.array[:] = 1.0
        #: plasticity: M = N (symmetric tangent); damage: M = σ̃ / q̃ (exact, nonsymmetric)
        self.M = dolfinx.fem.Function(W, name="tangent_direction")
        #: damage: use the symmetric part of the tangent (set for an increment when a
        #: linear solve with the exact, nonsymmetric tangent fails)
        self.symmetric_tangent = False
        self.du = dolfinx.fem.Function(self.V, name="increment")
        self._eps_expr = dolfinx.fem.Expression(self.eps(self.du), W.element.interpolation_points)
        self._deps = dolfinx.fem.Function(W)
        mu, lmbda, N, beta = self.mu, self.lmbda, self.N, self.beta
        omega, kappa, M = self.omega, self.kappa, self.M
        w, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)

        def sigma_tang(e):
            # plasticity: omega = 1, kappa = 3μ/(3μ+H) - β; damage: omega = 1 - D,
            # kappa = 1 - D on loading cells (0 elsewhere), β = 0. N is 0 on elastic cells.
            return (omega * (lmbda * ufl.tr(e) * ufl.Identity(3) + 2 * mu * e)
                    - 3 * mu * kappa * ufl.inner(N, e) * M
                    - 2 * mu * beta * ufl.dev(e))

        dx = ufl.dx(metadata={"quadrature_degree": 1})
        self.a_tangent = dolfinx.fem.form(ufl.inner(sigma_tang(self.eps(w)), self.eps(v)) * dx)
        self.f_internal = dolfinx.fem.form(ufl.inner(self.sig, self.eps(v)) * dx)

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
        self.dp = dp
        self._set_cells(self.sig, sig_tr - beta[:, None, None] * s)
        self._set_cells(self.N, N)
        self._set_cells(self.beta, beta)
        self._set_cells(self.kappa, np.where(plastic, 3 * mu / (3 * mu + H) - beta, 0.0))
        self._set_cells(self.M, N)
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int(plastic[:n_owned].sum()), MPI.SUM)

    def _damage_update(self, de: np.ndarray) -> int:
        """Stress-capped isotropic damage: σ = (1 - D) C:ε, D the least value with q <= σ_y.

        ``D = max(D_n, 1 - σ_y / q(C:ε))`` (irreversible). Tangent on loading cells:
        ``(1 - D) (C - 3μ N⊗N)`` with ``N = s̃ / q̃`` (the symmetric part of the exact
        tangent, zero stiffness along the deviatoric stress direction, as perfect
        plasticity); on unloading or elastic cells the secant ``(1 - D) C``.
        """
        eps = self.eps_n + de
        mu, lm = self.c_mu, self.c_lmbda
        eye = np.eye(3)
        tr = np.trace(eps, axis1=1, axis2=2)
        sig_e = lm[:, None, None] * tr[:, None, None] * eye + 2 * mu[:, None, None] * eps
        s = sig_e - np.trace(sig_e, axis1=1, axis2=2)[:, None, None] / 3.0 * eye
        q = np.sqrt(1.5 * np.einsum("nij,nij->n", s, s))
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(q > self.c_sy, 1.0 - self.c_sy / np.where(q > 0, q, 1.0), 0.0)
        loading = need >= self.D_n
        D = np.maximum(self.D_n, need)
        active = loading & (need > 0)
        qs = np.where(active, q, 1.0)
        N = np.where(active[:, None, None], s / qs[:, None, None], 0.0)
        self.D = D
        self._set_cells(self.sig, (1.0 - D)[:, None, None] * sig_e)
        self._set_cells(self.omega, 1.0 - D)
        self._set_cells(self.kappa, np.where(active, 1.0 - D, 0.0))
        self._set_cells(self.N, N)
        M = N if self.symmetric_tangent else sig_e / qs[:, None, None]
        self._set_cells(self.M, np.where(active[:, None, None], M, 0.0))
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int((D[:n_owned] > 0).sum()), MPI.SUM)

    def fail_cells(self, params: NonlinearParams) -> int:
        """Damage model: mark elements that meet the failure criterion; new failures (all ranks).

        Criteria of Bessho et al. (J Biomech 2007;40:1745), used with the Keyak laws in
        CT-FEA of vertebrae: crushing when the minimum principal strain is below
        ``-failure_strain``, cracking when the maximum principal stress exceeds
        ``tensile_strength_ratio`` x the yield stress. A failed element keeps
        ``residual_fraction`` of its stiffness (``D = 1 - residual_fraction``): its stress is
        released, and the caller re-equilibrates at the same displacement.
        """
        if self.constitutive != "damage":
            return 0
        bone = np.isfinite(self.c_sy)
        new = np.zeros_like(self.failed)
        if params.failure_strain is not None:
            e_min = np.linalg.eigvalsh(self.eps_n)[:, 0]
            new |= e_min < -params.failure_strain
        if params.tensile_strength_ratio is not None:
            s_max = np.linalg.eigvalsh(self.sig_n)[:, 2]
            with np.errstate(invalid="ignore"):
                new |= s_max > params.tensile_strength_ratio * self.c_sy
        new &= bone & ~self.failed
        if new.any():
            self.failed |= new
            self.D_n = np.where(new, np.maximum(self.D_n, 1.0 - params.residual_fraction),
                                self.D_n)
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int(new[:n_owned].sum()), MPI.SUM)

    def n_failed(self) -> int:
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int(self.failed[:n_owned].sum()), MPI.SUM)

    def _tangent_state(self):
        return [f.x.array.copy() for f in (self.N, self.beta, self.omega, self.kappa, self.M)]

    def _restore_tangent_state(self, saved) -> None:
        for f, a in zip((self.N, self.beta, self.omega, self.kappa, self.M), saved):
            f.x.array[:] = a

    def commit(self) -> None:
        """Accept the increment: u += du, stress and plastic strain become converged state."""
        self.sig_n = self.sig.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3).copy()
        if self.constitutive == "damage":
            de = self._deps.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3)
            self.eps_n = self.eps_n + 0.5 * (de + de.transpose(0, 2, 1))
            self.D_n = self.D.copy()
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
            params: NonlinearParams, offset_displacement: float | None = None,
            petsc_options: dict | None = None,
            prefix: str = "qctfea_nl_", progress=None) -> NonlinearResult:
        """Displace the ``loaded`` dofs along ``direction`` up to ``max_displacement``.

        ``fixed`` is a list of ``(dofs, component)`` held at zero and ``loaded`` one
        ``(dofs, component)``: ``component`` None means whole nodes (block dofs from
        ``locate_dofs_topological(V, ...)``), an int one displacement component (dofs
        from ``locate_dofs_topological(V.sub(i), ...)``; ``direction`` must then be
        that axis). Returns the force-displacement curve and the strength.
        """
        comm = self.mesh.comm
        t_start = time.perf_counter()
        res = NonlinearResult(rule=params.strength_rule, n_dofs=self.n_dofs(),
                              mpi_ranks=comm.size,
                              n_cells=self.mesh.topology.index_map(3).size_global)
        sec = {"assembly": 0.0, "solve": 0.0, "constitutive": 0.0}
        direction = np.asarray(direction, float)
        l_dofs, l_comp = loaded
        g = dolfinx.fem.Constant(self.mesh, np.zeros(3) if l_comp is None else 0.0)
        bcs = [self._bc(dofs, comp, np.zeros(3) if comp is None else 0.0) for dofs, comp in fixed]
        bcs.append(self._bc(l_dofs, l_comp, g))
        bc_rows = np.unique(np.concatenate([self._rows(d, c) for d, c in [*fixed, loaded]]))
        loaded_rows = self._rows(l_dofs, l_comp)
        row_weight = (np.tile(direction, len(loaded_rows) // 3) if l_comp is None
                      else np.full(len(loaded_rows), direction[l_comp]))

        A = dolfinx.fem.petsc.create_matrix(self.a_tangent)
        A.setNearNullSpace(build_nullspace(self.V))
        b = dolfinx.fem.petsc.create_vector(self.V)
        dx = b.duplicate()
        r = b.duplicate()
        all_opts = {**NONLINEAR_PETSC_OPTIONS, **(petsc_options or {})}
        if self.constitutive == "damage":
            # The exact damage tangent is not symmetric: GMRES instead of CG.
            all_opts = {**all_opts, "ksp_type": "gmres", "ksp_gmres_restart": 100,
                        "mg_levels_esteig_ksp_type": "gmres"}
        ksp = make_ksp(comm, A, prefix, all_opts)
        reasons = {v: k for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}

        def internal_force():
            t0 = time.perf_counter()
            with b.localForm() as bl:
                bl.set(0.0)
            dolfinx.fem.petsc.assemble_vector(b, self.f_internal)
            # b keeps the unscattered local contributions for the lifting below; the
            # norms and the reaction come from a summed copy.
            with b.localForm() as bl, r.localForm() as rl:
                bl.copy(rl)
            r.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
            sec["assembly"] += time.perf_counter() - t0
            arr = r.getArray(readonly=True)
            force = comm.allreduce(float(arr[loaded_rows] @ row_weight), MPI.SUM)
            free = arr.copy()
            free[bc_rows] = 0.0
            r_free = np.sqrt(comm.allreduce(float(free @ free), MPI.SUM))
            r_all = np.sqrt(comm.allreduce(float(arr @ arr), MPI.SUM))
            return force, r_free, r_all

        def tangent_solve() -> int:
            """Assemble the tangent of the current state and solve A dx = b; PETSc's reason."""
            t0 = time.perf_counter()
            A.zeroEntries()
            dolfinx.fem.petsc.assemble_matrix(A, self.a_tangent, bcs=bcs)
            A.assemble()
            sec["assembly"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ksp.setOperators(A)
            ksp.solve(b, dx)
            sec["solve"] += time.perf_counter() - t0
            res.ksp_iterations += int(ksp.getIterationNumber())
            return ksp.getConvergedReason()

        def newton(step: float):
            """Solve one increment of size ``step``; (converged, iterations, force, yielded)."""
            g.value = step * direction if l_comp is None else step * direction[l_comp]
            force, yielded = 0.0, 0
            self.symmetric_tangent = False
            for it in range(params.newton_max_it + 1):
                t0 = time.perf_counter()
                yielded = self.return_mapping()
                sec["constitutive"] += time.perf_counter() - t0
                force, r_free, r_all = internal_force()
                if not np.isfinite(r_free):
                    return False, it, force, yielded
                if it > 0 and r_free <= params.newton_rtol * max(r_all, 1e-30):
                    return True, it, force, yielded
                if it == params.newton_max_it:
                    return False, it, force, yielded
                t0 = time.perf_counter()
                dolfinx.fem.petsc.apply_lifting(b, [self.a_tangent], bcs=[bcs],
                                                x0=[self.du.x.petsc_vec], alpha=-1.0)
                b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
                dolfinx.fem.petsc.set_bc(b, bcs, x0=self.du.x.petsc_vec, alpha=-1.0)
                sec["assembly"] += time.perf_counter() - t0
                reason = tangent_solve()
                if reason < 0 and self.constitutive == "damage" and not self.symmetric_tangent:
                    # Hydrostatic softening makes the exact tangent indefinite: retry this
                    # iteration with its symmetric, positive semi-definite part.
                    if progress:
                        progress(f"  linear solve failed ({reasons.get(reason, reason)}); "
                                 "symmetric tangent for this increment")
                    self.symmetric_tangent = True
                    self.return_mapping()
                    reason = tangent_solve()
                if reason < 0:
                    if progress:
                        progress(f"  linear solve failed ({reasons.get(reason, reason)}); "
                                 "cutting the step")
                    return False, it, force, yielded
                self.du.x.petsc_vec.axpy(-1.0, dx)
                self.du.x.scatter_forward()
            return False, params.newton_max_it, force, yielded

        base = max_displacement / params.increments
        probe = max_displacement * PROBE_FRACTION
        step = probe
        d = 0.0
        res.curve.append(CurvePoint(0.0, 0.0, 0, 0))
        saved = self._tangent_state()
        offset = offset_displacement if offset_displacement is not None else np.inf
        try:
            while d < max_displacement * (1 - 1e-9):
                h = min(step, max_displacement - d)
                ok, its, force, yielded = newton(h)
                res.newton_iterations += its
                if not ok:
                    self.du.x.array[:] = 0.0
                    self._restore_tangent_state(saved)
                    res.step_cuts += 1
                    step = h / 2
                    if step < base * params.min_increment_fraction:
                        res.stop_reason = (f"Newton did not converge at {d:.4g} mm even with "
                                           f"step {h:.3g} mm")
                        n_failed = self.n_failed()
                        if n_failed and res.increments > 1:
                            # Failed elements released more load than the rest can take
                            # at any larger displacement: the structure has collapsed.
                            res.peak_reached = True
                            res.stop_reason = (f"collapse after {n_failed} elements failed: "
                                               + res.stop_reason)
                        break
                    continue
                self.commit()
                # Element failure (damage model): release the failed elements' stress and
                # re-equilibrate at this displacement until no further element fails.
                rounds = 0
                while ok and self.fail_cells(params) and rounds < params.max_failure_rounds:
                    rounds += 1
                    ok, its2, force, yielded = newton(0.0)
                    its += its2
                    res.newton_iterations += its2
                    if ok:
                        self.commit()
                if not ok:
                    res.stop_reason = (f"Newton did not converge re-equilibrating failed "
                                       f"elements at {d + h:.4g} mm")
                    break
                saved = self._tangent_state()
                d += h
                res.increments += 1
                prev = res.curve[-1]
                failed = self.n_failed()
                res.curve.append(CurvePoint(d, force, its, yielded, failed))
                if progress:
                    progress(f"  increment {res.increments}: d = {d:.4f} mm, F = {force:.1f} N, "
                             f"{its} Newton, {yielded} yielded cells, {failed} failed")
                if res.increments == 1:
                    # The probe increment (a small fraction of the range): initial stiffness.
                    res.initial_stiffness_n_per_mm = force / d
                    step = base
                    continue
                k0 = res.initial_stiffness_n_per_mm
                if res.offset_yield_n is None and force < k0 * (d - offset):
                    # Crossing of the curve with the offset line between prev and this point.
                    g0 = prev.force_n - k0 * (prev.displacement_mm - offset)
                    g1 = force - k0 * (d - offset)
                    t = g0 / (g0 - g1)
                    res.offset_yield_n = prev.force_n + t * (force - prev.force_n)
                    res.offset_yield_displacement_mm = prev.displacement_mm + t * h
                    if params.strength_rule == "offset":
                        res.stop_reason = "offset yield point reached"
                        break
                peak = max(p.force_n for p in res.curve)
                if force < (1 - params.stop_drop_fraction) * peak:
                    res.peak_reached, res.stop_reason = True, "force fell below the peak"
                    break
                tangent = (force - prev.force_n) / h
                if tangent < params.plateau_tangent_ratio * k0:
                    res.peak_reached = True
                    res.stop_reason = ("force fell after the peak" if tangent < 0
                                       else "plateau (limit load reached)")
                    break
                if its <= 4:
                    step = min(step * 1.5, base)
            else:
                res.stop_reason = "maximum displacement reached while the force still rose"
        finally:
            clear_options(prefix, all_opts)
            ksp.destroy()
            A.destroy()
            b.destroy()
            dx.destroy()
            r.destroy()
        if res.increments == 0:
            raise QctfeaError(f"nonlinear solve failed in the first increment: {res.stop_reason}; "
                              "check the boundary conditions, or raise loads.increments")
        peak = max(res.curve, key=lambda p: p.force_n)
        res.peak_force_n = peak.force_n
        res.displacement_at_peak_mm = peak.displacement_mm
        if params.strength_rule == "offset" and res.offset_yield_n is not None:
            res.strength_n = res.offset_yield_n
        else:
            res.strength_n = peak.force_n
            if params.strength_rule == "offset":
                res.stop_reason += "; the offset line was not crossed: strength = peak force"
        res.seconds = {**sec, "total": time.perf_counter() - t_start}
        return res

    # --- output -------------------------------------------------------------------------
    def write_fields(self, path) -> None:
        """Displacement (P1) and, per element, von Mises stress, plastic strain (plasticity)
        or damage and failed flag (damage model), yielded flag."""
        vm = dolfinx.fem.Function(self.V0, name="von_mises_mpa")
        yl = dolfinx.fem.Function(self.V0, name="yielded")
        self._set_cells(vm, self.von_mises())
        fns = [vm]
        if self.constitutive == "damage":
            dm = dolfinx.fem.Function(self.V0, name="damage")
            fl = dolfinx.fem.Function(self.V0, name="failed")
            self._set_cells(dm, self.D_n)
            self._set_cells(fl, self.failed.astype(float))
            self._set_cells(yl, (self.D_n > 0).astype(float))
            fns += [dm, fl]
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
