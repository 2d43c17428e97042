"""Self-contained HTML summary page of a cohort analysis.

:func:`summary_page` writes one HTML file with no external resources (inline
CSS, figures embedded as ``data:`` URIs, no scripts; links only to the per-patient pages
beside it): the headline findings
(each sentence with its numbers, from ``stats/summary.json``), what data were
used and what was missing, the clinical categories of every scan (with their sources and
what they cannot say), Table 1, the tests over time, the mixed models, the
correlations and their comparison, and the figures. It is also one of the
results of the Snakemake report (``snakemake --report``).
"""

from __future__ import annotations

import base64
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from qctfea import __version__
from qctfea.cohort import clinical
from qctfea.cohort import longtable
from qctfea.cohort.exclusions import EXCLUSION_COLUMNS
from qctfea.cohort import summaries
from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, read_json
from qctfea.qc.templating import render

log = logging.getLogger(__name__)

def _cell(v: object) -> tuple[str, bool]:
    """(text, is_text) of one table cell; numbers with 3-4 significant digits."""
    if isinstance(v, bool):
        return ("yes" if v else "no"), True
    if isinstance(v, (int,)) and not isinstance(v, bool):
        return str(v), False
    if isinstance(v, float):
        if not math.isfinite(v):
            return "", False
        if float(v).is_integer() and abs(v) < 1e6:
            return str(int(v)), False
        a = abs(v)
        if a != 0 and (a < 1e-3 or a >= 1e6):
            return f"{v:.3g}", False
        digits = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 1 else 3
        return f"{v:.{digits}f}", False
    return str(v), True


def html_table(frame: pd.DataFrame, columns: Mapping[str, str] | None = None,
               p_columns: Sequence[str] = ()) -> str:
    """An HTML table of ``frame`` (``columns``: column -> header, in order; ``p_columns``:
    p-values, shown as "< 0.001" or with three decimals), rendered by the template
    ``qc/templates/table.html.j2``, which escapes every cell."""
    columns = dict(columns) if columns else {c: c for c in frame.columns}
    cols = [c for c in columns if c in frame.columns]
    rows = []
    for _, r in frame.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if c in p_columns and isinstance(v, float) and math.isfinite(v):
                cells.append((("< 0.001" if v < 0.001 else f"{v:.3f}"), False))
            else:
                cells.append(_cell(v.item() if hasattr(v, "item") else v))
        rows.append(cells)
    return render("table.html.j2", header=[columns[c] for c in cols], rows=rows)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype={"patient": str, "timepoint": str})
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise QctfeaError(f"summary page: cannot read {path} ({exc})") from exc


def _labelled(frame: pd.DataFrame, *cols: str) -> pd.DataFrame:
    out = frame.copy()
    for c in cols:
        if c in out.columns:
            out[c] = out[c].map(lambda m: longtable.label(m) if isinstance(m, str) else m)
    return out


def _figure_caption(path: Path) -> str:
    stem = path.stem
    if stem.startswith("spaghetti_"):
        m = stem[len("spaghetti_"):]
        return (f"{longtable.label(m)}: one line per patient (dashed: a scan is missing), "
                "mean and 95 % CI per timepoint")
    if stem.startswith("scatter_pullout_"):
        p = stem[len("scatter_pullout_"):]
        return (f"pullout strength vs {longtable.label(p)}, per timepoint: least-squares line "
                "and Pearson r")
    if stem.startswith("qc_"):
        return f"QC montage of the per-scan {stem[3:]} pictures (patients x timepoints)"
    return stem


