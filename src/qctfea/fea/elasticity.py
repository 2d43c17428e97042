"""Linear elasticity in DOLFINx: assembly, CG + GAMG solve, reaction forces.

The weak form: find u in V (P1 vector Lagrange) with u = g on the Dirichlet
boundary such that

    a(u, v) = ∫ σ(u) : ε(v) dx = 0   for all v in V0,
    σ(u) = 2 μ ε(u) + λ tr(ε(u)) I,   ε(u) = sym(∇u),

with μ and λ element-wise constant (DG0) from each element's E and ν. There
are no body forces; the load is a prescribed displacement.

Solver: conjugate gradients preconditioned by smoothed-aggregation algebraic
multigrid (PETSc GAMG). GAMG needs the near-nullspace of the operator, the
six rigid body modes, to build good coarse spaces for elasticity; the modes
are built about the mesh centroid (scan coordinates are hundreds of mm from
the origin, which would make the rotations badly scaled). Chebyshev
smoothing with Jacobi is the robust choice for large modulus contrast (bone
to titanium). A solve that does not converge raises with PETSc's reason.

Reaction force: the residual r = A_full u is assembled from the action of
the unconstrained bilinear form; the force on a set of prescribed dofs is
the sum of r over them (the discrete, exact reaction), not an integral of
stresses over the boundary.
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

from qctfea.errors import QctfeaError

DEFAULT_PETSC_OPTIONS = {
    "ksp_type": "cg",
    "ksp_rtol": 1.0e-10,
    "ksp_atol": 1.0e-30,
    "ksp_max_it": 1000,
    "pc_type": "gamg",
    "pc_gamg_type": "agg",
    # Smoothed aggregation: one Jacobi smoothing step of the tentative prolongator T (the
    # rigid-body modes restricted to each aggregate), P = (I - w D^-1 A) T
    # (PCGAMGSetNSmooths, PETSc's default; not the smoothing steps of the solve's levels,
    # mg_levels_ksp_max_it below).
    "pc_gamg_agg_nsmooths": 1,
    # Keep every graph connection when aggregating (threshold 0; it was 0.01): on 4 ranks
    # the real L1's hierarchy with 0.01 left CG indefinite or diverging for compression
    # even with scalar Jacobi, with 0 it converged (69-73 iterations); on 1, 2 and 4 ranks
    # and four models (demo, real L1 and L3, the L1 enlarged to an L4) 0 took 30-50 % more
    # iterations but less time per load case, set-up included (docs/performance.md).
    "pc_gamg_threshold": 0.0,
    "pc_gamg_coarse_eq_limit": 1000,
    "mg_levels_ksp_type": "chebyshev",
    # One Chebyshev step with point-block Jacobi (the matrix's blocks: 3x3 nodal blocks on
    # the fine level, 6x6 on GAMG's coarse levels) per level and direction
    # (docs/performance.md): 22-36 % faster linear solves than PETSc's 2 steps with scalar
    # Jacobi on the demo models (4.5-2 mm), 34-42 CG iterations at rtol 1e-8, no growth
    # with refinement. A coarse level with a singular block is smoothed with scalar Jacobi
    # (SINGULAR_BLOCK_RATIO). The nonlinear solver: 2 steps, scalar Jacobi (stepping.py).
    "mg_levels_pc_type": "pbjacobi",
    "mg_levels_ksp_max_it": 1,
    # Eigenvalue estimate for Chebyshev by CG (the operator is SPD).
    "mg_levels_esteig_ksp_type": "cg",
    "mg_levels_ksp_chebyshev_esteig_steps": 20,
}

#: Options put over the caller's when CG breaks down (any failure but running out of
#: iterations): the nonlinear solver's multigrid (2 Chebyshev steps with scalar Jacobi per
#: level, GAMG graph threshold 0.02; stepping.NONLINEAR_PETSC_OPTIONS builds on them). The
#: L4 of a 3 mm clinical CT (TotalSegmentator's example, docs/mesh_convergence.md) meshed
#: with 2 mm bone cells (100,353 DOFs), on 2 ranks: every load case stopped with
#: DIVERGED_DTOL after 5-8 CG iterations with the defaults, with 2 point-block or scalar
#: Jacobi steps at threshold 0, and at threshold 0.01 (DIVERGED_INDEFINITE_MAT with the
#: unpreconditioned norm: the preconditioner was not positive definite); with these, 39-41
#: iterations. On 1 rank the defaults converged (73 iterations, level 1 in Jacobi). Neither
#: set converges on every model (the threshold 0.01 failed where 0 did: above), so the
#: solve tries the defaults first and these second, and records it (``SolveInfo.fallback``).
FALLBACK_PETSC_OPTIONS = {
    "mg_levels_ksp_type": "chebyshev", "mg_levels_pc_type": "jacobi",
    "mg_levels_ksp_max_it": 2, "pc_gamg_threshold": 0.02,
}

#: Point-block Jacobi inverts each diagonal block of a level's operator. On GAMG's coarse
#: levels a block is an aggregate's 6 x 6 rigid-body block, and an aggregate of one node (or
#: of nodes on a line) has no stiffness against some of its rotations: the block is
#: singular. Run on 2 ranks, the real L1 of the totalseg-l1 cohort (mesh 3 mm, 53,841 DOFs)
#: had one such block on level 2 of 4 (GAMG threshold 0.01; smallest / largest eigenvalue
#: 2e-17, 0.009 or more for every other block of the hierarchy, and no such block on 1 rank):
#: CG stopped with DIVERGED_INDEFINITE_PC after 5 iterations for every load case. (With the
#: threshold 0 it is level 1.) A level with a block whose
#: smallest / largest eigenvalue is below this ratio is smoothed with scalar Jacobi
#: instead (:func:`singular_block_levels`), before the solve.
SINGULAR_BLOCK_RATIO = 1.0e-8


def smallest_block_ratio(A) -> float:
    """The smallest ratio of smallest to largest eigenvalue over the diagonal blocks (of the
    matrix's block size) of this rank's rows of ``A`` (inf when it has none); a block whose
    largest eigenvalue is not positive counts as -inf."""
    bs = A.getBlockSize()
    r0, r1 = A.getOwnershipRange()
    if r1 == r0 or bs == 1:
        return np.inf
    ai, aj, av = A.getValuesCSR()
    rows = np.repeat(np.arange(r1 - r0), np.diff(ai))
    cols = aj - r0
    inside = (cols >= 0) & (cols < r1 - r0) & (cols // bs == rows // bs)
    blocks = np.zeros(((r1 - r0) // bs, bs, bs))
    blocks[rows[inside] // bs, rows[inside] % bs, cols[inside] % bs] = av[inside]
    w = np.linalg.eigvalsh(0.5 * (blocks + blocks.transpose(0, 2, 1)))
    ratio = np.where(w[:, -1] > 0, w[:, 0] / np.where(w[:, -1] > 0, w[:, -1], 1.0), -np.inf)
    return float(ratio.min())


def singular_block_levels(ksp) -> list[int]:
    """The levels of the set-up multigrid preconditioner of ``ksp`` whose point-block Jacobi
    smoother would invert a (near) singular diagonal block (:data:`SINGULAR_BLOCK_RATIO`);
    the finest level's 3 x 3 nodal blocks of an assembled stiffness are not checked.
    Collective."""
    pc = ksp.getPC()
    if pc.getType() not in ("gamg", "mg"):
        return []
    comm = ksp.getComm().tompi4py()
    levels = []
    for level in range(1, pc.getMGLevels() - 1):
        smoother = pc.getMGSmoother(level)
        if smoother.getPC().getType() != "pbjacobi":
            continue
        ratio = smallest_block_ratio(smoother.getOperators()[1])
        if comm.allreduce(ratio, op=MPI.MIN) < SINGULAR_BLOCK_RATIO:
            levels.append(level)
    return levels


@dataclass
class SolveInfo:
    iterations: int = 0
    converged_reason: str = ""
    residual_norm: float = 0.0
    #: multigrid levels smoothed with scalar Jacobi instead of point-block Jacobi, whose
    #: operator had a singular diagonal block (:func:`singular_block_levels`)
    jacobi_levels: list = field(default_factory=list)
    #: how the first attempt failed when the solution comes from the second, with
    #: :data:`FALLBACK_PETSC_OPTIONS` ("" when the first converged)
    fallback: str = ""
    n_dofs: int = 0
    n_cells: int = 0
    mpi_ranks: int = 1
    seconds: dict = field(default_factory=dict)


def read_mesh(path: str, comm=MPI.COMM_WORLD):
    """Mesh and cell tags from an XDMF written by :func:`qctfea.model.meshing.write_mesh`."""
    with dolfinx.io.XDMFFile(comm, str(path), "r") as f:
        mesh = f.read_mesh(name="mesh")
        tags = f.read_meshtags(mesh, name="cell_tags")
    mesh.topology.create_connectivity(mesh.topology.dim - 1, mesh.topology.dim)
    return mesh, tags


def cell_values_from_original(mesh, values_by_original_cell: np.ndarray, name: str):
    """A DG0 function whose value on each cell is ``values[original cell index]``."""
    V0 = dolfinx.fem.functionspace(mesh, ("DG", 0))
    f = dolfinx.fem.Function(V0, name=name)
    n_local = mesh.topology.index_map(mesh.topology.dim).size_local
    orig = np.asarray(mesh.topology.original_cell_index)[:n_local]
    cell_dofs = V0.dofmap.list[:n_local, 0]
    f.x.array[cell_dofs] = values_by_original_cell[orig]
    f.x.scatter_forward()
    return f


def make_ksp(comm, A, prefix: str, options: dict):
    """A PETSc KSP on operator ``A`` configured from ``options`` (PETSc option names without
    the leading dash) under the options ``prefix``."""
    opts = PETSc.Options()
    for k, val in options.items():
        opts[prefix + k] = val
    ksp = PETSc.KSP().create(comm)
    ksp.setOptionsPrefix(prefix)
    ksp.setOperators(A)
    ksp.setFromOptions()
    return ksp


def clear_options(prefix: str, options) -> None:
    """Remove the options :func:`make_ksp` set under ``prefix`` from PETSc's database."""
    opts = PETSc.Options()
    for k in options:
        opts.delValue(prefix + k)


def build_nullspace(V) -> PETSc.NullSpace:
    """Rigid body modes (3 translations, 3 rotations about the centroid), orthonormalised."""
    index_map = V.dofmap.index_map
    bs = V.dofmap.index_map_bs
    n_owned = index_map.size_local
    basis = [dolfinx.la.vector(index_map, bs=bs, dtype=PETSc.ScalarType) for _ in range(6)]
    b = [v.array for v in basis]
    dofs = [V.sub(i).dofmap.list.ravel() for i in range(3)]
    for i in range(3):
        b[i][dofs[i]] = 1.0
    x = V.tabulate_dof_coordinates()
    centre = V.mesh.comm.allreduce(x[:n_owned].sum(axis=0), MPI.SUM) / V.mesh.comm.allreduce(
        n_owned, MPI.SUM
    )
    x = x - centre
    blocks = V.dofmap.list.ravel()
    x0, x1, x2 = x[blocks, 0], x[blocks, 1], x[blocks, 2]
    b[3][dofs[0]] = -x1
    b[3][dofs[1]] = x0
    b[4][dofs[0]] = x2
    b[4][dofs[2]] = -x0
    b[5][dofs[2]] = x1
    b[5][dofs[1]] = -x2
    dolfinx.la.orthonormalize(basis)
    vecs = [PETSc.Vec().createWithArray(v[: bs * n_owned], bsize=bs, comm=V.mesh.comm) for v in b]
    return PETSc.NullSpace().create(vectors=vecs)


class ElasticModel:
    """P1 elasticity on a tagged tetrahedral mesh with element-wise E and ν."""

    def __init__(self, mesh, youngs_mpa: np.ndarray, poisson: np.ndarray):
        self.mesh = mesh
        self.V = dolfinx.fem.functionspace(mesh, ("Lagrange", 1, (mesh.geometry.dim,)))
        self.E = cell_values_from_original(mesh, youngs_mpa, "E")
        self.nu = cell_values_from_original(mesh, poisson, "nu")
        E, nu = self.E, self.nu
        self.mu = E / (2 * (1 + nu))
        self.lmbda = E * nu / ((1 + nu) * (1 - 2 * nu))
        self.u = dolfinx.fem.Function(self.V, name="displacement")
        u, v = ufl.TrialFunction(self.V), ufl.TestFunction(self.V)
        self.a = dolfinx.fem.form(ufl.inner(self.sigma(u), self.eps(v)) * ufl.dx)
        zero = dolfinx.fem.Constant(mesh, np.zeros(3, dtype=PETSc.ScalarType))
        self.L = dolfinx.fem.form(ufl.inner(zero, v) * ufl.dx)
        self.residual = dolfinx.fem.form(ufl.inner(self.sigma(self.u), self.eps(v)) * ufl.dx)

    @staticmethod
    def eps(w):
        return ufl.sym(ufl.grad(w))

    def sigma(self, w):
        return 2.0 * self.mu * self.eps(w) + self.lmbda * ufl.tr(self.eps(w)) * ufl.Identity(3)

    def n_dofs(self) -> int:
        im = self.V.dofmap.index_map
        return im.size_global * self.V.dofmap.index_map_bs

    def assemble_system(self, bcs):
        """Stiffness matrix (with the rigid-body near-null space for GAMG) and right-hand side
        with the Dirichlet conditions ``bcs`` applied."""
        A = dolfinx.fem.petsc.assemble_matrix(self.a, bcs=bcs)
        A.assemble()
        b = dolfinx.fem.petsc.assemble_vector(self.L)
        dolfinx.fem.petsc.apply_lifting(b, [self.a], bcs=[bcs])
        b.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        dolfinx.fem.petsc.set_bc(b, bcs)
        A.setNearNullSpace(build_nullspace(self.V))
        return A, b

    def solve(self, bcs, petsc_options: dict | None = None, prefix: str = "qctfea_") -> SolveInfo:
        """Assemble and solve (CG and GAMG; after a breakdown once more with
        :data:`FALLBACK_PETSC_OPTIONS`); raise :class:`QctfeaError` when CG does not
        converge."""
        comm = self.mesh.comm
        info = SolveInfo(n_dofs=self.n_dofs(), mpi_ranks=comm.size,
                         n_cells=self.mesh.topology.index_map(3).size_global)
        t0 = time.perf_counter()
        A, b = self.assemble_system(bcs)
        info.seconds["assembly"] = time.perf_counter() - t0
        options = {**DEFAULT_PETSC_OPTIONS, **(petsc_options or {})}
        reason = self._krylov(A, b, options, prefix, info)
        first = f"{info.converged_reason} after {info.iterations} iterations"
        if reason < 0 and reason != PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT:
            info.fallback = first
            self.u.x.array[:] = 0.0
            reason = self._krylov(A, b, {**options, **FALLBACK_PETSC_OPTIONS}, prefix, info)
        A.destroy()
        b.destroy()
        if reason < 0:
            advice = ("raise solver.ksp_max_it"
                      if reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT else
                      "set other solver options (solver: in the cohort config)")
            raise QctfeaError(
                f"linear solve did not converge: PETSc reason {info.converged_reason} after "
                f"{info.iterations} iterations (residual {info.residual_norm:.3e})"
                + (f", and {first} with the default multigrid" if info.fallback else "")
                + f"; check the mesh (mesh.json's quality) and materials, or {advice}")
        return info

    def _krylov(self, A, b, options: dict, prefix: str, info: SolveInfo) -> int:
        """One preconditioner set-up and CG solve into ``self.u`` from zero (PETSc's default
        initial guess); its iterations, reason and seconds into ``info``; the reason."""
        names = {v: k for k, v in vars(PETSc.KSP.ConvergedReason).items() if isinstance(v, int)}
        t0 = time.perf_counter()
        ksp = make_ksp(self.mesh.comm, A, prefix, options)
        ksp.setUp()
        # GAMG builds the same hierarchy again, those levels now smoothed with scalar Jacobi
        # (checked again all the same; a Jacobi level is not, so this ends)
        while singular := singular_block_levels(ksp):
            clear_options(prefix, options)
            ksp.destroy()
            info.jacobi_levels += singular
            options = {**options, **{f"mg_levels_{level}_pc_type": "jacobi"
                                     for level in singular}}
            ksp = make_ksp(self.mesh.comm, A, prefix, options)
            ksp.setUp()
        sec = info.seconds
        sec["preconditioner_setup"] = (sec.get("preconditioner_setup", 0.0)
                                       + time.perf_counter() - t0)
        t0 = time.perf_counter()
        ksp.solve(b, self.u.x.petsc_vec)
        self.u.x.scatter_forward()
        sec["solve"] = sec.get("solve", 0.0) + time.perf_counter() - t0
        reason = ksp.getConvergedReason()
        info.iterations = int(ksp.getIterationNumber())
        info.converged_reason = names.get(reason, str(reason))
        info.residual_norm = float(ksp.getResidualNorm())
        clear_options(prefix, options)
        ksp.destroy()
        return reason

    def reaction(self, block_dofs: np.ndarray, direction: np.ndarray) -> float:
        """Sum over ``block_dofs`` of the residual projected on ``direction`` (N), all ranks."""
        r = dolfinx.fem.petsc.assemble_vector(self.residual)
        r.ghostUpdate(addv=PETSc.InsertMode.ADD, mode=PETSc.ScatterMode.REVERSE)
        n_owned = self.V.dofmap.index_map.size_local
        owned = block_dofs[block_dofs < n_owned]
        arr = r.getArray(readonly=True).reshape(-1, 3)
        local = float((arr[owned] @ np.asarray(direction, float)).sum())
        r.destroy()
        return self.mesh.comm.allreduce(local, MPI.SUM)

    def write_fields(self, path) -> None:
        """Displacement (P1) and element von Mises stress (MPa) to XDMF (ParaView)."""
        V0 = dolfinx.fem.functionspace(self.mesh, ("DG", 0))
        vm = dolfinx.fem.Function(V0, name="von_mises_mpa")
        s = ufl.dev(self.sigma(self.u))
        vm.interpolate(dolfinx.fem.Expression(ufl.sqrt(1.5 * ufl.inner(s, s)),
                                              V0.element.interpolation_points))
        self.u.name = "displacement_mm"
        with dolfinx.io.XDMFFile(self.mesh.comm, str(path), "w") as f:
            f.write_mesh(self.mesh)
            f.write_function(self.u)
            f.write_function(vm)

    def cell_strains(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per owned cell: strain tensor (n, 3, 3), volume, original cell index."""
        mesh = self.mesh
        W = dolfinx.fem.functionspace(mesh, ("DG", 0, (3, 3)))
        expr = dolfinx.fem.Expression(self.eps(self.u), W.element.interpolation_points)
        e = dolfinx.fem.Function(W)
        e.interpolate(expr)
        n_local = mesh.topology.index_map(3).size_local
        cdofs = W.dofmap.list[:n_local, 0]
        strains = e.x.array.reshape(-1, 9)[cdofs].reshape(-1, 3, 3)
        V0 = dolfinx.fem.functionspace(mesh, ("DG", 0))
        vol = dolfinx.fem.petsc.assemble_vector(
            dolfinx.fem.form(ufl.TestFunction(V0) * ufl.dx))
        vols = vol.getArray(readonly=True)[V0.dofmap.list[:n_local, 0]].copy()
        vol.destroy()
        orig = np.asarray(mesh.topology.original_cell_index)[:n_local]
        return strains, vols, orig


def boundary_facets_of_tags(mesh, cell_tags, tags) -> np.ndarray:
    """Exterior facets whose (single) cell carries one of ``tags``."""
    tdim = mesh.topology.dim
    mesh.topology.create_connectivity(tdim - 1, tdim)
    facets = dolfinx.mesh.exterior_facet_indices(mesh.topology)
    f2c = mesh.topology.connectivity(tdim - 1, tdim)
    tag_of = np.full(mesh.topology.index_map(tdim).size_local
                     + mesh.topology.index_map(tdim).num_ghosts, -1, np.int32)
    tag_of[cell_tags.indices] = cell_tags.values
    cells = np.array([f2c.links(f)[0] for f in facets], dtype=np.int32)
    return facets[np.isin(tag_of[cells], tags)]


def facet_midpoints(mesh, facets: np.ndarray) -> np.ndarray:
    return dolfinx.mesh.compute_midpoints(mesh, mesh.topology.dim - 1, facets)
