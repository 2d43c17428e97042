"""The cohort's results as English sentences (summary.json's headlines, the summary page).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from qctfea.cohort.exclusions import BY_CONFIG, planned_scans
from qctfea.cohort.longtable import (AREAL, as_text, label, missing_scans, timepoint_months,
                                     unit)


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
    n_pat_planned, planned = planned_scans(df, excluded)
    missing = missing_scans(df, excluded)
    s = (f"Data: {len(df)} of {planned} planned scans ({n_pat_planned} patients x "
         f"{planned // max(n_pat_planned, 1)} timepoints; analysed: {n_pat} patients, "
         f"timepoints {', '.join(map(str, tpm.index))})")
    by_config = [e for e in excluded if e.get("excluded_by", BY_CONFIG) == BY_CONFIG]
    refused = [e for e in excluded if e.get("excluded_by", BY_CONFIG) not in (BY_CONFIG, "")]
    unknown = [e for e in excluded if e.get("excluded_by", BY_CONFIG) == ""]
    if unknown:  # an exclusions file written before it said which
        s += "; excluded or refused: " + ", ".join(
            f"{e['patient']} {e['timepoint']} ({e['reason']})" for e in unknown)
    if by_config:
        s += "; excluded by the cohort config: " + ", ".join(
            f"{e['patient']} {e['timepoint']} ({e['reason']})" for e in by_config)
    if refused:
        s += "; refused by a gate: " + ", ".join(
            f"{e['patient']} {e['timepoint']} ({e['excluded_by']}: {e['reason']})"
            for e in refused)
    if missing:
        s += f"; missing {', '.join(f'{p} {t}' for p, t in missing)}"
    absent = {p for p, _ in missing_scans(df)}
    if not absent:
        return s + ("; none missing." if not excluded else ".")
    complete = n_pat - len(absent)
    return (s + f". Paired tests use the "
            f"patients with both scans (n per test in stats/changes.csv), the mixed models all "
            f"{len(df)} scans, the Friedman test the {complete} patients with every timepoint.")


def _protocol_sentence(df: pd.DataFrame) -> str | None:
    """The follow-ups acquired differently from their baseline (long table column
    ``protocol_change``), whose changes mix treatment and protocol; None when there are none."""
    if "protocol_change" not in df.columns:
        return None
    changed = df[as_text(df["protocol_change"]) != ""]
    if changed.empty:
        return None
    items = "; ".join(f"{r.patient} {r.timepoint}: {r.protocol_change}"
                      for r in changed.itertuples())
    return (f"Protocol: {len(changed)} follow-up scan(s) acquired differently from their "
            f"baseline ({items}); their changes from baseline mix treatment and protocol "
            "(longitudinal.csv, protocol_change).")


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
    if s := _protocol_sentence(df):
        lines.append(s)
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
