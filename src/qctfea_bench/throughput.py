"""Cohort throughput: wall time of whole workflow runs and how the per-model cost
grows with mesh size, from what a run leaves behind (no extra timing)::

    qctfea-bench throughput --cohort demo --cohort demo-study --cohort verse-l3 \\
        --out-png docs/img/throughput.png --out-md docs/performance.md

For each cohort name, Snakemake's benchmark files ``benchmarks/<cohort>/**.tsv`` (wall
seconds of every job, :mod:`qctfea_bench.benchmarks`) and the solve JSONs
``results/<cohort>/<patient>/<timepoint>/{compression,pullout_*}.json`` (DOFs) give:

* the run's **span**: from the first job's start (its file's modification time minus its
  wall seconds) to the last job's end — the wall time of the run as it happened, including
  any contention on the machine and any pause between a run and its resumption;
* the **core-seconds** (sum over jobs of wall seconds x cores held: the MPI ranks of a
  solve, one otherwise) and the share of job-seconds spent in solves;
* per solve job: DOFs and wall seconds (start-up, assembly, the nonlinear solve, output),
  which the picture plots against each other, one marker per cohort.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from qctfea.errors import QctfeaError
from qctfea.mdtable import pipe_table
from qctfea.provenance import atomic_path

BEGIN_MARK = "<!-- throughput:begin -->"
END_MARK = "<!-- throughput:end -->"
#: the solve rule's benchmark names, one per load case (solve_<case>.tsv, sides stripped)
SOLVE_RULES = ("solve_compression", "solve_pullout")


def cohort_summary(name: str, bench_root: Path, results_root: Path) -> dict:
    from qctfea_bench.benchmarks import read_benchmarks

    df = read_benchmarks(bench_root)
    start = float((df["finished"] - df["wall_s"]).min())
    end = float(df["finished"].max())
    solves = []
    for f in sorted(bench_root.rglob("solve_*.tsv")):
        rel = f.relative_to(bench_root)
        stem = f.stem  # solve_compression | solve_pullout_left | ...
        case = "compression" if stem == "solve_compression" else "pullout"
        res = results_root / rel.parent / (stem.replace("solve_", "") + ".json")
        if not res.exists():
            continue
        d = json.loads(res.read_text(encoding="utf-8"))
        wall = float(pd.read_csv(f, sep="\t")["s"].iloc[-1])
        solves.append({"scan": "/".join(rel.parts[:-1]), "case": case,
                       "n_dofs": int(d.get("n_dofs") or 0), "wall_s": wall,
                       "ranks": int(d.get("mpi_ranks") or 1),
                       "analysis": d.get("analysis", "")})
    if not solves:
        raise QctfeaError(f"no solve benchmark with a result JSON under {bench_root} and "
                          f"{results_root}; run the workflow for cohort {name!r} first")
    job_s = float(df["wall_s"].sum())
    solve_s = float(df[df["rule"].isin(SOLVE_RULES)]["wall_s"].sum())
    # Core-seconds: a solve job holds its MPI ranks' cores, every other job one core.
    core_s = job_s - solve_s + sum(s["wall_s"] * s["ranks"] for s in solves)
    return {"cohort": name, "scans": int(df["scan"].nunique()), "jobs": int(len(df)),
            "span_s": end - start, "job_s": job_s, "core_s": core_s,
            "solve_share": solve_s / job_s,
            "dofs_median": float(np.median([s["n_dofs"] for s in solves])),
            "solves": solves}


def perf_levels(perf_json: Path) -> list[dict]:
    """Per mesh level of a ``qctfea-bench perf`` run (1 rank, compression): DOFs and the seconds of
    meshing, material mapping and one linear solve with its set-up."""
    res = json.loads(Path(perf_json).read_text(encoding="utf-8"))
    out = []
    for r in res.get("rows", []):
        if r.get("ranks") != 1 or r.get("load_case") != "compression":
            continue
        s = r["seconds"]
        out.append({"n_dofs": r["n_dofs"], "mesh_s": r["mesh_s"], "materials_s": r["materials_s"],
                    "solve_s": s["assembly"] + s["preconditioner_setup"] + s["solve"],
                    "bone_cell_size_mm": r["bone_cell_size_mm"]})
    return sorted(out, key=lambda r: r["n_dofs"])


def picture(cohorts: list[dict], out_png: Path, levels: list[dict] | None = None) -> None:
    import matplotlib
    from matplotlib.figure import Figure

    n = 3 if levels else 2
    fig = Figure(figsize=(5.5 * n, 4.2))
    axes = fig.subplots(1, n)
    a, b = axes[0], axes[1]
    if levels:
        c = axes[2]
        x = [r["n_dofs"] for r in levels]
        for key, lab in (("mesh_s", "meshing (CGAL)"), ("materials_s", "material mapping"),
                         ("solve_s", "linear solve incl. assembly + set-up")):
            c.plot(x, [r[key] for r in levels], "o-", label=lab)
        for r in levels:
            c.annotate(f"{r['bone_cell_size_mm']:g} mm", (r["n_dofs"], r["mesh_s"]),
                       fontsize=7, xytext=(3, 3), textcoords="offset points")
        c.set_xscale("log")
        c.set_yscale("log")
        c.set_xlabel("DOFs")
        c.set_ylabel("seconds (1 rank)")
        c.set_title("One model's stages against mesh size (perf harness)")
        c.grid(True, which="both", alpha=0.3)
        c.legend(fontsize=7)
    markers = {"compression": "s", "pullout": "o"}
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(cohorts):
        for case, m in markers.items():
            pts = [(s["n_dofs"], s["wall_s"]) for s in c["solves"] if s["case"] == case]
            if pts:
                x, y = np.array(pts).T
                a.scatter(x, y, marker=m, s=18, alpha=0.6, color=colors[i % len(colors)],
                          label=f"{c['cohort']} {case} (n={len(pts)})")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("DOFs of the model")
    a.set_ylabel("solve job wall time (s)")
    a.set_title("Nonlinear solve jobs: time against mesh size")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    names = [f"{c['cohort']}\n{c['scans']} scans, {c['dofs_median'] / 1e3:.0f}k DOFs"
             for c in cohorts]
    x = np.arange(len(cohorts))
    b.bar(x - 0.2, [c["span_s"] / 60 for c in cohorts], 0.4, label="run span (wall)")
    b.bar(x + 0.2, [c["core_s"] / 60 / 2 for c in cohorts], 0.4,
          label="core-seconds / 2 cores")
    for xi, c in zip(x, cohorts):
        b.text(xi - 0.2, c["span_s"] / 60, f"{c['span_s'] / 60:.0f}", ha="center",
               va="bottom", fontsize=8)
    b.set_xticks(x, names, fontsize=8)
    b.set_ylabel("minutes")
    b.set_title("Whole cohort runs (2 cores)")
    b.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110)


def markdown(cohorts: list[dict], png: str, command: str) -> str:
    lines = [BEGIN_MARK, "## Cohort throughput", "",
             "Command (regenerates this section and the picture from the benchmark files "
             "and solve JSONs of earlier workflow runs):", "", "```bash", command, "```", "",
             f"![throughput]({png})", ""]
    rows = []
    for c in cohorts:
        med = float(np.median([s["wall_s"] for s in c["solves"]]))
        rows.append([c["cohort"], c["scans"], c["jobs"], f"{c['dofs_median']:.0f}",
                     f"{c['span_s'] / 60:.1f}", f"{c['core_s'] / 120:.1f}",
                     f"{100 * c['solve_share']:.0f} %", f"{med:.1f}"])
    lines.append(pipe_table(["cohort", "scans", "jobs", "median DOFs", "run span (min)",
                             "core-seconds / 2 (min)", "solve share",
                             "solve s / job at median DOFs"], rows, "l" + "r" * 7))
    lines += ["", "Run span: first job start to last job end, from the benchmark files' times "
              "(includes contention and pauses); core-seconds / 2: the sum over jobs of wall "
              "seconds x cores held (MPI ranks for a solve, 1 otherwise) over 2 cores, the "
              "span of an uncontended 2-core machine kept busy; contention inflates both.", END_MARK]
    return "\n".join(lines) + "\n"


def write_section(md_path: Path, section: str) -> None:
    from qctfea_bench.peer import write_section as write

    write(md_path, section, BEGIN_MARK, END_MARK)


def main_cli(a) -> None:
    cohorts = [cohort_summary(c, Path(a.benchmarks) / c, Path(a.results) / c) for c in a.cohort]
    out_png = Path(a.out_png)
    levels = perf_levels(Path(a.perf_json)) if a.perf_json else None
    picture(cohorts, out_png, levels)
    png_rel = os.path.relpath(out_png, Path(a.out_md).parent)
    cmd = ("qctfea-bench throughput " + " ".join(f"--cohort {c}" for c in a.cohort)
           + f" --out-png {a.out_png} --out-md {a.out_md}"
           + (f" --perf-json {a.perf_json}" if a.perf_json else ""))
    section = markdown(cohorts, png_rel, cmd)
    Path(a.out_md).parent.mkdir(parents=True, exist_ok=True)
    write_section(Path(a.out_md), section)
    if a.out_json:
        Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_json).write_text(json.dumps(cohorts, indent=1), encoding="utf-8")
    print(section)
