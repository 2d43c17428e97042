"""The per-patient page (qctfea.qc.patient_page) on a result tree built from the coarse demo
model (conftest ``demo_model``): numbers against the JSONs they come from, the embedded
geometry against an independent face count, and the page in headless Chromium (offline,
no console error, the WebGL canvas draws the model where its camera, projected here with
numpy, puts it, and nothing elsewhere)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from browser import WEBGL_ARGS, Chromium, find_chromium
from conftest import REPO

ARTIFACTS = REPO / "results" / "test-artifacts"
#: the load-case results written into the tree: {timepoint: {file: (strength_n, stop_reason)}}
CASES = {
    "M00": {"pullout_left.json": (812.4, "force fell after the peak"),
            "pullout_right.json": (790.6, "force fell after the peak"),
            "compression.json": (2500.2, "force fell after the peak")},
    "M12": {"pullout_left.json": (None, "maximum displacement reached before a peak"),
            "pullout_right.json": (861.5, "force fell after the peak"),
            "compression.json": (2751.8, "force fell after the peak")},
}
#: failed cells at the peak of each run: {(timepoint, load case): n}
FAILED = {("M00", "compression"): 7, ("M12", "compression"): 19,
          ("M00", "pullout_left"): 3, ("M12", "pullout_left"): 4,
          ("M00", "pullout_right"): 5, ("M12", "pullout_right"): 6}
#: a run whose fields file predates the peak flags (its flags are those of the run's end)
OLD_FIELDS = ("M12", "pullout_right")
#: the page's name of each load case
CASE_LABEL = {"compression": "vertebral compression", "pullout_left": "pullout, left screw",
              "pullout_right": "pullout, right screw"}
UNC_SD = {"M00": 20.0, "M12": 30.0}  # per-scan SD of the compression strength (N)
#: per-scan SD (N) of the right screw's pullout strength (the left one's M12 has no peak)
UNC_SD_RIGHT = {"M00": 30.0, "M12": 40.0}
EXCLUDED_REASON = "motion artefact at L4"


def _png(path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2), dpi=60)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1, 2], [0, 2, 1], "o-")
    ax.set_title(title, fontsize=8)
    fig.savefig(path, format="png")


def _fields(path: Path, points: np.ndarray, cells: np.ndarray, failed: np.ndarray,
            rng: np.random.Generator, at_peak: bool = True) -> None:
    """A <case>_fields.h5 as DOLFINx writes it: its own (permuted) vertex and cell order,
    per-cell flags under Function/<name>/0. ``failed`` fail by the peak; at the end of the
    run 10 more cells have (``failed``), which the page must not show. ``at_peak`` False:
    a file without the peak flags (``failed`` then holds ``failed`` only)."""
    vperm = rng.permutation(len(points))  # new vertex i is old vertex vperm[i]
    new_of_old = np.empty_like(vperm)
    new_of_old[vperm] = np.arange(len(vperm))
    cperm = rng.permutation(len(cells))
    flag = np.zeros(len(cells))
    flag[failed] = 1.0
    yielded = flag.copy()
    yielded[rng.choice(len(cells), 50, replace=False)] = 1.0
    end = flag.copy()
    end[rng.choice(np.flatnonzero(flag == 0), 10, replace=False)] = 1.0
    with h5py.File(path, "w") as f:
        f["Mesh/mesh/geometry"] = points[vperm]
        f["Mesh/mesh/topology"] = new_of_old[cells[cperm]]
        if at_peak:
            f["Function/failed_at_peak/0"] = flag[cperm].reshape(-1, 1)
            f["Function/yielded_at_peak/0"] = yielded[cperm].reshape(-1, 1)
            f["Function/failed/0"] = end[cperm].reshape(-1, 1)
        else:
            f["Function/failed/0"] = flag[cperm].reshape(-1, 1)
        f["Function/yielded/0"] = np.maximum(yielded, end)[cperm].reshape(-1, 1)
        f["Function/damage/0"] = (0.5 * yielded[cperm]).reshape(-1, 1)


#: Slice spacing (mm) and kernel per timepoint: the follow-up reconstructed differently.
ACQUISITION = {"M00": (1.0, "B60f"), "M12": (2.0, "B30f")}


@pytest.fixture(scope="module")
def patient_tree(demo_model, tmp_path_factory) -> dict:
    """results/<cohort>/P01/{M00,M12} from the demo model (M12 registered to M00: the model
    lives in M00), with load-case results, curves, fields, long table and exclusions."""
    from qctfea.cohort import analysis as cohort
    from qctfea.model.meshing import read_mesh

    src = demo_model["results"]
    res = tmp_path_factory.mktemp("patient-page") / "results" / "demo"
    points, cells, tags = read_mesh(src / "mesh.xdmf")
    bone = np.flatnonzero(np.isin(tags, (1, 2)))
    rng = np.random.default_rng(5)
    failed = {k: np.sort(rng.choice(bone, n, replace=False)) for k, n in FAILED.items()}
    for tp in CASES:
        d = res / "P01" / tp
        d.mkdir(parents=True)
        for name in ("bmd.json", "calibration.json", "calibration.png"):
            shutil.copy(src / name, d / name)
        _png(d / "roi.png", f"{tp} roi")
        for name, (strength, reason) in CASES[tp].items():
            (d / name).write_text(json.dumps({
                "strength_n": strength, "stiffness_n_per_mm": 40000.0, "stop_reason": reason,
                "peak_reached": strength is not None, "n_dofs": 3000, "ksp_iterations": 10}))
            _png(d / f"{name[:-5]}_curve.png", f"{tp} {name}")
        for case in CASE_LABEL:
            _fields(d / f"{case}_fields.h5", points, cells, failed[tp, case], rng,
                    at_peak=(tp, case) != OLD_FIELDS)
    for tp, (slice_mm, kernel) in ACQUISITION.items():  # scan.json of the ingest step
        (res / "P01" / tp / "scan.json").write_text(json.dumps({"scan": {
            "spacing_mm": [0.7, 0.7, slice_mm], "kvp": 120.0, "convolution_kernel": kernel,
            "manufacturer": "SIEMENS"}}))
    base = res / "P01" / "M00"
    for name in ("mesh.xdmf", "mesh.h5", "mesh.json", "screws.json"):
        shutil.copy(src / name, base / name)
    _png(base / "mesh.png", "mesh")
    _png(base / "screws.png", "screws")
    _png(res / "P01" / "M12" / "registration.png", "registration")
    (res / "P01" / "M12" / "registration.json").write_text(
        json.dumps({"dice_after": 0.97, "point_spread_mm": 0.05}))
    for tp, sd in UNC_SD.items():  # uncertainty.json: compression and right pullout
        outcomes = {}
        for key, name, sd_scan in (("compression_strength_n", "compression.json", sd),
                                   ("pullout_strength_right_n", "pullout_right.json",
                                    UNC_SD_RIGHT[tp])):
            v = CASES[tp][name][0]
            outcomes[key] = {"value": v, "sd": 5 * sd_scan, "ci_low": v - 10 * sd_scan,
                             "ci_high": v + 10 * sd_scan, "sd_scan": sd_scan}
        (res / "P01" / tp / "uncertainty.json").write_text(json.dumps({"outcomes": outcomes}))
    long = res / "tables" / "longitudinal.csv"
    cohort.aggregate([{"patient": "P01", "timepoint": tp, "months": m, "model_timepoint": "M00",
                       "sex": "female"} for tp, m in (("M00", 0.0), ("M12", 12.0))], res, long)
    pd.DataFrame([{"patient": "P01", "timepoint": "M24", "months": 24.0,
                   "reason": EXCLUDED_REASON},
                  {"patient": "P02", "timepoint": "M00", "months": 0.0, "reason": "other"}]
                 ).to_csv(res / "tables" / "exclusions.csv", index=False)
    return {"res": res, "points": points, "cells": cells, "tags": tags, "failed": failed}


@pytest.fixture(scope="module")
def page(patient_tree) -> Path:
    from qctfea.qc.patient_page import write_patient_page

    out = patient_tree["res"] / "report" / "patients" / "P01.html"
    return write_patient_page(patient_tree["res"], "P01", out, cohort_name="demo")


def _section(html: str, tp: str) -> str:
    start = html.index(f'<section class="timepoint" id="tp-{tp}">')
    return html[start:html.index("</section>", start)]


def _geometry(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="qctfea-geometry">(.*?)</script>',
                  html, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def _boundary_count(cells: np.ndarray) -> int:
    """Faces that belong to exactly one of ``cells`` (counted with a Counter of tuples)."""
    faces = Counter()
    for c in cells.tolist():
        for drop in range(4):
            faces[tuple(sorted(v for k, v in enumerate(c) if k != drop))] += 1
    return sum(1 for n in faces.values() if n == 1)


def _decode(geo: dict, b64: str) -> np.ndarray:
    q = np.frombuffer(base64.b64decode(b64), "<u2").reshape(-1, 3).astype(float)
    return np.asarray(geo["origin"]) + q * np.asarray(geo["step"])


def test_page_numbers_come_from_the_results(page: Path, patient_tree: dict) -> None:
    html = page.read_text()
    assert page.stat().st_size < 3_000_000
    res = patient_tree["res"]
    for tp, cases in CASES.items():
        sec = _section(html, tp)
        for name, (strength, reason) in cases.items():
            key = name[:-5]
            row = re.search(rf'<tr data-case="{key}" data-status="(\w+)">(.*?)</tr>', sec, re.S)
            assert row, (tp, key)
            if strength is None:
                assert row.group(1) == "refused" and "refused" in row.group(2)
                assert reason in row.group(2)
            else:
                stored = json.loads((res / "P01" / tp / name).read_text())["strength_n"]
                shown = re.search(r'<td class="strength-n">(\d+) N</td>', row.group(2))
                assert row.group(1) == "ok" and int(shown.group(1)) == round(stored)
        # the screws' grades of the model's screws.json, the curves and QC pictures embedded
        placement = {s["side"]: s["placement"] for s in json.loads(
            (res / "P01" / "M00" / "screws.json").read_text())["screws"]}
        for side, p in placement.items():
            assert re.search(rf'<tr data-side="{side}"><td class="l">{side}</td>'
                             rf'<td>{p["grade"]}</td>', sec), (tp, side)
        files = set(re.findall(r'<img src="data:image/png;base64,[^"]+"[^>]*data-file="([^"]+)"',
                               sec))
        assert {"pullout_left_curve.png", "compression_curve.png", "roi.png",
                "calibration.png"} <= files
    assert {"mesh.png", "screws.png"} <= set(re.findall(r'data-file="([^"]+)"',
                                                         _section(html, "M00")))
    assert 'data-file="registration.png"' in _section(html, "M12")
    # change from baseline, from the JSON strengths and the long table's vBMD
    comp = [CASES[tp]["compression.json"][0] for tp in ("M00", "M12")]
    pct = 100 * (comp[1] - comp[0]) / comp[0]
    assert re.search('data-case="compression".*?<td>' + re.escape(f"{pct:+.1f} %</td>"),
                     _section(html, "M12"), re.S)
    long = pd.read_csv(res / "tables" / "longitudinal.csv").set_index("timepoint")
    trab = long["trabecular_vbmd_mg_cm3"]
    assert f"{trab['M12']:.1f}" in html
    # the refused load case in the overview, the excluded scan with its reason
    assert re.search(r"pullout strength, left</td>.*?<td>refused</td>", html, re.S)
    assert EXCLUDED_REASON in html and ">other<" not in html
    # self-contained: no resource outside the page (one relative link to the summary)
    assert re.findall(r"""(?:src|href)=["'](?!data:|#)([^"']*)""", html) == [
        "../summary.html"]


