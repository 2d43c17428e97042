"""Cohort aggregation and longitudinal statistics.

The per-scan steps of the pipeline leave JSON files in
``results/<cohort>/<patient>/<timepoint>/`` (``bmd.json``, ``compression.json``,
``pullout_left.json``, ``pullout_right.json``, ``mesh.json``, ``calibration.json``).
This module flattens them into one long table (one row per patient x timepoint),
and computes from that table:

* change from baseline per patient (absolute and percent), where a patient's
  baseline is its earliest scan;
* paired tests of each follow-up timepoint against the cohort baseline
  timepoint (paired t test and Wilcoxon signed-rank test), using only the
  patients that have a non-missing value at both timepoints;
* Pearson correlations with Fisher-z confidence intervals (and Spearman rank
  correlations) between FE outcomes and densitometric predictors, per timepoint;
* a short JSON summary with headline sentences and a scatter figure.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from qctfea.provenance import QctfeaError, atomic_path, provenance, read_json, write_json

#: Columns of the long table, in order.
COLUMNS: list[str] = [
    "patient",
    "timepoint",
    "months",
    "trabecular_vbmd_mg_cm3",
    "integral_vbmd_mg_cm3",
    "around_screw_vbmd_left_mg_cm3",
    "around_screw_vbmd_right_mg_cm3",
    "around_screw_vbmd_mg_cm3",
    "ct_areal_bmd_g_cm2",
    "dxa_areal_bmd_g_cm2",
    "areal_bmd_g_cm2",
    "compression_stiffness_n_per_mm",
    "compression_strength_n",
    "pullout_stiffness_left_n_per_mm",
    "pullout_stiffness_right_n_per_mm",
    "pullout_strength_left_n",
    "pullout_strength_right_n",
    "pullout_strength_n",
    "pullout_stiffness_n_per_mm",
    "calibration_slope",
    "calibration_intercept",
    "calibration_r2",
    "mesh_cells",
    "mesh_vertices",
    "n_dofs",
    "compression_iterations",
    "pullout_iterations_left",
    "pullout_iterations_right",
]

#: Metrics tested for change from baseline by :func:`statistics`.
DEFAULT_METRICS: list[str] = [
    "trabecular_vbmd_mg_cm3",
    "integral_vbmd_mg_cm3",
    "around_screw_vbmd_mg_cm3",
    "areal_bmd_g_cm2",
    "compression_stiffness_n_per_mm",
    "compression_strength_n",
    "pullout_stiffness_n_per_mm",
    "pullout_strength_n",
]

#: Outcome -> predictors correlated per timepoint by :func:`statistics`.
DEFAULT_CORRELATIONS: dict[str, list[str]] = {
    "pullout_strength_n": [
        "around_screw_vbmd_mg_cm3",
        "trabecular_vbmd_mg_cm3",
        "areal_bmd_g_cm2",
    ],
    "compression_strength_n": [
        "trabecular_vbmd_mg_cm3",
        "integral_vbmd_mg_cm3",
        "areal_bmd_g_cm2",
    ],
}

#: Per-scan input files read by :func:`aggregate`.
SCAN_FILES: dict[str, str] = {
    "bmd": "bmd.json",
    "compression": "compression.json",
    "pullout_left": "pullout_left.json",
    "pullout_right": "pullout_right.json",
    "mesh": "mesh.json",
    "calibration": "calibration.json",
}

CHANGE_COLUMNS: list[str] = [
    "metric",
    "patient",
    "timepoint",
    "months",
    "baseline_value",
    "value",
    "change_abs",
    "change_pct",
]

PAIRED_COLUMNS: list[str] = [
    "metric",
    "timepoint",
    "months",
    "n_pairs",
    "mean_baseline",
    "mean_followup",
    "mean_change",
    "mean_change_pct",
    "sd_change",
    "t",
    "p_ttest",
    "p_wilcoxon",
]

CORRELATION_COLUMNS: list[str] = [
    "timepoint",
    "months",
    "outcome",
    "predictor",
    "n",
    "r",
    "p",
    "ci_low",
    "ci_high",
    "rho_spearman",
    "p_spearman",
]

_LABELS: dict[str, str] = {
    "pullout_strength_n": "pullout strength",
    "compression_strength_n": "compression strength",
    "around_screw_vbmd_mg_cm3": "around-screw vBMD",
    "trabecular_vbmd_mg_cm3": "trabecular vBMD",
    "integral_vbmd_mg_cm3": "integral vBMD",
    "areal_bmd_g_cm2": "areal BMD",
}


# --------------------------------------------------------------------------- rows


def _num(d: Mapping[str, Any], key: str, what: str) -> float:
    """``float(d[key])`` with an error naming the file (``what``) and the key."""
    if not isinstance(d, Mapping):
        raise QctfeaError(f"{what}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise QctfeaError(f"{what}: missing key {key!r}; regenerate this file")
    value = d[key]
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise QctfeaError(f"{what}: key {key!r} is not a number ({value!r})") from exc


def _opt_float(value: Any) -> float:
    """A float, with ``None``/empty/unparseable-as-missing mapped to NaN."""
    if value is None:
        return math.nan
    if isinstance(value, str) and value.strip() == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise QctfeaError(f"not a number: {value!r}") from exc


def _mean2(a: float, b: float) -> float:
    """Mean of two values (NaN if either is NaN)."""
    return 0.5 * (a + b)


def scan_row(
    patient: str,
    timepoint: str,
    months: float,
    bmd: dict,
    compression: dict,
    pullout: dict[str, dict],
    mesh: dict,
    calibration: dict,
    dxa_areal_bmd_g_cm2: float | None,
) -> dict:
    """Flatten the per-scan results of one patient x timepoint into one row.

    ``pullout`` maps ``"left"`` and ``"right"`` to the pullout result dicts.
    ``areal_bmd_g_cm2`` is the DXA value when given, otherwise the CT-derived one.
    Raises :class:`QctfeaError` naming the input and key when a value is missing.
    """
    screw = bmd.get("around_screw_vbmd_mg_cm3") if isinstance(bmd, Mapping) else None
    if not isinstance(screw, Mapping):
        raise QctfeaError("bmd.json: missing object 'around_screw_vbmd_mg_cm3' {left, right}")
    if not isinstance(pullout, Mapping) or not {"left", "right"} <= set(pullout):
        raise QctfeaError("pullout: expected results for both 'left' and 'right' screws")
    pl, pr = pullout["left"], pullout["right"]

    screw_l = _num(screw, "left", "bmd.json around_screw_vbmd_mg_cm3")
    screw_r = _num(screw, "right", "bmd.json around_screw_vbmd_mg_cm3")
    ct_areal = _num(bmd, "areal_bmd_g_cm2", "bmd.json")
    dxa = _opt_float(dxa_areal_bmd_g_cm2)
    k_l = _num(pl, "stiffness_n_per_mm", "pullout_left.json")
    k_r = _num(pr, "stiffness_n_per_mm", "pullout_right.json")
    f_l = _num(pl, "strength_n", "pullout_left.json")
    f_r = _num(pr, "strength_n", "pullout_right.json")

    return {
        "patient": str(patient),
        "timepoint": str(timepoint),
        "months": float(months),
        "trabecular_vbmd_mg_cm3": _num(bmd, "trabecular_vbmd_mg_cm3", "bmd.json"),
        "integral_vbmd_mg_cm3": _num(bmd, "integral_vbmd_mg_cm3", "bmd.json"),
        "around_screw_vbmd_left_mg_cm3": screw_l,
        "around_screw_vbmd_right_mg_cm3": screw_r,
        "around_screw_vbmd_mg_cm3": _mean2(screw_l, screw_r),
        "ct_areal_bmd_g_cm2": ct_areal,
        "dxa_areal_bmd_g_cm2": dxa,
        "areal_bmd_g_cm2": ct_areal if math.isnan(dxa) else dxa,
        "compression_stiffness_n_per_mm": _num(
            compression, "stiffness_n_per_mm", "compression.json"
        ),
        "compression_strength_n": _num(compression, "strength_n", "compression.json"),
        "pullout_stiffness_left_n_per_mm": k_l,
        "pullout_stiffness_right_n_per_mm": k_r,
        "pullout_strength_left_n": f_l,
        "pullout_strength_right_n": f_r,
        "pullout_strength_n": _mean2(f_l, f_r),
        "pullout_stiffness_n_per_mm": _mean2(k_l, k_r),
        "calibration_slope": _num(calibration, "slope", "calibration.json"),
        "calibration_intercept": _num(calibration, "intercept", "calibration.json"),
        "calibration_r2": _num(calibration, "r2", "calibration.json"),
        "mesh_cells": _num(mesh, "n_cells", "mesh.json"),
        "mesh_vertices": _num(mesh, "n_vertices", "mesh.json"),
        "n_dofs": _num(compression, "n_dofs", "compression.json"),
        "compression_iterations": _num(compression, "ksp_iterations", "compression.json"),
        "pullout_iterations_left": _num(pl, "ksp_iterations", "pullout_left.json"),
        "pullout_iterations_right": _num(pr, "ksp_iterations", "pullout_right.json"),
    }


def longitudinal_table(rows: list[dict]) -> pd.DataFrame:
    """The long table (one row per patient x timepoint), sorted by patient and months.

    Raises :class:`QctfeaError` naming every duplicated patient x timepoint.
    """
    df = pd.DataFrame(list(rows))
    if df.empty:
        return pd.DataFrame(columns=COLUMNS)
    for col in ("patient", "timepoint", "months"):
        if col not in df.columns:
            raise QctfeaError(f"longitudinal table: rows lack the column {col!r}")
    df["patient"] = df["patient"].astype(str)
    df["timepoint"] = df["timepoint"].astype(str)
    df["months"] = pd.to_numeric(df["months"], errors="raise").astype(float)
    dup = df.duplicated(["patient", "timepoint"], keep=False)
    if dup.any():
        counts = df.loc[dup].groupby(["patient", "timepoint"], sort=True).size()
        names = ", ".join(f"{p} {t} ({n} rows)" for (p, t), n in counts.items())
        raise QctfeaError(
            f"duplicate patient x timepoint rows: {names}; each scan must appear once"
        )
    ordered = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    df = df[ordered].sort_values(["patient", "months"], kind="mergesort")
    return df.reset_index(drop=True)


# --------------------------------------------------------------------------- changes


def _check_metrics(df: pd.DataFrame, metrics: Sequence[str]) -> None:
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise QctfeaError(f"long table lacks the metric column(s) {missing}")


def change_from_baseline(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per-patient change of each metric from that patient's earliest scan.

    Long format, one row per metric x patient x timepoint (the baseline row
    included, with zero change): ``metric, patient, timepoint, months,
    baseline_value, value, change_abs, change_pct``. ``change_pct`` is
    ``100 * (value - baseline) / baseline`` (NaN when the baseline is 0 or NaN).
    """
    _check_metrics(df, metrics)
    if df.empty:
        return pd.DataFrame(columns=CHANGE_COLUMNS)
    data = df.sort_values(["patient", "months"], kind="mergesort")
    base_idx = data.groupby("patient", sort=False)["months"].idxmin()
    base = data.loc[base_idx.values].set_index("patient")
    parts = []
    for metric in metrics:
        value = data[metric].astype(float).to_numpy()
        b = base.loc[data["patient"], metric].astype(float).to_numpy()
        change = value - b
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = np.where(b != 0, 100.0 * change / b, np.nan)
        parts.append(
            pd.DataFrame(
                {
                    "metric": metric,
                    "patient": data["patient"].to_numpy(),
                    "timepoint": data["timepoint"].to_numpy(),
                    "months": data["months"].astype(float).to_numpy(),
                    "baseline_value": b,
                    "value": value,
                    "change_abs": change,
                    "change_pct": pct,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)[CHANGE_COLUMNS]


def _timepoint_months(df: pd.DataFrame) -> pd.Series:
    """Nominal months of each timepoint label (median over patients), ascending."""
    return df.groupby("timepoint")["months"].median().sort_values(kind="mergesort")


def paired_change_tests(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Paired tests of each follow-up timepoint against the baseline timepoint.

    The baseline timepoint is the one with the smallest (median) months in the
    cohort; every other timepoint is a follow-up. For each metric and follow-up
    only patients with non-NaN values at both timepoints are paired (``n_pairs``).
    ``t``/``p_ttest`` are the paired t test (NaN if fewer than 2 pairs or zero
    variance of the differences); ``p_wilcoxon`` is the two-sided Wilcoxon
    signed-rank p (NaN if fewer than 2 pairs or all differences zero).
    """
    _check_metrics(df, metrics)
    if df.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    tp_months = _timepoint_months(df)
    base_tp = tp_months.index[0]
    base = df[df["timepoint"] == base_tp].set_index("patient")
    out = []
    for metric in metrics:
        for tp, months in tp_months.iloc[1:].items():
            follow = df[df["timepoint"] == tp].set_index("patient")
            joined = pd.concat(
                [base[metric].astype(float).rename("b"), follow[metric].astype(float).rename("f")],
                axis=1,
                join="inner",
            ).dropna()
            b = joined["b"].to_numpy()
            f = joined["f"].to_numpy()
            out.append({"metric": metric, "timepoint": tp, "months": float(months),
                        **_paired_stats(b, f)})
    return pd.DataFrame(out, columns=PAIRED_COLUMNS)


def _paired_stats(b: np.ndarray, f: np.ndarray) -> dict[str, float]:
    """Descriptives, paired t and Wilcoxon for paired arrays without NaN."""
    n = len(b)
    d = f - b
    nan = math.nan
    res: dict[str, float] = {
        "n_pairs": n,
        "mean_baseline": float(np.mean(b)) if n else nan,
        "mean_followup": float(np.mean(f)) if n else nan,
        "mean_change": float(np.mean(d)) if n else nan,
        "mean_change_pct": nan,
        "sd_change": float(np.std(d, ddof=1)) if n >= 2 else nan,
        "t": nan,
        "p_ttest": nan,
        "p_wilcoxon": nan,
    }
    if n:
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = np.where(b != 0, 100.0 * d / b, np.nan)
        if np.isfinite(pct).any():
            res["mean_change_pct"] = float(np.nanmean(pct))
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if res["sd_change"] > 0:
                tt = stats.ttest_rel(f, b)
                res["t"] = float(tt.statistic)
                res["p_ttest"] = float(tt.pvalue)
            if np.any(d != 0):
                try:
                    res["p_wilcoxon"] = float(stats.wilcoxon(f, b).pvalue)
                except ValueError:
                    res["p_wilcoxon"] = nan
    return res


# --------------------------------------------------------------------------- correlation


def pearson_with_ci(x: Any, y: Any, alpha: float = 0.05) -> dict[str, float]:
    """Pearson r with two-sided p and Fisher-z CI, plus Spearman rho and p.

    Pairs with a NaN in either variable are dropped. With fewer than 3 pairs
    or a constant variable every statistic is NaN (``n`` is still reported);
    with exactly 3 pairs the CI is NaN. The CI is
    ``tanh(atanh(r) +- z_{1-alpha/2} / sqrt(n - 3))``.
    """
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    if xa.shape != ya.shape:
        raise QctfeaError(f"pearson_with_ci: x and y differ in length ({len(xa)} vs {len(ya)})")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(len(xa))
    nan = math.nan
    out: dict[str, float] = {
        "n": n, "r": nan, "p": nan, "ci_low": nan, "ci_high": nan,
        "rho_spearman": nan, "p_spearman": nan,
    }
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(xa, ya)
        sr = stats.spearmanr(xa, ya)
    r = float(np.clip(pr.statistic, -1.0, 1.0))
    out["r"] = r
    out["p"] = float(pr.pvalue)
    out["rho_spearman"] = float(sr.statistic)
    out["p_spearman"] = float(sr.pvalue)
    if n > 3:
        zcrit = float(stats.norm.ppf(1.0 - alpha / 2.0))
        if abs(r) >= 1.0:
            out["ci_low"] = out["ci_high"] = r
        else:
            z = math.atanh(r)
            se = 1.0 / math.sqrt(n - 3)
            out["ci_low"] = math.tanh(z - zcrit * se)
            out["ci_high"] = math.tanh(z + zcrit * se)
    return out


def correlation_table(
    df: pd.DataFrame, outcome_predictors: dict[str, list[str]]
) -> pd.DataFrame:
    """Pearson/Spearman correlation of each outcome with each predictor, per timepoint.

    One row per timepoint (ordered by months) x outcome x predictor with the
    columns ``timepoint, months, outcome, predictor, n, r, p, ci_low, ci_high,
    rho_spearman, p_spearman``.
    """
    cols = [c for o, ps in outcome_predictors.items() for c in (o, *ps)]
    _check_metrics(df, cols)
    if df.empty:
        return pd.DataFrame(columns=CORRELATION_COLUMNS)
    out = []
    for tp, months in _timepoint_months(df).items():
        sub = df[df["timepoint"] == tp]
        for outcome, predictors in outcome_predictors.items():
            for predictor in predictors:
                res = pearson_with_ci(sub[predictor], sub[outcome])
                out.append({"timepoint": tp, "months": float(months), "outcome": outcome,
                            "predictor": predictor, **res})
    return pd.DataFrame(out, columns=CORRELATION_COLUMNS)


# --------------------------------------------------------------------------- I/O steps


def aggregate(
    sample_rows: list[dict], results_dir: str | os.PathLike, out_csv: str | os.PathLike
) -> pd.DataFrame:
    """Read the per-scan JSONs of every sample and write the long table CSV.

    ``sample_rows`` are dicts with ``patient``, ``timepoint``, ``months`` and an
    optional ``dxa`` (areal BMD in g/cm2, or None/NaN). Files are read from
    ``results_dir/<patient>/<timepoint>/``. A missing or unreadable file raises
    :class:`QctfeaError` naming the file, the patient and the timepoint.
    """
    if not sample_rows:
        raise QctfeaError("aggregate: no samples given; check the cohort sample sheet")
    root = Path(results_dir)
    rows = []
    for sample in sample_rows:
        try:
            patient = str(sample["patient"])
            timepoint = str(sample["timepoint"])
            months = float(sample["months"])
        except (KeyError, TypeError, ValueError) as exc:
            raise QctfeaError(
                f"aggregate: sample {sample!r} needs patient, timepoint and numeric months"
            ) from exc
        where = f"patient {patient}, timepoint {timepoint}"
        if not math.isfinite(months):
            raise QctfeaError(f"aggregate: {where}: months is not a finite number")
        scan_dir = root / patient / timepoint
        data: dict[str, Any] = {}
        for key, name in SCAN_FILES.items():
            path = scan_dir / name
            try:
                data[key] = read_json(path)
            except QctfeaError as exc:
                raise QctfeaError(f"{where}: cannot read {name} ({exc})") from exc
            except OSError as exc:
                raise QctfeaError(f"{where}: cannot read {name} at {path} ({exc})") from exc
        try:
            dxa = _opt_float(sample.get("dxa"))
            row = scan_row(
                patient,
                timepoint,
                months,
                data["bmd"],
                data["compression"],
                {"left": data["pullout_left"], "right": data["pullout_right"]},
                data["mesh"],
                data["calibration"],
                None if math.isnan(dxa) else dxa,
            )
        except QctfeaError as exc:
            raise QctfeaError(f"{where} ({scan_dir}): {exc}") from exc
        rows.append(row)
    df = longitudinal_table(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}" if p < 0.1 else f"= {p:.2f}"


def _fmt_r(row: Mapping[str, Any]) -> str:
    r, lo, hi = row["r"], row["ci_low"], row["ci_high"]
    if not math.isfinite(r):
        return f"r = n/a (n = {int(row['n'])})"
    ci = f" (95 % CI {lo:.2f} to {hi:.2f})" if math.isfinite(lo) else ""
    return f"r = {r:.2f}{ci}, p {_fmt_p(row['p'])}, n = {int(row['n'])}"


def _headlines(
    changes: pd.DataFrame, corr: pd.DataFrame, tp_months: pd.Series
) -> list[str]:
    """Short sentences, each with its numbers."""
    lines: list[str] = []
    if len(tp_months) > 1:
        last_tp = tp_months.index[-1]
        for metric in ("pullout_strength_n", "compression_strength_n",
                       "around_screw_vbmd_mg_cm3", "trabecular_vbmd_mg_cm3", "areal_bmd_g_cm2"):
            sel = changes[(changes["metric"] == metric) & (changes["timepoint"] == last_tp)]
            if sel.empty:
                continue
            c = sel.iloc[0]
            pct = c["mean_change_pct"]
            pct_s = f"{pct:+.1f} %" if math.isfinite(pct) else "n/a"
            lines.append(
                f"{metric}: {pct_s} at {c['months']:g} months vs baseline "
                f"(n = {int(c['n_pairs'])} pairs, paired t p {_fmt_p(c['p_ttest'])}, "
                f"Wilcoxon p {_fmt_p(c['p_wilcoxon'])})"
            )
    tps = list(dict.fromkeys([tp_months.index[0], tp_months.index[-1]])) if len(tp_months) else []
    for tp in tps:
        for outcome, predictors in DEFAULT_CORRELATIONS.items():
            sub = corr[(corr["timepoint"] == tp) & (corr["outcome"] == outcome)]
            if sub.empty:
                continue
            parts = []
            for predictor in predictors:
                row = sub[sub["predictor"] == predictor]
                if row.empty:
                    continue
                label = _LABELS.get(predictor, predictor)
                if not parts:
                    prefix = f"{_LABELS.get(outcome, outcome)} vs {label} at {tp}: "
                else:
                    prefix = f"vs {label}: "
                parts.append(prefix + _fmt_r(row.iloc[0]))
            if parts:
                lines.append("; ".join(parts))
    return lines


def _scatter(df: pd.DataFrame, corr: pd.DataFrame, tp_months: pd.Series, out_png: Path) -> None:
    """Two-panel scatter of pullout strength vs around-screw vBMD and areal BMD."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(tp_months))]
    for ax, predictor in zip(axes, ("around_screw_vbmd_mg_cm3", "areal_bmd_g_cm2"), strict=True):
        for colour, tp in zip(colours, tp_months.index, strict=True):
            sub = df[df["timepoint"] == tp]
            row = corr[(corr["timepoint"] == tp) & (corr["outcome"] == "pullout_strength_n")
                       & (corr["predictor"] == predictor)]
            r = float(row["r"].iloc[0]) if not row.empty else math.nan
            n = int(row["n"].iloc[0]) if not row.empty else 0
            r_s = f"r = {r:.2f}" if math.isfinite(r) else "r = n/a"
            ax.scatter(sub[predictor], sub["pullout_strength_n"], color=colour,
                       label=f"{tp} ({r_s}, n = {n})", alpha=0.8, edgecolors="none")
        unit = "mg/cm$^3$" if predictor.endswith("mg_cm3") else "g/cm$^2$"
        ax.set_xlabel(f"{_LABELS[predictor]} ({unit})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pullout strength (N, mean of sides)")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150)


def statistics(long_csv: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Change-from-baseline, paired tests, correlations, summary and scatter figure.

    Writes ``correlations.csv``, ``changes.csv`` (paired tests),
    ``change_from_baseline.csv``, ``summary.json`` and ``pullout_scatter.png``
    in ``out_dir`` and returns the summary dict.
    """
    long_csv = Path(long_csv)
    out = Path(out_dir)
    if not long_csv.is_file():
        raise QctfeaError(f"{long_csv}: long table not found; run the aggregate step first")
    try:
        df = pd.read_csv(long_csv, dtype={"patient": str, "timepoint": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise QctfeaError(f"{long_csv}: cannot read the long table ({exc})") from exc
    df = longitudinal_table(df.to_dict("records"))
    if df.empty:
        raise QctfeaError(f"{long_csv}: long table has no rows")
    metrics = DEFAULT_METRICS
    print(
        f"qctfea statistics: {len(df)} scans, {df['patient'].nunique()} patients, "
        f"{df['timepoint'].nunique()} timepoints -> {out}",
        file=sys.stderr,
    )
    cfb = change_from_baseline(df, metrics)
    changes = paired_change_tests(df, metrics)
    corr = correlation_table(df, DEFAULT_CORRELATIONS)
    tp_months = _timepoint_months(df)

    files = {
        "correlations": out / "correlations.csv",
        "changes": out / "changes.csv",
        "change_from_baseline": out / "change_from_baseline.csv",
    }
    for name, frame in (("correlations", corr), ("changes", changes),
                        ("change_from_baseline", cfb)):
        with atomic_path(files[name]) as tmp:
            frame.to_csv(tmp, index=False)
    png = out / "pullout_scatter.png"
    _scatter(df, corr, tp_months, png)

    summary = {
        "n_patients": int(df["patient"].nunique()),
        "n_scans": int(len(df)),
        "timepoints": {str(k): float(v) for k, v in tp_months.items()},
        "baseline_timepoint": str(tp_months.index[0]),
        "headlines": _headlines(changes, corr, tp_months),
        "outputs": {**{k: str(v) for k, v in files.items()}, "pullout_scatter": str(png)},
        "provenance": provenance(
            "statistics",
            {"metrics": metrics, "correlations": DEFAULT_CORRELATIONS},
            {"long_table": long_csv},
        ),
    }
    write_json(out / "summary.json", summary)
    return summary
