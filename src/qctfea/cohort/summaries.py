"""The cohort's tables from the long table: change from baseline, wide and per-timepoint
summaries, baseline characteristics, tests over time (paired, Friedman, mixed models) and
correlations (:mod:`qctfea.cohort.stats` does the statistics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from qctfea.cohort import clinical
from qctfea.cohort import stats as st
from qctfea.cohort.longtable import (
    AREAL, check_metrics, as_text, baseline_timepoint, label, missing_scans, timepoint_months,
    unit, with_resolved_areal,
)


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


def change_from_baseline(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Per-patient change of each metric from that patient's scan at the cohort baseline.

    Long format, one row per metric x patient x timepoint (the baseline row
    included, with zero change): ``metric, patient, timepoint, months,
    baseline_timepoint, baseline_value, value, change_abs, change_pct``.
    ``change_pct`` is ``100 * (value - baseline) / baseline`` (NaN when the
    baseline is 0 or NaN); a patient without a baseline scan has NaN changes.
    """
    check_metrics(df, metrics)
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

    check_metrics(df, metrics)
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
    check_metrics(df, metrics)
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
    counts = as_text(values).replace("", "not given").value_counts()
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


def paired_change_tests(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Paired tests of each follow-up timepoint against the baseline timepoint.

    For each metric and follow-up only patients with non-NaN values at both
    timepoints are paired (``n_pairs``; the others are listed in
    ``patients_not_paired``). ``t``/``p_ttest`` are the paired t test,
    ``p_wilcoxon`` the two-sided Wilcoxon signed-rank p (see
    :func:`qctfea.cohort.stats.paired_tests`); ``*_holm`` are Holm-adjusted over the
    follow-ups of that metric and test.
    """
    check_metrics(df, metrics)
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
    check_metrics(df, metrics)
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
    check_metrics(df, metrics)
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
    check_metrics(data, cols)
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
    check_metrics(data, [c for o, ps in comparisons.items() for c in (o, *ps)])
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