def test_page_shows_intervals_and_least_significant_change(page: Path) -> None:
    """The overview's compression row: each scan's interval, and the follow-up's change
    against the least significant change 1.96 (20² + 30²)^½ = 70.7 N (a change of 252 N:
    significant)."""
    html = page.read_text()
    row = re.search(r"<tr><td class=\"l\">compression strength</td>(.*?)</tr>", html, re.S)
    assert row
    for tp, sd in UNC_SD.items():
        v = CASES[tp]["compression.json"][0]
        assert f"{v - 10 * sd:.0f}–{v + 10 * sd:.0f}" in row.group(1)
    lsc = 1.959964 * (20.0 ** 2 + 30.0 ** 2) ** 0.5
    assert f"LSC {lsc:.0f}: significant" in row.group(1)
    assert 'data-significant="yes"' in row.group(1)


def _outcome_cells(html_text: str, label: str) -> list[str]:
    row = re.search(rf'<tr><td class="l">{label}</td><td class="l">[^<]*</td>(.*?)</tr>',
                    html_text, re.S)
    assert row, label
    return re.findall(r"<td>(.*?)</td>", row.group(1), re.S)


def test_page_per_side_pullout_lsc_is_the_tables(page: Path, patient_tree: dict,
                                                  tmp_path: Path) -> None:
    """The right screw's pullout: the follow-up's change (+70.9 N) against the least
    significant change computed here from the uncertainty inputs, 1.96 (30² + 40²)^½ = 98 N
    (within it), and the same number and verdict in tables/least_significant_change.csv
    and the wide table, which the page and the tables take from one function; the left
    screw has no interval in this tree (and its follow-up no strength), so no LSC on the
    page or in the tables."""
    from qctfea.cohort import analysis as cohort

    html_text = page.read_text()
    b, v = (CASES[tp]["pullout_right.json"][0] for tp in ("M00", "M12"))
    want = 1.959964 * (UNC_SD_RIGHT["M00"] ** 2 + UNC_SD_RIGHT["M12"] ** 2) ** 0.5
    assert abs(v - b) < want  # within the LSC
    right = _outcome_cells(html_text, "pullout strength, right")
    assert "LSC" not in right[0]
    assert f"LSC {want:.0f}: within LSC" in right[1] and 'data-significant="no"' in right[1]
    assert "LSC" not in "".join(_outcome_cells(html_text, "pullout strength, left"))
    paths = cohort.tables(patient_tree["res"] / "tables" / "longitudinal.csv", tmp_path)
    lsc = pd.read_csv(paths["least_significant_change"], dtype={"patient": str})
    r = lsc.set_index(["timepoint", "metric"]).loc[("M12", "pullout_strength_right_n")]
    assert r["lsc"] == pytest.approx(want, rel=1e-6) and not r["significant"]
    assert r["change"] == pytest.approx(v - b)
    assert "pullout_strength_left_n" not in set(lsc["metric"])  # no left interval here
    wide = pd.read_csv(paths["wide"], dtype={"patient": str}).iloc[0]
    assert wide["pullout_strength_right_n_M12_lsc"] == pytest.approx(want, rel=1e-6)
    assert not wide["pullout_strength_right_n_M12_significant"]
    # every LSC the page shows is the table's, for every outcome
    for label, col in (("compression strength", "compression_strength_n"),
                       ("pullout strength, right", "pullout_strength_right_n")):
        shown = re.search(r"LSC (\d+)", _outcome_cells(html_text, label)[1]).group(1)
        table = lsc.set_index(["timepoint", "metric"]).loc[("M12", col), "lsc"]
        assert int(shown) == round(table), label


