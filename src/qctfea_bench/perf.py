"""Performance harness: where the time goes, and how close the solver is to the
machine's memory bandwidth.

A documented command, not a timed test::

    qctfea-bench perf --scan results/demo/P01/M00 --out-dir results/perf \\
        --out-md docs/performance.md --sizes 4.5 3 2 --ranks 1 2

For one processed scan (``results/<cohort>/<patient>/<timepoint>/``) and each bone cell size
(screw cells half as large, peri-screw bone a third, as in :mod:`qctfea_bench.convergence`):

1. **Meshing** and **material mapping** are run in this process (``steps_model.mesh``,
   ``steps_model.materials``) and timed.
2. For each MPI rank count, a *linear* compression and a *linear* left-pullout solve are
   run under ``mpiexec`` by a small worker (``python -m qctfea_bench.perf_worker worker``) that
   builds exactly the system the pipeline solves (:class:`qctfea.fea.elasticity.ElasticModel`,
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
   Solver variants: ``python -m qctfea_bench.perf_worker worker ... --petsc-option KEY=VALUE``
   (repeatable)
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

import glob
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from qctfea.errors import QctfeaError
from qctfea.provenance import write_text
from qctfea_bench.convergence import mpiexec

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


def _run_mpi(ranks: int, args: list[str], what: str) -> None:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "qctfea_bench.perf_worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise QctfeaError(f"perf {what} failed:\n{res.stdout[-1000:]}\n{res.stderr[-2000:]}")


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
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
        first = Path("/proc/stat").read_text(encoding="utf-8").splitlines()[0]
        v = [int(x) for x in first.split()[1:]]
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
            d = json.loads(Path(f).read_text(encoding="utf-8"))
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


# Long on purpose: the harness's run in order (triad, levels, solves, triad again).
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
            res[str(r)] = json.loads(f.read_text(encoding="utf-8"))
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
                w = json.loads(f.read_text(encoding="utf-8"))
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


def main_cli(a) -> None:
    from qctfea_bench.perf_report import markdown  # it imports this module's goals

    res = run_benchmark(a.scan, a.out_dir, a.sizes, a.ranks, a.voxel_mm, a.triad_n,
                        a.nonlinear_results)
    out_dir = Path(a.out_dir)
    (out_dir / "perf.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    cmd = (f"qctfea-bench perf --scan {a.scan} --out-dir {a.out_dir} --out-md {a.out_md} "
           f"--sizes {' '.join(f'{s:g}' for s in a.sizes)} "
           f"--ranks {' '.join(str(r) for r in a.ranks)}"
           + (f" --nonlinear-results {a.nonlinear_results}"
              if a.nonlinear_results != "results/demo" else ""))
    text = markdown(res, cmd)
    out = Path(a.out_md)
    # keep the hand-written notes
    if out.exists() and NOTES_MARK in out.read_text(encoding="utf-8"):
        text += "\n" + NOTES_MARK + out.read_text(encoding="utf-8").split(NOTES_MARK, 1)[1]
    write_text(out, text)
    print(text)
