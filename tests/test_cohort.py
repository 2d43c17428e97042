"""Tests of qctfea.cohort.analysis: every statistic against an independent computation."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from qctfea.cohort import analysis as cohort
from qctfea.cohort import exclusions, longtable
from qctfea.cohort import summaries
from qctfea.errors import QctfeaError

# --------------------------------------------------------------------------- fixtures


def _fake_scan(trab: float, screw_l: float, screw_r: float, f_l: float, f_r: float) -> dict:
    """Per-scan JSON contents as the pipeline writes them."""
    prov = {"step": "fake"}
    comp = {"stiffness_n_per_mm": 20 * trab, "strength_n": 40 * trab, "n_dofs": 3000,
            "ksp_iterations": 50, "mpi_ranks": 1, "n_cells": 1000, "provenance": prov}
    return {
        "bmd.json": {"trabecular_vbmd_mg_cm3": trab, "integral_vbmd_mg_cm3": 1.5 * trab,
                     "areal_bmd_g_cm2": trab / 100.0,
                     "around_screw_vbmd_mg_cm3": {"left": screw_l, "right": screw_r},
                     "provenance": prov},
        "compression.json": comp,
        "pullout_left.json": {"stiffness_n_per_mm": 10 * f_l / 100, "strength_n": f_l,
                              "n_dofs": 2000, "ksp_iterations": 31, "provenance": prov},
        "pullout_right.json": {"stiffness_n_per_mm": 10 * f_r / 100, "strength_n": f_r,
                               "n_dofs": 2000, "ksp_iterations": 33, "provenance": prov},
        "mesh.json": {"n_cells": 1000, "n_vertices": 300, "min_dihedral_deg": 12.0},
        "calibration.json": {"slope": 0.8, "intercept": -1.0, "r2": 0.999},
        "screws.json": {"screws": [
            {"side": "left", "placement": {"grade": "A", "breach_mm": 0.0, "direction": "none"}},
            {"side": "right", "placement": {"grade": "B", "breach_mm": 1.2,
                                            "direction": "lateral"}}]},
    }


def _write_scan(root: Path, patient: str, timepoint: str, files: dict) -> None:
    d = root / patient / timepoint
    d.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (d / name).write_text(json.dumps(content))


def _row(patient: str, timepoint: str, months: float, **metrics: float) -> dict:
    return {"patient": patient, "timepoint": timepoint, "months": months, **metrics}


# --------------------------------------------------------------------------- scan_row / table


def test_scan_row_flattens_and_averages_sides() -> None:
    f = _fake_scan(150.0, 200.0, 220.0, 900.0, 1100.0)
    row = longtable.scan_row(
        "P01", "M12", 12, f["bmd.json"], f["compression.json"],
        {"left": f["pullout_left.json"], "right": f["pullout_right.json"]},
        f["mesh.json"], f["calibration.json"], None,
    )
    # every column but the screws' grades, which aggregate() adds from screws.json
    assert list(row) == [c for c in longtable.COLUMNS
                         if not c.startswith(("screw_", "registration_"))]
    assert row["around_screw_vbmd_mg_cm3"] == pytest.approx(210.0)
    assert row["pullout_strength_n"] == pytest.approx(1000.0)
    assert row["pullout_stiffness_n_per_mm"] == pytest.approx(100.0)
    assert math.isnan(row["dxa_areal_bmd_g_cm2"])
    assert row["areal_bmd_g_cm2"] == pytest.approx(1.5)  # CT value when no DXA
    assert row["compression_strength_n"] == pytest.approx(6000.0)
    assert row["pullout_iterations_left"] == 31 and row["pullout_iterations_right"] == 33
    assert row["mesh_cells"] == 1000 and row["n_dofs"] == 3000
    with_dxa = longtable.scan_row(
        "P01", "M12", 12, f["bmd.json"], f["compression.json"],
        {"left": f["pullout_left.json"], "right": f["pullout_right.json"]},
        f["mesh.json"], f["calibration.json"], 0.9,
    )
    assert with_dxa["areal_bmd_g_cm2"] == 0.9 and with_dxa["ct_areal_bmd_g_cm2"] == 1.5


def test_scan_row_source_and_keys_it_does_not_use() -> None:
    f = _fake_scan(150.0, 200.0, 220.0, 900.0, 1100.0)
    # Keys another analysis may add are ignored; iteration counts are optional.
    f["compression.json"].update(analysis="nonlinear", curve=[{"u": 0, "f": 0}],
                                 newton_iterations=12)
    del f["pullout_right.json"]["ksp_iterations"]
    row = longtable.scan_row(
        "P01", "M12", 12, f["bmd.json"], f["compression.json"],
        {"left": f["pullout_left.json"], "right": f["pullout_right.json"]},
        f["mesh.json"], f["calibration.json"], None,
    )
    assert list(row) == [c for c in longtable.COLUMNS
                         if not c.startswith(("screw_", "registration_"))]
    assert row["areal_bmd_source"] == "ct" and math.isnan(row["pullout_iterations_right"])
    assert row["compression_strength_n"] == pytest.approx(6000.0)


def test_scan_row_missing_key_names_file() -> None:
    f = _fake_scan(150.0, 200.0, 220.0, 900.0, 1100.0)
    del f["pullout_right.json"]["strength_n"]
    with pytest.raises(QctfeaError, match=r"pullout_right\.json.*strength_n"):
        longtable.scan_row(
            "P01", "M12", 12, f["bmd.json"], f["compression.json"],
            {"left": f["pullout_left.json"], "right": f["pullout_right.json"]},
            f["mesh.json"], f["calibration.json"], None,
        )


def test_longitudinal_table_sorts_and_rejects_duplicates() -> None:
    rows = [_row("B", "M12", 12, x=1.0), _row("A", "M24", 24, x=2.0),
            _row("A", "M00", 0, x=3.0), _row("B", "M00", 0, x=4.0)]
    df = longtable.longitudinal_table(rows)
    assert list(zip(df["patient"], df["timepoint"], strict=True)) == [
        ("A", "M00"), ("A", "M24"), ("B", "M00"), ("B", "M12")]
    with pytest.raises(QctfeaError, match=r"B M12 \(2 rows\)"):
        longtable.longitudinal_table([*rows, _row("B", "M12", 12.1, x=5.0)])


# --------------------------------------------------------------------------- change


def test_change_from_baseline_hand_numbers() -> None:
    df = longtable.longitudinal_table([
        _row("A", "M00", 0, v=200.0), _row("A", "M12", 12, v=180.0),
        _row("A", "M24", 24, v=150.0),
        _row("B", "M12", 12, v=50.0), _row("B", "M24", 24, v=55.0),  # no baseline scan
        _row("C", "M00", 0, v=0.0), _row("C", "M12", 12, v=10.0),
    ])
    out = summaries.change_from_baseline(df, ["v"]).set_index(["patient", "timepoint"])
    assert (out["baseline_timepoint"] == "M00").all()
    assert out.loc[("A", "M00"), "change_pct"] == 0.0
    assert out.loc[("A", "M12"), "change_abs"] == pytest.approx(-20.0)
    assert out.loc[("A", "M12"), "change_pct"] == pytest.approx(-10.0)
    assert out.loc[("A", "M24"), "change_pct"] == pytest.approx(-25.0)
    # B has no M00 scan: no change from baseline (not a change from its M12 scan).
    assert math.isnan(out.loc[("B", "M24"), "baseline_value"])
    assert math.isnan(out.loc[("B", "M24"), "change_abs"])
    assert out.loc[("C", "M12"), "change_abs"] == 10.0
    assert math.isnan(out.loc[("C", "M12"), "change_pct"])  # zero baseline
    assert list(summaries.change_from_baseline(df, ["v"]).columns) == summaries.CHANGE_COLUMNS


def _exact_wilcoxon_two_sided(d: np.ndarray) -> float:
    """Exact two-sided signed-rank p by enumerating all 2^n sign assignments."""
    ranks = stats.rankdata(np.abs(d))
    w_obs = ranks[d > 0].sum()
    w_all = np.array([sum(r for r, s in zip(ranks, signs, strict=True) if s)
                      for signs in itertools.product([0, 1], repeat=len(d))])
    p_low = np.mean(w_all <= w_obs + 1e-12)
    p_high = np.mean(w_all >= w_obs - 1e-12)
    return min(1.0, 2.0 * min(p_low, p_high))


def test_paired_tests_against_hand_formulas_and_nan_handling() -> None:
    base = {"P1": 100.0, "P2": 120.0, "P3": 90.0, "P4": 110.0, "P5": 105.0, "P6": 95.0}
    follow = {"P1": 104.0, "P2": 121.5, "P3": 97.0, "P4": 108.0, "P5": 115.0, "P6": np.nan}
    rows = [_row(p, "M00", 0, v=b) for p, b in base.items()]
    rows += [_row(p, "M24", 24, v=f) for p, f in follow.items() if p != "P5"]
    rows.append(_row("P5", "M24", 23.5, v=follow["P5"]))
    rows.append(_row("P7", "M24", 24, v=130.0))  # no baseline: excluded
    df = longtable.longitudinal_table(rows)
    res = summaries.paired_change_tests(df, ["v"])
    assert list(res.columns) == summaries.PAIRED_COLUMNS
    assert len(res) == 1
    r = res.iloc[0]
    assert r["timepoint"] == "M24" and r["months"] == 24.0
    # Pairs: P1..P5 (P6 NaN at follow-up, P7 lacks the baseline).
    b = np.array([100.0, 120.0, 90.0, 110.0, 105.0])
    f = np.array([104.0, 121.5, 97.0, 108.0, 115.0])
    d = f - b
    n = 5
    assert r["n_pairs"] == n
    assert r["mean_baseline"] == pytest.approx(b.sum() / n)
    assert r["mean_followup"] == pytest.approx(f.sum() / n)
    assert r["mean_change"] == pytest.approx(d.sum() / n)
    assert r["mean_change_pct"] == pytest.approx(sum(100 * d / b) / n)
    sd = math.sqrt(sum((d - d.mean()) ** 2) / (n - 1))
    assert r["sd_change"] == pytest.approx(sd)
    t_hand = d.mean() / (sd / math.sqrt(n))
    assert r["t"] == pytest.approx(t_hand)
    assert r["p_ttest"] == pytest.approx(2 * stats.t.sf(abs(t_hand), n - 1))
    # d = [4, 1.5, 7, -2, 10]: distinct |d|, no zeros -> exact distribution.
    assert r["p_wilcoxon"] == pytest.approx(_exact_wilcoxon_two_sided(d))
    # By hand: ranks of |d| are 3,1,4,2,5, W- = 2; subsets of {1..5} with sum <= 2: {}, {1}, {2}.
    assert r["p_wilcoxon"] == pytest.approx(2 * 3 / 32)
    # One follow-up: Holm leaves p as is. The table says who was not paired.
    assert r["p_ttest_holm"] == pytest.approx(r["p_ttest"])
    assert r["n_patients"] == 7 and r["patients_not_paired"] == "P6;P7"


def test_wilcoxon_exact_hand_value() -> None:
    # d = [1, 2, 3, 4, 5, -6]: W- = 6; P(W- <= 6) over 64 sign patterns = 14/64.
    d = np.array([1.0, 2.0, 3.0, 4.0, 5.0, -6.0])
    assert _exact_wilcoxon_two_sided(d) == pytest.approx(2 * 14 / 64)
    rows = [_row(f"P{i}", "M00", 0, v=10.0) for i in range(6)]
    rows += [_row(f"P{i}", "M12", 12, v=10.0 + di) for i, di in enumerate(d)]
    r = summaries.paired_change_tests(longtable.longitudinal_table(rows), ["v"]).iloc[0]
    assert r["p_wilcoxon"] == pytest.approx(2 * 14 / 64)


def test_paired_tests_degenerate_cases() -> None:
    rows = [_row("A", "M00", 0, v=1.0, w=1.0), _row("A", "M12", 12, v=2.0, w=1.0),
            _row("B", "M00", 0, v=1.0, w=2.0), _row("B", "M12", 12, v=np.nan, w=2.0)]
    res = summaries.paired_change_tests(longtable.longitudinal_table(rows), ["v", "w"])
    v = res[res["metric"] == "v"].iloc[0]
    assert v["n_pairs"] == 1 and v["mean_change"] == 1.0
    assert math.isnan(v["t"]) and math.isnan(v["p_wilcoxon"]) and math.isnan(v["sd_change"])
    w = res[res["metric"] == "w"].iloc[0]  # all differences zero
    assert w["n_pairs"] == 2 and w["mean_change"] == 0.0
    assert math.isnan(w["p_wilcoxon"]) and math.isnan(w["t"])


# --------------------------------------------------------------------------- correlation


def test_pearson_against_hand_formula() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=20)
    y = 0.6 * x + rng.normal(size=20)
    x[4] = np.nan
    y[11] = np.nan
    res = summaries.pearson_with_ci(x, y)
    keep = ~(np.isnan(x) | np.isnan(y))
    xs, ys = x[keep], y[keep]
    n = len(xs)
    assert res["n"] == n == 18
    cov = np.sum((xs - xs.mean()) * (ys - ys.mean())) / (n - 1)
    r_hand = cov / (np.std(xs, ddof=1) * np.std(ys, ddof=1))
    assert res["r"] == pytest.approx(r_hand, rel=1e-12)
    t = r_hand * math.sqrt((n - 2) / (1 - r_hand**2))
    assert res["p"] == pytest.approx(2 * stats.t.sf(abs(t), n - 2), rel=1e-9)
    z, se = math.atanh(r_hand), 1 / math.sqrt(n - 3)
    assert res["ci_low"] == pytest.approx(math.tanh(z - 1.959963984540054 * se))
    assert res["ci_high"] == pytest.approx(math.tanh(z + 1.959963984540054 * se))
    # Spearman = Pearson of ranks (no ties here).
    rx, ry = stats.rankdata(xs), stats.rankdata(ys)
    rho = np.corrcoef(rx, ry)[0, 1]
    assert res["rho_spearman"] == pytest.approx(rho)
    ts = rho * math.sqrt((n - 2) / (1 - rho**2))
    assert res["p_spearman"] == pytest.approx(2 * stats.t.sf(abs(ts), n - 2), rel=1e-9)


def test_fisher_ci_published_example() -> None:
    # r = 0.5, n = 50 -> 95 % CI (0.2575, 0.6833): by hand, atanh(0.5) = 0.549306,
    # se = 1/sqrt(47) = 0.145865, 1.959964 * se = 0.285890, tanh(0.263416) = 0.25749,
    # tanh(0.835196) = 0.68326.
    z, se = math.atanh(0.5), 1 / math.sqrt(47)
    assert math.tanh(z - 1.959964 * se) == pytest.approx(0.25749, abs=1e-5)
    assert math.tanh(z + 1.959964 * se) == pytest.approx(0.68326, abs=1e-5)
    # Construct data with r exactly 0.5, n = 50: y = 0.5 x + sqrt(0.75) e, x _|_ e.
    rng = np.random.default_rng(0)
    a, e = rng.normal(size=(2, 50))
    x = (a - a.mean()) / a.std()
    e = e - e.mean()
    e = e - (e @ x) / (x @ x) * x
    e /= e.std()
    y = 0.5 * x + math.sqrt(0.75) * e
    res = summaries.pearson_with_ci(x, y)
    assert res["r"] == pytest.approx(0.5, abs=1e-12)
    assert res["ci_low"] == pytest.approx(0.25749, abs=1e-5)
    assert res["ci_high"] == pytest.approx(0.68326, abs=1e-5)
    # 90 % interval uses z_0.95 = 1.644854.
    res90 = summaries.pearson_with_ci(x, y, alpha=0.10)
    assert res90["ci_low"] == pytest.approx(math.tanh(z - 1.644854 * se), abs=1e-6)


def test_pearson_small_and_constant() -> None:
    r3 = summaries.pearson_with_ci([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert r3["n"] == 3 and r3["r"] == pytest.approx(0.5)
    assert math.isnan(r3["ci_low"]) and math.isnan(r3["ci_high"])
    r2 = summaries.pearson_with_ci([1.0, 2.0, np.nan], [1.0, 3.0, 2.0])
    assert r2["n"] == 2 and all(math.isnan(r2[k]) for k in r2 if k != "n")
    rc = summaries.pearson_with_ci([1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 2.0, 4.0])
    assert rc["n"] == 4 and all(math.isnan(rc[k]) for k in rc if k != "n")


def test_correlation_table_per_timepoint() -> None:
    rows = []
    for i in range(6):
        rows.append(_row(f"P{i}", "M00", 0, out=2.0 * i + (i % 2), a=float(i), b=float(i**2)))
        rows.append(_row(f"P{i}", "M12", 12, out=float(-i), a=float(i), b=float(i % 3)))
    df = longtable.longitudinal_table(rows)
    tab = summaries.correlation_table(df, {"out": ["a", "b"]})
    assert list(tab.columns) == summaries.CORRELATION_COLUMNS
    assert list(zip(tab["timepoint"], tab["predictor"], strict=True)) == [
        ("M00", "a"), ("M00", "b"), ("M12", "a"), ("M12", "b")]
    m12a = tab[(tab["timepoint"] == "M12") & (tab["predictor"] == "a")].iloc[0]
    assert m12a["r"] == pytest.approx(-1.0) and m12a["n"] == 6
    m00 = df[df["timepoint"] == "M00"]
    expect = np.corrcoef(m00["a"], m00["out"])[0, 1]
    got = tab[(tab["timepoint"] == "M00") & (tab["predictor"] == "a")].iloc[0]["r"]
    assert got == pytest.approx(expect)
    with pytest.raises(QctfeaError, match="nope"):
        summaries.correlation_table(df, {"out": ["nope"]})


# --------------------------------------------------------------------------- I/O


def _cohort_dir(root: Path) -> list[dict]:
    samples = []
    rng = np.random.default_rng(1)
    for i in range(5):
        p = f"P{i:02d}"
        for tp, months in (("M00", 0.0), ("M12", 12.0), ("M24", 24.0)):
            trab = 120.0 + 10 * i - months / 4 + rng.normal()
            screw = 180.0 + 15 * i - months / 3
            f = 600.0 + 4 * screw + months + rng.normal(scale=5)
            _write_scan(root, p, tp, _fake_scan(trab, screw - 5, screw + 5, f - 20, f + 20))
            samples.append({"patient": p, "timepoint": tp, "months": months,
                            "dxa": 0.9 + 0.01 * i if tp == "M00" else (None if i else np.nan)})
    return samples


def test_aggregate_reads_jsons_and_writes_csv(tmp_path: Path) -> None:
    res_dir = tmp_path / "results"
    samples = _cohort_dir(res_dir)
    out_csv = tmp_path / "tables" / "long.csv"
    df = cohort.aggregate(samples, res_dir, out_csv)
    assert out_csv.is_file() and len(df) == 15
    assert not list(out_csv.parent.glob(".*part*"))
    back = pd.read_csv(out_csv, dtype={"patient": str, "timepoint": str})
    # every column; registration QC only for follow-ups on their baseline's model (none here)
    assert list(back.columns) == [c for c in longtable.COLUMNS if not c.startswith("registration_")]
    assert set(back["screw_grade_right"]) == {"B"} and set(back["screw_breach_right_mm"]) == {1.2}
    raw = json.loads((res_dir / "P03" / "M12" / "bmd.json").read_text())
    pl = json.loads((res_dir / "P03" / "M12" / "pullout_left.json").read_text())
    pr = json.loads((res_dir / "P03" / "M12" / "pullout_right.json").read_text())
    row = back[(back["patient"] == "P03") & (back["timepoint"] == "M12")].iloc[0]
    assert row["trabecular_vbmd_mg_cm3"] == pytest.approx(raw["trabecular_vbmd_mg_cm3"])
    assert row["pullout_strength_n"] == pytest.approx((pl["strength_n"] + pr["strength_n"]) / 2)
    assert row["areal_bmd_g_cm2"] == pytest.approx(raw["areal_bmd_g_cm2"])  # no DXA at M12
    base = back[(back["patient"] == "P03") & (back["timepoint"] == "M00")].iloc[0]
    assert base["areal_bmd_g_cm2"] == pytest.approx(0.93)  # DXA at M00


#: Hand-written thresholds (N) of the Biomechanical CT (Keaveny et al. 2020, Table 1, spine):
#: fragile at or below the first, normal at or above the second.
BCT = {"F": (4500.0, 6000.0), "M": (6500.0, 8500.0)}


def _strength_category(strength: float, sex: str, thresholds: dict) -> str:
    if sex not in thresholds:
        return "unknown (sex not given)"
    fragile, normal = thresholds[sex]
    return "fragile" if strength <= fragile else "normal" if strength >= normal else "low"


def _vbmd_category(vbmd: float) -> str:
    """ACR: osteoporosis < 80 <= low bone mass <= 120 < normal (mg/cm³)."""
    return "osteoporosis" if vbmd < 80 else "normal" if vbmd > 120 else "low bone mass"


def test_aggregate_writes_the_clinical_categories(tmp_path: Path) -> None:
    """sex (F/M, female/male, or none), the strength and vBMD categories and their sources,
    each from the scan's JSONs by the thresholds written out above; a configured threshold
    replaces the published one, and Table 1 counts the baseline scans' categories."""
    res_dir = tmp_path / "results"
    sexes = {"P00": "F", "P01": "M", "P02": "female", "P03": "", "P04": "MALE"}
    samples = [{**s, "sex": sexes[s["patient"]]} for s in _cohort_dir(res_dir)]
    cats: dict[str, set] = {"strength": set(), "vbmd": set()}
    for cfg, thresholds in ((None, BCT), ({"strength_thresholds_n": {"male": {"normal": 6000}}},
                                          {**BCT, "M": (6500.0, 6000.0)})):
        if cfg:  # crossed thresholds: refused, naming the key
            with pytest.raises(QctfeaError, match=r"strength_thresholds_n\.male: fragile "
                                                  r"\(6500\) must be below normal \(6000\)"):
                cohort.aggregate(samples, res_dir, tmp_path / "long.csv", clinical_cfg=cfg)
            cfg = {"strength_thresholds_n": {"male": {"fragile": 4600, "normal": 6000}}}
            thresholds = {**BCT, "M": (4600.0, 6000.0)}
        out_csv = tmp_path / "long.csv"
        cohort.aggregate(samples, res_dir, out_csv, clinical_cfg=cfg)
        back = longtable.read_long_table(out_csv)
        for row in back.itertuples():
            d = res_dir / row.patient / row.timepoint
            strength = json.loads((d / "compression.json").read_text())["strength_n"]
            vbmd = json.loads((d / "bmd.json").read_text())["trabecular_vbmd_mg_cm3"]
            sex = {"F": "F", "female": "F", "M": "M", "MALE": "M"}.get(sexes[row.patient], "")
            assert (row.sex if isinstance(row.sex, str) else "") == sex
            assert row.strength_category == _strength_category(strength, sex, thresholds)
            assert row.vbmd_category == _vbmd_category(vbmd)
            cats["strength"].add(row.strength_category)
            cats["vbmd"].add(row.vbmd_category)
            if sex == "M" and cfg:
                assert row.strength_category_source.startswith("configured thresholds")
                assert "fragile <= 4600 N < low < 6000 N <= normal" in \
                    row.strength_category_source
            elif sex:
                fragile, normal = BCT[sex]
                assert "Keaveny et al. 2020" in row.strength_category_source
                assert f"fragile <= {fragile:g} N < low < {normal:g} N <= normal" in \
                    row.strength_category_source
            else:
                assert "differ by sex" in row.strength_category_source
            assert "ACR" in row.vbmd_category_source
    # the cohort spans the categories (men: fragile by the BCT, normal by the configured
    # thresholds), so every branch above was taken
    assert cats["strength"] == {"fragile", "low", "normal", "unknown (sex not given)"}
    assert cats["vbmd"] == {"low bone mass", "normal"}
    # Table 1: the baseline scans' sexes and categories, counted here from the long table
    t1 = summaries.baseline_characteristics(back, ["compression_strength_n"]).set_index(
        "characteristic")
    base = back[back["timepoint"] == "M00"]
    assert t1.loc["sex (sample sheet)", "mean_sd"] == "F 2, M 2, not given 1"
    assert t1.loc["sex (sample sheet)", "n"] == 4
    want = [_strength_category(
        json.loads((res_dir / p / "M00" / "compression.json").read_text())["strength_n"],
        {"F": "F", "female": "F", "M": "M", "MALE": "M"}.get(sexes[p], ""),
        {**BCT, "M": (4600.0, 6000.0)}) for p in base["patient"]]
    order = ["fragile", "low", "normal", "unknown (sex not given)"]
    text = ", ".join(f"{c} {want.count(c)}" for c in order if c in want)
    row = t1.loc["vertebral strength category at M00 (BCT, Keaveny et al. 2020)"]
    assert row["mean_sd"] == text and row["n"] == sum(c != order[-1] for c in want)
    assert "trabecular vBMD category at M00 (ACR QCT)" in t1.index