def test_page_says_when_a_scan_has_no_interval(patient_tree: dict, tmp_path: Path) -> None:
    """The follow-up's uncertainty step failed (its uncertainty.json records why): its
    compression cell says it has no interval, and its change no least significant change;
    the baseline keeps its interval."""
    from qctfea.cohort import analysis as cohort
    from qctfea.qc.patient_page import write_patient_page

    res = tmp_path / "demo"
    shutil.copytree(patient_tree["res"], res)
    (res / "P01" / "M12" / "uncertainty.json").write_text(json.dumps(
        {"failed": "patient P01, timepoint M12: no intervals for this scan: a test"}))
    cohort.aggregate([{"patient": "P01", "timepoint": tp, "months": m, "model_timepoint": "M00",
                       "sex": "female"} for tp, m in (("M00", 0.0), ("M12", 12.0))], res,
                     res / "tables" / "longitudinal.csv")
    html = write_patient_page(res, "P01", tmp_path / "P01.html", cohort_name="demo").read_text()
    row = re.search(r"<tr><td class=\"l\">compression strength</td>(.*?)</tr>", html, re.S)
    assert row
    v, sd = CASES["M00"]["compression.json"][0], UNC_SD["M00"]
    assert f"{v - 10 * sd:.0f}–{v + 10 * sd:.0f}" in row.group(1)
    assert row.group(1).count("no interval: its uncertainty step failed") == 1
    assert "LSC" not in row.group(1)


