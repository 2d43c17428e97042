"""The cohort rules on a cohort with a missing follow-up, and both reports in Chromium.

One module-scoped run: the per-scan result files of ``tests/cohorts/missing-followup``
(P03 has no M12 scan, P02 M24 has no DXA) are written by ``tests/fake_cohort.py``;
Snakemake runs only the cohort-level rules on them (``--allowed-rules``), then
``snakemake --report``. The browser test opens the summary page and the Snakemake
report in headless Chromium (Debian's ``chromium``; CI installs it and sets
QCTFEA_REQUIRE_CHROMIUM=1 so that a missing browser fails instead of skipping).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fake_cohort as fc
import pixels
import svgdata
from browser import IMAGES_JS, SNAKEMAKE_IMAGES_JS, Chromium, find_chromium
from conftest import REPO, run, venv_bin

NAME = "missing-followup"
#: Where the browser test keeps its screenshots (stable path; results/ is git-ignored).
ARTIFACTS = REPO / "results" / "test-artifacts"


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("cohort-rules")
    cohorts, sheet = fc.setup_cohort(work, NAME)
    args = fc.snakemake_args(work, cohorts, NAME)
    pages = [f"results/{NAME}/report/patients/{p}.html" for p in sorted(set(sheet["patient"]))]
    p = run([venv_bin("snakemake"), "--cores", "2", *args, "--",
             f"results/{NAME}/report/summary.html", *pages], cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    report = work / "results" / NAME / "report.html"
    p = run([venv_bin("snakemake"), "--report", str(report), *args], cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"work": work, "res": work / "results" / NAME, "sheet": sheet, "report": report}


def test_cohort_rules_run_with_a_missing_followup(cohort_run: dict) -> None:
    res = cohort_run["res"]
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    assert len(long) == len(cohort_run["sheet"]) == 14
    assert not ((long["patient"] == "P03") & (long["timepoint"] == "M12")).any()
    # follow-ups carry their registration QC, baselines none (they are the reference)
    base = long["timepoint"] == "M00"
    assert long.loc[base, "registration_dice"].isna().all()
    assert (long.loc[~base, "registration_dice"] == 0.97).all()
    assert (long.loc[~base, "registration_point_spread_mm"] == 0.05).all()
    src = long.set_index(["patient", "timepoint"])["areal_bmd_source"]
    assert src[("P02", "M24")] == "ct" and src[("P01", "M24")] == "dxa"
    # least significant change from the scans' uncertainty.json (sd_scan 1 % of each value)
    lsc = pd.read_csv(res / "tables" / "least_significant_change.csv", dtype={"patient": str})
    trab = long.set_index(["patient", "timepoint"])["trabecular_vbmd_mg_cm3"]
    r = lsc[(lsc["patient"] == "P01") & (lsc["timepoint"] == "M24")
            & (lsc["metric"] == "trabecular_vbmd_mg_cm3")].iloc[0]
    b, f = trab[("P01", "M00")], trab[("P01", "M24")]
    assert r["lsc"] == pytest.approx(1.959964 * 0.01 * (b ** 2 + f ** 2) ** 0.5, rel=1e-5)
    assert bool(r["significant"]) == (abs(f - b) > r["lsc"])
    assert set(lsc["metric"]) >= {"pullout_strength_n", "compression_strength_n",
                                  "around_screw_vbmd_mg_cm3"}
    for name in ("wide.csv", "change_from_baseline.csv", "summary_by_timepoint.csv",
                 "baseline_characteristics.csv"):
        assert (res / "tables" / name).is_file(), name
    summary = json.loads((res / "stats" / "summary.json").read_text())
    assert summary["missing_scans"] == [{"patient": "P03", "timepoint": "M12"}]
    assert "missing P03 M12" in summary["headlines"][0]
    changes = pd.read_csv(res / "stats" / "changes.csv").fillna("")
    pull = changes[changes["metric"] == "pullout_strength_n"].set_index("timepoint")
    assert pull.loc["M12", "n_pairs"] == 4 and pull.loc["M12", "patients_not_paired"] == "P03"
    assert pull.loc["M24", "n_pairs"] == 5 and pull.loc["M24", "patients_not_paired"] == ""
    mm = pd.read_csv(res / "stats" / "mixed_models.csv")
    assert (mm.loc[mm["metric"] == "pullout_strength_n", "n_obs"] == 14).all()
    fr = pd.read_csv(res / "stats" / "friedman.csv").set_index("metric")
    assert fr.loc["pullout_strength_n", "n_complete"] == 4
    assert fr.loc["pullout_strength_n", "patients_excluded"] == "P03"
    corr = pd.read_csv(res / "stats" / "correlations.csv")
    areal = corr[(corr["outcome"] == "pullout_strength_n")
                 & (corr["predictor"] == "areal_bmd_g_cm2")].set_index("timepoint")
    assert areal.loc["M24", "n"] == 4 and areal.loc["M24", "predictor_source"] == "clinical DXA"
    assert areal.loc["M12", "n"] == 4
    figs = res / "figures"
    for stem in ("spaghetti_pullout_strength_n", "scatter_pullout_areal_bmd_g_cm2",
                 "qc_calibration", "qc_roi"):
        assert (figs / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ET.parse(figs / f"{stem}.svg").getroot().tag.endswith("svg")
    assert len(list(figs.glob("*.png"))) == len(list(figs.glob("*.svg"))) == 14
    # The figures show the table's numbers. Spaghetti: one grey line per patient in patient
    # order (P03's without M12), a marker at each scan's (months, value) where the axes'
    # tick labels put it (the months axis labelled "M12\n12 mo");
    pull = long.sort_values(["patient", "months"])
    svg = figs / "spaghetti_pullout_strength_n.svg"
    lines = svgdata.line_markers(svg, "#999999")
    assert [len(m) for m in lines] == pull.groupby("patient").size().tolist() == [3, 3, 2, 3, 3]
    drawn = np.concatenate(lines)
    assert svgdata.affine_residual(pull["months"], drawn[:, 0],
                                   svgdata.axis_ticks(svg, "x", r"([\d.]+) mo")) < 0.01
    assert svgdata.affine_residual(pull["pullout_strength_n"], drawn[:, 1],
                                   svgdata.axis_ticks(svg, "y")) < 0.01
    # scatter: one collection per timepoint with a point per scan, where its values are;
    tp = long.sort_values("months")["timepoint"].unique()
    svg = figs / "scatter_pullout_trabecular_vbmd_mg_cm3.svg"
    pts = svgdata.scatter_points(svg)
    by_tp = [long[long["timepoint"] == t] for t in tp]
    assert [len(p) for p in pts] == [len(d) for d in by_tp] == [5, 4, 5]
    for axis, col in enumerate(("trabecular_vbmd_mg_cm3", "pullout_strength_n")):
        got = np.concatenate([p[:, axis] for p in pts])
        want = np.concatenate([d[col].to_numpy() for d in by_tp])
        # matplotlib draws a collection's points in the data's order
        assert svgdata.affine_residual(want, got, svgdata.axis_ticks(svg, "xy"[axis])) < 0.01, col
    # areal BMD: DXA where a timepoint has it (M24 has 4 of 5), as correlations.csv's n;
    pts = svgdata.scatter_points(figs / "scatter_pullout_areal_bmd_g_cm2.svg")
    assert [len(p) for p in pts] == [areal.loc[t, "n"] for t in tp]
    # the QC montage marks the one missing scan (P03 M12: row 3 of 5, column 2 of 3) in red.
    a = pixels.rgb(figs / "qc_roi.png")
    rows, cols = np.nonzero(pixels.colour(a, "C3"))
    assert 1 / 3 < cols.mean() / a.shape[1] < 2 / 3 and 0.4 < rows.mean() / a.shape[0] < 0.65
    page = (res / "report" / "summary.html").read_text()
    assert "Missing scans: P03 M12" in page and "not paired: P03" in page
    # no external resource; the only links are to the per-patient pages beside it
    assert not re.search(r"""(src|href)=["'](?!data:|#|patients/)""", page), "external resource"
    assert 'href="patients/P01.html"' in page
    # the per-patient pages (rule patient_page): P03's without M12, numbers from the JSONs
    p03 = (res / "report" / "patients" / "P03.html").read_text()
    assert 'id="tp-M00"' in p03 and 'id="tp-M12"' not in p03
    left = json.loads((res / "P03" / "M00" / "pullout_left.json").read_text())["strength_n"]
    assert f'<td class="strength-n">{round(left)} N</td>' in p03