def _placement_table(long_csv) -> pd.DataFrame | None:
    """One row per scan whose model has screws: grade, breach and direction per side, and
    where the table has them the diameter modelled, the convergence (planned screws), the
    pedicle isthmus' narrowest width and whether the screw is wider than it."""
    if long_csv is None or not Path(long_csv).is_file():
        return None
    df = _read_csv(Path(long_csv))
    cols = [f"screw_{k}_{side}{u}" for side in ("left", "right")
            for k, u in (("grade", ""), ("breach", "_mm"))]
    if not set(cols) <= set(df.columns):
        return None
    out = df[["patient", "timepoint"]].copy()
    for side in ("left", "right"):
        out[f"{side}: grade"] = df[f"screw_grade_{side}"]
        out[f"{side}: breach mm"] = df[f"screw_breach_{side}_mm"].map(lambda v: f"{v:.1f}")
        out[f"{side}: direction"] = df[f"screw_breach_direction_{side}"]
        for col, head, fmt in ((f"screw_diameter_{side}_mm", "diameter mm", "{:.1f}"),
                               (f"screw_convergence_{side}_deg", "convergence °", "{:.1f}"),
                               (f"screw_isthmus_width_{side}_mm", "isthmus mm", "{:.1f}")):
            if col in df.columns and df[col].notna().any():
                out[f"{side}: {head}"] = df[col].map(
                    lambda v, f=fmt: "–" if pd.isna(v) else f.format(v))
        col = f"screw_exceeds_isthmus_{side}"
        if col in df.columns and df[col].notna().any():
            out[f"{side}: wider than isthmus"] = df[col].map(_yes_no)
    if "screw_grade_voxel_mm" in df.columns and df["screw_grade_voxel_mm"].notna().any():
        out["graded on voxels of mm"] = df["screw_grade_voxel_mm"].map(
            lambda v: "–" if pd.isna(v) else f"{v:g}")
    return out


def _yes_no(value) -> str:
    """A long-table flag as read back from the CSV (bool, 'True'/'False', or empty)."""
    if pd.isna(value):
        return "–"
    return "yes" if str(value).strip().lower() in ("true", "1", "1.0") else "no"


def _clinical_tables(long_csv) -> tuple[pd.DataFrame, pd.DataFrame, list[str]] | None:
    """The clinical categories of the long table: counts per timepoint, one row per scan,
    and the distinct threshold sources used; None without the columns."""
    if long_csv is None or not Path(long_csv).is_file():
        return None
    df = pd.read_csv(long_csv, dtype={"patient": str, "timepoint": str,
                                      **longtable.TEXT_COLUMNS})
    if not {"strength_category", "vbmd_category"} <= set(df.columns) or df.empty:
        return None
    df = df.sort_values(["months", "patient"], kind="mergesort")
    counts = []
    for tp, g in df.groupby("timepoint", sort=False):
        row = {"timepoint": tp, "scans": len(g)}
        for col, what, known in (("strength_category", "strength", clinical.STRENGTH_CATEGORIES),
                                 ("vbmd_category", "vBMD", clinical.VBMD_CATEGORIES)):
            _, text = summaries.category_counts(g[col], known)
            row[what] = text
        counts.append(row)
    scans = pd.DataFrame({
        "patient": df["patient"], "timepoint": df["timepoint"],
        "sex": longtable.as_text(df.get("sex", pd.Series("", index=df.index))).replace(
            "", "not given"),
        "strength N": df["compression_strength_n"].map(
            lambda v: f"{v:.0f}" if math.isfinite(v) else "n/a"),
        "strength category": longtable.as_text(df["strength_category"]),
        "trabecular vBMD mg/cm³": df["trabecular_vbmd_mg_cm3"].map(
            lambda v: f"{v:.1f}" if math.isfinite(v) else "n/a"),
        "vBMD category": longtable.as_text(df["vbmd_category"])})
    sources = [str(v) for c in ("strength_category_source", "vbmd_category_source")
               if c in df.columns for v in dict.fromkeys(df[c].dropna())]
    return pd.DataFrame(counts), scans, sources


def _clinical_section(long_csv) -> dict | None:
    """The summary page's clinical categories: sources, caveat, counts and every scan."""
    tables = _clinical_tables(long_csv)
    if tables is None:
        return None
    counts, scans, sources = tables
    return {"bct_source": clinical.BCT_SOURCE, "acr_source": clinical.ACR_SOURCE,
            "unknown_sex": clinical.UNKNOWN_SEX, "caveat": clinical.CAVEAT,
            "sources": sources, "counts": html_table(counts), "scans": html_table(scans)}