def test_page_shows_a_coarse_label_map_s_note_beside_its_screw(patient_tree: dict,
                                                               tmp_path: Path) -> None:
    """A screw graded on a coarse label map with a breach within half a voxel of the
    accepted grade's limit (screws.json placement `coarse_map_note`): the note stands under
    the timepoint's screw table, naming the side; the other screw has none."""
    from qctfea.qc.patient_page import write_patient_page

    res = tmp_path / "demo"
    shutil.copytree(patient_tree["res"], res)
    path = res / "P01" / "M00" / "screws.json"
    d = json.loads(path.read_text())
    note = "breach 0.9 mm measured on a label map of 3 mm voxels (a test)"
    for sc in d["screws"]:
        if sc["side"] == "right":
            sc["placement"]["coarse_map_note"] = note
    path.write_text(json.dumps(d))
    html = write_patient_page(res, "P01", tmp_path / "P01.html", cohort_name="demo").read_text()
    base = _section(html, "M00")
    assert f'<p class="note">right screw: {note}</p>' in base
    assert "left screw:" not in base


def test_page_shows_the_clinical_categories(page: Path, patient_tree: dict) -> None:
    """Sex, and per timepoint the strength category (women: fragile <= 4500 N < low < 6000 N
    <= normal, Keaveny et al. 2020) and the vBMD category (ACR: osteoporosis < 80 <= low
    bone mass <= 120 < normal), computed here from the JSONs; the sources and the caveat."""
    html = page.read_text()
    assert '<span id="sex">F</span>' in html
    table = re.search(r'<table id="clinical-categories">(.*?)</table>', html, re.S).group(1)
    for key, case in (("strength", "strength"), ("vbmd", "vbmd")):
        cells = re.findall(r"<td>([^<]*)</td>", re.search(
            rf'<tr data-category="{key}">(.*?)</tr>', table, re.S).group(1))
        want = []
        for tp in CASES:
            if case == "strength":
                f = CASES[tp]["compression.json"][0]
                want.append("fragile" if f <= 4500 else "normal" if f >= 6000 else "low")
            else:
                v = json.loads((patient_tree["res"] / "P01" / tp / "bmd.json").read_text())[
                    "trabecular_vbmd_mg_cm3"]
                want.append("osteoporosis" if v < 80 else "normal" if v > 120
                            else "low bone mass")
        assert cells == want, key
    assert "Osteoporos Int 2020;31:1025-1048" in html and "ACR-SPR-SSR" in html
    assert "fragile &lt;= 4500 N &lt; low &lt; 6000 N &lt;= normal" in html
    assert "VirtuOst" in html and "not calibrated" in html


