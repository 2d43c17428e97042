"""The performance harness's pieces: fast, no timing assertions.

The harness itself is a documented command (``qctfea-bench perf``, docs/performance.md), not a test.
"""
from __future__ import annotations

import dolfinx_solver  # noqa: F401  (before dolfinx or petsc4py)
import numpy as np
import pytest
from conftest import markdown_rows

from qctfea_bench import perf
from qctfea_bench import perf_report
from qctfea_bench import perf_worker


def _tridiagonal(n: int):
    from petsc4py import PETSc

    A = PETSc.Mat().createAIJ([n, n], nnz=3, comm=PETSc.COMM_SELF)
    for i in range(n):
        for j in (i - 1, i, i + 1):
            if 0 <= j < n:
                A.setValue(i, j, 2.0 if i == j else -1.0)
    A.assemble()
    return A


def test_matrix_bytes_hand_count():
    # 4 x 4 tridiagonal: 4 + 3 + 3 = 10 nonzeros; values 8 B, column indices 4 B,
    # 5 row pointers of 4 B: 10 * 12 + 5 * 4 = 140 bytes.
    assert perf.matrix_bytes(10, 4, index_bytes=4) == 140
    assert perf.matrix_bytes(10, 4, index_bytes=8) == 10 * 16 + 5 * 8


def test_bytes_per_iteration_tiny_petsc_matrix_without_multigrid():
    from petsc4py import PETSc

    A = _tridiagonal(4)
    pc = PETSc.PC().create(PETSc.COMM_SELF)
    pc.setType("jacobi")
    pc.setOperators(A)
    pc.setUp()
    bm = perf.bytes_per_iteration(A, pc)
    ib = bm["index_bytes"]
    assert (bm["rows"], bm["nnz"]) == (4, 10)
    assert bm["matrix_bytes"] == 10 * (8 + ib) + 5 * ib
    assert bm["vector_bytes"] == perf.CG_VECTOR_PASSES * 4 * 8  # 8 vectors of 4 doubles
    assert bm["mg_operator_bytes"] == 0 and bm["levels"] == []
    assert bm["bytes_per_iteration"] == 10 * (8 + ib) + 5 * ib + 8 * 4 * 8
    assert perf.bytes_per_iteration(A, None)["bytes_per_iteration"] == bm["bytes_per_iteration"]
    A.destroy()
    pc.destroy()


def test_bytes_per_iteration_counts_every_gamg_level():
    """On a 1-D Laplacian with a tiny coarse limit GAMG builds several levels; each level's
    operator is counted once (floor), the finest being A itself."""
    from petsc4py import PETSc

    n = 2000
    A = _tridiagonal(n)
    ksp = PETSc.KSP().create(PETSc.COMM_SELF)
    ksp.setOperators(A)
    ksp.setType("cg")
    pc = ksp.getPC()
    pc.setType("gamg")
    opts = PETSc.Options()
    opts["pc_gamg_coarse_eq_limit"] = 10
    ksp.setFromOptions()
    ksp.setUp()
    del opts["pc_gamg_coarse_eq_limit"]
    bm = perf.bytes_per_iteration(A, pc)
    ib = bm["index_bytes"]
    assert len(bm["levels"]) == pc.getMGLevels() >= 2
    finest = max(bm["levels"], key=lambda r: r["level"])
    assert (finest["rows"], finest["nnz"]) == (n, 3 * n - 2)
    assert bm["mg_operator_bytes"] == sum(perf.matrix_bytes(r["nnz"], r["rows"], ib)
                                          for r in bm["levels"])
    assert bm["bytes_per_iteration"] == (bm["matrix_bytes"] + bm["vector_bytes"]
                                         + bm["mg_operator_bytes"])
    assert bm["sweep_bytes_per_iteration"] > bm["bytes_per_iteration"]
    # The preconditioner still works after the level walk (no smoother was re-created).
    b, x = A.createVecs()
    b.set(1.0)
    ksp.solve(b, x)
    assert ksp.getConvergedReason() > 0
    ksp.destroy()
    A.destroy()


