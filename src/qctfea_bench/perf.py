"""Performance harness: where the time goes, and how close the solver is to the
machine's memory bandwidth.

A documented command, not a timed test::

    qctfea-bench perf --scan results/demo/P01/M00 --out-dir results/perf \\
        --out-md docs/performance.md --sizes 4.5 3 2 --ranks 1 2

For one processed scan (``results/<cohort>/<patient>/<timepoint>/``) and each bone cell size
(screw cells half as large, peri-screw bone a third, as in :mod:`qctfea_bench.convergence`):

1. **Meshing** and **material mapping** are run in this process (``steps.mesh``,
   ``steps.materials``) and timed.
2. For each MPI rank count, a *linear* compression and a *linear* left-pullout solve are
   run under ``mpiexec`` by a small worker (``python -m qctfea_bench.perf worker``) that builds
   exactly the system the pipeline solves (:class:`qctfea.fea.elasticity.ElasticModel`,
   the boundary conditions of :mod:`qctfea.fea.loadcases`, ``DEFAULT_PETSC_OPTIONS``) and
   times separately: mesh read, function space and form set-up, boundary-condition
   location, matrix (and right-hand side) assembly, preconditioner set-up
   (``KSPSetUp``: GAMG coarsening, prolongators, coarse factorisation; plus one
   preconditioner application, because PETSc computes the Chebyshev smoothers' eigenvalue
   estimates lazily at the first V-cycle) and the Krylov solve (best of 3 identical solves
   from a zero start, preconditioner kept; the first one is kept too), and one MatMult with
   A (best of 10). It reports DOFs, CG iterations, the peak resident set size summed over
   ranks (``getrusage`` maxrss, MPI reduce) and DOFs per second of the solve
   (DOFs / solve seconds). The first solve uses the pipeline's defaults (``ksp_rtol``
   1e-10); the worker then overrides ``ksp_rtol`` to 1e-8 (``KSPSetTolerances`` on the same
   KSP, the preconditioner kept) and solves again from a zero initial guess, because the
   iteration goal is stated at 1e-8.
   Solver variants: ``python -m qctfea_bench.perf worker ... --petsc-option KEY=VALUE`` (repeatable)
   overrides the defaults, ``--mat-type baij`` applies a 3x3-blocked copy of the operator
   (GAMG keeps the AIJ matrix to coarsen); ``docs/performance.md`` records the variants tried.
3. A **STREAM-like triad** ``a = b + s c`` on float64 arrays of ``n`` (default 2e7, 160 MB
   per array, far beyond the caches) is timed by the harness itself, best of 5, every MPI
   rank doing its own triad at the same time (a barrier before each repetition); the
   bandwidth is the sum over ranks of ``24 n / best seconds`` (3 arrays x 8 bytes, the
   STREAM convention: the write-allocate read of ``a`` is not counted). numpy would write a
   temporary ``s c`` to memory and read it back, so the triad is done in cache-sized blocks
   (``np.multiply`` into a small scratch block, then ``np.add`` into ``a``): memory sees
   ``b`` and ``c`` read and ``a`` written once. It is measured before and after the solves;
   the larger (best) value is used for the bound.

**Bandwidth bound of a solve.** Bytes moved per preconditioned CG iteration (a floor: every
operator streamed once, vectors at the count below)::

    B_it = M(A) + V * n * 8 + sum over GAMG levels l of M(A_l)
    M(A) = nnz(A) * (8 + i) + (rows(A) + 1) * i          # AIJ values + column indices + row
                                                          # pointers; i = PetscInt bytes (4)

with ``n`` the global number of unknowns (rows of A), ``V`` = :data:`CG_VECTOR_PASSES` = 8
vector streams of ``n`` doubles for CG's own vector work (x, r, z, p, A p: the dot products,
norms and three AXPYs, fused as far as a memory-bound implementation could; PETSc's unfused
CG does about 16 passes), and ``A_l`` the operator of every level of the multigrid
hierarchy, read from PETSc (``pc.getMGLevels()``, each level's smoother KSP
``getOperators()``; the finest level's operator is ``A`` itself, counted again because the
V-cycle applies it in its smoother). The bound is

    t_bound = iterations * B_it / bandwidth,   ratio = t_solve / t_bound

(goal: ratio <= 3). Because the floor counts each operator once per iteration while a
V-cycle applies each level's operator (down-smoothing steps + 1 residual + up-smoothing steps)
times and its prolongator twice, a second, *sweep* model is reported alongside::

    B_sweep = M(A) + V * n * 8 + sum over levels l >= 1 of
              [(k_down(l) + k_up(l) + 1) * M(A_l) + 2 * M(P_l)] + M(A_0)

with ``k`` the smoother's iteration count read from PETSc (one KSP shared by both sweeps)
and ``P_l`` the interpolation into level l; the coarse solve (``A_0``, at most
``pc_gamg_coarse_eq_limit`` rows) is counted once. Neither model counts the
Chebyshev/Jacobi smoothers' own vector operations.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qctfea import logs
from qctfea.errors import QctfeaError
from qctfea.mdtable import pipe_table
from qctfea.provenance import write_text

log = logging.getLogger(__name__)

#: vector streams of n doubles per CG iteration outside the preconditioner (see docstring)
CG_VECTOR_PASSES = 8
#: bytes of one matrix value (float64)
VALUE_BYTES = 8
#: the performance goals (docs/performance.md)
GOAL_ITERATIONS = 50
GOAL_RTOL = 1.0e-8
GOAL_REFINE_GROWTH = 0.30
GOAL_BANDWIDTH_RATIO = 3.0
#: nonlinear runs: wall time in units of one linear solve of the same model (demo models)
GOAL_NONLINEAR_COST = {"compression": 15.0, "pullout": 10.0}

#: text after this line of an existing --out-md file is kept when the tables are regenerated
NOTES_MARK = "<!-- notes: kept when the tables above are regenerated -->"

CASES = [("compression", None), ("pullout", "left")]


# --- bytes per iteration ----------------------------------------------------------------


def matrix_bytes(nnz: int, rows: int, index_bytes: int = 4, value_bytes: int = VALUE_BYTES) -> int:
    """Bytes one pass over an AIJ (CSR) matrix reads: values, column indices, row pointers."""
    return int(nnz) * (value_bytes + index_bytes) + (int(rows) + 1) * index_bytes


def operator_bytes(M, index_bytes: int) -> tuple[int, int, int]:
    """(nnz, rows, bytes of one pass) of a PETSc matrix in its own storage format: AIJ as
    :func:`matrix_bytes`; BAIJ/SBAIJ with block size bs keeps one column index per bs x bs
    block and one row pointer per block row."""
    nnz, n = mat_size(M)
    mtype = M.getType() or ""
    bs = int(M.getBlockSize() or 1)
    if "baij" in mtype and bs > 1:
        return nnz, n, int(nnz * VALUE_BYTES + (nnz // (bs * bs)) * index_bytes
                           + (n // bs + 1) * index_bytes)
    return nnz, n, matrix_bytes(nnz, n, index_bytes)


def _index_bytes() -> int:
    from petsc4py import PETSc

    return int(np.dtype(PETSc.IntType).itemsize)


def mat_size(A) -> tuple[int, int]:
    """Global (nonzeros, rows) of a PETSc matrix."""
    from petsc4py import PETSc

    info = A.getInfo(PETSc.Mat.InfoType.GLOBAL_SUM)
    return int(round(info["nz_used"])), int(A.getSize()[0])


def bytes_per_iteration(A, pc=None, vector_passes: int = CG_VECTOR_PASSES) -> dict:
    """Bytes a preconditioned CG iteration moves (floor and sweep models, module docstring).

    ``pc`` must be set up (``ksp.setUp()``) for its multigrid levels to exist; a PC that is
    not multigrid (or None) contributes nothing.
    """
    ib = _index_bytes()
    nnz, n, fine = operator_bytes(A, ib)
    vectors = int(vector_passes) * n * VALUE_BYTES
    levels = []
    n_levels = 0
    if pc is not None and pc.getType() in ("gamg", "mg", "ml"):
        n_levels = int(pc.getMGLevels())
    for lev in range(n_levels):
        smoother = pc.getMGSmoother(lev) if lev > 0 else pc.getMGCoarseSolve()
        A_l = smoother.getOperators()[0]
        nnz_l, n_l, bytes_l = operator_bytes(A_l, ib)
        row = {"level": lev, "rows": n_l, "nnz": nnz_l, "bytes": bytes_l}
        if lev > 0:
            # One smoother KSP is shared by the down and up sweeps (the default; do not
            # call PCMGGetSmootherUp: it splits them, creating a new, unset-up KSP).
            down = up = int(smoother.getTolerances()[3])
            P = pc.getMGInterpolation(lev)
            nnz_p, _, bytes_p = operator_bytes(P, ib)
            row.update(smooth_down=down, smooth_up=up, interp_nnz=nnz_p,
                       interp_bytes=bytes_p)
        levels.append(row)
    mg = sum(r["bytes"] for r in levels)
    sweep = sum(((r["smooth_down"] + r["smooth_up"] + 1) * r["bytes"] + 2 * r["interp_bytes"])
                if r["level"] > 0 else r["bytes"] for r in levels)
    return {"rows": n, "nnz": nnz, "index_bytes": ib, "vector_passes": int(vector_passes),
            "matrix_bytes": fine, "vector_bytes": vectors, "mg_operator_bytes": mg,
            "levels": levels, "bytes_per_iteration": fine + vectors + mg,
            "sweep_bytes_per_iteration": fine + vectors + sweep}


def bandwidth_ratio(solve_s: float, iterations: int, bytes_per_it: float,
                    bandwidth_b_s: float) -> float:
    """t_solve / (iterations x bytes per iteration / bandwidth); inf without iterations."""
    if iterations <= 0 or bandwidth_b_s <= 0:
        return float("inf")
    return float(solve_s) / (iterations * bytes_per_it / bandwidth_b_s)


# --- STREAM-like triad -------------------------------------------------------------------


def triad(n: int = 20_000_000, repeats: int = 5, scalar: float = 3.0, block: int = 32_768,
          barrier=None) -> dict:
    """Best-of-``repeats`` triad a = b + s c on ``n`` doubles; bytes counted as 24 n.

    Done in blocks of ``block`` elements so that the temporary s c stays in cache.
    ``barrier`` (a callable) is called before each repetition (MPI: all ranks together).
    """
    n = int(n)
    if n <= 0 or repeats <= 0:
        raise QctfeaError("triad: n and repeats must be positive")
    a = np.empty(n)
    b = np.full(n, 1.0)
    c = np.full(n, 2.0)
    tmp = np.empty(min(block, n))
    times = []
    for _ in range(int(repeats)):
        if barrier is not None:
            barrier()
        t0 = time.perf_counter()
        for i in range(0, n, block):
            j = min(i + block, n)
            t = tmp[: j - i]
            np.multiply(c[i:j], scalar, out=t)
            np.add(b[i:j], t, out=a[i:j])
        times.append(time.perf_counter() - t0)
    if not (a[0] == 1.0 + scalar * 2.0 and a[-1] == a[0]):
        raise QctfeaError("triad: wrong result")
    best = min(times)
    nbytes = 3 * VALUE_BYTES * n
    return {"n": n, "repeats": int(repeats), "bytes": nbytes, "best_s": best,
            "times_s": times, "bandwidth_gb_s": nbytes / best / 1e9}


def triad_mpi(n: int, repeats: int, out_json: str | None = None) -> dict:
    """Every rank runs its own triad at the same time; bandwidth summed over ranks."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    r = triad(n, repeats, barrier=comm.Barrier)
    per_rank = comm.gather(r["bandwidth_gb_s"], root=0)
    res = None
    if comm.rank == 0:
        res = {"ranks": comm.size, "n_per_rank": r["n"], "bytes_per_rank": r["bytes"],
               "repeats": r["repeats"], "per_rank_gb_s": per_rank,
               "bandwidth_gb_s": float(sum(per_rank))}
        if out_json:
            Path(out_json).write_text(json.dumps(res, indent=1))
    return comm.bcast(res, root=0)