def test_embedded_geometry_is_the_model(page: Path, patient_tree: dict) -> None:
    geo = _geometry(page.read_text())
    cells, tags = patient_tree["cells"], patient_tree["tags"]
    for name, sel in (("bone", np.isin(tags, (1, 2))), ("screw_left", tags == 3),
                      ("screw_right", tags == 4)):
        s = geo["surfaces"][name]
        expected = _boundary_count(cells[sel])
        assert s["n_triangles"] == expected > 0, name
        index = np.frombuffer(base64.b64decode(s["index"]),
                              "<u2" if s["index_type"] == "uint16" else "<u4")
        assert len(index) == 3 * expected and index.max() == s["n_vertices"] - 1
        assert len(_decode(geo, s["positions"])) == s["n_vertices"]
    # the failed elements of each run at its peak (not the 10 more at its end), found in the
    # permuted fields file, at the model's cell centroids (to the quantisation step); a file
    # without peak flags gives its end, and says so
    centroids = patient_tree["points"][cells].mean(axis=1)
    step = np.asarray(geo["step"])
    assert list(geo["elements"]) == [f"{tp}, {CASE_LABEL[c]}" for tp in ("M00", "M12")
                                     for c in CASE_LABEL]
    for (tp, case), idx in patient_tree["failed"].items():
        key = f"{tp}, {CASE_LABEL[case]}"
        assert geo["elements"][key]["at"] == ("end" if (tp, case) == OLD_FIELDS else "peak")
        e = geo["elements"][key]["failed"]
        assert e["n"] == e["n_bone"] == len(idx) == FAILED[tp, case]
        got = _decode(geo, e["positions"])
        want = centroids[idx]
        assert np.all(np.abs(got[np.lexsort(got.T)] - want[np.lexsort(want.T)]) <= step)
        assert geo["elements"][key]["yielded"]["n"] >= len(idx)