def test_bandwidth_ratio():
    # 10 iterations x 1e9 bytes at 10 GB/s = 1 s bound; 2.5 s solve -> 2.5
    assert perf.bandwidth_ratio(2.5, 10, 1e9, 10e9) == pytest.approx(2.5)
    assert perf.bandwidth_ratio(1.0, 0, 1e9, 10e9) == float("inf")


def test_triad_bandwidth_positive_and_bytes_24n():
    r = perf_worker.triad(n=100_000, repeats=2, block=4096)
    assert r["bytes"] == 24 * 100_000
    assert r["bandwidth_gb_s"] > 0
    assert r["bandwidth_gb_s"] == pytest.approx(r["bytes"] / r["best_s"] / 1e9)
    assert len(r["times_s"]) == 2 and r["best_s"] == min(r["times_s"])


def test_triad_bandwidth_against_an_independent_numpy_timing():
    """The harness' triad bandwidth against the same 24 n bytes moved by numpy's own
    whole-array a = b + 3 c, timed here (best of 5, 4 M doubles, beyond the caches): the
    two agree within a factor of 3 (the blocked form keeps s c in cache, the plain one
    writes it to memory: 40 instead of 24 bytes per element, so numpy reads lower). The two
    timings alternate (numpy's right before each of the harness' repetitions, through its
    barrier hook), so that a load on the other core (the suite runs two pytest processes)
    meets both alike: timed one after the other, they once read 3.4 and 12.0 GB/s."""
    import time

    n = 4_000_000
    b, c, a = np.full(n, 1.0), np.full(n, 2.0), np.empty(n)
    best = [float("inf")]

    def numpy_timing() -> None:
        t0 = time.perf_counter()
        np.add(b, 3.0 * c, out=a)
        best[0] = min(best[0], time.perf_counter() - t0)

    r = perf_worker.triad(n=n, repeats=7, barrier=numpy_timing)
    numpy_gb_s = 24 * n / best[0] / 1e9
    print(f"triad {r['bandwidth_gb_s']:.2f} GB/s, numpy {numpy_gb_s:.2f} GB/s")
    assert 1 / 3 < r["bandwidth_gb_s"] / numpy_gb_s < 3


def _fake_result():
    bm = {"rows": 27060, "nnz": 1000000, "index_bytes": 4, "vector_passes": 8,
          "matrix_bytes": 12108244, "vector_bytes": 1731840, "mg_operator_bytes": 20000000,
          "levels": [{"level": 0, "rows": 500, "nnz": 100000, "bytes": 1202004},
                     {"level": 1, "rows": 27060, "nnz": 1000000, "bytes": 12108244,
                      "smooth_down": 2, "smooth_up": 2, "interp_nnz": 1, "interp_bytes": 1}],
          "bytes_per_iteration": 33840084, "sweep_bytes_per_iteration": 90000000}
    row = {"bone_cell_size_mm": 4.5, "screw_cell_size_mm": 2.25, "peri_screw_cell_size_mm": 1.5,
           "n_cells": 36251, "mesh_s": 4.4, "materials_s": 3.1, "load_case": "pullout_left",
           "case": "pullout", "side": "left", "ranks": 2, "n_dofs": 27060,
           "seconds": {"mesh_read": 0.1, "function_space": 0.02, "assembly": 0.05,
                       "preconditioner_setup": 0.2, "solve": 0.3, "solve_extra_rtol": 0.25},
           "iterations": 40, "iterations_extra_rtol": 31, "dofs_per_s": 90200.0,
           "peak_rss_mb_sum": 540.0, "bytes_model": bm, "bandwidth_ratio": 2.2,
           "bandwidth_ratio_sweep": 0.9, "bandwidth_ratio_extra_rtol": 2.1, "bound_s": 0.136}
    tri = {"n_per_rank": 2e7, "bandwidth_gb_s": 10.0}
    return {"scan": "results/demo/P01/M00", "sizes": [4.5], "ranks": [2], "voxel_mm": 0.5,
            "machine": {"cpu_model": "Fake CPU", "logical_cpus": 2, "affinity_cpus": 2,
                        "memory_gb": 16, "platform": "Linux"},
            "load_average_before": [0.1, 0.1, 0.1], "load_average_after": [1.9, 1.0, 0.5],
            "harness_wall_s": 60.0,
            "triad": {"before": {"2": tri}, "after": {"2": tri}, "used_gb_s": {"2": 10.0}},
            "rows": [row], "nonlinear": {}, "goals": perf.goal_checks([row])}


