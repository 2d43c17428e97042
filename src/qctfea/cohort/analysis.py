"""Cohort aggregation, longitudinal tables and statistics.

The per-scan steps of the pipeline leave JSON files in
``results/<cohort>/<patient>/<timepoint>/`` (``bmd.json``, ``compression.json``,
``pullout_left.json``, ``pullout_right.json``, ``mesh.json``, ``calibration.json``).
This module flattens them into one long table (one row per patient x timepoint)
and derives from it, without assuming complete data:

* tables (:func:`tables`): change from the cohort baseline per patient (long
  and wide), a summary per timepoint (n, mean +/- SD, median [IQR]) and the
  baseline characteristics (Table 1);
* statistics (:func:`statistics`): each follow-up against baseline (paired t
  and Wilcoxon signed-rank, Holm-corrected over the follow-ups of a metric;
  only patients with both values are paired and the table says how many and
  who was left out), Friedman across all timepoints (complete cases), a
  random-intercept linear mixed model per metric (REML; keeps every available
  scan), Pearson/Spearman correlations per timepoint and the comparison of the
  QCT and areal-BMD correlations with the outcome (Williams' t, Steiger's z);
* a ``summary.json`` with headline sentences that carry their numbers.

Each scan's row also carries its clinical categories with their sources
(:mod:`qctfea.cohort.clinical`): the vertebral strength by the BCT thresholds (by the patient's
``sex`` from the sample sheet) and the trabecular vBMD by the ACR QCT classes.

The baseline timepoint is the one with the smallest (median) months in the
cohort. Areal BMD in the statistics is the clinical DXA value from the sample
sheet at a timepoint where any scan has one (scans without it drop out of that
analysis), else the CT-derived one; every output says which it used.
The statistics themselves live in :mod:`qctfea.cohort.stats`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qctfea.cohort import clinical
from qctfea.cohort import stats as st
from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, provenance, read_json, write_json

log = logging.getLogger(__name__)

#: Columns of the long table, in order.
COLUMNS: list[str] = [
    "patient",
    "timepoint",
    "months",
    "sex",
    "trabecular_vbmd_mg_cm3",
    "integral_vbmd_mg_cm3",
    "around_screw_vbmd_left_mg_cm3",
    "around_screw_vbmd_right_mg_cm3",
    "around_screw_vbmd_mg_cm3",
    "ct_areal_bmd_g_cm2",
    "dxa_areal_bmd_g_cm2",
    "areal_bmd_g_cm2",
    "areal_bmd_source",
    "compression_stiffness_n_per_mm",
    "compression_strength_n",
    "strength_category",
    "strength_category_source",
    "vbmd_category",
    "vbmd_category_source",
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
    "screw_grade_left",
    "screw_grade_right",
    "screw_breach_left_mm",
    "screw_breach_right_mm",
    "screw_breach_direction_left",
    "screw_breach_direction_right",
    "registration_dice",
    "registration_point_spread_mm",
]

#: Metrics summarised, tested for change and modelled (all-missing ones are skipped).
DEFAULT_METRICS: list[str] = [
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

#: The resolved areal BMD (clinical DXA where present, else CT-derived; see module doc).
AREAL = "areal_bmd_g_cm2"

#: Outcome -> predictors correlated per timepoint by :func:`statistics`.
DEFAULT_CORRELATIONS: dict[str, list[str]] = {
    "pullout_strength_n": [
        "around_screw_vbmd_mg_cm3",
        "trabecular_vbmd_mg_cm3",
        "integral_vbmd_mg_cm3",
        AREAL,
    ],
    "compression_strength_n": [
        "around_screw_vbmd_mg_cm3",
        "trabecular_vbmd_mg_cm3",
        "integral_vbmd_mg_cm3",
        AREAL,
    ],
}

#: Outcome -> QCT predictors whose correlation is compared with the areal BMD one.
DEFAULT_COMPARISONS: dict[str, list[str]] = {
    "pullout_strength_n": ["around_screw_vbmd_mg_cm3", "trabecular_vbmd_mg_cm3"],
    "compression_strength_n": ["trabecular_vbmd_mg_cm3", "integral_vbmd_mg_cm3"],
}

#: Metric -> (label, unit) for tables, figures and sentences.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "pullout_strength_n": ("pullout strength", "N"),
    "pullout_stiffness_n_per_mm": ("pullout stiffness", "N/mm"),
    "compression_strength_n": ("compression strength", "N"),
    "compression_stiffness_n_per_mm": ("compression stiffness", "N/mm"),
    "around_screw_vbmd_mg_cm3": ("vBMD around the screw", "mg/cm³"),
    "trabecular_vbmd_mg_cm3": ("trabecular vBMD", "mg/cm³"),
    "integral_vbmd_mg_cm3": ("integral vBMD", "mg/cm³"),
    "ct_areal_bmd_g_cm2": ("CT-derived areal BMD", "g/cm²"),
    "dxa_areal_bmd_g_cm2": ("clinical DXA areal BMD", "g/cm²"),
    AREAL: ("areal BMD", "g/cm²"),
    "calibration_r2": ("calibration R²", ""),
    "mesh_cells": ("mesh elements", ""),
}

#: Columns that exist only with screws (``loads.cases`` with pullout): around-screw vBMD
#: and the pullout results. A cohort without pullout has none of them.
SCREW_COLUMNS: list[str] = [c for c in COLUMNS
                            if c.startswith(("pullout_", "around_screw_", "screw_"))]

#: Per-scan input files read by :func:`aggregate` (the pullout ones only with pullout).
SCAN_FILES: dict[str, str] = {
    "bmd": "bmd.json",
    "compression": "compression.json",
    "pullout_left": "pullout_left.json",
    "pullout_right": "pullout_right.json",
    "mesh": "mesh.json",
    "screws": "screws.json",
    "calibration": "calibration.json",
}

CHANGE_COLUMNS: list[str] = [
    "metric",
    "patient",
    "timepoint",
    "months",
    "baseline_timepoint",
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
    "p_ttest_holm",
    "p_wilcoxon_holm",
    "n_patients",
    "patients_not_paired",
]

FRIEDMAN_COLUMNS: list[str] = [
    "metric",
    "timepoints",
    "k",
    "n_complete",
    "n_patients",
    "chi2",
    "df",
    "p",
    "patients_excluded",
]

MIXED_COLUMNS: list[str] = [
    "metric",
    "model",
    "term",
    "estimate",
    "se",
    "df",
    "t",
    "p",
    "ci_low",
    "ci_high",
    "p_z",
    "n_obs",
    "n_patients",
    "n_patients_complete",
    "var_patient",
    "var_residual",
    "icc",
    "reml_loglik",
    "converged",
    "boundary",
    "note",
]

CORRELATION_COLUMNS: list[str] = [
    "timepoint",
    "months",
    "outcome",
    "predictor",
    "predictor_source",
    "n",
    "r",
    "p",
    "ci_low",
    "ci_high",
    "rho_spearman",
    "p_spearman",
]

COMPARISON_COLUMNS: list[str] = [
    "timepoint",
    "months",
    "outcome",
    "predictor_qct",
    "predictor_areal",
    "areal_source",
    "n",
    "r_qct",
    "r_areal",
    "r_qct_areal",
    "williams_t",
    "df",
    "p_williams",
    "p_williams_greater",
    "steiger_z",
    "p_steiger",
    "p_steiger_greater",
]

SUMMARY_COLUMNS: list[str] = [
    "metric",
    "quantity",
    "timepoint",
    "months",
    "n",
    "n_missing",
    "mean",
    "sd",
    "ci_low",
    "ci_high",
    "median",
    "q1",
    "q3",
    "min",
    "max",
    "mean_sd",
    "median_iqr",
]

BASELINE_COLUMNS: list[str] = [
    "characteristic",
    "unit",
    "n",
    "mean",
    "sd",
    "median",
    "q1",
    "q3",
    "mean_sd",
    "median_iqr",
]


def label(metric: str) -> str:
    """Human-readable name of a metric column."""
    return METRIC_INFO.get(metric, (metric, ""))[0]


def unit(metric: str) -> str:
    return METRIC_INFO.get(metric, ("", ""))[1]


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


def _num_opt(d: Mapping[str, Any], key: str, what: str) -> float:
    """Like :func:`_num` for diagnostic keys: NaN when the key is absent."""
    if isinstance(d, Mapping) and key not in d:
        return math.nan
    return _num(d, key, what)


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
    sex: str = "",
    clinical_params: clinical.ClinicalParams | None = None,
) -> dict:
    """Flatten the per-scan results of one patient x timepoint into one row.

    ``pullout`` maps ``"left"`` and ``"right"`` to the pullout result dicts; ``None`` for a
    model without screws (``loads.cases`` without pullout): the row then has no pullout or
    around-screw columns (:data:`SCREW_COLUMNS`).
    ``areal_bmd_g_cm2`` is the DXA value when given, otherwise the CT-derived
    one (``areal_bmd_source`` says which). Keys the row does not use (for
    example those of a nonlinear analysis) are ignored; solver iteration counts
    are NaN when absent. ``sex`` (``"F"``, ``"M"`` or ``""``, see
    :func:`qctfea.cohort.clinical.sex_code`) and ``clinical_params`` (default: the published
    thresholds) give the clinical categories and their sources (:func:`qctfea.cohort.clinical.categories`).
    Raises :class:`QctfeaError` naming the input and key when a value the tables need is
    missing.
    """
    ct_areal = _num(bmd, "areal_bmd_g_cm2", "bmd.json")
    dxa = _opt_float(dxa_areal_bmd_g_cm2)
    row = {
        "patient": str(patient),
        "timepoint": str(timepoint),
        "months": float(months),
        "trabecular_vbmd_mg_cm3": _num(bmd, "trabecular_vbmd_mg_cm3", "bmd.json"),
        "integral_vbmd_mg_cm3": _num(bmd, "integral_vbmd_mg_cm3", "bmd.json"),
        "ct_areal_bmd_g_cm2": ct_areal,
        "dxa_areal_bmd_g_cm2": dxa,
        "areal_bmd_g_cm2": ct_areal if math.isnan(dxa) else dxa,
        "areal_bmd_source": "ct" if math.isnan(dxa) else "dxa",
        "compression_stiffness_n_per_mm": _num(
            compression, "stiffness_n_per_mm", "compression.json"
        ),
        "compression_strength_n": _num(compression, "strength_n", "compression.json"),
        "calibration_slope": _num(calibration, "slope", "calibration.json"),
        "calibration_intercept": _num(calibration, "intercept", "calibration.json"),
        "calibration_r2": _num(calibration, "r2", "calibration.json"),
        "mesh_cells": _num(mesh, "n_cells", "mesh.json"),
        "mesh_vertices": _num(mesh, "n_vertices", "mesh.json"),
        "n_dofs": _num_opt(compression, "n_dofs", "compression.json"),
        "compression_iterations": _num_opt(compression, "ksp_iterations", "compression.json"),
    }
    row |= clinical.categories(row["compression_strength_n"], row["trabecular_vbmd_mg_cm3"],
                               clinical.sex_code(sex), clinical_params)
    if pullout is None:
        return {c: row[c] for c in COLUMNS if c in row}
    screw = bmd.get("around_screw_vbmd_mg_cm3") if isinstance(bmd, Mapping) else None
    if not isinstance(screw, Mapping):
        raise QctfeaError("bmd.json: missing object 'around_screw_vbmd_mg_cm3' {left, right}")
    if not isinstance(pullout, Mapping) or not {"left", "right"} <= set(pullout):
        raise QctfeaError("pullout: expected results for both 'left' and 'right' screws")
    pl, pr = pullout["left"], pullout["right"]
    screw_l = _num(screw, "left", "bmd.json around_screw_vbmd_mg_cm3")
    screw_r = _num(screw, "right", "bmd.json around_screw_vbmd_mg_cm3")
    k_l = _num(pl, "stiffness_n_per_mm", "pullout_left.json")
    k_r = _num(pr, "stiffness_n_per_mm", "pullout_right.json")
    f_l = _num(pl, "strength_n", "pullout_left.json")
    f_r = _num(pr, "strength_n", "pullout_right.json")
    row |= {
        "around_screw_vbmd_left_mg_cm3": screw_l,
        "around_screw_vbmd_right_mg_cm3": screw_r,
        "around_screw_vbmd_mg_cm3": _mean2(screw_l, screw_r),
        "pullout_stiffness_left_n_per_mm": k_l,
        "pullout_stiffness_right_n_per_mm": k_r,
        "pullout_strength_left_n": f_l,
        "pullout_strength_right_n": f_r,
        "pullout_strength_n": _mean2(f_l, f_r),
        "pullout_stiffness_n_per_mm": _mean2(k_l, k_r),
        "pullout_iterations_left": _num_opt(pl, "ksp_iterations", "pullout_left.json"),
        "pullout_iterations_right": _num_opt(pr, "ksp_iterations", "pullout_right.json"),
    }
    return {c: row[c] for c in COLUMNS if c in row}


def placement_columns(screws: Mapping[str, Any]) -> dict:
    """Each screw's Gertzbein-Robbins grade, breach (mm) and its direction, from the model's
    screws.json; refused screws are an error (they never reach the tables)."""
    if screws.get("refused"):
        raise QctfeaError(f"screws.json: the screws were refused at planning: "
                          f"{screws['refused']}")
    out = {}
    for s in screws.get("screws", []):
        g = s.get("placement")
        if not isinstance(g, Mapping):
            raise QctfeaError(f"screws.json: the {s.get('side')} screw has no placement grade; "
                              "rerun the planning step (rule plan_screws)")
        out |= {f"screw_grade_{s['side']}": g["grade"],
                f"screw_breach_{s['side']}_mm": float(g["breach_mm"]),
                f"screw_breach_direction_{s['side']}": g["direction"]}
    return out


def registration_columns(reg: Mapping[str, Any]) -> dict:
    """A follow-up's registration to its baseline: vertebra Dice after registration and the
    spread (mm) between the two best starts at the points that matter (registration.json)."""
    return {"registration_dice": _num(reg, "dice_after", "registration.json"),
            "registration_point_spread_mm": _opt_float(reg.get("point_spread_mm"))}


#: Suffixes of an outcome's uncertainty columns in the long table (uncertainty.json):
#: interval bounds and the per-scan SD behind the least significant change.
UNCERTAINTY_SUFFIXES = ("ci_low", "ci_high", "sd_scan")


def uncertainty_columns(unc: Mapping[str, Any]) -> dict:
    """``<outcome>_ci_low``, ``_ci_high`` and ``_sd_scan`` of every outcome of a scan's
    uncertainty.json (see :mod:`qctfea.uncertainty`)."""
    outcomes = unc.get("outcomes")
    if not isinstance(outcomes, Mapping):
        raise QctfeaError("uncertainty.json: missing object 'outcomes'")
    return {f"{k}_{suffix}": _num(v, suffix, f"uncertainty.json {k}")
            for k, v in outcomes.items() for suffix in UNCERTAINTY_SUFFIXES}


def least_significant_changes(df: pd.DataFrame, metrics: Sequence[str],
                              level: float = 0.95) -> pd.DataFrame:
    """Per patient, follow-up and outcome: the change from baseline, the least significant
    change from the two scans' ``_sd_scan`` (:func:`qctfea.uncertainty.least_significant_change`)
    and whether the change exceeds it. Empty without uncertainty columns."""
    from qctfea.uncertainty import least_significant_change

    rows = []
    for metric in metrics:
        sd_col = f"{metric}_sd_scan"
        if metric not in df.columns or sd_col not in df.columns:
            continue
        for patient, g in df.groupby("patient", sort=True):
            g = g.sort_values("months", kind="mergesort")
            base = g.iloc[0]
            for _, f in g.iloc[1:].iterrows():
                change = float(f[metric] - base[metric])
                lsc = least_significant_change(float(base[sd_col]), float(f[sd_col]), level)
                rows.append({"patient": patient, "baseline": base["timepoint"],
                             "timepoint": f["timepoint"], "months": float(f["months"]),
                             "metric": metric, "baseline_value": float(base[metric]),
                             "value": float(f[metric]), "change": change,
                             "change_pct": 100 * change / float(base[metric]),
                             "lsc": lsc, "significant": bool(abs(change) > lsc)})
    return pd.DataFrame(rows, columns=["patient", "baseline", "timepoint", "months", "metric",
                                       "baseline_value", "value", "change", "change_pct",
                                       "lsc", "significant"])


def refusal_entries(scans: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Exclusion entries (patient, timepoint, months, reason) for the scans whose model's
    screws were refused at planning or whose load case did not reach its peak; ``scans``:
    dicts with patient, timepoint, months, the model's ``screws`` file (or None: no
    screws) and optionally ``results``, the scan's load-case result files."""
    out = []
    for s in scans:
        reasons = []
        if s.get("screws"):
            reasons = [read_json(s["screws"]).get("refused")]
        if not any(reasons):
            reasons = [read_json(p).get("refused") for p in s.get("results", ())]
        if any(reasons):
            out.append({"patient": s["patient"], "timepoint": s["timepoint"],
                        "months": s["months"], "reason": "; ".join(r for r in reasons if r)})
    return out


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


