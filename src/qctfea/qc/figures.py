"""Cohort figures (PNG and SVG): spaghetti plots, BMD scatter plots, QC montage.

* :func:`spaghetti` -- one line per patient over months, with the mean and its
  t-based 95 % CI per timepoint (n printed at each timepoint);
* :func:`scatter` -- an outcome against one BMD measure, colour per timepoint,
  least-squares line and Pearson r per timepoint;
* :func:`qc_montage` -- the per-scan QC pictures (e.g. ``calibration.png``) in
  a patients x timepoints grid, missing scans marked.

:func:`cohort_figures` writes the spaghetti and scatter figures of a long table;
the file names are fixed by :func:`figure_files` so that the workflow can
declare them as outputs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from qctfea.cohort import longtable
from qctfea.cohort import stats as st
from qctfea.errors import QctfeaError
from qctfea.qc.pictures import message_picture, new_figure, save_figure

log = logging.getLogger(__name__)

#: Metrics with a spaghetti plot (a metric without values gets a "no data" panel).
SPAGHETTI_METRICS: list[str] = [
    "pullout_strength_n",
    "pullout_stiffness_n_per_mm",
    "compression_strength_n",
    "compression_stiffness_n_per_mm",
    "around_screw_vbmd_mg_cm3",
    "trabecular_vbmd_mg_cm3",
    "integral_vbmd_mg_cm3",
    "ct_areal_bmd_g_cm2",
    "dxa_areal_bmd_g_cm2",
]

#: BMD measures plotted against pullout strength (areal: DXA where present, else CT).
SCATTER_PREDICTORS: list[str] = [
    "around_screw_vbmd_mg_cm3",
    "trabecular_vbmd_mg_cm3",
    longtable.AREAL,
]

FORMATS = ("png", "svg")


def spaghetti_metrics(cases: Sequence[str] = ("compression", "pullout")) -> list[str]:
    """The metrics with a spaghetti plot: without pullout in ``cases`` (``loads.cases``) no
    pullout or around-screw ones (a model without screws has none)."""
    return [m for m in SPAGHETTI_METRICS
            if "pullout" in cases or not m.startswith(("pullout_", "around_screw_"))]


def figure_files(out_dir: str | os.PathLike, cases: Sequence[str] = ("compression", "pullout"),
                 ) -> dict[str, dict[str, Path]]:
    """``{figure name: {"png": path, "svg": path}}`` written by :func:`cohort_figures` for
    the load cases ``cases`` (no pullout figures without pullout)."""
    out = Path(out_dir)
    names = [f"spaghetti_{m}" for m in spaghetti_metrics(cases)]
    if "pullout" in cases:
        names += [f"scatter_pullout_{p}" for p in SCATTER_PREDICTORS]
    return {n: {fmt: out / f"{n}.{fmt}" for fmt in FORMATS} for n in names}


def _axis_label(metric: str) -> str:
    u = longtable.unit(metric)
    return f"{longtable.label(metric)} ({u})" if u else longtable.label(metric)


def spaghetti(df: pd.DataFrame, metric: str, paths: dict[str, Path]) -> None:
    """Per-patient trajectories of ``metric`` with the mean and 95 % CI per timepoint."""
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    tpm = longtable.timepoint_months(df)
    vals = pd.to_numeric(df[metric], errors="coerce") if metric in df.columns else None
    if vals is None or not np.isfinite(vals).any():
        ax.text(0.5, 0.5, f"no {longtable.label(metric)} in this cohort", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        save_figure(fig, paths)
        return
    data = df.assign(_v=vals)
    for patient, sub in data.groupby("patient", sort=True):
        sub = sub[np.isfinite(sub["_v"])].sort_values("months")
        incomplete = len(sub) < len(tpm)
        ax.plot(sub["months"], sub["_v"], color="0.6", lw=1.0, marker="o", ms=3,
                ls="--" if incomplete else "-", zorder=1)
        if len(sub):
            ax.annotate(str(patient), (sub["months"].iloc[-1], sub["_v"].iloc[-1]),
                        xytext=(4, 0), textcoords="offset points", fontsize=7, color="0.4",
                        va="center")
    means, lows, highs, ns = [], [], [], []
    for tp in tpm.index:
        d = st.describe(data.loc[data["timepoint"] == tp, "_v"])
        means.append(d["mean"])
        lows.append(d["mean"] - d["ci_low"] if math.isfinite(d["ci_low"]) else 0.0)
        highs.append(d["ci_high"] - d["mean"] if math.isfinite(d["ci_high"]) else 0.0)
        ns.append(d["n"])
    x = tpm.to_numpy(float)
    ax.errorbar(x, means, yerr=[lows, highs], color="C3", lw=2, marker="s", ms=6, capsize=5,
                zorder=3, label="mean and 95 % CI (t)")
    for xi, m, n in zip(x, means, ns, strict=True):
        if math.isfinite(m):
            ax.annotate(f"n = {n}", (xi, m), xytext=(6, -12), textcoords="offset points",
                        fontsize=8, color="C3")
    ax.set_xticks(x, [f"{t}\n{m:g} mo" for t, m in tpm.items()])
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{longtable.label(metric)}: patients (grey, dashed = missing scan) and mean")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, paths)


def scatter(df: pd.DataFrame, outcome: str, predictor: str, paths: dict[str, Path]) -> None:
    """``outcome`` against ``predictor`` per timepoint with least-squares lines and r."""
    data, sources = longtable.with_resolved_areal(df)
    fig = new_figure(6.0, 4.5)
    ax = fig.subplots()
    tpm = longtable.timepoint_months(data)
    for i, tp in enumerate(tpm.index):
        sub = data[data["timepoint"] == tp][[predictor, outcome]].apply(
            pd.to_numeric, errors="coerce").dropna()
        res = st.pearson_with_ci(sub[predictor], sub[outcome])
        colour = f"C{i % 10}"
        src = f", {sources.get(str(tp), '')}" if predictor == longtable.AREAL else ""
        r_s = f"r = {res['r']:.2f}" if math.isfinite(res["r"]) else "r = n/a"
        ax.scatter(sub[predictor], sub[outcome], color=colour, alpha=0.85, edgecolors="none",
                   label=f"{tp}: {r_s}, n = {res['n']}{src}")
        if res["n"] >= 2 and np.ptp(sub[predictor].to_numpy()) > 0:
            slope, icept = np.polyfit(sub[predictor], sub[outcome], 1)
            xs = np.linspace(sub[predictor].min(), sub[predictor].max(), 2)
            ax.plot(xs, icept + slope * xs, color=colour, lw=1.5)
    xlabel = _axis_label(predictor)
    if predictor == longtable.AREAL:
        used = sorted(set(sources.values()))
        xlabel = f"areal BMD (g/cm²; {' / '.join(used)})"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_axis_label(outcome))
    ax.set_title(f"{longtable.label(outcome)} vs {xlabel.split(' (')[0]}, per timepoint")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    save_figure(fig, paths)


def cohort_figures(long_csv: str | os.PathLike, out_dir: str | os.PathLike,
                   cases: Sequence[str] = ("compression", "pullout")) -> list[Path]:
    """Write every figure of :func:`figure_files` from the long table; return the paths."""
    df = longtable.read_long_table(long_csv, allow_empty=True)
    files = figure_files(out_dir, cases)
    written: list[Path] = []
    if df.empty:  # every scan refused or excluded
        for name, paths in files.items():
            message_picture(name.replace("_", " "),
                            f"{longtable.NO_SCAN_KEPT} (tables/exclusions.csv).", paths)
            written += paths.values()
        return written
    for metric in spaghetti_metrics(cases):
        paths = files[f"spaghetti_{metric}"]
        spaghetti(df, metric, paths)
        written += paths.values()
    for predictor in SCATTER_PREDICTORS if "pullout" in cases else []:
        paths = files[f"scatter_pullout_{predictor}"]
        scatter(df, "pullout_strength_n", predictor, paths)
        written += paths.values()
    log.info(f"qctfea figures: {len(written)} files -> {out_dir}")
    return written


def qc_montage(
    entries: Iterable[tuple[str, str, str | os.PathLike]],
    paths: dict[str, Path],
    title: str = "",
    timepoints: Sequence[str] | None = None,
) -> None:
    """Grid of per-scan pictures: one row per patient, one column per timepoint.

    ``entries`` are ``(patient, timepoint, png path)``; a cell without an entry
    is marked "missing"; without entries (every scan refused or excluded) the picture says
    so. Raises :class:`QctfeaError` naming an unreadable picture.
    """
    from matplotlib.image import imread

    entries = [(str(p), str(t), Path(f)) for p, t, f in entries]
    if not entries:
        message_picture(title or "QC", f"{longtable.NO_SCAN_KEPT} (tables/exclusions.csv "
                        "lists them and why).", paths)
        return
    patients = sorted({p for p, _, _ in entries})
    tps = list(timepoints) if timepoints else list(dict.fromkeys(t for _, t, _ in entries))
    cell = {(p, t): f for p, t, f in entries}
    ncol, nrow = len(tps), len(patients)
    fig = new_figure(2.6 * ncol + 0.6, 2.0 * nrow + 0.6)
    axes = np.atleast_2d(fig.subplots(nrow, ncol, squeeze=False))
    for i, p in enumerate(patients):
        for j, t in enumerate(tps):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            f = cell.get((p, t))
            if f is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", color="C3",
                        transform=ax.transAxes)
                for side in ax.spines.values():
                    side.set_color("C3")
            else:
                try:
                    img = imread(f)
                except (OSError, ValueError, SyntaxError) as exc:
                    raise QctfeaError(f"qc_montage: patient {p}, timepoint {t}: cannot read "
                                      f"{f} ({exc})") from exc
                ax.imshow(img, interpolation="antialiased")
            if i == 0:
                ax.set_title(t, fontsize=10)
            if j == 0:
                ax.set_ylabel(p, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    save_figure(fig, paths, dpi=110)