#: The sample sheet's sex column as read (P02 "male", P03 "Female", P05 empty), and the
#: strength thresholds (N) in force: the BCT's for women (Keaveny et al. 2020: fragile <=
#: 4500 < low < 6000 <= normal); for men the cohort config moves fragile to 3900 (BCT 8500
#: for normal).
SEX = {"P01": "F", "P02": "M", "P03": "F", "P04": "F", "P05": ""}
STRENGTH_N = {"F": (4500.0, 6000.0), "M": (3900.0, 8500.0)}


def test_clinical_categories_in_the_tables_and_pages(cohort_run: dict) -> None:
    res = cohort_run["res"]
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str}
                       ).fillna({"sex": ""})
    seen = set()
    for row in long.itertuples():
        d = res / row.patient / row.timepoint
        f = json.loads((d / "compression.json").read_text())["strength_n"]
        v = json.loads((d / "bmd.json").read_text())["trabecular_vbmd_mg_cm3"]
        sex = SEX[row.patient]
        assert row.sex == sex
        if sex:
            fragile, normal = STRENGTH_N[sex]
            want = "fragile" if f <= fragile else "normal" if f >= normal else "low"
        else:
            want = "unknown (sex not given)"
        assert row.strength_category == want, (row.patient, row.timepoint, f)
        assert row.vbmd_category == ("osteoporosis" if v < 80 else "normal" if v > 120
                                     else "low bone mass"), (row.patient, row.timepoint, v)
        seen |= {row.strength_category, row.vbmd_category}
        src = row.strength_category_source
        # a man's thresholds are the configured ones; without a sex, some of them are
        assert src.startswith("configured thresholds") == (sex != "F"), src
        assert ("Keaveny et al. 2020" in src) == (sex == "F"), src
        assert "ACR" in row.vbmd_category_source
    assert {"fragile", "low", "unknown (sex not given)", "low bone mass", "normal"} <= seen
    t1 = pd.read_csv(res / "tables" / "baseline_characteristics.csv").set_index(
        "characteristic")
    assert t1.loc["sex (sample sheet)", "mean_sd"] == "F 3, M 1, not given 1"
    page = (res / "report" / "summary.html").read_text()
    assert '<h2 id="clinical">Clinical categories</h2>' in page
    assert "Osteoporos Int 2020;31:1025-1048" in page and "ACR-SPR-SSR" in page
    assert "VirtuOst" in page and "not calibrated" in page
    assert "configured thresholds (clinical.strength_thresholds_n)" in page
    p05 = (res / "report" / "patients" / "P05.html").read_text()
    assert '<span id="sex">not given</span>' in p05
    assert "<td>unknown (sex not given)</td>" in p05 and "VirtuOst" in p05


