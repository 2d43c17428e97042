"""The cohort's long table: one row per scan from the per-scan result files (what was
measured, where it came from, what was refused), and reading it back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qctfea.cohort import clinical
from qctfea.errors import QctfeaError


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
    "calibration_energy_kev",
    "calibration_energy_from",
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
    "screw_diameter_left_mm",
    "screw_diameter_right_mm",
    "screw_length_left_mm",
    "screw_length_right_mm",
    "screw_convergence_left_deg",
    "screw_convergence_right_deg",
    "screw_isthmus_width_left_mm",
    "screw_isthmus_width_right_mm",
    "screw_exceeds_isthmus_left",
    "screw_exceeds_isthmus_right",
    "screw_grade_voxel_mm",
    "registration_dice",
    "registration_point_spread_mm",
    "registration_point_motion_max_mm",
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


#: Per-side outcomes with intervals of their own (``uncertainty.json``): in the wide table
#: and ``tables/least_significant_change.csv`` with their least significant change, beside
#: the two sides' mean of :data:`DEFAULT_METRICS`; not in the statistics (the mean is).
#: The patient pages read their LSC from the same function (docs/uncertainty.md).
SIDE_METRICS: list[str] = [
    "pullout_strength_left_n",
    "pullout_strength_right_n",
    "around_screw_vbmd_left_mg_cm3",
    "around_screw_vbmd_right_mg_cm3",
]


#: The resolved areal BMD (clinical DXA where present, else CT-derived; see module doc).
AREAL = "areal_bmd_g_cm2"

#: Metric -> (label, unit) for tables, figures and sentences.
METRIC_INFO: dict[str, tuple[str, str]] = {
    "pullout_strength_n": ("pullout strength", "N"),
    "pullout_stiffness_n_per_mm": ("pullout stiffness", "N/mm"),
    "compression_strength_n": ("compression strength", "N"),
    "compression_stiffness_n_per_mm": ("compression stiffness", "N/mm"),
    "around_screw_vbmd_mg_cm3": ("vBMD around the screw", "mg/cm³"),
    "pullout_strength_left_n": ("pullout strength, left", "N"),
    "pullout_strength_right_n": ("pullout strength, right", "N"),
    "around_screw_vbmd_left_mg_cm3": ("vBMD around the left screw", "mg/cm³"),
    "around_screw_vbmd_right_mg_cm3": ("vBMD around the right screw", "mg/cm³"),
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


def as_text(values: pd.Series) -> pd.Series:
    """A text column as read back from a CSV: "" where empty (read as NaN, in a float column
    when every cell is empty, which pandas will not fill with text)."""
    return values.astype(object).fillna("").astype(str)


def label(metric: str) -> str:
    """Human-readable name of a metric column."""
    return METRIC_INFO.get(metric, (metric, ""))[0]


def unit(metric: str) -> str:
    return METRIC_INFO.get(metric, ("", ""))[1]


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


def opt_float(value: Any) -> float:
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


# Long on purpose: one row, column by column, from the scan's result files.
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
    dxa = opt_float(dxa_areal_bmd_g_cm2)
    ee = (calibration.get("effective_energy") or {}) if isinstance(calibration, Mapping) else {}
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
        # the phantomless effective energy and whose it is (this scan's, or the baseline's)
        "calibration_energy_kev": _num_opt(ee, "energy_kev", "calibration.json"),
        "calibration_energy_from": ee.get("energy_from", ""),
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
    """Each screw's Gertzbein-Robbins grade, breach (mm) and its direction, its diameter and
    length as modelled (a diameter fitted to the isthmus, planning.fit_diameter, differs
    from the configured one), for a screw planned from the mask its convergence (degrees,
    medial positive), and its pedicle isthmus' narrowest width (mm) and whether the screw is
    wider than that (planned screws and screws from landmarks; empty where no pedicle was
    found), from the model's screws.json; refused screws are an error (they never reach
    the tables)."""
    if screws.get("refused"):
        raise QctfeaError(f"screws.json: the screws were refused at planning: "
                          f"{screws['refused']}")
    out = {}
    for s in screws.get("screws", []):
        g = s.get("placement")
        if not isinstance(g, Mapping):
            raise QctfeaError(f"screws.json: the {s.get('side')} screw has no placement grade; "
                              "rerun the planning step (rule plan_screws)")
        side, plan = s["side"], s.get("planning") or {}
        out |= {f"screw_grade_{side}": g["grade"],
                f"screw_breach_{side}_mm": float(g["breach_mm"]),
                f"screw_breach_direction_{side}": g["direction"],
                f"screw_diameter_{side}_mm": opt_float(s.get("diameter_mm")),
                f"screw_length_{side}_mm": opt_float(s.get("length_mm")),
                f"screw_convergence_{side}_deg": opt_float(plan.get("convergence_deg")),
                f"screw_isthmus_width_{side}_mm": opt_float(plan.get("isthmus_min_width_mm")),
                f"screw_exceeds_isthmus_{side}": plan.get("screw_exceeds_isthmus")}
    voxels = [opt_float((s.get("placement") or {}).get("label_voxel_mm"))
              for s in screws.get("screws", [])]
    if voxels:  # the label map's coarsest voxel the grades were measured on
        out["screw_grade_voxel_mm"] = max(voxels)
    return out


def registration_columns(reg: Mapping[str, Any]) -> dict:
    """A follow-up's registration to its baseline: vertebra Dice after registration, the
    spread (mm) between the two best starts at the points that matter (the screws' entry
    and tip, else the vertebra's box corners) and how far the registration moved the
    farthest of those points (mm) (registration.json)."""
    motion = reg.get("point_motion_mm") or []
    return {"registration_dice": _num(reg, "dice_after", "registration.json"),
            "registration_point_spread_mm": opt_float(reg.get("point_spread_mm")),
            "registration_point_motion_max_mm": (float(max(motion)) if motion
                                                 else float("nan"))}


#: Columns of the scan's acquisition (scan.json of the ingest step) in the long table.
PROTOCOL_COLUMNS = ("slice_spacing_mm", "pixel_spacing_mm", "kvp", "kernel", "manufacturer")
#: Relative difference of slice or pixel spacing from the baseline's that counts as a
#: protocol change (rounding of the reconstruction grid stays below it).
SPACING_CHANGE = 0.10


def protocol_columns(scan: Mapping[str, Any]) -> dict:
    """The scan's acquisition from scan.json: slice spacing and in-plane pixel size (mm, of
    the ingested image), tube voltage (kVp), reconstruction kernel and manufacturer (empty
    when the source did not say, e.g. a NIfTI file)."""
    info = scan.get("scan") if isinstance(scan, Mapping) else None
    if not isinstance(info, Mapping):
        raise QctfeaError("scan.json: missing object 'scan'")
    spacing = info.get("spacing_mm") or [math.nan] * 3
    return {"slice_spacing_mm": opt_float(spacing[2]),
            "pixel_spacing_mm": opt_float(min(spacing[0], spacing[1])),
            "kvp": opt_float(info.get("kvp")),
            "kernel": str(info.get("convolution_kernel") or ""),
            "manufacturer": str(info.get("manufacturer") or "")}


def protocol_changes(df: pd.DataFrame) -> pd.Series:
    """Per scan, how its acquisition differs from its patient's baseline (first scan by
    months): slice spacing or pixel size by more than :data:`SPACING_CHANGE`, another
    tube voltage, kernel or manufacturer; '' for the baseline and for an unchanged
    protocol. A change from baseline then mixes treatment and protocol."""
    out = pd.Series("", index=df.index, dtype=object)
    if not set(PROTOCOL_COLUMNS) <= set(df.columns):
        return out
    for _, g in df.sort_values("months", kind="mergesort").groupby("patient", sort=False):
        base = g.iloc[0]
        for i, row in g.iloc[1:].iterrows():
            diffs = []
            for col, what in (("slice_spacing_mm", "slice spacing"),
                              ("pixel_spacing_mm", "pixel size")):
                a, b = float(base[col]), float(row[col])
                if math.isfinite(a) and math.isfinite(b) and abs(b - a) > SPACING_CHANGE * a:
                    diffs.append(f"{what} {a:.3g} -> {b:.3g} mm")
            for col, what in (("kvp", "kVp"), ("kernel", "kernel"),
                              ("manufacturer", "manufacturer")):
                a, b = base[col], row[col]
                known = [v for v in (a, b) if isinstance(v, str) and v or
                         isinstance(v, float) and math.isfinite(v)]
                if len(known) == 2 and a != b:
                    fmt = (lambda v: f"{v:g}") if col == "kvp" else str
                    diffs.append(f"{what} {fmt(a)} -> {fmt(b)}")
            out[i] = "; ".join(diffs)
    return out


#: Suffixes of an outcome's uncertainty columns in the long table (uncertainty.json):
#: interval bounds and the per-scan SD behind the least significant change.
UNCERTAINTY_SUFFIXES = ("ci_low", "ci_high", "sd_scan")


def uncertainty_columns(unc: Mapping[str, Any]) -> dict:
    """``<outcome>_ci_low``, ``_ci_high`` and ``_sd_scan`` of every outcome of a scan's
    uncertainty.json (see :mod:`qctfea.uncertainty`); for a scan whose uncertainty step
    failed (``failed``: its message), none of them but ``uncertainty_failed`` with the
    message."""
    if unc.get("failed"):
        return {"uncertainty_failed": str(unc["failed"])}
    outcomes = unc.get("outcomes")
    if not isinstance(outcomes, Mapping):
        raise QctfeaError("uncertainty.json: missing object 'outcomes'")
    return {f"{k}_{suffix}": _num(v, suffix, f"uncertainty.json {k}")
            for k, v in outcomes.items() for suffix in UNCERTAINTY_SUFFIXES}


def least_significant_changes(df: pd.DataFrame, metrics: Sequence[str],
                              level: float = 0.95) -> pd.DataFrame:
    """Per patient, follow-up and outcome: the change from baseline, the least significant
    change from the two scans' ``_sd_scan`` (:func:`qctfea.uncertainty.least_significant_change`)
    and whether the change exceeds it (None when either is missing: a scan without intervals,
    or a value missing, e.g. a pullout without a peak). The baseline is the patient's
    earliest scan. Empty without uncertainty columns."""
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
                # NaN when a scan has no intervals (its uncertainty step failed): the
                # change is then neither significant nor not
                lsc = least_significant_change(float(base[sd_col]), float(f[sd_col]), level)
                rows.append({"patient": patient, "baseline": base["timepoint"],
                             "timepoint": f["timepoint"], "months": float(f["months"]),
                             "metric": metric, "baseline_value": float(base[metric]),
                             "value": float(f[metric]), "change": change,
                             "change_pct": 100 * change / float(base[metric]),
                             "lsc": lsc, "significant": (
                                 bool(abs(change) > lsc)
                                 if math.isfinite(lsc) and math.isfinite(change) else None)})
    return pd.DataFrame(rows, columns=["patient", "baseline", "timepoint", "months", "metric",
                                       "baseline_value", "value", "change", "change_pct",
                                       "lsc", "significant"])


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
    for col in ("kernel", "manufacturer"):  # text read back from a CSV: NaN when empty
        if col in df.columns:
            df[col] = as_text(df[col])
    if set(PROTOCOL_COLUMNS) <= set(df.columns):
        df["protocol_change"] = protocol_changes(df)
    ordered = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    df = df[ordered].sort_values(["patient", "months"], kind="mergesort")
    return df.reset_index(drop=True)


#: Text columns of the clinical categories (read as text even when all empty).
TEXT_COLUMNS: dict[str, type] = {c: str for c in (
    "sex", "strength_category", "strength_category_source", "vbmd_category",
    "vbmd_category_source", "kernel", "manufacturer", "protocol_change")}


#: What every cohort output says when the long table has no rows.
NO_SCAN_KEPT = "No scan of this cohort was kept: every scan was refused by a gate or excluded"


def read_long_table(long_csv: str | os.PathLike, *, allow_empty: bool = False
                    ) -> pd.DataFrame:
    """Read and check a long table CSV written by :func:`aggregate`; one without rows (every
    scan refused or excluded) is an error unless ``allow_empty``."""
    long_csv = Path(long_csv)
    if not long_csv.is_file():
        raise QctfeaError(f"{long_csv}: long table not found; run the aggregate step first")
    try:
        df = pd.read_csv(long_csv, dtype={"patient": str, "timepoint": str,
                                          "areal_bmd_source": str, **TEXT_COLUMNS})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise QctfeaError(f"{long_csv}: cannot read the long table ({exc})") from exc
    df = longitudinal_table(df.to_dict("records"))
    if df.empty and not allow_empty:
        raise QctfeaError(
            f"{long_csv}: long table has no rows. {NO_SCAN_KEPT} "
            f"({long_csv.parent / 'exclusions.csv'} lists them and why, "
            "and logs/<cohort>/failures.txt the failed jobs); no cohort tables, statistics or "
            "figures can be made of none")
    return df


def check_metrics(df: pd.DataFrame, metrics: Sequence[str]) -> None:
    """Refuse a long table that lacks any of ``metrics`` as a column."""
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
    cohort config excluded or a gate refused (``excluded`` entries, see
    :func:`qctfea.cohort.exclusions.read_exclusions`) not counted."""
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
