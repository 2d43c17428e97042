"""Elasto-plastic bone in DOLFINx: return mapping, consistent tangent, Newton.

Constitutive model (small strain, rate independent):

* isotropic linear elasticity, E and ν per element (from the material law);
* von Mises yield surface ``f = q - (σ_y + H p) <= 0`` with the equivalent
  stress ``q = sqrt(3/2 s:s)`` (``s`` the deviatoric stress), ``σ_y`` the
  element's yield stress from the material law's yield relation (the uniaxial
  compressive yield stress), ``p`` the accumulated equivalent plastic strain;
* associated flow; linear isotropic hardening ``H = hardening_ratio * E``:
  ``hardening_ratio = 0`` is perfect plasticity (the default: the force
  reaches a plateau, strength = that plateau), ``> 0`` hardening. Softening
  is not offered: its tangent is indefinite (CG cannot solve it) and local
  softening is mesh dependent;
* elements with infinite yield stress (screw, Keyak's no-yield range) stay
  elastic.

Discretisation: P1 displacement on tetrahedra; strain, stress and the
internal variables are constant per element (one quadrature point, exact for
P1). The return mapping is the radial return (Simo & Hughes 1998, box 3.2),
vectorised in numpy over the cells of the process (owned and ghost cells,
so no communication is needed and every rank holds the same state for a
shared cell). The consistent tangent (Simo & Taylor 1985), in the form of
Bleyer's FEniCS elasto-plasticity tutorial:

    C_ep : e = C : e - 3μ (3μ/(3μ+H) - β) (N : e) N - 2μ β dev(e),
    N = s_trial / q_trial,  β = 3μ Δp / q_trial  (both 0 on elastic cells),

which gives quadratic convergence of Newton's method.

Loading is displacement controlled: a set of nodes is displaced along a
direction in increments; each increment is solved by Newton with the
consistent tangent (linear solves: CG + GAMG with the rigid body
near-nullspace, the interpolation reused between Newton steps). An increment
whose Newton iteration does not converge is cut in half (down to
``min_increment_fraction`` of the base increment); after easy increments the
step grows back. The reaction force is read from the assembled internal-force
vector at the loaded nodes (the discrete reaction).

Initial stiffness: the first increment is a probe of ``PROBE_FRACTION`` of
the displacement range (elastic but for a few floor-yield elements); its
secant is the initial stiffness k0.

Strength, two documented rules (``strength_rule``):

* ``offset`` (default): the force where the curve crosses the line
  ``F = k0 (d - offset)``, the 0.2 %-offset yield point of Crawford, Cann &
  Keaveny (Bone 2003;33:744) used for nonlinear QCT-FE vertebral strength.
  The offset displacement comes from the load case (``offset_strain`` times
  the body height for compression, times the screw's inserted length for
  pullout). The run stops once the line is crossed. Reason for the default:
  with linear tetrahedra the isochoric plastic flow of von Mises locks, so
  after general yield the curve keeps rising slowly instead of showing a
  peak; the offset point is where the curve bends, and it is insensitive
  to that late slope.
* ``peak``: the maximum force. The run stops when the force has fallen
  ``stop_drop_fraction`` below the peak, when the tangent stiffness fell
  below ``plateau_tangent_ratio`` x k0 (a plateau), or at
  ``max_displacement``; ``peak_reached`` says which (False: the curve still
  rose at the maximum displacement and the strength is a lower bound).

Both values are reported when reached (``offset_yield_n``,
``peak_force_n``) together with the whole curve.
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

from qctfea.fea.elasticity import DEFAULT_PETSC_OPTIONS, ElasticModel, build_nullspace
from qctfea.provenance import QctfeaError

#: GAMG keeps its prolongators between Newton steps (the sparsity never changes).
NONLINEAR_PETSC_OPTIONS = {**DEFAULT_PETSC_OPTIONS, "pc_gamg_reuse_interpolation": True}


@dataclass
class NonlinearParams:
    increments: int = 25  #: base number of increments to the maximum displacement
    min_increment_fraction: float = 1.0 / 64  #: smallest step, as a fraction of the base step
    newton_rtol: float = 1.0e-6  #: ‖free residual‖ <= rtol ‖internal force‖
    newton_max_it: int = 15
    hardening_ratio: float = 0.0  #: H / E of yielding elements (0: perfectly plastic)
    stop_drop_fraction: float = 0.05  #: stop once F < (1 - this) * peak
    plateau_tangent_ratio: float = 0.02  #: stop once dF/dd < this * initial stiffness
    #: "offset": the offset yield force (see the module docstring); "peak": the maximum force
    strength_rule: str = "offset"

    def __post_init__(self):
        if self.strength_rule not in ("offset", "peak"):
            raise QctfeaError(f"loads.strength_rule must be 'offset' or 'peak', not "
                              f"{self.strength_rule!r}")


#: The first increment, a probe of this fraction of the range, measures the initial stiffness.
PROBE_FRACTION = 1.0e-3


@dataclass
class CurvePoint:
    displacement_mm: float
    force_n: float
    newton_iterations: int
    yielded_cells: int


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
                 yield_mpa: np.ndarray, hardening_ratio: float = 0.0):
        super().__init__(mesh, youngs_mpa, poisson)
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
        self.sig = dolfinx.fem.Function(W, name="stress")
        self.N = dolfinx.fem.Function(W, name="flow_direction")
        self.beta = dolfinx.fem.Function(V0, name="beta")
        self.du = dolfinx.fem.Function(self.V, name="increment")
        self._eps_expr = dolfinx.fem.Expression(self.eps(self.du), W.element.interpolation_points)
        self._deps = dolfinx.fem.Function(W)
        H = hardening_ratio * self.E
        mu, lmbda, N, beta = self.mu, self.lmbda, self.N, self.beta
        w, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)

        def sigma_tang(e):
            return (lmbda * ufl.tr(e) * ufl.Identity(3) + 2 * mu * e
                    - 3 * mu * (3 * mu / (3 * mu + H) - beta) * ufl.inner(N, e) * N
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
        """Trial stress from the current increment; radial return; tangent data. Yielded cells."""
        self._deps.interpolate(self._eps_expr)
        de = self._deps.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3)
        de = 0.5 * (de + de.transpose(0, 2, 1))
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
        n_owned = self.mesh.topology.index_map(3).size_local
        return self.mesh.comm.allreduce(int(plastic[:n_owned].sum()), MPI.SUM)

    def commit(self) -> None:
        """Accept the increment: u += du, stress and plastic strain become converged state."""
        self.sig_n = self.sig.x.array.reshape(-1, 9)[self._t_idx].reshape(-1, 3, 3).copy()
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
        opts = PETSc.Options()
        all_opts = {**NONLINEAR_PETSC_OPTIONS, **(petsc_options or {})}
        for k, val in all_opts.items():
            opts[prefix + k] = val
        ksp = PETSc.KSP().create(comm)
        ksp.setOptionsPrefix(prefix)
        ksp.setOperators(A)
        ksp.setFromOptions()
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

        def newton(step: float):
            """Solve one increment of size ``step``; (converged, iterations, force, yielded)."""
            g.value = step * direction if l_comp is None else step * direction[l_comp]
            force, yielded = 0.0, 0
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
                A.zeroEntries()
                dolfinx.fem.petsc.assemble_matrix(A, self.a_tangent, bcs=bcs)
                A.assemble()
                dolfinx.fem.petsc.apply_lifting(b, [self.a_tangent], bcs=[bcs],
                                                x0=[self.du.x.petsc_vec], alpha=-1.0)
                b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
                dolfinx.fem.petsc.set_bc(b, bcs, x0=self.du.x.petsc_vec, alpha=-1.0)
                sec["assembly"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                ksp.setOperators(A)
                ksp.solve(b, dx)
                sec["solve"] += time.perf_counter() - t0
                reason = ksp.getConvergedReason()
                res.ksp_iterations += int(ksp.getIterationNumber())
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
        saved = (self.N.x.array.copy(), self.beta.x.array.copy())
        offset = offset_displacement if offset_displacement is not None else np.inf
        try:
            while d < max_displacement * (1 - 1e-9):
                h = min(step, max_displacement - d)
                ok, its, force, yielded = newton(h)
                res.newton_iterations += its
                if not ok:
                    self.du.x.array[:] = 0.0
                    self.N.x.array[:], self.beta.x.array[:] = saved[0], saved[1]
                    res.step_cuts += 1
                    step = h / 2
                    if step < base * params.min_increment_fraction:
                        res.stop_reason = (f"Newton did not converge at {d:.4g} mm even with "
                                           f"step {h:.3g} mm")
                        break
                    continue
                self.commit()
                saved = (self.N.x.array.copy(), self.beta.x.array.copy())
                d += h
                res.increments += 1
                prev = res.curve[-1]
                res.curve.append(CurvePoint(d, force, its, yielded))
                if progress:
                    progress(f"  increment {res.increments}: d = {d:.4f} mm, F = {force:.1f} N, "
                             f"{its} Newton, {yielded} yielded cells")
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
                    res.peak_reached, res.stop_reason = True, "plateau (limit load reached)"
                    break
                if its <= 4:
                    step = min(step * 1.5, base)
            else:
                res.stop_reason = "maximum displacement reached while the force still rose"
        finally:
            for k in all_opts:
                opts.delValue(prefix + k)
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
        """Displacement (P1) and, per element, von Mises stress, plastic strain, yielded flag."""
        vm = dolfinx.fem.Function(self.V0, name="von_mises_mpa")
        pe = dolfinx.fem.Function(self.V0, name="plastic_strain")
        yl = dolfinx.fem.Function(self.V0, name="yielded")
        self._set_cells(vm, self.von_mises())
        self._set_cells(pe, self.p_n)
        self._set_cells(yl, (self.p_n > 0).astype(float))
        self.u.name = "displacement_mm"
        with dolfinx.io.XDMFFile(self.mesh.comm, str(path), "w") as f:
            f.write_mesh(self.mesh)
            f.write_function(self.u)
            for fn in (vm, pe, yl):
                f.write_function(fn)