def _chromium() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("QCTFEA_REQUIRE_CHROMIUM"):
            pytest.fail("chromium not found but QCTFEA_REQUIRE_CHROMIUM is set (CI)")
        pytest.skip("chromium not installed (apt-get install chromium); CI installs it")
    return exe


def _model_box(geo: dict, cam: dict) -> np.ndarray:
    """[left, top, right, bottom] on the canvas (CSS px from its top-left corner) of the
    page's surfaces (bone and screws, decoded from the embedded geometry) seen by a
    perspective camera at ``cam["position"]`` looking at ``cam["target"]`` (``up``,
    vertical field of view ``fov`` degrees, ``aspect``, ``zoom``), computed here with
    numpy: the view axes as a look-at camera has them, then the pinhole projection to
    normalised device coordinates and the canvas's pixels."""
    pts = np.vstack([_decode(geo, s["positions"]) for s in geo["surfaces"].values()])
    eye, target, up = (np.asarray(cam[k], float) for k in ("position", "target", "up"))
    back = (eye - target) / np.linalg.norm(eye - target)
    right = np.cross(up, back) / np.linalg.norm(np.cross(up, back))
    upward = np.cross(back, right)
    rel = pts - eye
    depth = -(rel @ back)
    assert depth.min() > 0, "part of the model is behind the camera"
    f = cam["zoom"] / np.tan(np.radians(cam["fov"]) / 2)
    x = (f / cam["aspect"] * (rel @ right) / depth + 1) / 2 * cam["width"]
    y = (1 - f * (rel @ upward) / depth) / 2 * cam["height"]
    return np.array([x.min(), y.min(), x.max(), y.max()])


def _check_drawn_in_box(drawn: np.ndarray, box: np.ndarray, margin: int,
                        tight: bool = False) -> None:
    """Every drawn (non-background) pixel of the canvas lies in ``box`` widened by
    ``margin`` px, the box lies well inside the canvas, so that the strips beside it are
    background, and the model fills much of the box; ``tight``: the drawn pixels reach the
    box's four sides (within 3 % of its size), i.e. the model is drawn where it should
    be, at the size it should be."""
    h, w = drawn.shape
    left, top, right, bottom = box
    assert 0 < left < right < w and 0 < top < bottom < h, (box, w, h)
    assert right - left < 0.7 * w, "the model fills the canvas: no background to check"
    rows, cols = np.nonzero(drawn)
    outside = ((cols < left - margin) | (cols > right + margin)
               | (rows < top - margin) | (rows > bottom + margin))
    first = list(zip(cols[outside][:5].tolist(), rows[outside][:5].tolist()))
    assert not outside.any(), (f"{outside.sum()} drawn pixels outside the model's box "
                               f"{np.round(box).tolist()} (+{margin} px), e.g. at {first}")
    x0, x1 = int(np.floor(left)), int(np.ceil(right)) + 1
    y0, y1 = int(np.floor(top)), int(np.ceil(bottom)) + 1
    assert drawn[y0:y1, x0:x1].mean() > 0.2, "the model's box is mostly empty"
    if tight:
        got = np.array([cols.min(), rows.min(), cols.max(), rows.max()], float)
        tol = 0.03 * np.array([right - left, bottom - top] * 2)
        assert np.all(np.abs(got - box) <= tol + 2), (got.tolist(), box.tolist())


