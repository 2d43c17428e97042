"""The perf harness's result as the markdown record (docs/performance.md).
"""

from __future__ import annotations


from qctfea.mdtable import pipe_table
from qctfea_bench.perf import (
    GOAL_BANDWIDTH_RATIO, GOAL_ITERATIONS, GOAL_NONLINEAR_COST, GOAL_REFINE_GROWTH,
)


#: columns of the per-stage table
TABLE_COLUMNS = ("bone / screw / peri-screw cell (mm)", "load case", "ranks", "cells", "DOFs",
                 "mesh s", "materials s", "read + space s", "assembly s", "PC set-up s",
                 "solve s", "iterations (rtol 1e-10)", "iterations (rtol 1e-8)", "DOFs/s",
                 "peak RSS MB", "bandwidth-bound ratio")


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def markdown(res: dict, command: str) -> str:
    """The harness result as the markdown record (docs/performance.md)."""
    lines = _header(res, command)
    for section in (_triad_table, _stage_section, _bytes_section, _goals_section,
                    _nonlinear_section):
        lines += section(res)
    return "\n".join(lines) + "\n"


def _header(res: dict, command: str) -> list[str]:
    """Title, command, machine and load; the triad section's heading."""
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
    return lines


def _triad_table(res: dict) -> list[str]:
    """Memory bandwidth per rank count, before and after the solves."""
    lines: list[str] = []
    tri = res["triad"]
    table = []
    for r in res["ranks"]:
        b, a, used = tri["before"][str(r)], tri["after"][str(r)], tri["used_gb_s"][str(r)]
        table.append([r, f"{b['n_per_rank']:.3g}", f"{b['bandwidth_gb_s']:.2f}",
                      f"{a['bandwidth_gb_s']:.2f}", f"{used:.2f}"])
    lines.append(pipe_table(["ranks", "elements per rank", "before (GB/s)", "after (GB/s)",
                             "used (GB/s)"], table, "rrrrr"))
    return lines


def _stage_section(res: dict) -> list[str]:
    """Seconds per stage, per level and rank count."""
    lines: list[str] = []
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
    return lines


def _bytes_section(res: dict) -> list[str]:
    """Bytes per CG iteration, the bound and the ratios."""
    lines: list[str] = []
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
    return lines


def _goals_section(res: dict) -> list[str]:
    """The goals against the numbers."""
    lines: list[str] = []
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
    return lines


def _nonlinear_section(res: dict) -> list[str]:
    """The demo cohort's nonlinear solves."""
    lines: list[str] = []
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
    return lines