def test_placement_table_shows_the_isthmus_of_the_long_table(cohort_run: dict) -> None:
    """The summary page's screw placement table: per side the pedicle isthmus' narrowest
    width and whether the screw is wider, as the long table has them from each baseline's
    screws.json (tests/fake_cohort.py: 6.5 mm screws, isthmus 5.9 + 1.1 i mm, so only
    P01's is narrower; the right screws of P02 and P04 have no isthmus record)."""
    res = cohort_run["res"]
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    patients = sorted(set(cohort_run["sheet"]["patient"]))
    for row in long.itertuples():
        baseline = res / row.patient / "M00" / "screws.json"
        screws = {s["side"]: s for s in json.loads(baseline.read_text())["screws"]}
        i = patients.index(row.patient)
        assert row.screw_isthmus_width_left_mm == pytest.approx(
            screws["left"]["planning"]["isthmus_min_width_mm"])
        assert row.screw_isthmus_width_left_mm == pytest.approx(5.9 + 1.1 * i)
        assert bool(row.screw_exceeds_isthmus_left) == (row.patient == "P01")
        assert pd.isna(row.screw_isthmus_width_right_mm) == (i % 2 == 1), row.patient
    page = (res / "report" / "summary.html").read_text()
    section = page.split('<h2 id="screws">', 1)[1]
    table = ET.fromstring(section[section.index("<table>"):
                                  section.index("</table>") + len("</table>")])
    heads = [th.text for th in table.iter("th")]
    cells = {(r[0], r[1]): dict(zip(heads, r, strict=True))
             for r in ([td.text or "" for td in tr.findall("td")]
                       for tr in table.find("tbody"))}
    assert len(cells) == len(long)
    for row in long.to_dict("records"):
        shown = cells[(row["patient"], row["timepoint"])]
        for side in ("left", "right"):
            width, wider = (row[f"screw_isthmus_width_{side}_mm"],
                            row[f"screw_exceeds_isthmus_{side}"])
            assert shown[f"{side}: isthmus mm"] == ("–" if pd.isna(width) else f"{width:.1f}")
            assert shown[f"{side}: wider than isthmus"] == (
                "–" if pd.isna(wider) else "yes" if str(wider) == "True" else "no"), row
            assert shown[f"{side}: diameter mm"] == "6.5"
    assert {c["left: wider than isthmus"] for c in cells.values()} == {"yes", "no"}
    assert cells[("P01", "M00")]["left: isthmus mm"] == "5.9"
    assert cells[("P02", "M12")]["right: isthmus mm"] == "–"
    assert "whether the screw is wider than it" in section