def test_aggregate_refuses_a_bad_sex(tmp_path: Path) -> None:
    res_dir = tmp_path / "results"
    samples = _cohort_dir(res_dir)
    samples[4]["sex"] = "w"
    with pytest.raises(QctfeaError, match=r"P01, timepoint M12, sex: 'w' is not a sex"):
        cohort.aggregate(samples, res_dir, tmp_path / "long.csv")


def test_aggregate_missing_or_bad_file_names_it(tmp_path: Path) -> None:
    res_dir = tmp_path / "results"
    samples = _cohort_dir(res_dir)
    (res_dir / "P02" / "M24" / "pullout_left.json").unlink()
    with pytest.raises(QctfeaError) as err:
        cohort.aggregate(samples, res_dir, tmp_path / "long.csv")
    msg = str(err.value)
    assert "P02" in msg and "M24" in msg and "pullout_left.json" in msg
    assert not (tmp_path / "long.csv").exists()
    (res_dir / "P02" / "M24" / "pullout_left.json").write_text("{}")
    (res_dir / "P01" / "M12" / "mesh.json").write_text("{not json")
    with pytest.raises(QctfeaError, match=r"P01.*M12.*mesh\.json"):
        cohort.aggregate(samples, res_dir, tmp_path / "long.csv")


def test_statistics_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qctfea")
    res_dir = tmp_path / "results"
    samples = _cohort_dir(res_dir)
    long_csv = tmp_path / "long.csv"
    df = cohort.aggregate(samples, res_dir, long_csv)
    out = tmp_path / "stats"
    summary = cohort.statistics(long_csv, out)
    for name in cohort.STAT_FILES.values():
        assert (out / name).is_file(), name
    assert "qctfea statistics" in caplog.text
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["headlines"] == summary["headlines"]
    assert summary["n_patients"] == 5 and summary["n_scans"] == 15
    assert summary["missing_scans"] == []
    # DXA only at M00 in this cohort: the areal BMD source per timepoint says so.
    assert summary["areal_bmd_source"] == {"M00": "clinical DXA", "M12": "CT-derived",
                                           "M24": "CT-derived"}
    changes = pd.read_csv(out / "changes.csv")
    assert set(changes["timepoint"]) == {"M12", "M24"}
    c = changes[(changes["metric"] == "pullout_strength_n") & (changes["timepoint"] == "M24")]
    b = df[df["timepoint"] == "M00"].set_index("patient")["pullout_strength_n"]
    f = df[df["timepoint"] == "M24"].set_index("patient")["pullout_strength_n"]
    pct = (100 * (f - b) / b).mean()
    assert c.iloc[0]["mean_change_pct"] == pytest.approx(pct)
    head = [h for h in summary["headlines"]
            if h.startswith("Pullout strength") and "to M24" in h]
    assert head and f"{abs(pct):.1f} % from M00 to M24" in head[0]
    assert "n = 5 pairs" in head[0] and "Holm" in head[0] and "mixed model (15 scans" in head[0]
    corr_lines = [h for h in summary["headlines"] if h.startswith("At M24, pullout strength")]
    assert corr_lines and "Steiger z = " in corr_lines[0] and "Williams t(2) = " in corr_lines[0]
    assert summary["headlines"][0].startswith("Data: 15 of 15 planned scans")
    corr = pd.read_csv(out / "correlations.csv")
    assert len(corr) == 3 * 2 * 4
    m00 = corr[(corr["timepoint"] == "M00") & (corr["predictor"] == "areal_bmd_g_cm2")]
    assert set(m00["predictor_source"]) == {"clinical DXA"} and set(m00["n"]) == {5}
    mm = pd.read_csv(out / "mixed_models.csv")
    assert set(mm["model"]) == {"timepoint", "linear"}
    # every scan with a value of the metric enters its mixed model: all 15 scans, except
    # the clinical DXA, given at M00 only in this sample sheet
    for metric, n_obs in zip(mm["metric"], mm["n_obs"]):
        assert n_obs == df[metric].notna().sum(), metric
        assert n_obs == (5 if metric == "dxa_areal_bmd_g_cm2" else 15), metric