# --- the solve worker (runs under mpiexec) -------------------------------------------------


def worker(mesh_path, materials_path, vertebra_json, screws_path, case: str,
           side: str | None, out_json: str, extra_rtol: float = GOAL_RTOL,
           loads_cfg: dict | None = None, repeats: int = 3,
           petsc_options: dict | None = None, mat_type: str = "aij") -> dict:
    """Build the pipeline's linear system for ``case`` and time every stage (all ranks).

    ``petsc_options`` override :data:`DEFAULT_PETSC_OPTIONS` (solver variants);
    ``mat_type`` "baij" converts the assembled matrix to PETSc's 3x3-blocked format."""
    import dolfinx_solver  # noqa: F401  (orders MPI ahead of the compiled bindings)
    import dolfinx
    from mpi4py import MPI

    from qctfea import steps
    from qctfea.fea import elasticity, loadcases
    from qctfea.provenance import read_json

    comm = MPI.COMM_WORLD
    sec = {}

    def lap(key, t0):
        comm.Barrier()
        sec[key] = time.perf_counter() - t0
        return time.perf_counter()

    comm.Barrier()
    t = time.perf_counter()
    mesh, tags = elasticity.read_mesh(mesh_path, comm)
    t = lap("mesh_read", t)
    npz = np.load(materials_path)
    model = elasticity.ElasticModel(mesh, npz["youngs_mpa"], npz["poisson"])
    t = lap("function_space", t)
    lp = steps.params_from(loadcases.LoadParams, {**(loads_cfg or {}), "analysis": "linear"},
                           "loads")
    axis_info = read_json(vertebra_json)
    d = lp.displacement_mm
    if case == "compression":
        sup, inf, axis, _, _, _ = loadcases.compression_dofs(model, tags, axis_info, lp)
        bcs = [dolfinx.fem.dirichletbc(np.zeros(3), inf, model.V),
               dolfinx.fem.dirichletbc(-d * axis, sup, model.V)]
        react = (sup, -axis)
    elif case == "pullout":
        screws = {s.side: s for s in steps.load_screws(screws_path)}
        if side not in screws:
            raise QctfeaError(f"no {side!r} screw in {screws_path}")
        ends, head, pull, _ = loadcases.pullout_dofs(model, tags, axis_info, screws[side], lp)
        bcs = [dolfinx.fem.dirichletbc(np.zeros(3), ends, model.V),
               dolfinx.fem.dirichletbc(d * pull, head, model.V)]
        react = (head, pull)
    else:
        raise QctfeaError(f"unknown load case {case!r}")
    t = lap("boundary_conditions", t)

    A, b = model.assemble_system(bcs)  # the assembly ElasticModel.solve uses
    P = A
    if mat_type != "aij":
        # GAMG coarsens an AIJ matrix only (MatCreateGraph): it keeps the assembled AIJ
        # as the preconditioning matrix; CG and the fine-level smoother apply the BAIJ copy.
        from petsc4py import PETSc

        A = P.convert(mat_type, PETSc.Mat())  # a new matrix (out=None converts in place)
    t = lap("assembly", t)

    prefix = "qctfea_perf_"
    options = {**elasticity.DEFAULT_PETSC_OPTIONS, **(petsc_options or {})}
    ksp = elasticity.make_ksp(comm, A, prefix, options)
    if P is not A:
        ksp.setOperators(A, P)
    t = time.perf_counter()
    ksp.setUp()
    t = lap("ksp_setup", t)
    # PETSc builds the Chebyshev smoothers' eigenvalue estimates lazily, at the first
    # V-cycle: one preconditioner application here keeps them out of the solve's time.
    pc = ksp.getPC()
    z = b.duplicate()
    pc.apply(b, z)
    z.destroy()
    t = lap("smoother_setup", t)
    sec["preconditioner_setup"] = sec["ksp_setup"] + sec["smoother_setup"]
    x = model.u.x.petsc_vec
    ksp.solve(b, x)
    t = lap("solve_first", t)
    its = int(ksp.getIterationNumber())
    reason = int(ksp.getConvergedReason())
    model.u.x.scatter_forward()
    force = model.reaction(*react)
    model_bytes = bytes_per_iteration(A, pc)
    # The same solve again (zero start, preconditioner kept): 'solve' is the best of
    # ``repeats`` timings, which damps the noise of other jobs on a shared machine.
    times = [sec["solve_first"]]
    for _ in range(max(0, int(repeats) - 1)):
        x.set(0.0)
        comm.Barrier()
        t = time.perf_counter()
        ksp.solve(b, x)
        comm.Barrier()
        times.append(time.perf_counter() - t)
    sec["solve"] = min(times)
    sec["solve_all"] = times
    # One sparse matrix-vector product with A (best of 10): the kernel the bound is made of.
    y = b.duplicate()
    mm = []
    for _ in range(10):
        comm.Barrier()
        t = time.perf_counter()
        A.mult(x, y)
        comm.Barrier()
        mm.append(time.perf_counter() - t)
    y.destroy()
    sec["matmult"] = min(mm)

    # The goal tolerance (GOAL_RTOL): override ksp_rtol, same KSP and preconditioner, zero start.
    # (KSPSetTolerances, not a second KSPSetFromOptions: that would rebuild the Chebyshev
    # smoothers' eigenvalue estimators after set-up and break the V-cycle.)
    ksp.setTolerances(rtol=extra_rtol)
    x.set(0.0)
    comm.Barrier()
    t = time.perf_counter()
    ksp.solve(b, x)
    t = lap("solve_extra_rtol", t)
    its_extra = int(ksp.getIterationNumber())
    reason_extra = int(ksp.getConvergedReason())
    elasticity.clear_options(prefix, options)

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    rss_sum = comm.reduce(rss_kb, op=MPI.SUM, root=0)
    rss_max = comm.reduce(rss_kb, op=MPI.MAX, root=0)
    n_dofs = model.n_dofs()
    res = {
        "case": case, "side": side, "ranks": comm.size, "n_dofs": n_dofs,
        "n_cells": mesh.topology.index_map(3).size_global,
        "seconds": sec, "ksp_rtol": options["ksp_rtol"], "iterations": its,
        "converged_reason": reason, "extra_rtol": extra_rtol,
        "iterations_extra_rtol": its_extra, "converged_reason_extra_rtol": reason_extra,
        "reaction_force_n": force, "stiffness_n_per_mm": force / d,
        "dofs_per_s": n_dofs / sec["solve"] if sec["solve"] > 0 else float("inf"),
        "peak_rss_mb_sum": (rss_sum or 0) / 1024.0, "peak_rss_mb_max_rank": (rss_max or 0) / 1024.0,
        "bytes_model": model_bytes, "petsc_options": options,
    }
    ksp.destroy()
    A.destroy()
    if P is not A:
        P.destroy()
    b.destroy()
    if comm.rank == 0:
        Path(out_json).write_text(json.dumps(res, indent=1))
    comm.Barrier()
    return res


