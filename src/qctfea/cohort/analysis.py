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

This module holds the steps (read and write files); the work is in
:mod:`qctfea.cohort.longtable` (the per-scan rows, reading the long table back),
:mod:`qctfea.cohort.summaries` (the tables and tests computed from it) and
:mod:`qctfea.cohort.headlines` (the sentences).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from qctfea.cohort import clinical
from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, provenance, read_json, write_json
from qctfea.cohort.exclusions import planned_scans, read_exclusions
from qctfea.cohort.headlines import headlines
from qctfea.cohort.longtable import (
    DEFAULT_METRICS, NO_SCAN_KEPT, SCAN_FILES, SIDE_METRICS, opt_float,
    available_metrics, least_significant_changes, longitudinal_table, missing_scans,
    placement_columns,
    protocol_columns, read_long_table, registration_columns, scan_row, timepoint_months,
    uncertainty_columns, with_resolved_areal,
)
from qctfea.cohort.summaries import (
    DEFAULT_COMPARISONS, DEFAULT_CORRELATIONS, baseline_characteristics, change_from_baseline,
    compare_correlations, correlation_table, friedman_tests, mixed_models, paired_change_tests,
    present_pairs, summary_by_timepoint, wide_table,
)

log = logging.getLogger(__name__)


def aggregate(
    sample_rows: list[dict], results_dir: str | os.PathLike, out_csv: str | os.PathLike,
    cases: Sequence[str] = ("compression", "pullout"),
    clinical_cfg: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Read the per-scan JSONs of every sample and write the long table CSV.

    ``cases`` are the load cases run (``loads.cases``): without ``"pullout"`` no pullout
    file is read and the table has no pullout or around-screw columns. With it, each scan's
    model screws.json gives the screws' grades. A scan a gate refused (its inputs or its
    baseline's, its calibration or its baseline's, its label map's checks or its
    baseline's, its model's screws at planning, its registration to baseline, a load case
    without a peak) is left out (``tables/exclusions.csv`` lists it with the refusal).

    ``sample_rows`` are dicts with ``patient``, ``timepoint``, ``months`` and an
    optional ``dxa`` (areal BMD in g/cm2, or None/NaN), ``sex`` (F/M, female/male; empty
    or absent: not given) and ``model_timepoint`` (whose mesh the scan's model used;
    default its own). ``clinical_cfg`` is the cohort config's ``clinical`` section (the
    thresholds of the clinical categories; None: the published ones). Files are read from
    ``results_dir/<patient>/<timepoint>/`` (the mesh's from the model timepoint). A missing
    or unreadable file raises :class:`QctfeaError` naming the file, the patient and the
    timepoint.
    """
    if not sample_rows:
        raise QctfeaError("aggregate: no samples given; check the cohort sample sheet")
    thresholds = clinical.clinical_params(clinical_cfg)
    root = Path(results_dir)
    rows = []
    for sample in sample_rows:
        patient, timepoint, months, sex, where = _sample_fields(sample)
        scan_dir = root / patient / timepoint
        # A follow-up registered to baseline uses the baseline's mesh.
        model_dir = root / patient / str(sample.get("model_timepoint") or timepoint)
        data = _read_scan_files(scan_dir, model_dir, cases, where)
        if data is None:
            continue
        try:
            dxa = opt_float(sample.get("dxa"))
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
                row |= registration_columns(data["registration"])
            if (scan_dir / "scan.json").is_file():  # the acquisition (ingest step)
                row |= protocol_columns(read_json(scan_dir / "scan.json"))
            if (scan_dir / "uncertainty.json").is_file():  # uncertainty.enabled
                row |= uncertainty_columns(read_json(scan_dir / "uncertainty.json"))
        except QctfeaError as exc:
            raise QctfeaError(f"{where} ({scan_dir}): {exc}") from exc
        rows.append(row)
    df = longitudinal_table(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _sample_fields(sample: Mapping[str, Any]) -> tuple[str, str, float, str, str]:
    """A sample sheet row's patient, timepoint, months and sex code, and the scan's name for
    messages; a row without them, or with an unknown sex, is an error."""
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
    return patient, timepoint, months, sex, where


def _read_scan_files(scan_dir: Path, model_dir: Path, cases: Sequence[str],
                     where: str) -> dict[str, Any] | None:
    """The scan's result files by key (:data:`SCAN_FILES`; mesh and screws from the model's
    folder), or None when a gate refused the scan, read in the pipeline's order: its
    inputs or its model's (scan.json of the ingest step, when there), its calibration or
    its model's (the baseline's), its label map's checks or its model's (vertebra.json of
    the mask step, when there), its model's screws (planning), its model's mesh, its
    registration to baseline (a follow-up), a load case without a peak or whose solve failed
    (all listed in exclusions.csv); nothing after a refusal is read."""
    data: dict[str, Any] = {}

    def read(key: str, path: Path) -> dict:
        try:
            data[key] = read_json(path)
        except QctfeaError as exc:
            raise QctfeaError(f"{where}: cannot read {path.name} ({exc})") from exc
        except OSError as exc:
            raise QctfeaError(f"{where}: cannot read {path.name} at {path} ({exc})") from exc
        return data[key]

    def refused_here_or_in_model(name: str) -> bool:
        """Whether the scan's or its model's record ``name`` (where it exists) holds a
        refusal."""
        return any(read_json(d / name).get("refused")
                   for d in dict.fromkeys((scan_dir, model_dir)) if (d / name).is_file())

    if refused_here_or_in_model("scan.json"):
        return None
    if read("calibration", scan_dir / SCAN_FILES["calibration"]).get("refused") or (
            model_dir != scan_dir and read_json(model_dir / SCAN_FILES["calibration"]).get(
                "refused")):
        return None
    if refused_here_or_in_model("vertebra.json"):
        return None
    if "pullout" in cases and read("screws", model_dir / SCAN_FILES["screws"]).get("refused"):
        return None
    if read("mesh", model_dir / SCAN_FILES["mesh"]).get("refused"):
        return None
    if model_dir != scan_dir and read("registration", scan_dir / "registration.json").get(
            "refused"):
        return None
    keys = [k for k in SCAN_FILES
            if "pullout" in cases or not k.startswith(("pullout", "screws"))]
    load_cases = [k for k in keys if k.startswith(("compression", "pullout"))]
    if any([read(k, scan_dir / SCAN_FILES[k]).get("refused") for k in load_cases]):
        return None  # a load case without a peak: no strength (exclusions.csv)
    for key in keys:
        if key not in data:
            read(key, (model_dir if key in ("mesh", "screws") else scan_dir) / SCAN_FILES[key])
    return data


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
           metrics: Sequence[str] | None = None,
           side_metrics: Sequence[str] = tuple(SIDE_METRICS)) -> dict[str, Path]:
    """Wide table, change from baseline, summary per timepoint and Table 1 as CSV.

    Metrics without any value (e.g. DXA in a cohort without it) are left out.
    ``side_metrics`` (per-side pullout strength and vBMD around each screw) are added to
    ``metrics`` in the wide table and the least significant changes only.
    Returns ``{name: path}`` of the files written (see :data:`TABLE_FILES`).
    """
    df = read_long_table(long_csv, allow_empty=True)
    out = Path(out_dir)
    if df.empty:  # every scan refused or excluded: header-only tables, the page says why
        log.warning(f"qctfea tables: {long_csv} has no rows (no scan kept) -> empty tables")
        paths = {name: out / fname for name, fname in TABLE_FILES.items()}
        for path in paths.values():
            _write_csv(pd.DataFrame(columns=["patient", "timepoint"]), path)
        return paths
    metrics = available_metrics(df, list(metrics or DEFAULT_METRICS))
    # each side's value, change and LSC too (the patient pages show them per side)
    per_side = metrics + available_metrics(df, [m for m in side_metrics if m not in metrics])
    frames = {
        "wide": wide_table(df, per_side),
        "change_from_baseline": change_from_baseline(df, metrics),
        "summary_by_timepoint": summary_by_timepoint(df, metrics),
        "baseline_characteristics": baseline_characteristics(df, metrics),
        # empty (header only) without uncertainty columns (uncertainty.enabled: false)
        "least_significant_change": least_significant_changes(df, per_side),
    }
    paths = {}
    for name, frame in frames.items():
        paths[name] = out / TABLE_FILES[name]
        _write_csv(frame, paths[name])
    missing = missing_scans(df)
    log.info(f"qctfea tables: {len(df)} scans, {df['patient'].nunique()} patients, "
             f"missing {[f'{p} {t}' for p, t in missing] or 'none'} -> {out}")
    return paths


#: Columns of tables/exclusions.csv (scans the cohort config excludes, with the reason).
def statistics(long_csv: str | os.PathLike, out_dir: str | os.PathLike,
               metrics: Sequence[str] | None = None,
               exclusions_csv: str | os.PathLike | None = None) -> dict:
    """Paired tests, Friedman, mixed models, correlations and their comparison.

    Writes the files of :data:`STAT_FILES` in ``out_dir`` and returns the summary
    dict (also ``summary.json``): cohort size, missing scans, scans excluded by the
    cohort config or refused by a gate (``exclusions_csv``, see
    :func:`qctfea.cohort.exclusions.write_exclusions`) with their reasons,
    areal-BMD source per timepoint, the headline sentences and the output paths.
    """
    long_csv = Path(long_csv)
    out = Path(out_dir)
    df = read_long_table(long_csv, allow_empty=True)
    if df.empty:
        return _no_scan_statistics(long_csv, out, exclusions_csv)
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
    n_patients_planned, n_scans_planned = planned_scans(df, excluded)
    summary = {
        "n_patients": int(df["patient"].nunique()),
        "n_patients_planned": n_patients_planned,
        "n_scans": int(len(df)),
        "n_scans_planned": n_scans_planned,
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


#: The headline of a cohort of which no scan was kept.
NO_SCAN_HEADLINE = (f"{NO_SCAN_KEPT} (see Data used: refused and excluded scans, with each "
                    "reason and what to do). There are no results to summarise.")


def _no_scan_statistics(long_csv: Path, out: Path, exclusions_csv) -> dict:
    """The statistics of a cohort of which no scan was kept: header-only tables and a
    summary that lists the refused and excluded scans."""
    log.warning(f"qctfea statistics: {long_csv} has no rows (no scan kept) -> empty statistics")
    paths = {name: out / fname for name, fname in STAT_FILES.items() if name != "summary"}
    for path in paths.values():
        _write_csv(pd.DataFrame(columns=["metric"]), path)
    excluded = read_exclusions(exclusions_csv)
    n_patients_planned, n_scans_planned = planned_scans(
        pd.DataFrame(columns=["patient", "timepoint"]), excluded)
    summary = {
        "n_patients": 0, "n_patients_planned": n_patients_planned, "n_scans": 0,
        "n_scans_planned": n_scans_planned, "timepoints": {},
        "baseline_timepoint": None, "missing_scans": [],
        "excluded_scans": excluded, "metrics": [],
        "areal_bmd_source": {}, "methods": {}, "headlines": [NO_SCAN_HEADLINE],
        "outputs": {k: str(v) for k, v in paths.items()},
        "provenance": provenance("statistics", {}, {
            "long_table": long_csv, **({"exclusions": exclusions_csv} if exclusions_csv
                                       else {})}),
    }
    write_json(out / STAT_FILES["summary"], summary)
    return summary
