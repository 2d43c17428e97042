"""Self-contained HTML page of one patient: every kept scan's results and a 3D model.

:func:`write_patient_page` writes one HTML file per patient that opens offline (from
``file://``, no network request) and prints: per timepoint the two screws' placement
(Gertzbein-Robbins grade and breach, from ``screws.json``), the vBMD measures (long
table, from ``bmd.json``), pullout strength per side and compression strength (from the
load-case JSONs: ``strength_n``, ``stop_reason``; a result without a strength or without a
file is shown as refused/missing with the reason), the change from the patient's baseline
(earliest kept scan) in %, the force-displacement curves and the scan's QC pictures
(embedded as ``data:`` URIs). The overview gives the patient's sex (sample sheet) and each
scan's clinical categories (long table, :mod:`qctfea.cohort.clinical`): vertebral strength by the
BCT thresholds, trabecular vBMD by the ACR QCT classes, with the sources, the thresholds
applied and what the categories cannot say.

The 3D scene (three.js, bundled and inlined: ``assets/qctfea-three.min.js``, see
``assets/README.md``) shows the model the scans were solved on (the baseline's when
follow-ups are registered to it): the bone surface (boundary triangles of the bone cells,
tags 1 and 2), both screws (tags 3 and 4) and, selectable per timepoint and load case
(compression, pullout of each screw), the elements that had failed (softened, damage model)
at that run's peak force (``failed_at_peak`` in ``<case>_fields.h5``; a fields file written
before the peak flags existed gives the end of the run, and says so), plus optionally every
element that had yielded. The geometry is
computed here from ``mesh.h5`` and embedded as base64 arrays, quantised to uint16 over the
model's bounding box (about 1 µm per step on a vertebra). The scene sets
``window.qctfeaScene`` for tests and scripts: ``camera()`` (position, target, up, field of
view, aspect) and ``screenBox()`` (where the visible surfaces fall on the canvas).

Only the scans of the long table (the kept scans) are shown; scans listed in
``tables/exclusions.csv`` are named with their reason.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qctfea import __version__
from qctfea.cohort import clinical
from qctfea.cohort.longtable import TEXT_COLUMNS, least_significant_changes
from qctfea.errors import QctfeaError
from qctfea.model.mesh_arrays import boundary_triangles, read_model
from qctfea.qc.templating import render
from qctfea.provenance import atomic_path

log = logging.getLogger(__name__)

#: bone tags (body, posterior elements) and the screws' tags (qctfea.model.meshing)
BONE_TAGS = (1, 2)
SCREW_TAGS = {"left": 3, "right": 4}
SIDES = ("left", "right")
#: QC pictures of a scan folder shown per timepoint, in this order (those present)
QC_PICTURES = {
    "roi.png": "trabecular and around-screw ROIs",
    "screws.png": "planned screws (model timepoint)",
    "mesh.png": "FE mesh (model timepoint)",
    "calibration.png": "density calibration",
    "registration.png": "registration to baseline",
}
#: load cases: (key, JSON file, curve picture, label)
CASES = [
    ("pullout_left", "pullout_left.json", "pullout_left_curve.png", "pullout, left screw"),
    ("pullout_right", "pullout_right.json", "pullout_right_curve.png", "pullout, right screw"),
    ("compression", "compression.json", "compression_curve.png", "vertebral compression"),
]
#: the 3D scene's runs, compression first
SCENE_CASES = sorted(CASES, key=lambda case: case[0] != "compression")

#: outcomes whose change from baseline is listed: (key, label, unit, digits)
OUTCOMES = [
    ("pullout_left", "pullout strength, left", "N", 0),
    ("pullout_right", "pullout strength, right", "N", 0),
    ("compression", "compression strength", "N", 0),
    ("trabecular_vbmd_mg_cm3", "trabecular vBMD", "mg/cm³", 1),
    ("integral_vbmd_mg_cm3", "integral vBMD", "mg/cm³", 1),
    ("around_screw_vbmd_left_mg_cm3", "vBMD around the left screw", "mg/cm³", 1),
    ("around_screw_vbmd_right_mg_cm3", "vBMD around the right screw", "mg/cm³", 1),
    ("ct_areal_bmd_g_cm2", "CT-derived areal BMD", "g/cm²", 3),
    ("dxa_areal_bmd_g_cm2", "clinical DXA areal BMD", "g/cm²", 3),
]
#: the long table's column of each outcome key (the load cases' strengths)
LONG_COLUMN = {"pullout_left": "pullout_strength_left_n",
               "pullout_right": "pullout_strength_right_n",
               "compression": "compression_strength_n"}
#: per-set cap on the yielded-element points (every k-th drawn beyond it; the count shown is
#: the full one): keeps a page of three timepoints below about 3 MB
MAX_YIELDED_POINTS = 8_000


# --------------------------------------------------------------------------- geometry


class _Quantiser:
    """uint16 coordinates over a bounding box: x = origin + q * step."""

    def __init__(self, points: np.ndarray):
        lo, hi = points.min(axis=0), points.max(axis=0)
        self.origin = lo
        self.step = np.where(hi > lo, (hi - lo) / 65535.0, 1.0)

    def encode(self, xyz: np.ndarray) -> str:
        q = np.clip(np.rint((np.asarray(xyz, float) - self.origin) / self.step), 0, 65535)
        return _b64(q.astype("<u2"))


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _surface(points: np.ndarray, tri: np.ndarray, quant: _Quantiser) -> dict:
    used, local = np.unique(tri.reshape(-1), return_inverse=True)
    dtype = "<u2" if len(used) <= 65535 else "<u4"
    return {"n_triangles": int(len(tri)), "n_vertices": int(len(used)),
            "positions": quant.encode(points[used]),
            "index": _b64(local.astype(dtype)),
            "index_type": "uint16" if dtype == "<u2" else "uint32"}


def _field_cells(fields_h5: Path) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """Cell centroids of a fields file's own mesh, its per-cell 0/1 flags ``failed`` and
    ``yielded`` (last step) at the curve's peak (``*_at_peak``), and "peak"; or, in a file
    without the peak flags, at the end of the run, and "end"."""
    import h5py

    with h5py.File(fields_h5, "r") as f:
        pts = f["Mesh/mesh/geometry"][:]
        cells = f["Mesh/mesh/topology"][:].astype(np.int64)
        at = "peak" if "Function/failed_at_peak" in f or "Function/yielded_at_peak" in f \
            else "end"
        flags = {}
        for name in ("failed", "yielded"):
            key = f"Function/{name}_at_peak" if at == "peak" else f"Function/{name}"
            if key in f:
                grp = f[key]
                last = max(grp.keys(), key=lambda k: float(k) if k.replace(".", "", 1)
                           .isdigit() else -1.0)
                flags[name] = grp[last][:].reshape(-1) > 0.5
    return pts[cells].mean(axis=1), flags, at


def failed_elements(fields_h5: str | os.PathLike, model_centroids: np.ndarray,
                    tol_mm: float) -> tuple[dict[str, np.ndarray], str] | None:
    """{flag: indices of the model's cells} of the failed and yielded cells of a load case's
    run (at its peak, or at its end: the second item), matched to the model by cell
    centroid (DOLFINx reorders cells when it writes); None when the run's mesh is not this
    model (a centroid farther than ``tol_mm``)."""
    from scipy.spatial import cKDTree

    centroids, flags, at = _field_cells(Path(fields_h5))
    if len(centroids) != len(model_centroids):
        return None
    dist, idx = cKDTree(model_centroids).query(centroids)
    if not np.all(dist <= tol_mm):
        return None
    return {name: np.sort(idx[mask]) for name, mask in flags.items()}, at


def scene_geometry(mesh_path: str | os.PathLike,
                   fields: Mapping[str, str | os.PathLike]) -> tuple[dict, list[str]]:
    """The scene's geometry as JSON-ready data, and notes on what was left out.

    ``fields``: {set name (timepoint and load case): that run's ``<case>_fields.h5``}; each
    matched to the model by centroid.
    """
    points, cells, tags = read_model(mesh_path)
    quant = _Quantiser(points)
    notes: list[str] = []
    geo: dict[str, Any] = {
        "origin": [float(v) for v in quant.origin], "step": [float(v) for v in quant.step],
        "center": [float(v) for v in (points.min(0) + points.max(0)) / 2],
        "size": float(np.linalg.norm(points.max(0) - points.min(0))),
        "surfaces": {}, "elements": {}}
    bone = np.isin(tags, BONE_TAGS)
    geo["surfaces"]["bone"] = _surface(points, boundary_triangles(points, cells[bone]), quant)
    for side, tag in SCREW_TAGS.items():
        sel = tags == tag
        if sel.any():
            geo["surfaces"][f"screw_{side}"] = _surface(
                points, boundary_triangles(points, cells[sel]), quant)
    centroids = points[cells].mean(axis=1)
    edge = np.linalg.norm(points[cells[:, 0]] - points[cells[:, 1]], axis=1)
    tol = max(1e-6, 1e-3 * float(np.median(edge)))
    for key, path in fields.items():
        if not Path(path).is_file():
            notes.append(f"{key}: no fields file ({Path(path).name})")
            continue
        found = failed_elements(path, centroids, tol)
        if found is None:
            notes.append(f"{key}: this run used another mesh than the one shown "
                         "(registration disabled?); its elements are not drawn")
            continue
        sets, at = found
        entry: dict[str, Any] = {"at": at}
        for name, idx in sets.items():
            n = int(len(idx))
            shown = idx
            if name == "yielded" and n > MAX_YIELDED_POINTS:
                shown = idx[:: math.ceil(n / MAX_YIELDED_POINTS)]
            entry[name] = {"n": n, "n_shown": int(len(shown)),
                           "n_bone": int(np.isin(tags[idx], BONE_TAGS).sum()),
                           "positions": quant.encode(centroids[shown])}
        geo["elements"][key] = entry
    return geo, notes


# --------------------------------------------------------------------------- values


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise QctfeaError(f"patient page: cannot read {path} ({exc})") from exc


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, digits: int = 1, unit: str = "") -> str:
    f = _finite(v)
    if f is None:
        return "–"
    return f"{f:.{digits}f}" + (f" {unit}" if unit else "")


def _pct(v: float | None, base: float | None) -> float | None:
    if v is None or base is None or base == 0:
        return None
    return 100.0 * (v - base) / base


def _fmt_pct(p: float | None) -> str:
    return "–" if p is None else f"{p:+.1f} %"


def _load_case(path: Path) -> dict:
    """One load case's shown result: strength, stiffness, status and reason."""
    d = _read_json(path)
    if d is None:
        return {"status": "missing", "strength": None, "stiffness": None,
                "reason": f"{path.name} not found", "text": "missing"}
    strength = _finite(d.get("strength_n"))
    reason = d.get("stop_reason") or ""
    if strength is None:
        return {"status": "refused", "strength": None,
                "stiffness": _finite(d.get("stiffness_n_per_mm")),
                "reason": reason or "no strength in the result (the curve did not peak)",
                "text": "refused"}
    return {"status": "ok", "strength": strength,
            "stiffness": _finite(d.get("stiffness_n_per_mm")), "reason": reason,
            "rule": d.get("strength_rule", ""), "text": f"{round(strength)} N"}


def _screws(path: Path, row: Mapping[str, Any]) -> list[dict]:
    """Placement of each screw: from the model's screws.json, else the long table."""
    d = _read_json(path) or {}
    by_side = {s.get("side"): s.get("placement") or {} for s in d.get("screws", [])}
    out = []
    for side in SIDES:
        p = by_side.get(side) or {}
        grade = p.get("grade", row.get(f"screw_grade_{side}"))
        out.append({
            "side": side,
            "grade": grade if isinstance(grade, str) and grade else "–",
            "breach": _fmt(p.get("breach_mm", row.get(f"screw_breach_{side}_mm")), 1, "mm"),
            "direction": p.get("direction", row.get(f"screw_breach_direction_{side}")) or "–",
            "clearance": _fmt(p.get("min_clearance_mm"), 2, "mm"),
            "note": p.get("coarse_map_note", ""),
        })
    return out


def _text(v: Any) -> str:
    """A text cell of the long table ('' for a missing one)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def clinical_summary(rows: pd.DataFrame) -> dict | None:
    """The patient's sex and the sources of the clinical categories of its scans (the long
    table's rows); None for a long table without the categories."""
    if not {"strength_category", "vbmd_category"} <= set(rows.columns):
        return None
    sexes = sorted({_text(v) for v in rows.get("sex", pd.Series(dtype=str))} - {""})
    sources = [_text(v) for c in ("strength_category_source", "vbmd_category_source")
               if c in rows.columns for v in dict.fromkeys(rows[c].dropna())]
    return {"sex": ", ".join(sexes) or "not given", "sources": sources,
            "bct": clinical.BCT_SOURCE, "acr": clinical.ACR_SOURCE,
            "caveat": clinical.CAVEAT, "unknown_sex": clinical.UNKNOWN_SEX}


def _data_uri(path: Path, compress: bool = True) -> str:
    """A PNG as a data: URI; with ``compress``, re-encoded with a 256-colour palette when
    that is smaller (about half the size for matplotlib figures, no visible change)."""
    import io

    from PIL import Image

    data = path.read_bytes()
    if compress:
        try:
            with Image.open(path) as im:
                q = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT,
                                               dither=Image.Dither.NONE)
            buf = io.BytesIO()
            q.save(buf, "PNG", optimize=True)
            if buf.tell() < len(data):
                data = buf.getvalue()
        except (OSError, ValueError) as exc:
            raise QctfeaError(f"patient page: cannot read the picture {path} ({exc})") from exc
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _script_safe(text: str) -> str:
    """Text safe inside a <script> element (no closing tag, no comment opener): ``<\\/``
    is a valid escape in JSON and in JS strings (the bundle has no ``</`` outside them)."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


# --------------------------------------------------------------------------- page


def write_patient_page(
    cohort_results_dir: str | os.PathLike,
    patient: str,
    out_html: str | os.PathLike,
    *,
    cohort_name: str = "",
    long_csv: str | os.PathLike | None = None,
    exclusions_csv: str | os.PathLike | None = None,
    model_timepoint: str | None = None,
    compress_pictures: bool = True,
) -> Path:
    """Write the self-contained page of ``patient``; return its path.

    ``cohort_results_dir`` is ``results/<cohort>`` (the per-scan folders
    ``<patient>/<timepoint>/``); ``long_csv`` and ``exclusions_csv`` default to its
    ``tables/longitudinal.csv`` and ``tables/exclusions.csv`` (the latter optional).
    ``model_timepoint``: whose ``mesh.h5`` the 3D scene shows (default: the earliest
    kept scan whose folder has one, i.e. the baseline model). ``compress_pictures``:
    embed the PNGs with a 256-colour palette when smaller (False: byte for byte).
    """
    res = Path(cohort_results_dir)
    patient = str(patient)
    long, rows, excluded = _patient_tables(res, patient, long_csv, exclusions_csv)
    scans = _scans(res, patient, rows, long, compress_pictures)

    # the model the scans were solved on: the baseline's (registered follow-ups) or own
    mt = model_timepoint or next((s["timepoint"] for s in scans
                                  if (s["dir"] / "mesh.h5").is_file()), None)
    for s in scans:
        own = s["dir"] / "screws.json"
        s["screws"] = _screws(own if own.is_file() or mt is None
                              else res / patient / mt / "screws.json", s["row"])

    base = scans[0] if scans else None
    outcome_rows = _outcome_rows(scans, base, _least_significant_changes(rows))
    _add_changes_and_bmd(scans, base)

    geometry, notes = None, []
    if mt is not None and (res / patient / mt / "mesh.h5").is_file():
        # every load case each scan ran (its result file), compression first
        geometry, notes = scene_geometry(
            res / patient / mt / "mesh.xdmf",
            {f"{s['timepoint']}, {label}": s["dir"] / f"{key}_fields.h5"
             for s in scans for key, name, _, label in SCENE_CASES
             if (s["dir"] / name).is_file()})
    elif scans:
        notes.append("no model mesh (mesh.h5) found for this patient")

    pkg = resources.files("qctfea.qc")
    doc = render(
        "patient.html.j2", patient=patient, cohort=cohort_name, version=__version__,
        created=time.strftime("%Y-%m-%d %H:%M"), scans=scans, base=base,
        outcome_rows=outcome_rows, excluded=excluded, model_timepoint=mt, notes=notes,
        clinical=clinical_summary(rows),
        # inserted with |safe: JSON and the library, made safe inside <script>
        geometry_json=_script_safe(json.dumps(geometry)) if geometry else None,
        element_sets=list(geometry["elements"]) if geometry else [],
        three_js=_script_safe((pkg / "assets" / "qctfea-three.min.js").read_text("utf-8"))
        if geometry else None,
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(doc, encoding="utf-8")
    log.info(f"qctfea patient page: {patient}, {len(scans)} scans, "
             f"{len(doc) / 1e6:.2f} MB -> {out}")
    return out


def _patient_tables(res: Path, patient: str, long_csv, exclusions_csv
                    ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """The long table, the patient's rows in months order and the patient's exclusions
    (tables/exclusions.csv, optional)."""
    long_csv = Path(long_csv) if long_csv else res / "tables" / "longitudinal.csv"
    if not long_csv.is_file():
        raise QctfeaError(f"patient page: long table {long_csv} not found; run the "
                          "aggregate step first")
    long = pd.read_csv(long_csv, dtype={"patient": str, "timepoint": str, **TEXT_COLUMNS})
    rows = long[long["patient"] == patient].sort_values("months", kind="mergesort")
    excl_path = Path(exclusions_csv) if exclusions_csv else res / "tables" / "exclusions.csv"
    excluded = []
    if excl_path.is_file():
        ex = pd.read_csv(excl_path, dtype=str).fillna("")
        excluded = ex[ex["patient"] == patient].to_dict("records")
    return long, rows, excluded


def _scans(res: Path, patient: str, rows: pd.DataFrame, long: pd.DataFrame,
           compress_pictures: bool) -> list[dict]:
    """One dict per kept scan: its row, folder, load cases (with curves), outcome values,
    QC pictures and clinical categories."""
    # pullout in loads.cases: a strength in the long table, or a pullout result on disk
    pullout = bool(any(long[c].notna().any() for c in long.columns
                       if c.startswith("pullout_strength_")) or any(
        (res / patient / str(t) / f"pullout_{s}.json").is_file()
        for t in rows["timepoint"] for s in SIDES))
    scans = []
    for row in rows.to_dict("records"):
        tp = str(row["timepoint"])
        d = res / patient / tp
        cases = {key: {**_load_case(d / fname), "label": label,
                       "curve": _data_uri(d / png, compress_pictures)
                       if (d / png).is_file() else None}
                 for key, fname, png, label in CASES
                 if pullout or key == "compression"}
        values = {k: _finite(row.get(k)) for k, *_ in OUTCOMES if k in row}
        values.update({k: c["strength"] for k, c in cases.items()})
        pictures = [{"uri": _data_uri(d / name, compress_pictures), "caption": f"{tp}: {cap}",
                     "file": name}
                    for name, cap in QC_PICTURES.items() if (d / name).is_file()]
        scans.append({"timepoint": tp, "months": _finite(row["months"]), "row": row,
                      "dir": d, "cases": cases, "values": values, "pictures": pictures,
                      "strength_category": _text(row.get("strength_category")) or "–",
                      "vbmd_category": _text(row.get("vbmd_category")) or "–",
                      "acquisition": _acquisition(row),
                      "protocol_change": _text(row.get("protocol_change"))})
    return scans


def _acquisition(row: Mapping[str, Any]) -> str:
    """The scan's voxel size, kVp, kernel and manufacturer (long table), as one line; '–'
    when the table has none (scan.json not read)."""
    px, sl = _finite(row.get("pixel_spacing_mm")), _finite(row.get("slice_spacing_mm"))
    parts = [f"{px:.2g} mm pixels, {sl:.3g} mm slices" if px and sl else "",
             f"{_finite(row.get('kvp')):g} kVp" if _finite(row.get("kvp")) else "",
             _text(row.get("kernel")), _text(row.get("manufacturer"))]
    return ", ".join(p for p in parts if p) or "–"


def _least_significant_changes(rows: pd.DataFrame) -> dict[tuple[str, str], dict]:
    """{(long-table column, timepoint): row} of the patient's least significant changes,
    computed by the function that writes ``tables/least_significant_change.csv`` (the page
    and the tables agree by construction; docs/uncertainty.md)."""
    cols = [LONG_COLUMN.get(key, key) for key, *_ in OUTCOMES]
    table = least_significant_changes(rows, cols)
    return {(r["metric"], str(r["timepoint"])): r for r in table.to_dict("records")}


def _outcome_rows(scans: list[dict], base: dict | None,
                  lsc_rows: Mapping[tuple[str, str], dict]) -> list[dict]:
    """The outcomes table: per outcome, per scan the value, the change from baseline, the
    interval and whether the change exceeds the least significant change (``lsc_rows``:
    :func:`_least_significant_changes`)."""
    outcome_rows = []
    for key, label, unit, digits in OUTCOMES:
        if not any(s["values"].get(key) is not None for s in scans):
            continue
        b = base["values"].get(key) if base else None
        col = LONG_COLUMN.get(key, key)
        cells = []
        for s in scans:
            v = s["values"].get(key)
            case = s["cases"].get(key)
            if v is None and case is not None and case["status"] != "ok":
                text = f"{case['text']}"
            else:
                text = _fmt(v, digits)
            lo, hi = (_finite(s["row"].get(f"{col}_ci_{e}")) for e in ("low", "high"))
            r = lsc_rows.get((col, s["timepoint"]))
            lsc = sig = None
            if s is not base and r is not None and not pd.isna(r["significant"]):
                lsc, sig = r["lsc"], bool(r["significant"])
            interval = ""
            if v is not None and None not in (lo, hi):
                interval = f"{_fmt(lo, digits)}–{_fmt(hi, digits)}"
            elif v is not None and _text(s["row"].get("uncertainty_failed")):
                interval = "no interval: its uncertainty step failed (long table: " \
                           "uncertainty_failed)"
            cells.append({"value": text, "change": "" if s is base or v is None else
                          _fmt_pct(_pct(v, b)),
                          "interval": interval,
                          "lsc": "" if lsc is None else
                          f"LSC {_fmt(lsc, digits)}: {'significant' if sig else 'within LSC'}",
                          "significant": sig})
        outcome_rows.append({"label": label, "unit": unit, "cells": cells})
    return outcome_rows


def _add_changes_and_bmd(scans: list[dict], base: dict | None) -> None:
    """Each load case's change from baseline and stiffness text; each scan's BMD list."""
    for s in scans:
        for key, c in s["cases"].items():
            c["change"] = "" if s is base else _fmt_pct(_pct(c["strength"],
                                                             base["cases"].get(key, {})
                                                             .get("strength")))
            c["stiffness_text"] = _fmt(c["stiffness"], 0, "N/mm")
        r = s["row"]
        s["bmd"] = [
            ("trabecular vBMD", _fmt(r.get("trabecular_vbmd_mg_cm3"), 1, "mg/cm³")),
            ("integral vBMD", _fmt(r.get("integral_vbmd_mg_cm3"), 1, "mg/cm³")),
            ("vBMD around the left screw",
             _fmt(r.get("around_screw_vbmd_left_mg_cm3"), 1, "mg/cm³")),
            ("vBMD around the right screw",
             _fmt(r.get("around_screw_vbmd_right_mg_cm3"), 1, "mg/cm³")),
            ("CT-derived areal BMD", _fmt(r.get("ct_areal_bmd_g_cm2"), 3, "g/cm²")),
            ("clinical DXA areal BMD", _fmt(r.get("dxa_areal_bmd_g_cm2"), 3, "g/cm²")),
        ]
        s["bmd"] = [(k, v) for k, v in s["bmd"] if v != "–"]