def summary_page(
    summary_json: str | os.PathLike,
    table_files: Mapping[str, str | os.PathLike],
    stat_files: Mapping[str, str | os.PathLike],
    figure_pngs: Sequence[str | os.PathLike],
    out_html: str | os.PathLike,
    cohort_name: str = "",
    *,
    patient_pages: Sequence[str] = (),
) -> Path:
    """Write the self-contained summary page; return its path.

    ``table_files``/``stat_files`` map the names of :data:`qctfea.cohort.analysis.TABLE_FILES`
    and :data:`qctfea.cohort.analysis.STAT_FILES` to paths; ``figure_pngs`` are embedded
    in the given order (QC montages, named ``qc_*``, full width). ``patient_pages``: the
    patients whose pages (:mod:`qctfea.qc.patient_page`) are linked, as the relative links
    ``patients/<patient>.html`` beside this page.
    """
    summary = read_json(summary_json)
    kept = summary.get("n_scans", 1) > 0  # else every scan was refused: the reasons only
    t = {k: _read_csv(Path(v)) for k, v in table_files.items()
         if k != "longitudinal" and kept}
    s = {k: _read_csv(Path(v)) for k, v in stat_files.items() if k != "summary" and kept}
    longitudinal = table_files.get("longitudinal") if kept else None
    placement = _placement_table(longitudinal) if kept else None
    pngs = [Path(f) for f in figure_pngs] if kept else []  # their pictures say "no scan"
    doc = render(
        "summary.html.j2",
        title=f"qctfea cohort summary{': ' + cohort_name if cohort_name else ''}",
        n_patients=summary.get("n_patients"), n_scans=summary.get("n_scans"),
        n_patients_planned=summary.get("n_patients_planned", summary.get("n_patients")),
        n_scans_planned=summary.get("n_scans_planned"),
        timepoints=list(summary.get("timepoints", {})), version=__version__,
        created=time.strftime("%Y-%m-%d %H:%M"), patient_pages=list(patient_pages),
        **_data_context(summary),
        placement_table=html_table(placement) if placement is not None else None,
        clinical=_clinical_section(longitudinal), sections=_table_sections(t, s),
        figures=_figures(pngs))
    out = Path(out_html)
    with atomic_path(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    log.info(f"qctfea report: summary page with {len(pngs)} figures -> {out}")
    return out


def _data_context(summary: dict) -> dict:
    """Headline findings, the data used (missing and excluded or refused scans), the
    areal-BMD source and the methods, for the template."""
    excluded = summary.get("excluded_scans", [])
    return {
        "headlines": summary.get("headlines", []),
        "missing": [f"{m['patient']} {m['timepoint']}"
                    for m in summary.get("missing_scans", [])],
        "excluded_table": (html_table(pd.DataFrame(excluded,
                                                   columns=EXCLUSION_COLUMNS))
                           if excluded else None),
        "areal_sources": [f"{k}: {v}" for k, v in summary.get("areal_bmd_source", {}).items()],
        "methods": summary.get("methods", {}),
    }


def _table_sections(t: dict, s: dict) -> list[dict]:
    """Table 1, the summary per timepoint and the statistics tables (``t``: the tables,
    ``s``: the statistics, by name), each as {id, title, intro, table} for the template."""
    out: list[dict] = []

    def section(id_: str, title: str, table: str, intro: str = "") -> None:
        out.append({"id": id_, "title": title, "intro": intro, "table": table})

    if "baseline_characteristics" in t:
        section("table1", "Table 1: baseline characteristics", html_table(
            t["baseline_characteristics"], {
                "characteristic": "characteristic", "unit": "unit", "n": "n",
                "mean_sd": "mean ± SD", "median_iqr": "median [IQR]"}))
    if "summary_by_timepoint" in t:
        sbt = t["summary_by_timepoint"]
        sbt = _labelled(sbt[sbt["quantity"] == "value"], "metric")
        section("timepoints", "Summary per timepoint", html_table(sbt, {
            "metric": "metric", "timepoint": "timepoint", "n": "n", "n_missing": "missing",
            "mean_sd": "mean ± SD", "median_iqr": "median [IQR]"}))
    if "changes" in s:
        section("changes", "Each follow-up vs baseline (paired)", html_table(
            _labelled(s["changes"], "metric"), {
                "metric": "metric", "timepoint": "follow-up", "n_pairs": "pairs",
                "mean_baseline": "mean baseline", "mean_followup": "mean follow-up",
                "mean_change_pct": "mean change %", "p_ttest": "paired t p",
                "p_ttest_holm": "Holm", "p_wilcoxon": "Wilcoxon p",
                "p_wilcoxon_holm": "Holm", "patients_not_paired": "not paired"},
            p_columns=("p_ttest", "p_ttest_holm", "p_wilcoxon", "p_wilcoxon_holm")))
    if "friedman" in s:
        section("friedman", "Friedman test across all timepoints", html_table(
            _labelled(s["friedman"], "metric"), {
                "metric": "metric", "n_complete": "patients used", "n_patients": "patients",
                "chi2": "chi²", "df": "df", "p": "p", "patients_excluded": "excluded"},
            p_columns=("p",)))
    if "mixed_models" in s:
        mm = s["mixed_models"]
        mm = _labelled(mm[mm["term"].astype(str).str.contains(" - ")
                          | (mm["term"] == "months")], "metric")
        section("mixed", "Linear mixed models (random intercept per patient, REML)",
                html_table(mm, {
                    "metric": "metric", "model": "model", "term": "term",
                    "estimate": "estimate", "ci_low": "95 % CI low",
                    "ci_high": "95 % CI high", "df": "df", "p": "p", "n_obs": "scans",
                    "n_patients": "patients", "icc": "ICC", "note": "note"},
                    p_columns=("p",)),
                "Change at each follow-up vs baseline (model with time as a factor) and "
                "change per month (linear model).")
    if "correlations" in s:
        section("correlations", "Correlations per timepoint", html_table(
            _labelled(s["correlations"], "outcome", "predictor"), {
                "timepoint": "timepoint", "outcome": "outcome", "predictor": "predictor",
                "predictor_source": "source", "n": "n", "r": "Pearson r",
                "ci_low": "95 % CI low", "ci_high": "95 % CI high", "p": "p",
                "rho_spearman": "Spearman rho", "p_spearman": "p (rho)"},
            p_columns=("p", "p_spearman")))
    if "correlation_comparison" in s:
        section("comparison", "QCT vs areal BMD: dependent correlations", html_table(
            _labelled(s["correlation_comparison"], "outcome", "predictor_qct"), {
                "timepoint": "timepoint", "outcome": "outcome",
                "predictor_qct": "QCT predictor", "areal_source": "areal BMD", "n": "n",
                "r_qct": "r(QCT)", "r_areal": "r(areal)", "r_qct_areal": "r(QCT, areal)",
                "williams_t": "Williams t", "df": "df", "p_williams": "p",
                "steiger_z": "Steiger z", "p_steiger": "p",
                "p_steiger_greater": "p (one-sided)"},
            p_columns=("p_williams", "p_steiger", "p_steiger_greater")))
    return out


def _figures(pngs: list[Path]) -> list[dict]:
    """The figures (QC montages, ``qc_*``, full width) with their captions and PNG data
    for ``data:`` URIs; a missing figure is an error."""
    for f in pngs:
        if not f.is_file():
            raise QctfeaError(f"summary page: figure {f} not found")
    return [{"data": base64.b64encode(f.read_bytes()).decode("ascii"),
             "caption": _figure_caption(f), "file": f.name, "wide": f.stem.startswith("qc_")}
            for f in pngs]