def test_markdown_has_the_table_headers():
    text = perf_report.markdown(_fake_result(), "qctfea-bench perf --scan x")
    rows = markdown_rows(text)
    for h in ("cells", "DOFs", "mesh s", "materials s", "assembly s", "PC set-up s",
              "solve s", "iterations (rtol 1e-10)", "iterations (rtol 1e-8)", "DOFs/s",
              "peak RSS MB", "bandwidth-bound ratio"):
        assert h in perf_report.TABLE_COLUMNS, h
    assert perf_report.TABLE_COLUMNS in rows
    assert ("4.5 / 2.25 / 1.5", "pullout left", "2", "36251", "27060") in [r[:5] for r in rows]
    assert "qctfea-bench perf --scan x" in text and "Fake CPU" in text
    assert "**contended**" in text  # load 1.9 on 2 CPUs
    assert "≤ 50 CG iterations at rtol 1e-8" in text and "**met**" in text


def test_goal_checks_flags_iteration_growth():
    base = _fake_result()["rows"][0]
    fine = {**base, "bone_cell_size_mm": 2.0, "iterations_extra_rtol": 45}
    g = perf.goal_checks([base, fine])
    assert g["iterations_at_goal_rtol"]["met"]  # 45 <= 50
    (pair,) = g["refinement_growth"]
    assert pair["refinement"] == pytest.approx(2.25)
    assert not pair["met"]  # 31 -> 45 is +45 %


def test_bench_cli_has_perf_subcommand_and_the_library_cli_not():
    from qctfea.cli import build_parser as library_parser
    from qctfea_bench.cli import build_parser

    a = build_parser().parse_args(["perf", "--scan", "s", "--out-dir", "o", "--out-md", "m.md",
                                   "--sizes", "4.5", "3", "--ranks", "1", "2"])
    assert a.sizes == [4.5, 3.0] and a.ranks == [1, 2] and a.triad_n == 20_000_000
    with pytest.raises(SystemExit):  # the harness is outside the library
        library_parser().parse_args(["perf", "--scan", "s", "--out-dir", "o", "--out-md", "m"])


def test_nonlinear_summary(tmp_path):
    import json

    d = tmp_path / "P01" / "M00"
    d.mkdir(parents=True)
    (d / "compression.json").write_text(json.dumps(
        {"analysis": "nonlinear", "increments": 4, "newton_iterations": 12,
         "ksp_iterations": 480, "step_cuts": 1, "n_dofs": 100, "seconds": {"solve": 2.0},
         "cost_in_linear_solves": 17.5}))
    (d / "pullout_left.json").write_text(json.dumps(
        {"analysis": "nonlinear", "increments": 5, "newton_iterations": 10,
         "ksp_iterations": 300, "step_cuts": 0, "n_dofs": 100, "seconds": {"solve": 1.0}}))
    s = perf.nonlinear_summary(tmp_path)
    assert s["compression"]["newton_per_increment"]["median"] == 3.0
    assert s["compression"]["ksp_per_newton"]["median"] == 40.0
    assert s["pullout"]["newton_per_increment"]["median"] == 2.0
    assert s["pullout"]["models"] == 1 and np.isclose(s["pullout"]["solve_s_total"], 1.0)
    # the cost ratio and its goal line (compression 17.5 > 15: not met); pullout has none
    assert s["compression"]["cost_in_linear_solves"]["max"] == 17.5
    assert s["pullout"]["cost_in_linear_solves"] is None
    md = perf_report.markdown({**_fake_result(), "nonlinear": s}, "cmd")
    assert "- **compression at most 15 linear solves**: largest 17.5, median 17.5 — **NOT met**" \
        in md
    assert "pullout at most" not in md