# --------------------------------------------------------------------------- missing follow-up


def _missing_followup_table() -> pd.DataFrame:
    """6 patients x M00/M12/M24; P3 lacks M12, P5's M24 value is NaN; DXA except P2 M24."""
    rng = np.random.default_rng(8)
    rows = []
    for i in range(6):
        for tp, m in (("M00", 0.0), ("M12", 12.0), ("M24", 24.0)):
            if (i, tp) == (3, "M12"):
                continue
            screw = 170 + 12 * i + 0.5 * m + rng.normal(scale=3)
            rows.append(_row(
                f"P{i}", tp, m, pullout_strength_n=300 + 9 * screw + rng.normal(scale=50),
                compression_strength_n=3000 + 20 * i + 10 * m + rng.normal(scale=40),
                around_screw_vbmd_mg_cm3=screw, trabecular_vbmd_mg_cm3=screw / 2 + rng.normal(),
                integral_vbmd_mg_cm3=screw * 0.8 + rng.normal(),
                ct_areal_bmd_g_cm2=0.5 + screw / 1000 + rng.normal(scale=0.01),
                dxa_areal_bmd_g_cm2=np.nan if (i, tp) == (2, "M24")
                else 0.7 + screw / 800 + rng.normal(scale=0.02)))
    df = longtable.longitudinal_table(rows)
    df.loc[(df["patient"] == "P5") & (df["timepoint"] == "M24"), "pullout_strength_n"] = np.nan
    return df


