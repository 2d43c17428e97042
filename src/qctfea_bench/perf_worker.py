"""The measuring side of :mod:`qctfea_bench.perf`, run under ``mpiexec`` by the harness as
``python -m qctfea_bench.perf_worker worker|triad``: the pipeline's linear system built and
solved with every stage timed, and the STREAM-like triad.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from qctfea import logs
from qctfea.errors import QctfeaError
from qctfea_bench.perf import GOAL_RTOL, VALUE_BYTES, bytes_per_iteration


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
            Path(out_json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return comm.bcast(res, root=0)


# Long on purpose: one timed sequence; every stage is timed where it runs.
def worker(mesh_path, materials_path, vertebra_json, screws_path, case: str,
           side: str | None, out_json: str, extra_rtol: float = GOAL_RTOL,
           loads_cfg: dict | None = None, repeats: int = 3,
           petsc_options: dict | None = None, mat_type: str = "aij") -> dict:
    """Build the pipeline's linear system for ``case`` and time every stage (all ranks).

    ``petsc_options`` override :data:`DEFAULT_PETSC_OPTIONS` (solver variants);
    ``mat_type`` "baij" converts the assembled matrix to PETSc's 3x3-blocked format."""
    import dolfinx_solver  # noqa: F401  (orders MPI ahead of the compiled bindings)
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
    d = lp.displacement_mm
    bcs, react = _boundary_conditions(model, tags, read_json(vertebra_json), lp, case, side,
                                      screws_path)
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
    times = [sec["solve_first"]] + _timings(comm, max(0, int(repeats) - 1),
                                            lambda: ksp.solve(b, x), before=lambda: x.set(0.0))
    sec["solve"] = min(times)
    sec["solve_all"] = times
    # One sparse matrix-vector product with A (best of 10): the kernel the bound is made of.
    y = b.duplicate()
    sec["matmult"] = min(_timings(comm, 10, lambda: A.mult(x, y)))
    y.destroy()

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
        Path(out_json).write_text(json.dumps(res, indent=1), encoding="utf-8")
    comm.Barrier()
    return res



def _boundary_conditions(model, tags, axis_info: dict, lp, case: str, side: str | None,
                         screws_path):
    """The pipeline's Dirichlet conditions of ``case`` and the (dofs, direction) of its
    reaction force."""
    import dolfinx

    from qctfea import steps
    from qctfea.fea import loadcases

    d = lp.displacement_mm
    if case == "compression":
        sup, inf, axis, _, _, _ = loadcases.compression_dofs(model, tags, axis_info, lp)
        bcs = [dolfinx.fem.dirichletbc(np.zeros(3), inf, model.V),
               dolfinx.fem.dirichletbc(-d * axis, sup, model.V)]
        return bcs, (sup, -axis)
    if case == "pullout":
        screws = {s.side: s for s in steps.load_screws(screws_path)}
        if side not in screws:
            raise QctfeaError(f"no {side!r} screw in {screws_path}")
        ends, head, pull, _ = loadcases.pullout_dofs(model, tags, axis_info, screws[side], lp)
        bcs = [dolfinx.fem.dirichletbc(np.zeros(3), ends, model.V),
               dolfinx.fem.dirichletbc(d * pull, head, model.V)]
        return bcs, (head, pull)
    raise QctfeaError(f"unknown load case {case!r}")


def _timings(comm, n: int, fn, before=None) -> list[float]:
    """Wall seconds of ``n`` calls of ``fn``, each between barriers (all ranks); ``before``
    runs ahead of each, untimed."""
    out = []
    for _ in range(n):
        if before is not None:
            before()
        comm.Barrier()
        t = time.perf_counter()
        fn()
        comm.Barrier()
        out.append(time.perf_counter() - t)
    return out


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
    """``python -m qctfea_bench.perf_worker worker|triad`` (run under mpiexec by the harness)."""
    p = argparse.ArgumentParser(prog="python -m qctfea_bench.perf_worker")
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
        print(f"qctfea_bench.perf_worker {a.cmd}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        logs.remove(handler)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