def test_page_draws_the_model_offline_in_chromium(page: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    exe = _chromium()
    with Chromium(exe, tmp_path / "profile", extra_args=WEBGL_ARGS) as browser:
        browser.call("Network.enable")
        browser.open(page.as_uri())
        browser.evaluate("new Promise(r => setTimeout(r, 300))")
        assert browser.errors() == []
        assert browser.evaluate("document.body.dataset.scene") == "ready"
        urls = [e["params"]["request"]["url"] for e in browser.events
                if e["method"] == "Network.requestWillBeSent"]
        assert urls and all(u == page.as_uri() or u.startswith("data:") for u in urls), urls
        assert int(browser.evaluate(
            "document.getElementById('scene-canvas').dataset.triangles")) > 1000
        # the failed-element sets are selectable per timepoint and load case
        assert browser.evaluate("Array.from(document.querySelectorAll('#failed-set option'))"
                                ".map(o => o.value)") == [
            f"{tp}, {CASE_LABEL[c]}" for tp in ("M00", "M12") for c in CASE_LABEL] + [""]
        assert browser.evaluate("document.getElementById('scene-counts').textContent") == \
            "M00, vertebral compression, at the peak: 7 failed elements, 57 yielded"
        # the yielded elements are drawn from the start
        assert browser.evaluate("document.getElementById('show-yielded').checked") is True
        browser.evaluate("document.getElementById('scene').scrollIntoView()")
        browser.evaluate("new Promise(r => setTimeout(r, 200))")
        rect = browser.evaluate("(() => { const r = document.getElementById('scene-canvas')"
                                ".getBoundingClientRect(); return [r.left, r.top, r.width, "
                                "r.height]; })()")
        # where the model must be: the surfaces' vertices projected here from the camera
        box = _model_box(_geometry(page.read_text()), browser.evaluate("qctfeaScene.camera()"))
        np.testing.assert_allclose(browser.evaluate("qctfeaScene.screenBox()"), box, atol=1.0)
        shot = browser.screenshot(tmp_path / "patient_page_3d.png", full_page=False)
        # the surfaces alone (no failed-element points, whose sprites reach past them)
        browser.evaluate("(() => { const s = document.getElementById('failed-set'); "
                         "s.value = ''; s.dispatchEvent(new Event('change')); })()")
        browser.evaluate("new Promise(r => setTimeout(r, 200))")
        bare = browser.screenshot(tmp_path / "patient_page_3d_surfaces.png", full_page=False)
        assert browser.errors() == []
    x0, y0, w, h = (int(round(v)) for v in rect)
    canvas = imread(shot)[..., :3][max(y0, 0):y0 + h, max(x0, 0):x0 + w]
    assert canvas.shape[:2] == (h, w)
    drawn = np.any(np.abs(canvas - 1.0) > 0.05, axis=-1)  # background: white
    assert drawn.mean() > 0.02, f"the WebGL canvas is (almost) empty: {drawn.mean():.4f} drawn"
    # with the points: their sprites (about 11 px across here) may pass the box by 6 px
    _check_drawn_in_box(drawn, box, margin=8)
    bare = imread(bare)[..., :3][max(y0, 0):y0 + h, max(x0, 0):x0 + w]
    _check_drawn_in_box(np.any(np.abs(bare - 1.0) > 0.05, axis=-1), box, margin=2, tight=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "patient_page_3d.png")
    shutil.copy(page, ARTIFACTS / "patient_page_P01.html")


def test_page_shows_the_acquisition_and_a_protocol_change(page: Path) -> None:
    """Each timepoint's voxels, kVp, kernel and manufacturer (scan.json), and the follow-up's
    differences from its baseline flagged (slices 1 -> 2 mm, kernel B60f -> B30f)."""
    table = re.search(r'<table id="acquisition">(.*?)</table>', page.read_text(), re.S).group(1)
    body = table[table.index("<tbody>"):]
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>([^<]*)</td>", r)[1:]]
             for r in rows]
    assert cells[0] == ["0.7 mm pixels, 1 mm slices, 120 kVp, B60f, SIEMENS",
                        "0.7 mm pixels, 2 mm slices, 120 kVp, B30f, SIEMENS"]
    assert cells[1] == ["–", "slice spacing 1 -> 2 mm; kernel B60f -> B30f"]
    assert table.count('data-protocol-change="yes"') == 1