def test_missing_followup_tables_say_what_was_used() -> None:
    df = _missing_followup_table()
    assert longtable.missing_scans(df) == [("P3", "M12")]
    metrics = ["pullout_strength_n", "dxa_areal_bmd_g_cm2"]
    wide = summaries.wide_table(df, metrics).set_index("patient")
    assert wide.loc["P3", "n_scans"] == 2 and wide.loc["P3", "timepoints_missing"] == "M12"
    assert math.isnan(wide.loc["P3", "pullout_strength_n_M12"])
    p1 = df[df["patient"] == "P1"].set_index("timepoint")["pullout_strength_n"]
    assert wide.loc["P1", "pullout_strength_n_M24_change"] == pytest.approx(p1["M24"] - p1["M00"])
    assert wide.loc["P1", "pullout_strength_n_M24_change_pct"] == pytest.approx(
        100 * (p1["M24"] - p1["M00"]) / p1["M00"])
    summ = summaries.summary_by_timepoint(df, metrics)
    m12 = summ[(summ["metric"] == "pullout_strength_n") & (summ["quantity"] == "value")
               & (summ["timepoint"] == "M12")].iloc[0]
    vals = df.loc[df["timepoint"] == "M12", "pullout_strength_n"].to_numpy()
    assert m12["n"] == 5 and m12["n_missing"] == 1
    assert m12["mean"] == pytest.approx(vals.mean())
    assert m12["sd"] == pytest.approx(vals.std(ddof=1))
    assert m12["median"] == pytest.approx(np.median(vals))
    assert m12["mean_sd"] == f"{vals.mean():.0f} ± {vals.std(ddof=1):.0f}"
    m24 = summ[(summ["metric"] == "pullout_strength_n") & (summ["quantity"] == "change_pct")
               & (summ["timepoint"] == "M24")].iloc[0]
    assert m24["n"] == 5 and m24["n_missing"] == 1  # P5's M24 value is NaN
    t1 = summaries.baseline_characteristics(df, metrics).set_index("characteristic")
    assert t1.loc["scans (present of planned)", "mean_sd"] == "17 of 18; missing P3 M12"
    assert t1.loc["clinical DXA at baseline", "n"] == 6
    base = df.loc[df["timepoint"] == "M00", "pullout_strength_n"]
    assert t1.loc["pullout strength at M00", "mean"] == pytest.approx(base.mean())
    assert t1.loc["pullout strength at M00", "q1"] == pytest.approx(np.percentile(base, 25))


