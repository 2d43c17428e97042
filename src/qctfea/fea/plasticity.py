"""Nonlinear bone in DOLFINx: regularised softening damage (default) or von Mises plasticity.

Method and sources: docs/nonlinear.md. The element laws (this module) in short:

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
  one element wide is the same on every mesh. Below ``nonlocal_length_mm`` (2 mm, the
  default) κ is driven by the equivalent strain averaged over that length
  (:mod:`qctfea.fea.nonlocal_average`; Pijaudier-Cabot & Bažant 1987) and elements finer
  than it use the law of an element of that size: the band is as wide as the averaging
  length on every fine mesh, so the strength converges under refinement (measured in
  docs/mesh_convergence.md; the local crack band alone let a real scan's pullout
  strength move by up to 15 % between the two finest levels). The plateau's end at 1 %
  strain on the reference element follows the crushing strain of Bessho et al. (J
  Biomech 2007;40:1745).
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

Load stepping (displacement control, the path through the peak, the stop rules and the
increment solver) is in :mod:`qctfea.fea.stepping`; :meth:`PlasticModel.run` is its
entry point.
"""

# Long on purpose (about 620 lines): the damage and plasticity laws, their parameters
# declared once with their documentation (NonlinearParams) and the model that integrates
# them; the path following is in qctfea.fea.stepping.

from __future__ import annotations

from dataclasses import dataclass

import dolfinx_solver  # noqa: F401  (orders MPI ahead of the compiled bindings)
import dolfinx
import numpy as np
import ufl
from mpi4py import MPI

from qctfea.fea.elasticity import ElasticModel
from qctfea.fea.nonlocal_average import NonlocalAverage
from qctfea.fea.stepping import NonlinearResult, follow_path
from qctfea.config import option
from qctfea.errors import QctfeaError