# --- the harness ----------------------------------------------------------------------------


def _mpiexec() -> str:
    from qctfea_bench.convergence import _mpiexec as find

    return find()


def _run_mpi(ranks: int, args: list[str], what: str) -> None:
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "qctfea_bench.perf", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise QctfeaError(f"perf {what} failed:\n{res.stdout[-1000:]}\n{res.stderr[-2000:]}")


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return {"cpu_model": model or platform.processor(), "logical_cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "memory_gb": mem_gb, "platform": platform.platform(),
            "python": platform.python_version()}


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Busy CPUs (0..cores) over ``seconds`` from /proc/stat, while this harness is idle:
    the load other jobs put on the machine at that moment."""
    def read():
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = read()
        time.sleep(seconds)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    ncpu = os.cpu_count() or 1
    return ncpu * (1.0 - (i1 - i0) / max(1, t1 - t0))


def nonlinear_summary(results_root: str | Path) -> dict:
    """Newton iterations per increment and Krylov iterations per Newton step of the
    nonlinear solve JSONs under ``results_root/<patient>/<timepoint>/``."""
    out = {}
    for case, pattern in (("compression", "compression.json"), ("pullout", "pullout_*.json")):
        rows = []
        for f in sorted(glob.glob(str(Path(results_root) / "*" / "*" / pattern))):
            d = json.loads(Path(f).read_text())
            if d.get("analysis") != "nonlinear" or not d.get("increments"):
                continue
            rows.append({"file": f, "increments": d["increments"],
                         "step_cuts": d.get("step_cuts", 0),
                         "newton": d["newton_iterations"], "ksp": d["ksp_iterations"],
                         "n_dofs": d.get("n_dofs"),
                         "cost": d.get("cost_in_linear_solves"),
                         "solve_s": (d.get("seconds") or {}).get("solve"),
                         "total_s": (d.get("seconds") or {}).get("total")})
        if not rows:
            continue
        per_inc = [r["newton"] / r["increments"] for r in rows]
        per_newton = [r["ksp"] / r["newton"] for r in rows if r["newton"]]

        def stats(v):
            return {"median": statistics.median(v), "min": min(v), "max": max(v),
                    "mean": statistics.fmean(v)}

        out[case] = {"models": len(rows),
                     "increments": stats([r["increments"] for r in rows]),
                     "step_cuts_total": sum(r["step_cuts"] for r in rows),
                     "newton_per_increment": stats(per_inc),
                     "ksp_per_newton": stats(per_newton),
                     "cost_in_linear_solves": (stats([r["cost"] for r in rows])
                                               if all(r["cost"] for r in rows) else None),
                     "newton_total": sum(r["newton"] for r in rows),
                     "ksp_total": sum(r["ksp"] for r in rows),
                     "solve_s_total": sum(r["solve_s"] or 0 for r in rows),
                     "total_s_total": sum(r["total_s"] or 0 for r in rows),
                     "n_dofs": sorted({r["n_dofs"] for r in rows if r["n_dofs"]})}
    return out


def run_benchmark(scan, out_dir, sizes: list[float], ranks: list[int], voxel_mm: float = 0.5,
                  triad_n: int = 20_000_000, nonlinear_root: str | None = None,
                  materials_cfg: dict | None = None) -> dict:
    """The whole harness: triad, then mesh / materials / solves per level; one result dict."""
    from qctfea_bench.convergence import check_scan, mesh_level

    scan, out_dir = check_scan(scan), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    busy_before = cpu_busy()
    t_start = time.perf_counter()

    def measure_triad(tag):
        res = {}
        for r in ranks:
            f = out_dir / f"triad_{tag}_{r}ranks.json"
            log.info(f"[perf] triad ({r} ranks, {tag})")
            _run_mpi(r, ["triad", "--n", str(triad_n), "--out-json", str(f)], "triad")
            res[str(r)] = json.loads(f.read_text())
        return res

    triad_before = measure_triad("before")
    rows = []
    for size in sorted(sizes, reverse=True):
        d = out_dir / f"bone_{size:g}mm"
        d.mkdir(parents=True, exist_ok=True)
        ctx = f"{scan} at bone cell size {size:g} mm"
        log.info(f"[perf] {ctx}: meshing")
        t_mesh, t_mat, mesh_rep = mesh_level(scan, d, size, voxel_mm, materials_cfg, ctx)
        n_cells = mesh_rep["n_cells"]
        for r in ranks:
            for case, side in CASES:
                label = f"{case}_{side}" if side else case
                f = d / f"{label}_{r}ranks.json"
                log.info(f"[perf] {ctx}: {label}, {r} rank(s)")
                args = ["worker", "--case", case, "--mesh", str(d / "mesh.xdmf"),
                        "--materials", str(d / "materials.npz"),
                        "--vertebra", str(scan / "vertebra.json"),
                        "--screws", str(scan / "screws.json"), "--out-json", str(f)]
                if side:
                    args += ["--side", side]
                t0 = time.perf_counter()
                _run_mpi(r, args, f"{label} solve at {d}")
                w = json.loads(f.read_text())
                w["wall_s"] = time.perf_counter() - t0
                rows.append({"bone_cell_size_mm": size, "screw_cell_size_mm": size / 2,
                             "peri_screw_cell_size_mm": size / 3, "n_cells": n_cells,
                             "mesh_s": t_mesh, "materials_s": t_mat, "load_case": label, **w})
                log.info(f"[perf]   {w['n_dofs']} DOFs, {w['iterations']} its "
                         f"({w['iterations_extra_rtol']} at rtol {w['extra_rtol']:g}), "
                         f"solve {w['seconds']['solve']:.2f} s")
    triad_after = measure_triad("after")
    load_after = os.getloadavg()
    busy_after = cpu_busy()
    bw = {str(r): max(triad_before[str(r)]["bandwidth_gb_s"],
                      triad_after[str(r)]["bandwidth_gb_s"]) for r in ranks}
    for row in rows:
        bm = row["bytes_model"]
        bw_b = bw[str(row["ranks"])] * 1e9
        row["bandwidth_gb_s"] = bw[str(row["ranks"])]
        row["bound_s"] = row["iterations"] * bm["bytes_per_iteration"] / bw_b
        row["bandwidth_ratio"] = bandwidth_ratio(row["seconds"]["solve"], row["iterations"],
                                                 bm["bytes_per_iteration"], bw_b)
        row["bandwidth_ratio_sweep"] = bandwidth_ratio(
            row["seconds"]["solve"], row["iterations"], bm["sweep_bytes_per_iteration"], bw_b)
        row["matmult_ratio"] = bandwidth_ratio(
            row["seconds"]["matmult"], 1, bm["matrix_bytes"] + 2 * bm["rows"] * VALUE_BYTES, bw_b)
        row["bandwidth_ratio_extra_rtol"] = bandwidth_ratio(
            row["seconds"]["solve_extra_rtol"], row["iterations_extra_rtol"],
            bm["bytes_per_iteration"], bw_b)
    return {
        "scan": str(scan), "sizes": sorted(sizes, reverse=True), "ranks": list(ranks),
        "voxel_mm": voxel_mm, "machine": machine_info(),
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "busy_cpus_before": busy_before, "busy_cpus_after": busy_after,
        "harness_wall_s": time.perf_counter() - t_start,
        "triad": {"before": triad_before, "after": triad_after, "used_gb_s": bw},
        "rows": rows,
        "nonlinear": nonlinear_summary(nonlinear_root) if nonlinear_root else {},
        "goals": goal_checks(rows),
    }


def goal_checks(rows: list[dict]) -> dict:
    """The iteration goals and the bandwidth goal against the measured rows."""
    out = {"iterations_at_goal_rtol": [], "refinement_growth": [], "bandwidth": []}
    if not rows:
        return out
    worst = max(rows, key=lambda r: r["iterations_extra_rtol"])
    out["iterations_at_goal_rtol"] = {
        "max": worst["iterations_extra_rtol"],
        "where": f"{worst['load_case'].replace('_', ' ')} at "
        f"{worst['bone_cell_size_mm']:g} mm, {worst['ranks']} rank(s)",
        "met": all(r["iterations_extra_rtol"] <= GOAL_ITERATIONS for r in rows)}
    sizes = sorted({r["bone_cell_size_mm"] for r in rows}, reverse=True)
    growth = []
    for case in sorted({r["load_case"] for r in rows}):
        for nr in sorted({r["ranks"] for r in rows}):
            by = {r["bone_cell_size_mm"]: r for r in rows
                  if r["load_case"] == case and r["ranks"] == nr}
            for i, coarse in enumerate(sizes):
                for fine in sizes[i + 1:]:
                    if coarse in by and fine in by:
                        a = by[coarse]["iterations_extra_rtol"]
                        b = by[fine]["iterations_extra_rtol"]
                        growth.append({"load_case": case, "ranks": nr, "coarse_mm": coarse,
                                       "fine_mm": fine, "refinement": coarse / fine,
                                       "iterations": [a, b], "growth": b / a - 1.0,
                                       "met": b <= (1 + GOAL_REFINE_GROWTH) * a})
    out["refinement_growth"] = growth
    ratios = [r["bandwidth_ratio"] for r in rows]
    out["bandwidth"] = {"max_ratio": max(ratios), "min_ratio": min(ratios),
                        "met": all(x <= GOAL_BANDWIDTH_RATIO for x in ratios)}
    return out


# --- markdown -------------------------------------------------------------------------------

#: columns of the per-stage table
TABLE_COLUMNS = ("bone / screw / peri-screw cell (mm)", "load case", "ranks", "cells", "DOFs",
                 "mesh s", "materials s", "read + space s", "assembly s", "PC set-up s",
                 "solve s", "iterations (rtol 1e-10)", "iterations (rtol 1e-8)", "DOFs/s",
                 "peak RSS MB", "bandwidth-bound ratio")


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def markdown(res: dict, command: str) -> str:
    """The harness result as the markdown record (docs/performance.md)."""
    m = res["machine"]
    lb, la = res["load_average_before"], res["load_average_after"]
    ncpu = m.get("affinity_cpus") or m.get("logical_cpus") or 1
    busy = [b for b in (res.get("busy_cpus_before"), res.get("busy_cpus_after"))
            if b is not None]
    # Other jobs' load: busy CPUs sampled while the harness is idle when available (the load
    # average after the run includes the harness itself).
    contended = (max(busy) if busy else max(lb[0], la[0])) > 0.25 * ncpu
    lines = [
        "# Performance", "",
        f"Scan: `{res['scan']}`. Command (regenerates the tables; JSON in the out-dir):", "",
        "```bash", command, "```", "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"({ncpu} usable), {_f(m.get('memory_gb'), '{:.0f}')} GB memory; {m['platform']}. "
        f"Load average (1/5/15 min) before: {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f}, after: "
        f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (after includes this harness); "
        + (f"CPUs busy with other work in 2 s samples just before / after: "
           f"{_f(res.get('busy_cpus_before'))} / {_f(res.get('busy_cpus_after'))} of {ncpu}"
           if busy else "")
        + " — "
        + ("**contended**: other jobs shared the cores, so the times are upper bounds."
           if contended else "not contended."),
        f" Harness wall time {res['harness_wall_s']:.0f} s.", "",
        "## Memory bandwidth (STREAM-like triad, measured by the harness)", "",
        "`a = b + s c`, float64, best of 5, 24 bytes per element, every rank its own arrays; "
        "before and after the solves. The larger value is used for the bound.", "",
    ]
    tri = res["triad"]
    table = []
    for r in res["ranks"]:
        b, a, used = tri["before"][str(r)], tri["after"][str(r)], tri["used_gb_s"][str(r)]
        table.append([r, f"{b['n_per_rank']:.3g}", f"{b['bandwidth_gb_s']:.2f}",
                      f"{a['bandwidth_gb_s']:.2f}", f"{used:.2f}"])
    lines.append(pipe_table(["ranks", "elements per rank", "before (GB/s)", "after (GB/s)",
                             "used (GB/s)"], table, "rrrrr"))
    lines += [
        "", "## Per stage, per level and rank count (linear solves)", "",
        "Linear solves of the pipeline's system (CG + GAMG, `DEFAULT_PETSC_OPTIONS`, "
        "relative tolerance 1e-10). 'read + space' is the mesh read and partition plus the "
        "function space and form set-up (form compilation is cached after the first run); "
        "'PC set-up' is `KSPSetUp` (GAMG hierarchy, coarse factorisation) plus one "
        "preconditioner application (PETSc estimates the Chebyshev smoothers' eigenvalues "
        "lazily, at the first V-cycle); 'solve s' is the best of 3 identical solves from a "
        "zero start with the preconditioner kept (the first is in the JSON); "
        "DOFs/s = DOFs / solve s; peak RSS is summed over ranks; the bandwidth-bound ratio "
        "is solve s / (iterations x bytes per iteration / triad bandwidth), floor model "
        "(below). Iterations at 1e-8: the same KSP and preconditioner with `ksp_rtol` "
        "overridden.", "",
    ]
    table = []
    for r in res["rows"]:
        s = r["seconds"]
        table.append([
            f"{r['bone_cell_size_mm']:g} / {r['screw_cell_size_mm']:g} / "
            f"{r['peri_screw_cell_size_mm']:.2g}", r["load_case"].replace("_", " "),
            str(r["ranks"]), str(r["n_cells"]), str(r["n_dofs"]), f"{r['mesh_s']:.1f}",
            f"{r['materials_s']:.1f}",
            f"{s.get('mesh_read', 0) + s.get('function_space', 0):.2f}",
            f"{s['assembly']:.2f}", f"{s['preconditioner_setup']:.2f}", f"{s['solve']:.2f}",
            str(r["iterations"]), str(r["iterations_extra_rtol"]),
            f"{r['dofs_per_s']:.3g}", f"{r['peak_rss_mb_sum']:.0f}",
            _f(r.get("bandwidth_ratio"), "{:.1f}")])
    lines.append(pipe_table(TABLE_COLUMNS, table, "ll" + "r" * 14))
    lines += [
        "", "## Bytes per CG iteration and the bound", "",
        "Floor model (every operator streamed once per iteration):", "",
        "    B_it = M(A) + 8 n 8 + Σ_levels M(A_l),  M(A) = nnz (8 + 4) + (rows + 1) 4", "",
        "with n the unknowns, 8 vector streams of n doubles for CG (x, r, z, p, Ap), and A_l "
        "the operator of every GAMG level from PETSc (`pc.getMGLevels()`, each level's "
        "`getOperators()`; the finest is A again). Sweep model: each level l ≥ 1 counted "
        "(down + up smoothing steps + 1 residual) times plus its prolongator twice, the "
        "coarse operator once. Bound = iterations x B_it / bandwidth; ratio = solve s / "
        "bound (goal ≤ 3). 'MatMult ratio': one product y = A x (best of 10) against "
        "(M(A) + 2 n 8) / bandwidth, the kernel's own distance from the bound.", "",
    ]
    table = []
    for r in res["rows"]:
        bm = r["bytes_model"]
        lev = ", ".join(str(x["rows"]) for x in sorted(bm["levels"], key=lambda x: -x["level"]))
        table.append([
            f"{r['bone_cell_size_mm']:g}", r["load_case"].replace("_", " "), str(r["ranks"]),
            str(bm["rows"]), str(bm["nnz"]), f"{len(bm['levels'])} ({lev})",
            f"{bm['bytes_per_iteration'] / 1e6:.1f}",
            f"{bm['sweep_bytes_per_iteration'] / 1e6:.1f}", _f(r.get("bound_s"), "{:.3f}"),
            f"{r['seconds']['solve']:.2f}", _f(r.get("bandwidth_ratio"), "{:.1f}"),
            _f(r.get("bandwidth_ratio_sweep"), "{:.1f}"),
            _f(r.get("bandwidth_ratio_extra_rtol"), "{:.1f}"),
            _f(r["seconds"].get("matmult") and 1e3 * r["seconds"]["matmult"], "{:.2f}"),
            _f(r.get("matmult_ratio"), "{:.1f}")])
    lines.append(pipe_table(
        ["level (mm)", "load case", "ranks", "rows", "nnz(A)", "GAMG levels (rows)",
         "MB / iteration (floor)", "MB / iteration (sweep)", "bound s", "solve s",
         "ratio (floor)", "ratio (sweep)", "ratio at rtol 1e-8", "MatMult ms", "MatMult ratio"],
        table, "llrrrl" + "r" * 9))
    g = res.get("goals") or {}
    if g.get("iterations_at_goal_rtol"):
        it = g["iterations_at_goal_rtol"]
        lines += ["", "## The goals against these numbers", "",
                  f"- **≤ {GOAL_ITERATIONS} CG iterations at rtol 1e-8**: largest "
                  f"{it['max']} ({it['where']}) — **{'met' if it['met'] else 'NOT met'}**."]
        gr = g["refinement_growth"]
        if gr:
            worst = max(gr, key=lambda x: x["growth"])
            twofold = [x for x in gr if x["refinement"] >= 2.0 - 1e-9]
            lines.append(
                f"- **≤ {GOAL_REFINE_GROWTH:.0%} more iterations when the mesh is refined "
                "twofold**: " + "; ".join(
                    f"{x['load_case'].replace('_', ' ')} {x['ranks']} rank(s) "
                    f"{x['coarse_mm']:g} → {x['fine_mm']:g} mm ({x['refinement']:.2f}x): "
                    f"{x['iterations'][0]} → {x['iterations'][1]} ({x['growth']:+.0%})"
                    for x in (twofold or gr))
                + f" — **{'met' if all(x['met'] for x in (twofold or gr)) else 'NOT met'}** "
                f"(largest growth over any pair of levels {worst['growth']:+.0%}).")
        bwg = g["bandwidth"]
        lines.append(f"- **each linear solve within {GOAL_BANDWIDTH_RATIO:g}x of the "
                     f"bandwidth bound** (floor model): ratios {bwg['min_ratio']:.1f} to "
                     f"{bwg['max_ratio']:.1f} — **{'met' if bwg['met'] else 'NOT met'}**.")
    nl = res.get("nonlinear") or {}
    if nl:
        lines += ["", "## Nonlinear solves of the demo cohort (from the pipeline's JSONs)", "",
                  "Newton iterations per increment and CG iterations per Newton step of the "
                  "nonlinear (damage) analyses in `results/demo/*/*/{compression,pullout_*}"
                  ".json`: median (min–max) over the models. Cost: each run's wall time "
                  "in units of one linear solve of the same model measured in the same run "
                  "(`cost_in_linear_solves`).", ""]
        table = []
        for case, s in nl.items():
            def mm(d, fmt="{:.1f}"):
                lo, hi = fmt.format(d["min"]), fmt.format(d["max"])
                return f"{fmt.format(d['median'])} ({lo}–{hi})"
            table.append([
                case, str(s["models"]), ", ".join(str(x) for x in s["n_dofs"]),
                mm(s["increments"], "{:.0f}"), str(s["step_cuts_total"]),
                mm(s["newton_per_increment"]), mm(s["ksp_per_newton"]),
                str(s["newton_total"]), str(s["ksp_total"]), f"{s['solve_s_total']:.0f}",
                mm(s["cost_in_linear_solves"]) if s.get("cost_in_linear_solves") else "—"])
        lines += [pipe_table(
            ["load case", "models", "DOFs", "increments", "step cuts (total)",
             "Newton / increment", "CG / Newton step", "Newton (total)", "CG (total)",
             "solve s (total)", "cost (linear solves)"], table, "lrllrllrrrl"), ""]
        for case, s in nl.items():
            goal, cost = GOAL_NONLINEAR_COST.get(case), s.get("cost_in_linear_solves")
            if goal and cost:
                lines.append(f"- **{case} at most {goal:g} linear solves**: largest "
                             f"{cost['max']:.1f}, median {cost['median']:.1f} — "
                             f"**{'met' if cost['max'] <= goal else 'NOT met'}**.")
    return "\n".join(lines) + "\n"


def main_cli(a) -> None:
    res = run_benchmark(a.scan, a.out_dir, a.sizes, a.ranks, a.voxel_mm, a.triad_n,
                        a.nonlinear_results)
    out_dir = Path(a.out_dir)
    (out_dir / "perf.json").write_text(json.dumps(res, indent=1, default=str))
    cmd = (f"qctfea-bench perf --scan {a.scan} --out-dir {a.out_dir} --out-md {a.out_md} "
           f"--sizes {' '.join(f'{s:g}' for s in a.sizes)} "
           f"--ranks {' '.join(str(r) for r in a.ranks)}"
           + (f" --nonlinear-results {a.nonlinear_results}"
              if a.nonlinear_results != "results/demo" else ""))
    text = markdown(res, cmd)
    out = Path(a.out_md)
    if out.exists() and NOTES_MARK in out.read_text():  # keep the hand-written notes
        text += "\n" + NOTES_MARK + out.read_text().split(NOTES_MARK, 1)[1]
    write_text(out, text)
    print(text)


def parse_petsc_options(items) -> dict:
    """``["key=value", ...]`` (no leading dash) to a dict; values stay strings for PETSc."""
    out = {}
    for item in items or []:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip():
            raise QctfeaError(f"PETSc option {item!r}: write KEY=VALUE, e.g. mg_levels_ksp_max_it=1")
        out[key.strip().lstrip("-")] = val.strip()
    return out


def _main(argv=None) -> int:
    """``python -m qctfea_bench.perf worker|triad`` (run under mpiexec by the harness)."""
    p = argparse.ArgumentParser(prog="python -m qctfea_bench.perf")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--case", required=True, choices=["compression", "pullout"])
    w.add_argument("--side", choices=["left", "right"])
    w.add_argument("--mesh", required=True)
    w.add_argument("--materials", required=True)
    w.add_argument("--vertebra", required=True)
    w.add_argument("--screws", required=True)
    w.add_argument("--out-json", required=True)
    w.add_argument("--extra-rtol", type=float, default=GOAL_RTOL)
    w.add_argument("--repeats", type=int, default=3, help="timed solves (best reported)")
    w.add_argument("--petsc-option", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of DEFAULT_PETSC_OPTIONS (repeatable)")
    w.add_argument("--mat-type", default="aij", choices=["aij", "baij"])
    t = sub.add_parser("triad")
    t.add_argument("--n", type=int, default=20_000_000)
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--out-json")
    a = p.parse_args(argv)
    handler = logs.log_to(sys.stderr, ("qctfea", "qctfea_bench"))
    try:
        if a.cmd == "worker":
            worker(a.mesh, a.materials, a.vertebra, a.screws, a.case, a.side, a.out_json,
                   a.extra_rtol, repeats=a.repeats,
                   petsc_options=parse_petsc_options(a.petsc_option), mat_type=a.mat_type)
        else:
            triad_mpi(a.n, a.repeats, a.out_json)
    except QctfeaError as exc:
        print(f"qctfea_bench.perf {a.cmd}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        logs.remove(handler)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