def test_missing_followup_tests_count_pairs() -> None:
    df = _missing_followup_table()
    ch = summaries.paired_change_tests(df, ["pullout_strength_n"]).set_index("timepoint")
    assert ch.loc["M12", "n_pairs"] == 5 and ch.loc["M12", "patients_not_paired"] == "P3"
    assert ch.loc["M24", "n_pairs"] == 5 and ch.loc["M24", "patients_not_paired"] == "P5"
    # Holm over the two follow-ups, by hand.
    p = ch["p_ttest"].to_numpy()
    lo, hi = sorted(p)
    adj = {lo: min(1, 2 * lo), hi: min(1, max(2 * lo, hi))}
    assert ch["p_ttest_holm"].to_numpy() == pytest.approx([adj[v] for v in p])
    # The paired t on the 5 pairs, by hand.
    v = df.pivot(index="patient", columns="timepoint", values="pullout_strength_n")
    d = (v["M12"] - v["M00"]).dropna().to_numpy()
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert ch.loc["M12", "t"] == pytest.approx(t)
    fr = summaries.friedman_tests(df, ["pullout_strength_n"]).iloc[0]
    assert fr["n_complete"] == 4 and fr["patients_excluded"] == "P3;P5"
    assert fr["chi2"] == pytest.approx(stats.friedmanchisquare(
        *v.dropna()[["M00", "M12", "M24"]].to_numpy().T).statistic)


def test_missing_followup_mixed_model_keeps_every_scan() -> None:
    from qctfea.cohort import stats as st

    df = _missing_followup_table()
    mm = summaries.mixed_models(df, ["pullout_strength_n"])
    tp = mm[mm["model"] == "timepoint"].set_index("term")
    assert list(tp.index) == ["Intercept [M00]", "M12 - M00", "M24 - M00"]
    assert (tp["n_obs"] == 16).all() and (tp["n_patients"] == 6).all()  # 17 scans, 1 NaN
    assert (tp["n_patients_complete"] == 4).all()
    sub = df.dropna(subset=["pullout_strength_n"])
    X = np.column_stack([np.ones(len(sub)), sub["timepoint"] == "M12",
                         sub["timepoint"] == "M24"]).astype(float)
    fit = st.random_intercept_lmm(sub["pullout_strength_n"], X, sub["patient"])
    assert tp["estimate"].to_numpy() == pytest.approx(fit.beta)
    assert tp.loc["M24 - M00", "df"] == 16 - 6 - 2
    lin = mm[(mm["model"] == "linear") & (mm["term"] == "months")].iloc[0]
    assert lin["n_obs"] == 16 and lin["estimate"] > 0