@dataclass
class NonlinearParams:
    """The nonlinear solver's parameters: the path following, the damage law and the
    strength rule. Declared once, here, with their documentation; the cohort config gives
    them in its ``loads`` section (:class:`qctfea.fea.loadcases.LoadParams` holds them with
    the load cases' own)."""

    #: nonlinear: base increments to the maximum displacement
    increments: int = option(
        25, minimum=1,
        doc=("nonlinear: base increments to the largest displacement (after a 0.1 % probe "
             "increment that measures the initial stiffness)"))
    #: nonlinear: smallest step / base step
    min_increment_fraction: float = option(
        0.25, exclusiveMinimum=0, maximum=1,
        doc="nonlinear: smallest step after cutting, as a fraction of the base step")
    #: nonlinear: residual tolerance relative to internal force
    newton_rtol: float = option(
        1.0e-4, exclusiveMinimum=0,
        doc=("nonlinear: an increment is in equilibrium when the free residual is below rtol x "
             "the internal force norm (`imex`: the CG solve stops there; `newton`: PETSc SNES, "
             "inexact with Eisenstat-Walker Krylov tolerances); a `newton` increment not "
             "converged in `newton_max_it` iterations is retried at half the step"))
    newton_max_it: int = option(25, minimum=1, row="newton_rtol")
    #: nonlinear: H / E (0 = perfectly plastic)
    hardening_ratio: float = option(
        0.0, minimum=0,
        doc=("nonlinear `plasticity`: isotropic hardening modulus / E (0 = perfectly plastic; "
             "softening is refused; must be 0 with `damage`)"))
    #: nonlinear: stop once F < (1 - this) * peak
    stop_drop_fraction: float = option(
        0.05, exclusiveMinimum=0, exclusiveMaximum=1,
        doc=("nonlinear, `peak` rule: the curve has peaked (stop, strength = largest force) "
             "when the force fell this far below the peak, or the tangent fell below this x k0"))
    #: nonlinear: stop once dF/dd < this * initial slope
    plateau_tangent_ratio: float = option(0.02, minimum=0, row="stop_drop_fraction")
    #: nonlinear: a flattening ends the run once it has lasted this fraction of the range
    peak_confirm_fraction: float = option(
        0.05, exclusiveMinimum=0, maximum=1,
        doc=("nonlinear, `peak` rule: a flat or falling stretch (secant from where the "
             "tangent fell below `plateau_tangent_ratio` x k0 still below it) ends the run "
             "only once it has lasted this fraction of the maximum displacement; a curve "
             "that rises again within it was a transient, not the peak (docs/nonlinear.md)"))
    #: nonlinear: "peak" (max force) or "offset" (offset yield)
    strength_rule: str = option(
        "peak", enum=["peak", "offset"],
        doc=("nonlinear: `peak` = maximum force, reported only once the curve has peaked "
             "(below); `offset` = force where the curve crosses the line k0·(d − offset) (0.2 "
             "% offset yield, Crawford et al. 2003), the run stops there"))
    #: nonlinear: equilibrium lost at the smallest step after dF/dd fell below this x the
    #: initial slope is a collapse (peak reached); above it, "peak not reached"
    collapse_tangent_ratio: float = option(
        0.1, minimum=0, maximum=1,
        doc=("nonlinear: when Newton finds no equilibrium even at the smallest step, the run "
             "is a collapse (peak reached) if the last tangent was below this x k0, else "
             "\"peak not reached\": no strength, the scan is refused (rule `accept_strength`, "
             "listed in `tables/exclusions.csv`)"))
    #: nonlinear damage: equivalent strain where softening begins on the reference element
    #: (null: never, a plateau at the yield stress)
    failure_strain: float | None = option(
        0.01, exclusiveMinimum=0,
        doc=("nonlinear `damage`: equivalent strain where the plateau ends and softening "
             "begins, on an element of `crack_band_mm` (Bessho et al. 2007: 10,000 µε "
             "crushing); `null` = never (a plateau)"))
    #: nonlinear damage: strain over which the stress falls to zero on the reference element
    softening_strain: float = option(
        0.02, exclusiveMinimum=0,
        doc=("nonlinear `damage`: strain over which the stress falls from the yield stress to "
             "zero, on an element of `crack_band_mm`"))
    #: nonlinear damage: reference element size (mm) of the two strains above; each element's
    #: are scaled by this / its size (crack band; null: no scaling, mesh dependent)
    crack_band_mm: float | None = option(
        2.0, exclusiveMinimum=0,
        doc=("nonlinear `damage`: reference element size of the two strains above; an element "
             "of size h uses them x `crack_band_mm` / h (crack band, Bažant & Oh 1983), so the "
             "dissipated energy and the strength do not depend on the mesh; `null` = no scaling"))
    #: nonlinear damage: cracking when the largest principal stress passes this x the yield
    #: stress (null: von Mises only)
    tensile_strength_ratio: float | None = option(
        0.8, exclusiveMinimum=0,
        doc=("nonlinear `damage`: in tension the element yields when its largest principal "
             "trial stress exceeds this x its yield stress (Bessho et al. 2007); `null` = von "
             "Mises only"))
    #: nonlinear damage: stiffness kept by a softened element
    residual_fraction: float = option(
        0.01, exclusiveMinimum=0, exclusiveMaximum=1,
        doc=("nonlinear `damage`: stiffness a fully softened element keeps, as a fraction of "
             "its own (keeps the system solvable)"))
    #: nonlinear damage: "imex" (extrapolated damage, one linear solve per increment) or
    #: "newton" (implicit; docs/nonlinear.md)
    integration: str = option(
        "imex", enum=["imex", "newton"],
        doc=("nonlinear `damage`: `imex` = the damage of each increment extrapolated from the "
             "last two increments, then one linear (secant, symmetric positive definite) solve "
             "(Oliver et al. 2008; robust through softening, about one linear solve per "
             "increment), after which the implicit damage of the new strains is committed; "
             "`newton` = implicit, Newton (PETSc SNES) to equilibrium with the "
             "consistent tangent of the local law (needs `nonlocal_length_mm: null`) "
             "([docs/nonlinear.md](../docs/nonlinear.md))"))
    #: nonlinear damage, imex: damage error per increment that sets the step
    imex_damage_tolerance: float = option(
        0.02, exclusiveMinimum=0,
        doc=("nonlinear `imex`: the step shrinks when the damage the new strains give differs "
             "from the extrapolated one by more than this, measured as a fraction of the "
             "strain energy (sum of \\|ΔD\\| E κ² V over the sum of E κ² V); above 3x this the "
             "increment is redone with a smaller step; below half of it the step grows. On "
             "demo P01 M00 and the real L3 the strength is within 0.4 % (compression) and "
             "2.1 % (pullout) of Newton with 4x smaller steps (local law), and with the "
             "nonlocal average within 0.7 % of 20x tighter steps (docs/nonlinear.md)"))
    #: nonlinear damage: averaging length of the equivalent strain (mm; null: local)
    nonlocal_length_mm: float | None = option(
        2.0, exclusiveMinimum=0,
        doc=("nonlinear `damage`: damage is driven by the equivalent strain averaged with a "
             "Gaussian weight over this length (95 % of the weight within it; "
             "Pijaudier-Cabot & Bažant 1987), so a softening band is never narrower than it; "
             "elements finer than it use the failure and softening strains of an element of "
             "this size, coarser ones the crack band. On the real L3 the strengths then "
             "change by 2.3 % (compression) and 0.7 / 1.6 % (pullout) between 1.5 and 1.2 mm "
             "bone cells ([docs/mesh_convergence.md](../docs/mesh_convergence.md)). Needs "
             "`integration: imex`; `null` = local damage, crack band only (needed by "
             "`newton`)"))

    def __post_init__(self):
        if self.strength_rule not in ("offset", "peak"):
            raise QctfeaError(f"loads.strength_rule must be 'offset' or 'peak', not "
                              f"{self.strength_rule!r}")
        if not 0 < self.residual_fraction < 1:
            raise QctfeaError(f"loads.residual_fraction must be in (0, 1), not "
                              f"{self.residual_fraction}")
        for name in ("failure_strain", "tensile_strength_ratio", "crack_band_mm",
                     "nonlocal_length_mm"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise QctfeaError(f"loads.{name} must be positive or null, not {v}")
        if self.integration not in INTEGRATIONS:
            raise QctfeaError(f"loads.integration must be one of {list(INTEGRATIONS)}, not "
                              f"{self.integration!r}")
        if self.nonlocal_length_mm is not None and self.integration != "imex":
            raise QctfeaError("loads.nonlocal_length_mm needs loads.integration: imex (the "
                              "Newton tangent of a nonlocal model is not implemented); set "
                              "nonlocal_length_mm: null for newton")
        if not self.softening_strain > 0:
            raise QctfeaError(f"loads.softening_strain must be positive, not "
                              f"{self.softening_strain}")


#: damage integration: explicit-implicit (one linear solve per increment) or Newton
INTEGRATIONS = ("imex", "newton")

#: ``plasticity``: von Mises return mapping; ``damage``: regularised softening damage
CONSTITUTIVE_MODELS = ("plasticity", "damage")

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


def _cell_vertices(mesh) -> np.ndarray:
    """Vertex coordinates (cells, 4, 3) of every local cell, owned and ghost."""
    n_all = mesh.topology.index_map(3).size_local + mesh.topology.index_map(3).num_ghosts
    return mesh.geometry.x[mesh.geometry.dofmaps[0][:n_all]]


def cell_sizes(mesh) -> np.ndarray:
    """Size h of every local cell (owned and ghost): ``(6 V)^(1/3)``, the edge of the cube of
    which the tetrahedron is one sixth (a box mesh's cube side)."""
    p = _cell_vertices(mesh)
    vol = np.abs(np.linalg.det(p[:, 1:] - p[:, :1])) / 6.0
    return np.cbrt(6.0 * vol)


def cell_centroids(mesh) -> np.ndarray:
    """Centroid of every local cell (owned and ghost), mm."""
    return _cell_vertices(mesh).mean(axis=1)


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
        #: per-element flags at the curve's peak (:meth:`snapshot_peak`), for the fields file
        self.peak_flags: dict[str, np.ndarray] = {}
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
        h = cell_sizes(self.mesh)
        self.c_vol = h ** 3 / 6.0
        self._nonlocal = None
        if p.nonlocal_length_mm is not None:
            # below the nonlocal length the averaged strain sets the band's width (module
            # qctfea.fea.nonlocal_average): such elements use the law of an element of
            # that length; the crack band scales the law of coarser ones
            h = np.maximum(h, p.nonlocal_length_mm)
            self._nonlocal = NonlocalAverage(
                self.mesh.comm, cell_centroids(self.mesh), self.c_vol, np.isfinite(self.c_sy),
                self.mesh.topology.index_map(3).size_local, p.nonlocal_length_mm)
        scale = (p.crack_band_mm / h if p.crack_band_mm is not None
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
        if self._nonlocal is not None:
            k_tr = self._nonlocal(k_tr)  # over the bone cells; the others keep theirs
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

    def imex_error(self, D_imex: np.ndarray) -> float:
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

    def yielded(self) -> np.ndarray:
        """Elements past yield: damaged (damage model) or with plastic strain."""
        return (self.D_n > 0) if self.constitutive == "damage" else (self.p_n > 0)

    def snapshot_peak(self) -> None:
        """Keep the per-element failed and yielded flags of the committed state: called at
        every new maximum of the force, so at the end of a run they are the flags at the
        curve's peak (written as ``failed_at_peak``, ``yielded_at_peak``)."""
        self.peak_flags = {"failed_at_peak": self.failed.copy(),
                           "yielded_at_peak": self.yielded().copy()}

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
    def dirichlet_bc(self, dofs, component, value):
        """A Dirichlet condition on block dofs (component None) or on one component's dofs."""
        if component is None:
            return dolfinx.fem.dirichletbc(value, dofs, self.V)
        return dolfinx.fem.dirichletbc(value, dofs, self.V.sub(component))

    def owned_rows(self, dofs, component):
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
        """Displace the ``loaded`` dofs along ``direction`` up to ``max_displacement`` and
        follow the force-displacement curve through its peak
        (:func:`qctfea.fea.stepping.follow_path`, which documents the arguments)."""
        # equal parameters (the load cases pass a fresh copy of the model's) keep the law
        # and the nonlocal grid already built
        if params is not None and params != self.params:
            self.params = params
            self._set_damage_law(params)
        return follow_path(self, fixed, loaded, direction, max_displacement,
                           offset_displacement, petsc_options, prefix, progress)

    # --- output -------------------------------------------------------------------------
    def write_fields(self, path) -> None:
        """Displacement (P1) and, per element, von Mises stress, plastic strain (plasticity)
        or damage, equivalent strain and softened flag (damage model), yielded flag, all at
        the end of the run, and the failed and yielded flags at the curve's peak."""
        vm = dolfinx.fem.Function(self.V0, name="von_mises_mpa")
        self._set_cells(vm, self.von_mises())
        fns = [vm]
        if self.constitutive == "damage":
            dm = dolfinx.fem.Function(self.V0, name="damage")
            ke = dolfinx.fem.Function(self.V0, name="equivalent_strain")
            fl = dolfinx.fem.Function(self.V0, name="failed")
            self._set_cells(dm, self.D_n)
            self._set_cells(ke, self.k_n)
            self._set_cells(fl, self.failed.astype(float))
            fns += [dm, ke, fl]
        else:
            pe = dolfinx.fem.Function(self.V0, name="plastic_strain")
            self._set_cells(pe, self.p_n)
            fns += [pe]
        flags = {"yielded": self.yielded(), **self.peak_flags}
        for name, flag in flags.items():
            fn = dolfinx.fem.Function(self.V0, name=name)
            self._set_cells(fn, flag.astype(float))
            fns.append(fn)
        self.u.name = "displacement_mm"
        with dolfinx.io.XDMFFile(self.mesh.comm, str(path), "w") as f:
            f.write_mesh(self.mesh)
            f.write_function(self.u)
            for fn in fns:
                f.write_function(fn)
