"""Per-rule run time and peak memory of a workflow run, from Snakemake's benchmark files.

Every per-scan rule writes ``benchmarks/<cohort>/<patient>/<timepoint>/<rule>.tsv``
(Snakemake's ``benchmark:`` directive: wall seconds ``s``, peak resident memory
``max_rss`` in MB of the job's process tree, CPU seconds). :func:`summarize` gives,
per rule: jobs, wall seconds (mean, max, total), peak memory (median, max) and a
memory-growth check: the slope of peak memory against the order in which the jobs
finished (file modification time), in MB per 10 jobs, and the median of the last
third of the jobs against the first third. Memory that grows from job to job (a
leak carried between jobs) shows as a clearly positive slope.
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

COLUMNS = ["rule", "jobs", "wall_s_mean", "wall_s_max", "wall_s_total", "peak_rss_mb_median",
           "peak_rss_mb_max", "rss_slope_mb_per_10_jobs", "rss_last_vs_first_third"]


def read_benchmarks(root: str | os.PathLike) -> pd.DataFrame:
    """One row per benchmark file under ``root``: rule, scan, seconds, max_rss, finish order."""
    root = Path(root)
    files = sorted(root.rglob("*.tsv"))
    if not files:
        raise QctfeaError(f"no benchmark files (*.tsv) under {root}; run the workflow first")
    rows = []
    for f in files:
        try:
            t = pd.read_csv(f, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise QctfeaError(f"benchmark file {f} is not a Snakemake benchmark table ({exc})") \
                from exc
        if t.empty or not {"s", "max_rss"} <= set(t.columns):
            raise QctfeaError(f"benchmark file {f} has no s/max_rss columns")
        rel = f.relative_to(root).parts
        rows.append({"rule": f.stem, "scan": "/".join(rel[:-1]), "wall_s": float(t["s"].iloc[-1]),
                     "max_rss_mb": pd.to_numeric(t["max_rss"], errors="coerce").iloc[-1],
                     "finished": f.stat().st_mtime})
    df = pd.DataFrame(rows)
    # The solve rule names its load case in the file name (solve_compression,
    # solve_pullout_left, ...): one row per load case, both pullout sides together.
    df["rule"] = df["rule"].str.replace(r"_(left|right)$", "", regex=True)
    return df.sort_values("finished", kind="mergesort").reset_index(drop=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for rule, g in df.groupby("rule", sort=True):
        rss = g["max_rss_mb"].to_numpy(float)
        ok = np.isfinite(rss)
        order = np.arange(len(g), dtype=float)
        slope = (float(np.polyfit(order[ok], rss[ok], 1)[0]) * 10
                 if ok.sum() >= 3 and np.ptp(order[ok]) > 0 else float("nan"))
        third = max(1, len(g) // 3)
        first, last = np.nanmedian(rss[:third]), np.nanmedian(rss[-third:])
        out.append({"rule": rule, "jobs": len(g), "wall_s_mean": g["wall_s"].mean(),
                    "wall_s_max": g["wall_s"].max(), "wall_s_total": g["wall_s"].sum(),
                    "peak_rss_mb_median": float(np.nanmedian(rss)),
                    "peak_rss_mb_max": float(np.nanmax(rss)),
                    "rss_slope_mb_per_10_jobs": slope,
                    "rss_last_vs_first_third": float(last / first) if first else float("nan")})
    return pd.DataFrame(out, columns=COLUMNS)


def markdown(table: pd.DataFrame, title: str) -> str:
    rows = [[r.rule, r.jobs, f"{r.wall_s_mean:.1f}", f"{r.wall_s_max:.1f}",
             f"{r.wall_s_total:.0f}", f"{r.peak_rss_mb_median:.0f}", f"{r.peak_rss_mb_max:.0f}",
             f"{r.rss_slope_mb_per_10_jobs:+.1f}", f"{r.rss_last_vs_first_third:.2f}"]
            for r in table.itertuples()]
    header = ["rule", "jobs", "wall s mean", "wall s max", "wall s total", "peak RSS MB median",
              "peak RSS MB max", "RSS slope MB / 10 jobs", "RSS last / first third"]
    return f"### {title}\n\n" + pipe_table(header, rows, "l" + "r" * 8) + "\n"


def write_summary(root, out_md, out_json=None, title: str | None = None) -> pd.DataFrame:
    table = summarize(read_benchmarks(root))
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(markdown(table, title or f"Per-rule time and memory: {root}"),
            encoding="utf-8")
    if out_json:
        with atomic_path(out_json) as tmp:
            Path(tmp).write_text(json.dumps(table.to_dict("records"), indent=1), encoding="utf-8")
    return table