def test_missing_followup_correlations_and_comparison() -> None:
    from qctfea.cohort import stats as st

    df = _missing_followup_table()
    corr = summaries.correlation_table(df, summaries.DEFAULT_CORRELATIONS)
    areal = corr[(corr["predictor"] == "areal_bmd_g_cm2")
                 & (corr["outcome"] == "pullout_strength_n")].set_index("timepoint")
    assert (areal["predictor_source"] == "clinical DXA").all()
    # M24: P2 has no DXA and P5 no pullout value -> 4 pairs; M12: P3 missing -> 5.
    assert areal.loc["M24", "n"] == 4 and areal.loc["M12", "n"] == 5
    comp = summaries.compare_correlations(df).set_index(["timepoint", "outcome", "predictor_qct"])
    row = comp.loc[("M24", "pullout_strength_n", "around_screw_vbmd_mg_cm3")]
    sub = df[df["timepoint"] == "M24"][["pullout_strength_n", "around_screw_vbmd_mg_cm3",
                                       "dxa_areal_bmd_g_cm2"]].dropna()
    r = np.corrcoef(sub.to_numpy().T)
    assert row["n"] == 4
    assert row["r_qct"] == pytest.approx(r[0, 1]) and row["r_areal"] == pytest.approx(r[0, 2])
    r12, r13, r23 = r[0, 1], r[0, 2], r[1, 2]
    assert row["steiger_z"] == pytest.approx(st.steiger_z(r12, r13, r23, 4)["statistic"])
    assert row["williams_t"] == pytest.approx(st.williams_t(r12, r13, r23, 4)["statistic"])
    # Without any DXA the CT-derived areal BMD is used, and said so.
    no_dxa = df.assign(dxa_areal_bmd_g_cm2=np.nan)
    c2 = summaries.correlation_table(no_dxa, {"pullout_strength_n": ["areal_bmd_g_cm2"]})
    assert set(c2["predictor_source"]) == {"CT-derived"}
    m00 = no_dxa[no_dxa["timepoint"] == "M00"]
    assert c2.iloc[0]["r"] == pytest.approx(np.corrcoef(m00["ct_areal_bmd_g_cm2"],
                                                        m00["pullout_strength_n"])[0, 1])


def test_statistics_and_tables_with_missing_followup(tmp_path: Path) -> None:
    df = _missing_followup_table()
    long_csv = tmp_path / "tables" / "longitudinal.csv"
    long_csv.parent.mkdir()
    df.to_csv(long_csv, index=False)
    paths = cohort.tables(long_csv, tmp_path / "tables")
    assert {p.name for p in paths.values()} == set(cohort.TABLE_FILES.values())
    s = cohort.statistics(long_csv, tmp_path / "stats")
    assert s["missing_scans"] == [{"patient": "P3", "timepoint": "M12"}]
    assert s["n_scans"] == 17 and s["n_scans_planned"] == 18
    data = s["headlines"][0]
    assert "17 of 18 planned scans" in data and "missing P3 M12" in data
    assert "the mixed models all 17 scans" in data
    # A patient whose every scan a gate refused still counts as planned, named as refused
    ex = tmp_path / "exclusions.csv"
    exclusions.write_exclusions([
        {"patient": "P9", "timepoint": t, "months": m, "reason": "label map off its CT",
         "excluded_by": "accept_vertebra"} for t, m in (("M00", 0.0), ("M12", 12.0),
                                                        ("M24", 24.0))], ex)
    s = cohort.statistics(long_csv, tmp_path / "stats", exclusions_csv=ex)
    assert (s["n_patients"], s["n_patients_planned"]) == (6, 7)
    assert (s["n_scans"], s["n_scans_planned"]) == (17, 21)
    data = s["headlines"][0]
    assert data.startswith("Data: 17 of 21 planned scans (7 patients x 3 timepoints; analysed: "
                           "6 patients")
    assert "refused by a gate: P9 M00 (accept_vertebra: label map off its CT)" in data
    assert "excluded by the cohort config" not in data
    m12 = [h for h in s["headlines"] if h.startswith("Pullout strength") and "to M12" in h][0]
    assert "n = 5 pairs; not paired: P3" in m12 and "mixed model (16 scans of 6 patients)" in m12


def test_exclusions_round_trip_and_need_a_reason(tmp_path: Path) -> None:
    """Entries without ``excluded_by`` are the cohort config's; a gate's refusal keeps its."""
    entries = [{"patient": "P1", "timepoint": "M12", "months": 12.0, "reason": "motion"},
               {"patient": "P2", "timepoint": "M00", "months": 0.0, "reason": "grade D",
                "excluded_by": "accept_screws"}]
    exclusions.write_exclusions(entries, tmp_path / "ex.csv")
    assert exclusions.read_exclusions(tmp_path / "ex.csv") == [
        {**entries[0], "excluded_by": "cohort config"}, entries[1]]
    # a file written before excluded_by existed: who excluded them is not known
    pd.DataFrame(entries)[["patient", "timepoint", "months", "reason"]].to_csv(
        tmp_path / "old.csv", index=False)
    assert [e["excluded_by"] for e in exclusions.read_exclusions(tmp_path / "old.csv")] \
        == ["", ""]
    exclusions.write_exclusions([], tmp_path / "none.csv")
    assert exclusions.read_exclusions(tmp_path / "none.csv") == []
    with pytest.raises(QctfeaError, match="patient P1, timepoint M12 has no reason"):
        exclusions.write_exclusions([{**entries[0], "reason": " "}], tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


def test_placement_and_registration_columns_from_their_records() -> None:
    """screws.json of a planned (left) and a landmark (right) screw: grade, breach, the
    diameter and length modelled, convergence and the isthmus width and flag of the planned
    one (none for a landmark one recorded without them); registration.json: Dice, spread and
    the largest point motion."""
    screws = {"screws": [
        {"side": "left", "diameter_mm": 5.5, "length_mm": 38.0,
         "placement": {"grade": "B", "breach_mm": 1.2, "direction": "lateral",
                       "label_voxel_mm": 2.5},
         "planning": {"convergence_deg": 12.5, "isthmus_min_width_mm": 5.2,
                      "screw_exceeds_isthmus": True}},
        {"side": "right", "diameter_mm": 6.5, "length_mm": 40.0,
         "placement": {"grade": "A", "breach_mm": 0.0, "direction": "none",
                       "label_voxel_mm": 2.5}}]}
    cols = longtable.placement_columns(screws)
    assert {k: v for k, v in cols.items() if k.endswith("_left") or "_left_" in k} == {
        "screw_grade_left": "B", "screw_breach_left_mm": 1.2,
        "screw_breach_direction_left": "lateral", "screw_diameter_left_mm": 5.5,
        "screw_length_left_mm": 38.0, "screw_convergence_left_deg": 12.5,
        "screw_isthmus_width_left_mm": 5.2, "screw_exceeds_isthmus_left": True}
    assert cols["screw_diameter_right_mm"] == 6.5 and cols["screw_grade_right"] == "A"
    assert math.isnan(cols["screw_convergence_right_deg"])
    assert cols["screw_exceeds_isthmus_right"] is None
    assert math.isnan(cols["screw_isthmus_width_right_mm"])
    assert cols["screw_grade_voxel_mm"] == 2.5
    assert set(cols) <= set(longtable.COLUMNS)
    reg = longtable.registration_columns({"dice_after": 0.97, "point_spread_mm": 0.04,
                                          "point_motion_mm": [3.3, 4.8, 4.3]})
    assert reg == {"registration_dice": 0.97, "registration_point_spread_mm": 0.04,
                   "registration_point_motion_max_mm": 4.8}
    with pytest.raises(QctfeaError, match="refused at planning"):
        longtable.placement_columns({"refused": "left screw grade D", "screws": []})


def test_refusal_entries_name_the_first_refusing_gate(tmp_path: Path) -> None:
    """Each scan's gates in order: the first gate whose records refuse names the reason (all
    of that gate's refusals, joined), and the gates after it are never read (their jobs
    did not run: the files do not exist here)."""
    def rec(where: str, refused: str | None = None) -> str:
        path = tmp_path / where  # <patient>/<timepoint>/<record>.json, as the workflow's
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"refused": refused} if refused else {"strength_n": 1.0}))
        return str(path)

    never_made = str(tmp_path / "never_made.json")
    scans = [
        {"patient": "P1", "timepoint": "M00", "months": 0.0,  # every gate passed
         "gates": [[rec("P1/M00/scan.json")], [rec("P1/M00/compression.json"),
                                               rec("P1/M00/pullout_left.json")]]},
        {"patient": "P1", "timepoint": "M12", "months": 12.0,  # registration refused
         "gates": [[rec("P1/M12/scan.json")],
                   [rec("P1/M12/registration.json", "Dice 0.61 < 0.75")], [never_made]]},
        {"patient": "P2", "timepoint": "M00", "months": 0.0,  # two load cases without peak
         "gates": [[rec("P2/M00/scan.json")],
                   [rec("P2/M00/compression.json", "compression: peak not reached"),
                    rec("P2/M00/pullout_left.json"),
                    rec("P2/M00/pullout_right.json", "right: peak not reached")]]},
        {"patient": "P3", "timepoint": "M00", "months": 0.0,  # screws refused at planning
         "gates": [[rec("P3/M00/screws.json", "left screw grade D")], [never_made]]},
        {"patient": "P3", "timepoint": "M12", "months": 12.0,  # its baseline's screws
         "gates": [[rec("P3/M12/scan.json")], [rec("P3/M00/screws.json", "left screw grade D")],
                   [never_made]]},
    ]
    assert exclusions.refusal_entries(scans) == [
        {"patient": "P1", "timepoint": "M12", "months": 12.0,
         "excluded_by": "accept_registration", "reason": "Dice 0.61 < 0.75"},
        {"patient": "P2", "timepoint": "M00", "months": 0.0, "excluded_by": "accept_strength",
         "reason": "compression: peak not reached; right: peak not reached"},
        {"patient": "P3", "timepoint": "M00", "months": 0.0, "excluded_by": "accept_screws",
         "reason": "left screw grade D"},
        {"patient": "P3", "timepoint": "M12", "months": 12.0,
         "excluded_by": "accept_screws (of M00)", "reason": "left screw grade D"}]