#: Text columns of the clinical categories (read as text even when all empty).
TEXT_COLUMNS: dict[str, type] = {c: str for c in (
    "sex", "strength_category", "strength_category_source", "vbmd_category",
    "vbmd_category_source")}


def read_long_table(long_csv: str | os.PathLike) -> pd.DataFrame:
    """Read and check a long table CSV written by :func:`aggregate`."""
    long_csv = Path(long_csv)
    if not long_csv.is_file():
        raise QctfeaError(f"{long_csv}: long table not found; run the aggregate step first")
    try:
        df = pd.read_csv(long_csv, dtype={"patient": str, "timepoint": str,
                                          "areal_bmd_source": str, **TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise QctfeaError(f"{long_csv}: cannot read the long table ({exc})") from exc
    df = longitudinal_table(df.to_dict("records"))
    if df.empty:
        raise QctfeaError(f"{long_csv}: long table has no rows")
    return df


# --------------------------------------------------------------------------- helpers


def _check_metrics(df: pd.DataFrame, metrics: Sequence[str]) -> None:
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise QctfeaError(f"long table lacks the metric column(s) {missing}")


def timepoint_months(df: pd.DataFrame) -> pd.Series:
    """Nominal months of each timepoint label (median over patients), ascending."""
    return df.groupby("timepoint")["months"].median().sort_values(kind="mergesort")


_timepoint_months = timepoint_months  # backward-compatible name


def baseline_timepoint(df: pd.DataFrame) -> str:
    """The cohort's baseline: the timepoint with the smallest (median) months."""
    return str(timepoint_months(df).index[0])


def available_metrics(df: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """The metrics that are columns of ``df`` with at least one finite value."""
    out = []
    for m in metrics:
        if m in df.columns and np.isfinite(pd.to_numeric(df[m], errors="coerce")).any():
            out.append(m)
    return out


def missing_scans(df: pd.DataFrame,
                  excluded: Sequence[Mapping[str, Any]] = ()) -> list[tuple[str, str]]:
    """(patient, timepoint) pairs of the cohort grid that have no row, sorted; scans the
    cohort config excluded (``excluded`` entries, see :func:`read_exclusions`) not counted."""
    present = set(zip(df["patient"], df["timepoint"], strict=True))
    present |= {(e["patient"], e["timepoint"]) for e in excluded}
    tps = list(timepoint_months(df).index)
    return [(p, t) for p in sorted(df["patient"].unique()) for t in tps if (p, t) not in present]


def with_resolved_areal(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """Copy of ``df`` whose ``areal_bmd_g_cm2`` is, per timepoint, the clinical DXA
    value where any scan of that timepoint has one (NaN for scans without), else
    the CT-derived one. Returns the frame and ``{timepoint: "clinical DXA" | "CT-derived"}``.
    """
    out = df.copy()
    dxa = (pd.to_numeric(out["dxa_areal_bmd_g_cm2"], errors="coerce")
           if "dxa_areal_bmd_g_cm2" in out.columns else pd.Series(np.nan, index=out.index))
    if "ct_areal_bmd_g_cm2" in out.columns:
        ct = pd.to_numeric(out["ct_areal_bmd_g_cm2"], errors="coerce")
    elif AREAL in out.columns:
        ct = pd.to_numeric(out[AREAL], errors="coerce")
    else:
        ct = pd.Series(np.nan, index=out.index)
    sources: dict[str, str] = {}
    values = pd.Series(np.nan, index=out.index, dtype=float)
    for tp in timepoint_months(out).index:
        sel = out["timepoint"] == tp
        if dxa[sel].notna().any():
            values[sel] = dxa[sel]
            sources[str(tp)] = "clinical DXA"
        else:
            values[sel] = ct[sel]
            sources[str(tp)] = "CT-derived"
    out[AREAL] = values
    return out, sources


def _values(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """patient x timepoint matrix of one metric (columns in timepoint order)."""
    tps = list(timepoint_months(df).index)
    wide = df.pivot(index="patient", columns="timepoint", values=metric)
    return wide.reindex(columns=tps).astype(float)


def _fmt_num(x: float) -> str:
    """A number with 3-4 significant digits, as in a paper's table."""
    if not math.isfinite(x):
        return "n/a"
    a = abs(x)
    digits = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 1 else 3
    return f"{x:.{digits}f}"


def _mean_sd(d: Mapping[str, float]) -> str:
    if d["n"] == 0:
        return "n/a"
    if not math.isfinite(d["sd"]):
        return _fmt_num(d["mean"])
    return f"{_fmt_num(d['mean'])} ± {_fmt_num(d['sd'])}"


def _median_iqr(d: Mapping[str, float]) -> str:
    if d["n"] == 0:
        return "n/a"
    return f"{_fmt_num(d['median'])} [{_fmt_num(d['q1'])}, {_fmt_num(d['q3'])}]"


# --------------------------------------------------------------------------- tables


def change_from_baseline(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per-patient change of each metric from that patient's scan at the cohort baseline.

    Long format, one row per metric x patient x timepoint (the baseline row
    included, with zero change): ``metric, patient, timepoint, months,
    baseline_timepoint, baseline_value, value, change_abs, change_pct``.
    ``change_pct`` is ``100 * (value - baseline) / baseline`` (NaN when the
    baseline is 0 or NaN); a patient without a baseline scan has NaN changes.
    """
    _check_metrics(df, metrics)
    if df.empty:
        return pd.DataFrame(columns=CHANGE_COLUMNS)
    base_tp = baseline_timepoint(df)
    data = df.sort_values(["patient", "months"], kind="mergesort")
    base = df[df["timepoint"] == base_tp].set_index("patient")
    parts = []
    for metric in metrics:
        value = data[metric].astype(float).to_numpy()
        b = base[metric].astype(float).reindex(data["patient"]).to_numpy()
        change = value - b
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = np.where(b != 0, 100.0 * change / b, np.nan)
        parts.append(pd.DataFrame({
            "metric": metric,
            "patient": data["patient"].to_numpy(),
            "timepoint": data["timepoint"].to_numpy(),
            "months": data["months"].astype(float).to_numpy(),
            "baseline_timepoint": base_tp,
            "baseline_value": b,
            "value": value,
            "change_abs": change,
            "change_pct": pct,
        }))
    return pd.concat(parts, ignore_index=True)[CHANGE_COLUMNS]


def wide_table(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per patient: each metric at each timepoint, and for each follow-up
    the absolute and percent change from the patient's baseline scan.

    Columns: ``patient, n_scans, timepoints_missing, months_<tp>...,
    <metric>_<tp>..., <metric>_<tp>_change, <metric>_<tp>_change_pct`` (follow-ups), and
    with uncertainty columns ``<metric>_<tp>_lsc`` (least significant change) and
    ``<metric>_<tp>_significant`` (the change exceeds it).
    """
    from qctfea.uncertainty import least_significant_change

    _check_metrics(df, metrics)
    tps = [str(t) for t in timepoint_months(df).index]
    base_tp = tps[0]
    patients = sorted(df["patient"].unique())
    out = pd.DataFrame({"patient": patients})
    have = df.groupby("patient")["timepoint"].apply(set)
    out["n_scans"] = [len(have[p]) for p in patients]
    out["timepoints_missing"] = [";".join(t for t in tps if t not in have[p]) for p in patients]
    months = df.pivot(index="patient", columns="timepoint", values="months").reindex(
        index=patients, columns=tps)
    for tp in tps:
        out[f"months_{tp}"] = months[tp].to_numpy()
    for metric in metrics:
        v = _values(df, metric).reindex(index=patients)
        for tp in tps:
            out[f"{metric}_{tp}"] = v[tp].to_numpy()
        b = v[base_tp].to_numpy()
        for tp in tps[1:]:
            ch = v[tp].to_numpy() - b
            with np.errstate(divide="ignore", invalid="ignore"):
                pct = np.where(b != 0, 100.0 * ch / b, np.nan)
            out[f"{metric}_{tp}_change"] = ch
            out[f"{metric}_{tp}_change_pct"] = pct
        if f"{metric}_sd_scan" in df.columns:  # uncertainty.enabled: the LSC per follow-up
            sd = _values(df, f"{metric}_sd_scan").reindex(index=patients)
            for tp in tps[1:]:
                lsc = least_significant_change(sd[base_tp].to_numpy(), sd[tp].to_numpy())
                ch = out[f"{metric}_{tp}_change"].to_numpy()
                out[f"{metric}_{tp}_lsc"] = lsc
                out[f"{metric}_{tp}_significant"] = pd.array(
                    [bool(abs(c) > m) if np.isfinite(c) and np.isfinite(m) else pd.NA
                     for c, m in zip(ch, lsc, strict=True)], dtype="boolean")
    return out


def summary_by_timepoint(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """n, missing, mean, SD, 95 % CI of the mean, median [IQR], range per metric x timepoint.

    ``quantity`` is ``value`` (the metric) or ``change_pct`` (percent change from
    the patient's baseline scan, follow-ups only). ``n_missing`` counts the
    cohort's patients without a value.
    """
    _check_metrics(df, metrics)
    tpm = timepoint_months(df)
    n_pat = df["patient"].nunique()
    cfb = change_from_baseline(df, metrics)
    rows = []
    for metric in metrics:
        for quantity in ("value", "change_pct"):
            for i, (tp, months) in enumerate(tpm.items()):
                if quantity == "change_pct" and i == 0:
                    continue
                if quantity == "value":
                    vals = df.loc[df["timepoint"] == tp, metric]
                else:
                    sel = (cfb["metric"] == metric) & (cfb["timepoint"] == tp)
                    vals = cfb.loc[sel, "change_pct"]
                d = st.describe(vals)
                rows.append({"metric": metric, "quantity": quantity, "timepoint": tp,
                             "months": float(months), **d, "n_missing": n_pat - d["n"],
                             "mean_sd": _mean_sd(d), "median_iqr": _median_iqr(d)})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def category_counts(values: pd.Series, known: Sequence[str]) -> tuple[int, str]:
    """How many ``values`` are one of ``known``, and the counts as text ("F 3, M 1, not
    given 1"): the known ones in their order, then any other value; empty is "not given"."""
    counts = values.fillna("").astype(str).replace("", "not given").value_counts()
    order = [k for k in known if k in counts] + sorted(k for k in counts.index
                                                         if k not in known)
    n = int(sum(counts[k] for k in known if k in counts))
    return n, ", ".join(f"{k} {int(counts[k])}" for k in order)


def baseline_characteristics(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Table 1: the cohort at its baseline timepoint (counts, the sexes and clinical
    categories of the baseline scans, then each metric)."""
    tpm = timepoint_months(df)
    base_tp = str(tpm.index[0])
    base = df[df["timepoint"] == base_tp]
    n_pat = df["patient"].nunique()
    missing = missing_scans(df)

    def count_row(name: str, n: int, text: str) -> dict:
        return {"characteristic": name, "unit": "", "n": n, "mean": np.nan, "sd": np.nan,
                "median": np.nan, "q1": np.nan, "q3": np.nan, "mean_sd": text,
                "median_iqr": ""}

    rows = [
        count_row("patients", n_pat, str(n_pat)),
        count_row("scans (present of planned)", len(df),
                  f"{len(df)} of {n_pat * len(tpm)}"
                  + (f"; missing {', '.join(f'{p} {t}' for p, t in missing)}" if missing else "")),
        count_row("timepoints", len(tpm),
                  ", ".join(f"{t} ({m:g} months)" for t, m in tpm.items())),
        count_row(f"patients with a baseline scan ({base_tp})", base["patient"].nunique(),
                  str(base["patient"].nunique())),
    ]
    if "dxa_areal_bmd_g_cm2" in df.columns:
        n_dxa = int(pd.to_numeric(base["dxa_areal_bmd_g_cm2"], errors="coerce").notna().sum())
        rows.append(count_row("clinical DXA at baseline", n_dxa, f"{n_dxa} of {len(base)}"))
    for name, col, known in (
            ("sex (sample sheet)", "sex", ("F", "M")),
            (f"vertebral strength category at {base_tp} (BCT, Keaveny et al. 2020)",
             "strength_category", clinical.STRENGTH_CATEGORIES),
            (f"trabecular vBMD category at {base_tp} (ACR QCT)", "vbmd_category",
             clinical.VBMD_CATEGORIES)):
        if col in df.columns:
            n, text = category_counts(base[col], known)
            rows.append(count_row(name, n, text))
    for metric in [*metrics, "calibration_r2"]:
        if metric not in df.columns:
            continue
        d = st.describe(base[metric])
        rows.append({"characteristic": f"{label(metric)} at {base_tp}", "unit": unit(metric),
                     "n": d["n"], "mean": d["mean"], "sd": d["sd"], "median": d["median"],
                     "q1": d["q1"], "q3": d["q3"], "mean_sd": _mean_sd(d),
                     "median_iqr": _median_iqr(d)})
    return pd.DataFrame(rows, columns=BASELINE_COLUMNS)


# --------------------------------------------------------------------------- tests over time


def paired_change_tests(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Paired tests of each follow-up timepoint against the baseline timepoint.

    For each metric and follow-up only patients with non-NaN values at both
    timepoints are paired (``n_pairs``; the others are listed in
    ``patients_not_paired``). ``t``/``p_ttest`` are the paired t test,
    ``p_wilcoxon`` the two-sided Wilcoxon signed-rank p (see
    :func:`qctfea.cohort.stats.paired_tests`); ``*_holm`` are Holm-adjusted over the
    follow-ups of that metric and test.
    """
    _check_metrics(df, metrics)
    if df.empty:
        return pd.DataFrame(columns=PAIRED_COLUMNS)
    tpm = timepoint_months(df)
    patients = sorted(df["patient"].unique())
    out = []
    for metric in metrics:
        v = _values(df, metric).reindex(index=patients)
        block = []
        for tp, months in tpm.iloc[1:].items():
            pair = v[[tpm.index[0], tp]].dropna()
            res = st.paired_tests(pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy())
            left_out = [p for p in patients if p not in pair.index]
            block.append({"metric": metric, "timepoint": tp, "months": float(months), **res,
                          "n_patients": len(patients), "patients_not_paired": ";".join(left_out)})
        if block:
            for key in ("p_ttest", "p_wilcoxon"):
                adj = st.holm([b[key] for b in block])
                for b, a in zip(block, adj, strict=True):
                    b[f"{key}_holm"] = float(a)
        out.extend(block)
    return pd.DataFrame(out, columns=PAIRED_COLUMNS)


def friedman_tests(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Friedman test of each metric across all timepoints, complete cases only."""
    _check_metrics(df, metrics)
    tps = [str(t) for t in timepoint_months(df).index]
    rows = []
    for metric in metrics:
        v = _values(df, metric)
        complete = v.dropna()
        res = st.friedman(complete.to_numpy()) if len(tps) else {
            "n": 0, "k": 0, "chi2": np.nan, "df": np.nan, "p": np.nan}
        rows.append({"metric": metric, "timepoints": ";".join(tps), "k": len(tps),
                     "n_complete": len(complete), "n_patients": len(v),
                     "chi2": res["chi2"], "df": res["df"], "p": res["p"],
                     "patients_excluded": ";".join(p for p in v.index if p not in complete.index)})
    return pd.DataFrame(rows, columns=FRIEDMAN_COLUMNS)


def _lmm_rows(metric: str, model: str, sub: pd.DataFrame, X: np.ndarray, terms: list[str],
              n_complete: int) -> list[dict]:
    base = {"metric": metric, "model": model, "n_obs": len(sub),
            "n_patients": sub["patient"].nunique(), "n_patients_complete": n_complete}
    try:
        fit = st.random_intercept_lmm(sub[metric].to_numpy(), X, sub["patient"], terms)
    except (ValueError, np.linalg.LinAlgError) as exc:
        return [{**base, "term": t, "note": f"not fitted: {exc}"} for t in terms]
    lo, hi = fit.ci()
    rows = []
    for i, term in enumerate(terms):
        rows.append({
            **base, "term": term, "estimate": fit.beta[i], "se": fit.se[i], "df": fit.df,
            "t": fit.t[i], "p": fit.p[i], "ci_low": lo[i], "ci_high": hi[i], "p_z": fit.p_z[i],
            "var_patient": fit.var_group, "var_residual": fit.var_resid, "icc": fit.icc,
            "reml_loglik": fit.reml_loglik, "converged": fit.converged,
            "boundary": fit.boundary,
            "note": ("" if fit.converged else "REML fit did not converge; ")
            + ("patient variance at 0 (boundary): equals ordinary least squares"
               if fit.boundary else ""),
        })
    return rows


def mixed_models(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Random-intercept linear mixed models per metric, fitted by REML on every scan.

    Two models: ``timepoint`` (metric ~ timepoint as a factor; terms
    ``Intercept [<baseline>]`` and ``<tp> - <baseline>``: the change at each
    follow-up) and ``linear`` (metric ~ months; term ``months``: change per
    month). Patients with a missing timepoint keep their other scans.
    """
    _check_metrics(df, metrics)
    tps = [str(t) for t in timepoint_months(df).index]
    rows: list[dict] = []
    for metric in metrics:
        sub = df[["patient", "timepoint", "months", metric]].copy()
        sub[metric] = pd.to_numeric(sub[metric], errors="coerce")
        sub = sub[np.isfinite(sub[metric])].reset_index(drop=True)
        n_complete = int((sub.groupby("patient")["timepoint"].nunique() == len(tps)).sum())
        present = [t for t in tps if (sub["timepoint"] == t).any()]
        if not present:
            rows.append({"metric": metric, "model": "timepoint", "term": "",
                         "n_obs": 0, "n_patients": 0, "n_patients_complete": 0,
                         "note": "not fitted: no values"})
            continue
        ref = present[0]
        X = np.column_stack([np.ones(len(sub))]
                            + [(sub["timepoint"] == t).to_numpy(float) for t in present[1:]])
        terms = [f"Intercept [{ref}]"] + [f"{t} - {ref}" for t in present[1:]]
        rows += _lmm_rows(metric, "timepoint", sub, X, terms, n_complete)
        X = np.column_stack([np.ones(len(sub)), sub["months"].to_numpy(float)])
        rows += _lmm_rows(metric, "linear", sub, X, ["Intercept", "months"], n_complete)
    return pd.DataFrame(rows, columns=MIXED_COLUMNS)


# --------------------------------------------------------------------------- correlation


pearson_with_ci = st.pearson_with_ci  # backward-compatible name


def _source(predictor: str, sources: Mapping[str, str], tp: str) -> str:
    if predictor == AREAL:
        return sources.get(tp, "")
    if predictor == "dxa_areal_bmd_g_cm2":
        return "clinical DXA"
    if predictor == "ct_areal_bmd_g_cm2":
        return "CT-derived"
    return "QCT" if "vbmd" in predictor else ""


def present_pairs(df: pd.DataFrame, pairs: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``{outcome: [predictor, ...]}`` restricted to the columns of the long table: a cohort
    without pullout (``loads.cases``) has no pullout outcome and no around-screw vBMD."""
    have = set(df.columns) | {AREAL}
    out = {o: [p for p in ps if p in have] for o, ps in pairs.items() if o in have}
    return {o: ps for o, ps in out.items() if ps}


def correlation_table(
    df: pd.DataFrame, outcome_predictors: dict[str, list[str]]
) -> pd.DataFrame:
    """Pearson/Spearman correlation of each outcome with each predictor, per timepoint.

    One row per timepoint (ordered by months) x outcome x predictor. The
    predictor ``areal_bmd_g_cm2`` is the resolved areal BMD of
    :func:`with_resolved_areal`; ``predictor_source`` says which was used.
    """
    data, sources = with_resolved_areal(df) if not df.empty else (df, {})
    cols = [c for o, ps in outcome_predictors.items() for c in (o, *ps)]
    _check_metrics(data, cols)
    if data.empty:
        return pd.DataFrame(columns=CORRELATION_COLUMNS)
    out = []
    for tp, months in timepoint_months(data).items():
        sub = data[data["timepoint"] == tp]
        for outcome, predictors in outcome_predictors.items():
            for predictor in predictors:
                res = st.pearson_with_ci(sub[predictor], sub[outcome])
                out.append({"timepoint": tp, "months": float(months), "outcome": outcome,
                            "predictor": predictor,
                            "predictor_source": _source(predictor, sources, str(tp)), **res})
    return pd.DataFrame(out, columns=CORRELATION_COLUMNS)


def compare_correlations(
    df: pd.DataFrame, comparisons: dict[str, list[str]] | None = None
) -> pd.DataFrame:
    """Is the outcome's correlation with a QCT predictor larger than with areal BMD?

    Per timepoint, on the scans with all three values: r(outcome, QCT),
    r(outcome, areal), r(QCT, areal), Williams' t (df = n - 3) and Steiger's z
    for the two dependent correlations; ``p_*`` two-sided, ``p_*_greater`` for
    H1: r(QCT) > r(areal).
    """
    comparisons = DEFAULT_COMPARISONS if comparisons is None else comparisons
    data, sources = with_resolved_areal(df)
    _check_metrics(data, [c for o, ps in comparisons.items() for c in (o, *ps)])
    out = []
    for tp, months in timepoint_months(data).items():
        sub = data[data["timepoint"] == tp]
        for outcome, predictors in comparisons.items():
            for pred in predictors:
                trio = sub[[outcome, pred, AREAL]].apply(pd.to_numeric, errors="coerce").dropna()
                n = len(trio)
                row = {"timepoint": tp, "months": float(months), "outcome": outcome,
                       "predictor_qct": pred, "predictor_areal": AREAL,
                       "areal_source": sources.get(str(tp), ""), "n": n}
                r = np.full((3, 3), np.nan)
                if n >= 3 and (trio.std(ddof=0) > 0).all():
                    r = np.corrcoef(trio.to_numpy().T)
                r_q, r_a, r_qa = float(r[0, 1]), float(r[0, 2]), float(r[1, 2])
                w = st.williams_t(r_q, r_a, r_qa, n)
                s = st.steiger_z(r_q, r_a, r_qa, n)
                out.append({**row, "r_qct": r_q, "r_areal": r_a, "r_qct_areal": r_qa,
                            "williams_t": w["statistic"], "df": w["df"], "p_williams": w["p"],
                            "p_williams_greater": w["p_greater"], "steiger_z": s["statistic"],
                            "p_steiger": s["p"], "p_steiger_greater": s["p_greater"]})
    return pd.DataFrame(out, columns=COMPARISON_COLUMNS)


# --------------------------------------------------------------------------- I/O steps


def aggregate(
    sample_rows: list[dict], results_dir: str | os.PathLike, out_csv: str | os.PathLike,
    cases: Sequence[str] = ("compression", "pullout"),
    clinical_cfg: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Read the per-scan JSONs of every sample and write the long table CSV.

    ``cases`` are the load cases run (``loads.cases``): without ``"pullout"`` no pullout
    file is read and the table has no pullout or around-screw columns. With it, each scan's
    model screws.json gives the screws' grades, and a scan whose screws were refused at
    planning is left out (``tables/exclusions.csv`` lists it with the refusal).

    ``sample_rows`` are dicts with ``patient``, ``timepoint``, ``months`` and an
    optional ``dxa`` (areal BMD in g/cm2, or None/NaN), ``sex`` (F/M, female/male; empty
    or absent: not given) and ``model_timepoint`` (whose mesh the scan's model used;
    default its own). ``clinical_cfg`` is the cohort config's ``clinical`` section (the
    thresholds of the clinical categories; None: the published ones). Files are read from
    ``results_dir/<patient>/<timepoint>/`` (the mesh's from the model timepoint). A missing or unreadable file raises
    :class:`QctfeaError` naming the file, the patient and the timepoint.
    """
    if not sample_rows:
        raise QctfeaError("aggregate: no samples given; check the cohort sample sheet")
    thresholds = clinical.clinical_params(clinical_cfg)
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
        try:
            sex = clinical.sex_code(sample.get("sex"))
        except ValueError as exc:
            raise QctfeaError(f"aggregate: {where}, sex: {exc}") from None
        scan_dir = root / patient / timepoint
        # A follow-up registered to baseline uses the baseline's mesh.
        model_dir = root / patient / str(sample.get("model_timepoint") or timepoint)
        data: dict[str, Any] = {}
        if "pullout" in cases:  # refused screws: the scan is not analysed (exclusions.csv)
            data["screws"] = read_json(model_dir / SCAN_FILES["screws"])
            if data["screws"].get("refused"):
                continue
        for key, name in SCAN_FILES.items():
            if key in data:
                continue
            if key.startswith(("pullout", "screws")) and "pullout" not in cases:
                continue
            path = (model_dir if key in ("mesh", "screws") else scan_dir) / name
            try:
                data[key] = read_json(path)
            except QctfeaError as exc:
                raise QctfeaError(f"{where}: cannot read {name} ({exc})") from exc
            except OSError as exc:
                raise QctfeaError(f"{where}: cannot read {name} at {path} ({exc})") from exc
        if any(data[k].get("refused") for k in data if k.startswith(("compression",
                                                                     "pullout"))):
            continue  # a load case without a peak: no strength (exclusions.csv)
        try:
            dxa = _opt_float(sample.get("dxa"))
            row = scan_row(
                patient,
                timepoint,
                months,
                data["bmd"],
                data["compression"],
                ({"left": data["pullout_left"], "right": data["pullout_right"]}
                 if "pullout" in cases else None),
                data["mesh"],
                data["calibration"],
                None if math.isnan(dxa) else dxa,
                sex,
                thresholds,
            )
            if "pullout" in cases:
                row |= placement_columns(data["screws"])
            if model_dir != scan_dir:  # a follow-up on its baseline's model: registration QC
                row |= registration_columns(read_json(scan_dir / "registration.json"))
            if (scan_dir / "uncertainty.json").is_file():  # uncertainty.enabled
                row |= uncertainty_columns(read_json(scan_dir / "uncertainty.json"))
        except QctfeaError as exc:
            raise QctfeaError(f"{where} ({scan_dir}): {exc}") from exc
        rows.append(row)
    df = longitudinal_table(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


#: File names written by :func:`tables` (in the tables folder).
TABLE_FILES: dict[str, str] = {
    "wide": "wide.csv",
    "change_from_baseline": "change_from_baseline.csv",
    "summary_by_timepoint": "summary_by_timepoint.csv",
    "baseline_characteristics": "baseline_characteristics.csv",
    "least_significant_change": "least_significant_change.csv",
}

#: File names written by :func:`statistics` (in the stats folder).
STAT_FILES: dict[str, str] = {
    "changes": "changes.csv",
    "friedman": "friedman.csv",
    "mixed_models": "mixed_models.csv",
    "correlations": "correlations.csv",
    "correlation_comparison": "correlation_comparison.csv",
    "summary": "summary.json",
}


def tables(long_csv: str | os.PathLike, out_dir: str | os.PathLike,
           metrics: Sequence[str] | None = None) -> dict[str, Path]:
    """Wide table, change from baseline, summary per timepoint and Table 1 as CSV.

    Metrics without any value (e.g. DXA in a cohort without it) are left out.
    Returns ``{name: path}`` of the files written (see :data:`TABLE_FILES`).
    """
    df = read_long_table(long_csv)
    metrics = available_metrics(df, list(metrics or DEFAULT_METRICS))
    out = Path(out_dir)
    frames = {
        "wide": wide_table(df, metrics),
        "change_from_baseline": change_from_baseline(df, metrics),
        "summary_by_timepoint": summary_by_timepoint(df, metrics),
        "baseline_characteristics": baseline_characteristics(df, metrics),
        # empty (header only) without uncertainty columns (uncertainty.enabled: false)
        "least_significant_change": least_significant_changes(df, metrics),
    }
    paths = {}
    for name, frame in frames.items():
        paths[name] = out / TABLE_FILES[name]
        _write_csv(frame, paths[name])
    missing = missing_scans(df)
    log.info(f"qctfea tables: {len(df)} scans, {df['patient'].nunique()} patients, "
             f"missing {[f'{p} {t}' for p, t in missing] or 'none'} -> {out}")
    return paths


def _fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"= {p:.3f}" if p < 0.1 else f"= {p:.2f}"


def _fmt_r(r: float) -> str:
    return f"{r:.2f}" if math.isfinite(r) else "n/a"


def _cap(s: str) -> str:
    return s if s.startswith("vBMD") else s[:1].upper() + s[1:]


def _fmt_est(values: Sequence[float]) -> list[str]:
    """Numbers shown with about 3 significant digits of the largest of them."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0]
    decimals = max(0, 2 - math.floor(math.log10(max(finite)))) if finite else 0
    return [f"{v:.{decimals}f}" if math.isfinite(v) else "n/a" for v in values]


def _data_sentence(df: pd.DataFrame, tpm: pd.Series,
                   excluded: Sequence[Mapping[str, Any]] = ()) -> str:
    n_pat = df["patient"].nunique()
    planned = n_pat * len(tpm)
    missing = missing_scans(df, excluded)
    s = (f"Data: {len(df)} of {planned} planned scans ({n_pat} patients x {len(tpm)} "
         f"timepoints: {', '.join(map(str, tpm.index))})")
    if excluded:
        s += "; excluded by the cohort config: " + ", ".join(
            f"{e['patient']} {e['timepoint']} ({e['reason']})" for e in excluded)
    if missing:
        s += f"; missing {', '.join(f'{p} {t}' for p, t in missing)}"
    absent = {p for p, _ in missing_scans(df)}
    if not absent:
        return s + ("; none missing." if not excluded else ".")
    complete = n_pat - len(absent)
    return (s + f". Paired tests use the "
            f"patients with both scans (n per test in stats/changes.csv), the mixed models all "
            f"{len(df)} scans, the Friedman test the {complete} patients with every timepoint.")


#: Columns of tables/exclusions.csv (scans the cohort config excludes, with the reason).
EXCLUSION_COLUMNS = ["patient", "timepoint", "months", "reason"]


def write_exclusions(entries: Sequence[Mapping[str, Any]], out_csv: str | os.PathLike) -> pd.DataFrame:
    """Write the scans excluded by the cohort config (``exclude:``) with their reasons."""
    for e in entries:
        if not str(e.get("reason") or "").strip():
            raise QctfeaError(f"exclusion of patient {e.get('patient')}, timepoint "
                              f"{e.get('timepoint')} has no reason; say why it is excluded")
    df = pd.DataFrame([{c: e.get(c) for c in EXCLUSION_COLUMNS} for e in entries],
                      columns=EXCLUSION_COLUMNS)
    _write_csv(df, Path(out_csv))
    return df


def read_exclusions(path: str | os.PathLike | None) -> list[dict]:
    """Entries of an exclusions CSV (none when path is None)."""
    if path is None:
        return []
    df = pd.read_csv(path, dtype={"patient": str, "timepoint": str, "reason": str})
    return [{"patient": r.patient, "timepoint": r.timepoint, "months": float(r.months),
             "reason": r.reason} for r in df.itertuples()]


def _change_sentence(metric: str, c: Mapping[str, Any], base_tp: str,
                     lmm: pd.DataFrame) -> str:
    pct = c["mean_change_pct"]
    verb = ("rose" if pct > 0 else "fell" if pct < 0 else "did not change") \
        if math.isfinite(pct) else "changed by n/a"
    amount = f" {abs(pct):.1f} %" if math.isfinite(pct) and pct != 0 else ""
    left = f"; not paired: {c['patients_not_paired'].replace(';', ', ')}" \
        if isinstance(c["patients_not_paired"], str) and c["patients_not_paired"] else ""
    s = (f"{_cap(label(metric))} {verb}{amount} from {base_tp} to {c['timepoint']} "
         f"({c['months']:g} months; mean of per-patient changes, n = {int(c['n_pairs'])} pairs"
         f"{left}): paired t p {_fmt_p(c['p_ttest'])} (Holm {_fmt_p(c['p_ttest_holm'])}), "
         f"Wilcoxon p {_fmt_p(c['p_wilcoxon'])} (Holm {_fmt_p(c['p_wilcoxon_holm'])})")
    sel = lmm[(lmm["metric"] == metric) & (lmm["model"] == "timepoint")
              & (lmm["term"] == f"{c['timepoint']} - {base_tp}")]
    if (not sel.empty and math.isfinite(float(sel.iloc[0]["estimate"]))
            and bool(sel.iloc[0]["converged"])):  # a fit that did not converge: no numbers
        m = sel.iloc[0]
        est, lo, hi = _fmt_est([float(m["estimate"]), float(m["ci_low"]), float(m["ci_high"])])
        sign = "+" if float(m["estimate"]) >= 0 else ""
        s += (f"; mixed model ({int(m['n_obs'])} scans of {int(m['n_patients'])} patients): "
              f"{sign}{est} {unit(metric)} (95 % CI {lo} to {hi}), p {_fmt_p(m['p'])}")
    return s + "."


def _friedman_sentence(metric: str, f: Mapping[str, Any]) -> str:
    if not math.isfinite(f["chi2"]):
        return ""
    return (f"{_cap(label(metric))} across {f['timepoints'].replace(';', ', ')}: Friedman "
            f"chi2({f['df']:g}) = {f['chi2']:.2f}, p {_fmt_p(f['p'])} "
            f"(n = {int(f['n_complete'])} patients with every timepoint).")


def _corr_sentence(tp: str, outcome: str, pred: str, corr: pd.DataFrame,
                   comp: pd.DataFrame) -> str:
    def one(predictor: str) -> tuple[str, float]:
        sel = corr[(corr["timepoint"] == tp) & (corr["outcome"] == outcome)
                   & (corr["predictor"] == predictor)]
        if sel.empty:
            return "", math.nan
        r = sel.iloc[0]
        name = (f"{r['predictor_source']} areal BMD" if predictor == AREAL
                else label(predictor))
        ci = (f"95 % CI {r['ci_low']:.2f} to {r['ci_high']:.2f}, "
              if math.isfinite(r["ci_low"]) else "")
        return (f"{name} at r = {_fmt_r(r['r'])} ({ci}p {_fmt_p(r['p'])}, n = {int(r['n'])}; "
                f"Spearman rho = {_fmt_r(r['rho_spearman'])})"), float(r["r"])

    a, _ = one(pred)
    b, _ = one(AREAL)
    if not a:
        return ""
    s = f"At {tp}, {label(outcome)} correlated with {a}"
    if b:
        s += f" and with {b}"
    sel = comp[(comp["timepoint"] == tp) & (comp["outcome"] == outcome)
               & (comp["predictor_qct"] == pred)]
    if not sel.empty and math.isfinite(float(sel.iloc[0]["steiger_z"])):
        c = sel.iloc[0]
        tag = "DXA" if c["areal_source"] == "clinical DXA" else "CT aBMD"
        s += (f"; r(QCT) = {_fmt_r(c['r_qct'])} vs r({tag}) = {_fmt_r(c['r_areal'])} on "
              f"n = {int(c['n'])}: Williams t({c['df']:g}) = {c['williams_t']:.2f}, "
              f"p {_fmt_p(c['p_williams'])}; Steiger z = {c['steiger_z']:.2f}, "
              f"p {_fmt_p(c['p_steiger'])} (two-sided; one-sided for r(QCT) > r({tag}): "
              f"p {_fmt_p(c['p_steiger_greater'])})")
    return s + "."


def headlines(df: pd.DataFrame, changes: pd.DataFrame, friedman_: pd.DataFrame,
              lmm: pd.DataFrame, corr: pd.DataFrame, comp: pd.DataFrame,
              excluded: Sequence[Mapping[str, Any]] = ()) -> list[str]:
    """Short sentences, each carrying its numbers (what, how much, test, p, n)."""
    tpm = timepoint_months(df)
    base_tp = str(tpm.index[0])
    lines = [_data_sentence(df, tpm, excluded)]
    strengths = ["pullout_strength_n", "compression_strength_n"]
    others = ["around_screw_vbmd_mg_cm3", "trabecular_vbmd_mg_cm3", "dxa_areal_bmd_g_cm2",
              "ct_areal_bmd_g_cm2"]
    for metric in strengths + others:
        rows = changes[changes["metric"] == metric]
        if metric in others:
            rows = rows.tail(1)  # last follow-up only
        for _, c in rows.iterrows():
            lines.append(_change_sentence(metric, c, base_tp, lmm))
        if metric in strengths:
            f = friedman_[friedman_["metric"] == metric]
            if not f.empty and (s := _friedman_sentence(metric, f.iloc[0])):
                lines.append(s)
    tps = list(dict.fromkeys([str(t) for t in tpm.index]))
    for tp in tps:
        if s := _corr_sentence(tp, "pullout_strength_n", "around_screw_vbmd_mg_cm3", corr, comp):
            lines.append(s)
    last = tps[-1] if tps else None
    if last and (s := _corr_sentence(last, "compression_strength_n", "trabecular_vbmd_mg_cm3",
                                     corr, comp)):
        lines.append(s)
    return lines


def statistics(long_csv: str | os.PathLike, out_dir: str | os.PathLike,
               metrics: Sequence[str] | None = None,
               exclusions_csv: str | os.PathLike | None = None) -> dict:
    """Paired tests, Friedman, mixed models, correlations and their comparison.

    Writes the files of :data:`STAT_FILES` in ``out_dir`` and returns the summary
    dict (also ``summary.json``): cohort size, missing scans, scans excluded by the
    cohort config (``exclusions_csv``, see :func:`write_exclusions`) with their reasons,
    areal-BMD source per timepoint, the headline sentences and the output paths.
    """
    long_csv = Path(long_csv)
    out = Path(out_dir)
    df = read_long_table(long_csv)
    metrics = available_metrics(df, list(metrics or DEFAULT_METRICS))
    tpm = timepoint_months(df)
    log.info(f"qctfea statistics: {len(df)} scans, {df['patient'].nunique()} patients, "
             f"{len(tpm)} timepoints, metrics {metrics} -> {out}")
    _, sources = with_resolved_areal(df)
    correlations = present_pairs(df, DEFAULT_CORRELATIONS)
    comparisons = present_pairs(df, DEFAULT_COMPARISONS)
    frames = {
        "changes": paired_change_tests(df, metrics),
        "friedman": friedman_tests(df, metrics),
        "mixed_models": mixed_models(df, metrics),
        "correlations": correlation_table(df, correlations),
        "correlation_comparison": compare_correlations(df, comparisons),
    }
    paths = {}
    for name, frame in frames.items():
        paths[name] = out / STAT_FILES[name]
        _write_csv(frame, paths[name])
    excluded = read_exclusions(exclusions_csv)
    missing = missing_scans(df, excluded)
    summary = {
        "n_patients": int(df["patient"].nunique()),
        "n_scans": int(len(df)),
        "n_scans_planned": int(df["patient"].nunique() * len(tpm)),
        "timepoints": {str(k): float(v) for k, v in tpm.items()},
        "baseline_timepoint": str(tpm.index[0]),
        "missing_scans": [{"patient": p, "timepoint": t} for p, t in missing],
        "excluded_scans": excluded,
        "metrics": metrics,
        "areal_bmd_source": sources,
        "methods": {
            "paired": "each follow-up vs baseline: paired t test and Wilcoxon signed-rank "
                      "(two-sided) on patients with both scans; Holm over the follow-ups of "
                      "a metric",
            "friedman": "Friedman test across all timepoints, patients with every timepoint",
            "mixed_models": "metric ~ timepoint (factor) and metric ~ months, random intercept "
                            "per patient, REML; t tests with between-within df; every scan used",
            "correlations": "Pearson r (95 % CI by Fisher z) and Spearman rho per timepoint",
            "comparison": "Williams' t (df n-3) and Steiger's z (pooled r) for "
                          "r(outcome, QCT) vs r(outcome, areal BMD), same scans",
        },
        "headlines": headlines(df, frames["changes"], frames["friedman"],
                               frames["mixed_models"], frames["correlations"],
                               frames["correlation_comparison"], excluded),
        "outputs": {k: str(v) for k, v in paths.items()},
        "provenance": provenance(
            "statistics",
            {"metrics": metrics, "correlations": correlations, "comparisons": comparisons},
            {"long_table": long_csv, **({"exclusions": exclusions_csv} if exclusions_csv
                                        else {})},
        ),
    }
    write_json(out / STAT_FILES["summary"], summary)
    return summary