def _svg_texts(path: Path) -> list[str]:
    """The texts of a matplotlib SVG (it writes each text's string as a comment beside its
    glyphs): tick labels, axis labels, legend entries, annotations, in drawing order."""
    return re.findall(r"<!-- (.*?) -->", path.read_text(encoding="utf-8"))


def _numbers(texts: list[str]) -> list[float]:
    out = []
    for t in texts:
        try:
            out.append(float(t.replace("−", "-")))
        except ValueError:
            pass
    return out


def test_figures_show_the_tables_data(cohort_run: dict) -> None:
    """The cohort figures hold what the tables hold, read back from the SVG's texts: the
    spaghetti plot's value axis spans every pullout strength of the long table, one "n ="
    label per timepoint with that timepoint's count, a label per patient; the scatter plot's
    axes span the areal BMD and pullout strength plotted and its legend gives each
    timepoint's Pearson r and n of stats/correlations.csv."""
    res = cohort_run["res"]
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    texts = _svg_texts(res / "figures" / "spaghetti_pullout_strength_n.svg")
    ticks = _numbers(texts)
    step = min(b - a for a, b in zip(ticks, ticks[1:]))
    vals = long["pullout_strength_n"].dropna()
    assert min(ticks) - step <= vals.min() and vals.max() <= max(ticks) + step, (ticks, vals)
    counts = long.groupby("timepoint")["pullout_strength_n"].count()
    order = long.groupby("timepoint")["months"].median().sort_values().index
    assert [t for t in texts if t.startswith("n = ")] == [f"n = {counts[t]}" for t in order]
    assert set(long["patient"]) <= set(texts)
    texts = _svg_texts(res / "figures" / "scatter_pullout_areal_bmd_g_cm2.svg")
    i = next(k for k, t in enumerate(texts) if t.startswith("areal BMD"))
    x_ticks, y_ticks = _numbers(texts[:i]), _numbers(texts[i:])
    x = long["dxa_areal_bmd_g_cm2"].dropna()
    y = long.loc[long["dxa_areal_bmd_g_cm2"].notna(), "pullout_strength_n"]
    for ticks, v in ((x_ticks, x), (y_ticks, y)):
        step = min(b - a for a, b in zip(ticks, ticks[1:]))
        assert min(ticks) - step <= v.min() and v.max() <= max(ticks) + step, (ticks, v)
    corr = pd.read_csv(res / "stats" / "correlations.csv")
    corr = corr[(corr["outcome"] == "pullout_strength_n")
                & (corr["predictor"] == "areal_bmd_g_cm2")].set_index("timepoint")
    legend = [t for t in texts if re.match(r"M\d+: r = ", t)]
    assert [t.split(",")[0] + "," + t.split(",")[1] for t in legend] == [
        f"{tp}: r = {corr.loc[tp, 'r']:.2f}, n = {corr.loc[tp, 'n']}" for tp in order]