# --------------------------------------------------------------------------- uncertainty


def _unc(value: float, sd_scan: float) -> dict:
    return {"value": value, "sd": 3 * sd_scan, "ci_low": value - 6 * sd_scan,
            "ci_high": value + 6 * sd_scan, "sd_scan": sd_scan, "sd_by_source": {}}


def test_uncertainty_columns_and_least_significant_change(tmp_path: Path) -> None:
    """uncertainty.json per scan -> interval and sd_scan columns; the least significant
    change of a follow-up is 1.96 (sd_b² + sd_f²)^½, significant when |change| exceeds it."""
    samples = []
    for tp, months, trab, sd in (("M00", 0, 100.0, 1.0), ("M12", 12, 102.0, 1.0),
                                 ("M24", 24, 106.0, 2.0)):
        f = _fake_scan(trab, 200.0, 220.0, 900.0, 1100.0)
        f["uncertainty.json"] = {"outcomes": {"trabecular_vbmd_mg_cm3": _unc(trab, sd)}}
        _write_scan(tmp_path, "P01", tp, f)
        samples.append({"patient": "P01", "timepoint": tp, "months": months})
    df = cohort.aggregate(samples, tmp_path, tmp_path / "long.csv")
    assert df["trabecular_vbmd_mg_cm3_ci_low"].tolist() == [94.0, 96.0, 94.0]
    assert df["trabecular_vbmd_mg_cm3_sd_scan"].tolist() == [1.0, 1.0, 2.0]
    lsc12, lsc24 = 1.959964 * math.sqrt(2.0), 1.959964 * math.sqrt(5.0)  # 2.77, 4.38
    wide = summaries.wide_table(df, ["trabecular_vbmd_mg_cm3"]).iloc[0]
    assert wide["trabecular_vbmd_mg_cm3_M12_lsc"] == pytest.approx(lsc12, rel=1e-6)
    assert wide["trabecular_vbmd_mg_cm3_M24_lsc"] == pytest.approx(lsc24, rel=1e-6)
    assert not wide["trabecular_vbmd_mg_cm3_M12_significant"]  # +2 < 2.77
    assert wide["trabecular_vbmd_mg_cm3_M24_significant"]  # +6 > 4.38
    lsc = longtable.least_significant_changes(df, ["trabecular_vbmd_mg_cm3",
                                              "compression_strength_n"])
    assert lsc["metric"].unique().tolist() == ["trabecular_vbmd_mg_cm3"]  # no sd: left out
    assert lsc["lsc"].tolist() == pytest.approx([lsc12, lsc24], rel=1e-6)
    assert lsc["significant"].tolist() == [False, True]
    assert lsc["change"].tolist() == pytest.approx([2.0, 6.0])


#: per-side pullout (N) and its sd_scan per scan: {(patient, tp): (left, sd_l, right, sd_r)};
#: P02's M12 left screw did not peak (no strength, no interval)
SIDE_PULLOUT = {("P01", "M00"): (900.0, 10.0, 1100.0, 12.0),
                ("P01", "M12"): (960.0, 15.0, 1120.0, 16.0),
                ("P01", "M24"): (880.0, 20.0, 1010.0, 30.0),
                ("P02", "M00"): (700.0, 8.0, 800.0, 9.0),
                ("P02", "M12"): (None, None, 790.0, 11.0)}


def test_per_side_pullout_has_its_least_significant_change_in_the_tables(
        tmp_path: Path) -> None:
    """Each side's pullout strength gets, like the sides' mean, its change and least
    significant change in tables/least_significant_change.csv and in the wide table
    (``<metric>_<tp>_lsc``, ``_significant``), against values computed here from the
    uncertainty.json inputs: LSC = 1.96 (sd_b² + sd_f²)^½, significant when |change| > LSC;
    a side without a strength has none (neither significant nor not)."""
    samples = []
    for (patient, tp), (f_l, sd_l, f_r, sd_r) in SIDE_PULLOUT.items():
        f = _fake_scan(100.0, 200.0, 220.0, 900.0 if f_l is None else f_l, f_r)
        if f_l is None:  # no peak: no strength (the stiffness is kept)
            f["pullout_left.json"].update(strength_n=None, peak_reached=False)
        outcomes = {"pullout_strength_right_n": _unc(f_r, sd_r)}
        if f_l is not None:
            outcomes["pullout_strength_left_n"] = _unc(f_l, sd_l)
            outcomes["pullout_strength_n"] = _unc((f_l + f_r) / 2, 0.5 * math.hypot(sd_l, sd_r))
        f["uncertainty.json"] = {"outcomes": outcomes}
        _write_scan(tmp_path, patient, tp, f)
        samples.append({"patient": patient, "timepoint": tp, "months": float(tp[1:])})
    cohort.aggregate(samples, tmp_path, tmp_path / "long.csv")
    paths = cohort.tables(tmp_path / "long.csv", tmp_path / "tables")
    lsc = pd.read_csv(paths["least_significant_change"], dtype={"patient": str})
    wide = pd.read_csv(paths["wide"], dtype={"patient": str}).set_index("patient")
    z = stats.norm.ppf(0.975)
    checked = 0
    for (patient, tp), values in SIDE_PULLOUT.items():
        if tp == "M00":
            continue
        for k, side in ((0, "left"), (2, "right")):
            metric = f"pullout_strength_{side}_n"
            (b, sd_b), (v, sd_f) = SIDE_PULLOUT[patient, "M00"][k:k + 2], values[k:k + 2]
            r = lsc[(lsc["patient"] == patient) & (lsc["timepoint"] == tp)
                    & (lsc["metric"] == metric)]
            assert len(r) == 1, (patient, tp, metric)
            r = r.iloc[0]
            w_lsc, w_sig = wide.loc[patient, f"{metric}_{tp}_lsc"], \
                wide.loc[patient, f"{metric}_{tp}_significant"]
            if v is None:
                assert math.isnan(r["change"]) and pd.isna(r["significant"])
                assert pd.isna(w_sig)
                continue
            want = z * math.sqrt(sd_b ** 2 + sd_f ** 2)
            assert r["change"] == pytest.approx(v - b) == wide.loc[
                patient, f"{metric}_{tp}_change"]
            assert r["lsc"] == pytest.approx(want, rel=1e-9)
            assert w_lsc == pytest.approx(want, rel=1e-9)
            assert bool(r["significant"]) is bool(w_sig) is bool(abs(v - b) > want)
            checked += 1
    assert checked == 5  # 3 follow-ups x 2 sides, but P02 M12 left
    # both verdicts occur: P01 M12 left +60 N > 35.4 N, right +20 N < 39.0 N
    p01 = lsc[(lsc["patient"] == "P01") & (lsc["timepoint"] == "M12")].set_index("metric")
    assert bool(p01.loc["pullout_strength_left_n", "significant"])
    assert not bool(p01.loc["pullout_strength_right_n", "significant"])
    # the mean of both sides as before; per-side metrics stay out of the statistics
    assert "pullout_strength_n" in set(lsc["metric"])
    assert "pullout_strength_left_n" not in longtable.DEFAULT_METRICS