def test_operator_bytes_of_a_blocked_matrix():
    """BAIJ, block size 3: one column index per 3x3 block, one row pointer per block row."""
    from petsc4py import PETSc

    # 2 x 2 blocks of 3 x 3, block-diagonal plus one off-diagonal block: 3 blocks, 27 values.
    A = PETSc.Mat().createBAIJ(size=(6, 6), bsize=3, nnz=2, comm=PETSc.COMM_SELF)
    blk = np.arange(1.0, 10.0).reshape(3, 3)
    A.setValuesBlocked([0], [0], blk)
    A.setValuesBlocked([0], [1], blk)
    A.setValuesBlocked([1], [1], blk)
    A.assemble()
    ib = perf._index_bytes()
    nnz, rows, nbytes = perf.operator_bytes(A, ib)
    assert (nnz, rows) == (27, 6)
    assert nbytes == 27 * 8 + 3 * ib + (2 + 1) * ib
    # The same matrix as AIJ: one index per value, one pointer per row.
    B = A.convert("aij", PETSc.Mat())
    assert perf.operator_bytes(B, ib)[2] == 27 * (8 + ib) + 7 * ib
    A.destroy()
    B.destroy()


def test_petsc_option_overrides_parse():
    assert perf_worker.parse_petsc_options(["mg_levels_ksp_max_it=2", "-pc_type = jacobi"]) == {
        "mg_levels_ksp_max_it": "2", "pc_type": "jacobi"}
    with pytest.raises(Exception, match="KEY=VALUE"):
        perf_worker.parse_petsc_options(["mg_levels_ksp_max_it"])


def test_the_library_never_imports_the_harness():
    """src/qctfea (the science) imports nothing of src/qctfea_bench (the harness)."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "qctfea"
    hits = [f"{p.relative_to(src)}:{i + 1}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines())
            if re.search(r"\bqctfea_bench\b", line)]
    assert not hits, hits


def test_mesh_convergence_changes_and_verdict():
    """`qctfea-bench mesh-convergence`'s record: the change to the next finer level and the
    5 % verdict on the two finest levels, from hand-made levels, coarse to fine (stiffness
    104, 103, 100 N/mm: +1.0 % and +3.0 % to the next finer, within; strength 200, 190,
    180 N: +5.3 % and +5.6 %, not within)."""
    from qctfea_bench import convergence as conv

    keys = [k for k, _ in conv.QUANTITIES]
    def level(size, stiff, strength):
        return {"bone_cell_size_mm": size, "screw_cell_size_mm": size / 2,
                "peri_screw_cell_size_mm": size / 3, "n_cells": 1000, "n_dofs": 3000,
                "mesh_s": 1.0, **{k: stiff for k in keys},
                **{k: strength for k, _ in conv.STRENGTHS},
                **{f"{c}_solve_s": 1.0 for c in ("compression", "pullout_left",
                                                 "pullout_right")},
                **{f"{c}_ksp_iterations": 10 for c in ("compression", "pullout_left",
                                                      "pullout_right")},
                **{f"{c}_nonlinear_s": 5.0 for c in ("compression", "pullout_left",
                                                    "pullout_right")}}

    rows = [level(3.0, 104.0, 200.0), level(2.0, 103.0, 190.0), level(1.5, 100.0, 180.0)]
    conv.add_changes_to_finer(rows, keys + [k for k, _ in conv.STRENGTHS])
    assert rows[0][f"{keys[0]}_change_to_finer_pct"] == pytest.approx(100 * (104 / 103 - 1))
    assert rows[1][f"{keys[0]}_change_to_finer_pct"] == pytest.approx(3.0)
    assert rows[1]["compression_strength_n_change_to_finer_pct"] == pytest.approx(
        100 * (190 / 180 - 1))
    assert f"{keys[0]}_change_to_finer_pct" not in rows[2]
    md = conv.markdown(rows, "qctfea-bench mesh-convergence ...", "scan")
    assert "Largest stiffness change between the two finest levels: 3.0 % (within" in md
    assert "Largest strength change between the two finest levels: 5.6 % (NOT within" in md
    import re

    assert re.search(r"\|\s*104\s*\|\s*\+1\.0 %\s*\|", md), md
    assert re.search(r"\|\s*100\s*\|\s*—\s*\|", md), md