def test_excluded_scan_is_listed_with_its_reason(tmp_path: Path) -> None:
    """A scan excluded in the cohort config gets no jobs, is not counted as missing, and is
    named with its reason in tables/exclusions.csv, summary.json, the headline and the page."""
    cohorts, sheet = fc.setup_cohort(tmp_path, NAME)
    cfg = cohorts / NAME / "config.yaml"
    cfg.write_text(cfg.read_text() + "exclude:\n  - patient: P01\n    timepoint: M24\n"
                   "    reason: motion artefact at L4\n")
    args = fc.snakemake_args(tmp_path, cohorts, NAME)
    p = run([venv_bin("snakemake"), "--cores", "2", *args, "--",
             f"results/{NAME}/report/summary.html"], cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = tmp_path / "results" / NAME
    ex = pd.read_csv(res / "tables" / "exclusions.csv", dtype=str)
    assert ex.to_dict("records") == [{"patient": "P01", "timepoint": "M24", "months": "24.0",
                                      "excluded_by": "cohort config",
                                      "reason": "motion artefact at L4"}]
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    assert len(long) == len(sheet) - 1 == 13
    assert not ((long["patient"] == "P01") & (long["timepoint"] == "M24")).any()
    summary = json.loads((res / "stats" / "summary.json").read_text())
    assert summary["missing_scans"] == [{"patient": "P03", "timepoint": "M12"}]
    assert [(e["patient"], e["timepoint"], e["reason"]) for e in summary["excluded_scans"]] \
        == [("P01", "M24", "motion artefact at L4")]
    data = summary["headlines"][0]
    assert "13 of 15 planned scans" in data
    assert "excluded by the cohort config: P01 M24 (motion artefact at L4)" in data
    assert "missing P03 M12" in data and "missing P01" not in data
    page = (res / "report" / "summary.html").read_text()
    assert "motion artefact at L4" in page and "Missing scans: P03 M12." in page


def test_scans_refused_by_a_gate_are_left_out_and_listed(cohort_run: dict,
                                                         tmp_path: Path) -> None:
    """A baseline whose calibration was refused (its calibration.json's ``refused``, as rule
    calibrate_density records it), a follow-up whose registration was refused (as
    register_to_baseline records it), a scan whose compression curve did not peak (as
    solve records it), a follow-up whose label map lacks the vertebra (as ingest_scan
    records it), one whose vertebra is cut by the scan's edge (as extract_vertebra
    records it) and a baseline whose vertebra could not be meshed (as mesh_vertebra
    records it) are left out of the tables and statistics and listed in
    tables/exclusions.csv with their messages; the refused baseline takes its follow-ups
    (modelled on it) with it. The other scans' rows are those of the run without the
    refusals (the module's run of the same per-scan files)."""
    before = pd.read_csv(cohort_run["res"] / "tables" / "longitudinal.csv",
                         dtype={"patient": str})
    cohorts, sheet = fc.setup_cohort(tmp_path, NAME)
    res = tmp_path / "results" / NAME
    args = fc.snakemake_args(tmp_path, cohorts, NAME)
    target = f"results/{NAME}/report/summary.html"
    reg_msg = ("patient P01, timepoint M24: registration to baseline failed: vertebra Dice "
               "0.612 < 0.75 (before 0.540)")
    peak_msg = ("patient P02, timepoint M12, compression: peak not reached (the force still "
                "rose at the last increment). No strength is reported.")
    cal_msg = ("patient P04, timepoint M00: phantom calibration R² = 0.512 is below "
               "calibration.phantom.fail_r2 = 0.9")
    scan_msg = ("patient P03, timepoint M24 (labels.nii.gz): label 23 is not in the label map "
                "(labels present: [20, 21, 22]); set mask.label in the cohort config")
    (res / "P03" / "M24" / "scan.json").write_text(json.dumps({"refused": scan_msg}))
    vert_msg = ("patient P05, timepoint M24: the vertebra (label 23) is cut by the edge of CT "
                "ct.nii.gz: inferior (2 voxels); give a scan that holds the whole vertebra")
    (res / "P05" / "M24" / "vertebra.json").write_text(json.dumps({"refused": vert_msg}))
    mesh_msg = ("patient P03, timepoint M00: the vertebra (vertebra.nii.gz) could not be "
                "meshed: CGAL produced no tetrahedra; check the mask and mesh sizes")
    (res / "P03" / "M00" / "mesh.json").write_text(json.dumps({"refused": mesh_msg}))
    cal = res / "P04" / "M00" / "calibration.json"
    cal.write_text(json.dumps({"refused": cal_msg, "method": "phantom", "slope": None}))
    reg = res / "P01" / "M24" / "registration.json"
    reg.write_text(json.dumps({**json.loads(reg.read_text()), "refused": reg_msg}))
    comp = res / "P02" / "M12" / "compression.json"
    comp.write_text(json.dumps({**json.loads(comp.read_text()), "strength_n": None,
                                "peak_reached": False, "refused": peak_msg}))
    p = run([venv_bin("snakemake"), "--cores", "2", *args, "--", target], cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ex = pd.read_csv(res / "tables" / "exclusions.csv", dtype=str)
    assert ex[["patient", "timepoint", "reason"]].values.tolist() == [
        ["P01", "M24", reg_msg], ["P02", "M12", peak_msg], ["P03", "M00", mesh_msg],
        ["P03", "M24", scan_msg],
        ["P04", "M00", cal_msg], ["P04", "M12", cal_msg], ["P04", "M24", cal_msg],
        ["P05", "M24", vert_msg]]
    # which gate refused each (a follow-up refused with its baseline says so)
    assert ex["excluded_by"].tolist() == [
        "accept_registration", "accept_strength", "accept_mesh", "accept_scan",
        "accept_calibration", "accept_calibration (of M00)", "accept_calibration (of M00)",
        "accept_vertebra"]
    long = pd.read_csv(res / "tables" / "longitudinal.csv", dtype={"patient": str})
    kept = ~(((before["patient"] == "P01") & (before["timepoint"] == "M24"))
             | ((before["patient"] == "P02") & (before["timepoint"] == "M12"))
             | (before["patient"] == "P03")
             | ((before["patient"] == "P05") & (before["timepoint"] == "M24"))
             | (before["patient"] == "P04"))
    assert len(long) == len(before) - 8 == 6
    pd.testing.assert_frame_equal(long, before[kept].reset_index(drop=True))
    changes = pd.read_csv(res / "stats" / "changes.csv", dtype={"patients_not_paired": str})
    pull = changes[changes["metric"] == "pullout_strength_n"].set_index("timepoint")
    # P03 and P04 have no scan left: not patients of the analysis; P02's M12 was refused
    assert pull.loc["M12", "patients_not_paired"] == "P02"
    assert pull.loc["M12", "n_pairs"] == 2
    page = (res / "report" / "summary.html").read_text()
    for msg in (reg_msg, peak_msg, cal_msg, scan_msg, vert_msg, mesh_msg):
        assert html.escape(msg) in page, msg


def test_exclusion_of_an_unknown_scan_is_an_error(tmp_path: Path) -> None:
    cohorts, _ = fc.setup_cohort(tmp_path, NAME)
    cfg = cohorts / NAME / "config.yaml"
    cfg.write_text(cfg.read_text() + "exclude:\n  - patient: P09\n    reason: withdrew\n"
                   "  - patient: P01\n    timepoint: M24\n")
    p = run([venv_bin("snakemake"), "-n", *fc.snakemake_args(tmp_path, cohorts, NAME)],
            cwd=REPO, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "config.yaml, key exclude.1.reason: missing" in out, out[-3000:]
    cfg.write_text(cfg.read_text().replace("    timepoint: M24\n", "    timepoint: M24\n"
                                           "    reason: motion\n"))
    p = run([venv_bin("snakemake"), "-n", *fc.snakemake_args(tmp_path, cohorts, NAME)],
            cwd=REPO, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "config.yaml, key exclude.0: patient P09 is not in the sample sheet" in out, \
        out[-3000:]


def test_figures_edge_cases(tmp_path: Path) -> None:
    from qctfea.qc import figures
    from qctfea.errors import QctfeaError

    df = pd.DataFrame({"patient": ["A", "A"], "timepoint": ["M00", "M12"], "months": [0.0, 12.0],
                       "pullout_strength_n": [1.0, 2.0]})
    paths = {"png": tmp_path / "s.png", "svg": tmp_path / "s.svg"}
    figures.spaghetti(df, "dxa_areal_bmd_g_cm2", paths)  # no such data: a "no data" panel
    assert "no clinical DXA areal BMD" in paths["svg"].read_text()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(QctfeaError, match=r"patient A, timepoint M12: cannot read .*bad\.png"):
        figures.qc_montage([("A", "M12", bad)], paths)


def _rule_names() -> list[str]:
    names = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        names += re.findall(r"^\s*(?:rule|checkpoint)\s+(\w+)\s*:", smk.read_text(),
                            flags=re.M)
    names += re.findall(r"^rule\s+(\w+)\s*:", (REPO / "Snakefile").read_text(), flags=re.M)
    return names


def _report_var(html: str, script_id: str, name: str) -> object:
    """A JSON variable of Snakemake's report template (``<script id=...>var name = ...;``)."""
    m = re.search(rf'<script id="{script_id}">\s*var {name} = (.*?);\s*</script>', html,
                  flags=re.S)
    assert m, f"{name} not found in the report"
    return json.loads(m.group(1))


def test_snakemake_report_describes_every_rule_and_holds_the_results(cohort_run: dict) -> None:
    html = cohort_run["report"].read_text()
    desc = _report_var(html, "workflow-desc", "workflow_desc")
    rules = _rule_names()
    assert {"ingest_scan", "solve", "compute_statistics", "summary_page"} <= set(rules)
    undescribed = [r for r in rules if f"<dt>{r}</dt>" not in desc]
    assert not undescribed, (f"rules without a method description in "
                             f"workflow/report/workflow.rst: {undescribed}")
    results = _report_var(html, "results", "results")
    cats = _report_var(html, "categories", "categories")
    assert {"Summary", "Tables", "Statistical tests", "Figures", "QC"} <= set(cats)
    files = {Path(k).name for k in results}
    assert {"summary.html", "longitudinal.csv", "changes.csv", "mixed_models.csv",
            "correlation_comparison.csv", "baseline_characteristics.csv",
            "spaghetti_pullout_strength_n.png", "qc_calibration.png"} <= files
    assert all(r["caption"] for r in results.values() if "/stats/" in r["filename"]
               or "/figures/" in r["filename"]), "a result without caption"


def _chromium() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("QCTFEA_REQUIRE_CHROMIUM"):
            pytest.fail("chromium not found but QCTFEA_REQUIRE_CHROMIUM is set (CI)")
        pytest.skip("chromium not installed (apt-get install chromium); CI installs it")
    return exe


def test_reports_render_in_headless_chromium(cohort_run: dict, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    exe = _chromium()
    summary = cohort_run["res"] / "report" / "summary.html"
    n_pngs = len(list((cohort_run["res"] / "figures").glob("*.png")))
    shots = {}
    with Chromium(exe, tmp_path / "profile") as browser:
        browser.open(summary.as_uri())
        images = browser.evaluate(IMAGES_JS)
        assert browser.errors() == []
        assert len(images) == n_pngs == 14
        bad = [i for i in images if i["width"] <= 0 or i["height"] <= 0 or i["shown"] <= 0]
        assert not bad, f"figures that did not render: {bad}"
        assert browser.evaluate("document.querySelectorAll('ol.headlines li').length") >= 5
        text = browser.evaluate("document.body.innerText")
        assert "Missing scans: P03 M12" in text and "Steiger z = " in text
        shots["summary"] = browser.screenshot(tmp_path / "summary_page.png")

        browser.open(cohort_run["report"].as_uri())
        browser.evaluate("new Promise(r => setTimeout(r, 300))")
        assert browser.evaluate(
            "document.querySelector('#loading-screen').style.display") == "none"
        assert browser.evaluate("document.querySelector('#app').children.length") > 0
        assert "Method of every rule" in browser.evaluate("document.body.innerText")
        shown = browser.evaluate(SNAKEMAKE_IMAGES_JS)
        assert len(shown) >= n_pngs  # (per-scan pictures are in it when their rule ran)
        bad = [i for i in shown if i["width"] <= 0]
        assert not bad, f"report figures that did not render: {bad}"
        # Leave the pullout spaghetti plot on screen for the screenshot.
        browser.evaluate("""(() => { const k = Object.keys(results).find(
            p => p.endsWith('spaghetti_pullout_strength_n.png'));
            app.setView({content: 'img', contentPath: results[k].data_uri, resultPath: k});
            return k; })()""")
        browser.evaluate("new Promise(r => setTimeout(r, 300))")
        shots["snakemake_report"] = browser.screenshot(tmp_path / "snakemake_report.png",
                                                       full_page=False)
        assert browser.errors() == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = []
    for name, path in shots.items():
        shot = pixels.rgb(path)
        ink = shot.min(axis=-1) < 0.85  # a page drawn, not a blank window
        assert ink.mean() > 0.01 and len(pixels.text_rows(pixels.dark(shot))) >= 5
        dest = ARTIFACTS / f"browser_{name}.png"
        shutil.copy(path, dest)
        kept.append(str(dest))
    with capsys.disabled():
        print(f"\n[browser test] screenshots: {', '.join(kept)}")