def test_a_scan_whose_uncertainty_step_failed_keeps_its_outcomes_without_intervals(
        tmp_path: Path) -> None:
    """P01 M24's uncertainty step failed (steps_fea.uncertainty with record_failure: its
    uncertainty.json holds the message): its row keeps its outcomes, with empty intervals and
    the message in uncertainty_failed; its change has no least significant change and is
    neither significant nor not; M12's are as with every scan's intervals."""
    from qctfea.steps import fea as steps_fea

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "calibration.json").write_text("{}")  # no fit: the step fails on it
    samples = []
    for tp, months, trab in (("M00", 0, 100.0), ("M12", 12, 102.0), ("M24", 24, 106.0)):
        f = _fake_scan(trab, 200.0, 220.0, 900.0, 1100.0)
        if tp != "M24":
            f["uncertainty.json"] = {"outcomes": {"trabecular_vbmd_mg_cm3": _unc(trab, 1.0)}}
        _write_scan(tmp_path, "P01", tp, f)
        samples.append({"patient": "P01", "timepoint": tp, "months": months})
    out = tmp_path / "P01" / "M24" / "uncertainty.json"
    steps_fea.uncertainty(
        out_json=out, context="patient P01, timepoint M24", record_failure=True,
        calibration_json=bad / "calibration.json", bmd_json=bad / "bmd.json",
        density_path=bad / "density.nii.gz", parts_path=bad / "vertebra.nii.gz",
        strength_json=bad / "strength.json", screws_path=None, registration_json=None,
        cfg={}, materials_cfg={}, bmd_cfg={}, seed_key="P01/M24")
    failed = json.loads(out.read_text())["failed"]
    assert failed.startswith("patient P01, timepoint M24: no intervals for this scan: BMD "
                             f"record {bad / 'bmd.json'} not found"), failed
    df = cohort.aggregate(samples, tmp_path, tmp_path / "long.csv")
    assert df["trabecular_vbmd_mg_cm3"].tolist() == [100.0, 102.0, 106.0]
    assert df["trabecular_vbmd_mg_cm3_ci_low"].iloc[:2].tolist() == [94.0, 96.0]
    assert math.isnan(df["trabecular_vbmd_mg_cm3_ci_low"].iloc[2])
    assert df["uncertainty_failed"].isna().tolist() == [True, True, False]
    assert df["uncertainty_failed"].iloc[2] == failed
    lsc = longtable.least_significant_changes(df, ["trabecular_vbmd_mg_cm3"])
    assert lsc["lsc"].iloc[0] == pytest.approx(1.959964 * math.sqrt(2.0), rel=1e-6)
    assert math.isnan(lsc["lsc"].iloc[1]) and lsc["significant"].tolist() == [False, None]
    wide = summaries.wide_table(df, ["trabecular_vbmd_mg_cm3"]).iloc[0]
    assert wide["trabecular_vbmd_mg_cm3_M24_significant"] is pd.NA
    with pytest.raises(QctfeaError, match="not found"):  # outside the workflow: raised
        steps_fea.uncertainty(
            out_json=tmp_path / "u.json", context="P01 M24",
            calibration_json=bad / "calibration.json", bmd_json=bad / "bmd.json",
            density_path=bad / "density.nii.gz", parts_path=bad / "vertebra.nii.gz",
            strength_json=bad / "strength.json", screws_path=None, registration_json=None,
            cfg={}, materials_cfg={}, bmd_cfg={}, seed_key="P01/M24")


def _scan_json(slice_mm: float, kernel: str | None, kvp: float | None = 120.0) -> dict:
    """scan.json as the ingest step writes it (the fields the protocol columns read)."""
    return {"scan": {"spacing_mm": [0.7, 0.7, slice_mm], "kvp": kvp,
                     "convolution_kernel": kernel, "manufacturer": "SIEMENS"}}


def test_follow_ups_acquired_differently_from_baseline_are_flagged(tmp_path: Path) -> None:
    """P01 M12 reconstructed with 5 mm slices and another kernel, P02 M24 at 100 kVp; slice
    spacings within 10 % (2.5 vs 2.6 mm) and an unknown kVp are not changes."""
    res_dir = tmp_path / "results"
    samples = _cohort_dir(res_dir)
    acquisition = {("P01", "M12"): (5.0, "B60f"), ("P02", "M24"): (2.5, "B30f", 100.0),
                   ("P03", "M12"): (2.6, "B30f"), ("P04", "M24"): (2.5, "B30f", None)}
    for s in samples:
        key = (s["patient"], s["timepoint"])
        _write_scan(res_dir, *key, {"scan.json": _scan_json(*acquisition.get(key, (2.5, "B30f")))})
    df = cohort.aggregate(samples, res_dir, tmp_path / "long.csv")
    change = dict(zip(zip(df["patient"], df["timepoint"]), df["protocol_change"], strict=True))
    assert change[("P01", "M12")] == "slice spacing 2.5 -> 5 mm; kernel B30f -> B60f"
    assert change[("P02", "M24")] == "kVp 120 -> 100"
    assert {k for k, v in change.items() if v} == {("P01", "M12"), ("P02", "M24")}
    assert set(df["slice_spacing_mm"]) == {2.5, 5.0, 2.6} and set(df["kernel"]) == {"B30f", "B60f"}
    back = longtable.read_long_table(tmp_path / "long.csv")  # read back: the same flags
    assert list(back["protocol_change"]) == list(df["protocol_change"])
    from qctfea.cohort.headlines import _protocol_sentence

    s = _protocol_sentence(back)
    assert s.startswith("Protocol: 2 follow-up scan(s) acquired differently") and \
        "P01 M12: slice spacing 2.5 -> 5 mm; kernel B30f -> B60f" in s
    assert _protocol_sentence(back[back["patient"] != "P01"].iloc[:3]) is None
