"""Round trips with 3D Slicer: screws out as markups and surfaces, landmarks back in.

Coordinate conventions
----------------------
qctfea works in the scan's physical coordinates as DICOM and ITK define them:
**LPS**, millimetres (x grows towards the patient's Left, y towards Posterior,
z towards Superior). ``screws.json``, the landmarks JSON, and the origin and
direction of every image qctfea writes are in LPS.

3D Slicer shows everything in **RAS** (x towards the Right, y Anterior, z
Superior: the LPS point ``(x, y, z)`` is ``(-x, -y, z)`` in RAS), but its files
need not be:

- Markups files (``.mrk.json``) say their coordinate system in each markup's
  ``coordinateSystem`` key ("LPS" or "RAS"; the schema's default, when the key
  is absent, is LPS). :func:`write_markups` writes LPS, so the numbers in the
  file are exactly those of ``screws.json``; Slicer converts them on load.
  :func:`read_landmarks_markups` accepts both and converts RAS to LPS by
  negating x and y.
- Surface files (STL) carry no coordinate system in the format. Slicer since
  4.11 assumes LPS for models unless the file header says ``SPACE=RAS``; the
  STL files written here are in LPS and say ``SPACE=LPS`` in their 80-byte
  header (choose "LPS" if Slicer's Add Data dialog asks).

A physical point ``p`` lies in voxel ``round(inv(D @ diag(s)) @ (p - o))`` of an
image with origin ``o``, spacing ``s`` and direction matrix ``D`` (ITK's
``TransformPhysicalPointToIndex``), whatever the image's orientation on disk;
this is how the screws found in Slicer land on the same voxels qctfea uses.

Surfaces: neither scikit-image nor VTK is in qctfea's environment, so the
vertebra surface is the voxel-face surface (the exterior faces of the mask's
voxels, two triangles each), not marching cubes: blocky, but exactly the
voxelised boundary the placement grading uses, watertight, and consistently
oriented (outward normals). STL files are written with meshio (binary).

The accepted layouts of a markups file with landmarks are described in
:func:`read_landmarks_markups` and ``docs/slicer.md``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np

from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, read_json

SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
          "Resources/Schema/markups-schema-v1.0.3.json#")
SIDES = ("left", "right")
#: markup types whose control points :func:`read_landmarks_markups` reads
POINT_TYPES = ("Fiducial", "Line", "Curve")
#: the documented order of four unlabelled control points (layout c)
UNLABELLED_ORDER = (("left", "entry"), ("left", "target"), ("right", "entry"),
                    ("right", "target"))
#: header of the STL files (80 bytes): Slicer reads the coordinate system from it
STL_HEADER = "qctfea surface, scanner coordinates in mm. SPACE=LPS"

_HELP = ("give one Line markup per side (named with 'left' / 'right'; first point the entry, "
         "second the target), or one point list of four points labelled 'left entry', "
         "'left target', 'right entry', 'right target' (or four unlabelled points in that "
         "order); see docs/slicer.md")


# --- markups out ---------------------------------------------------------------------------


def write_markups(screws: list[dict], path) -> None:
    """Screws (entries of screws.json's "screws" list) as a Slicer markups file: one Line
    per screw, named "<side> screw", from the entry ("<side> entry") to the tip
    ("<side> tip"), in LPS mm exactly as screws.json holds them."""
    markups = []
    for sc in screws:
        side = sc["side"]
        desc = (f"{sc.get('diameter_mm', '?')} x {sc.get('length_mm', '?')} mm screw "
                "(qctfea screws.json)")
        points = []
        for k, (key, role) in enumerate((("entry_mm", "entry"), ("tip_mm", "tip"))):
            pos = [float(v) for v in sc[key]]
            if len(pos) != 3 or not np.all(np.isfinite(pos)):
                raise QctfeaError(f"{path}: the {side} screw's {key} is not 3 finite numbers "
                                  f"({sc[key]!r}); check screws.json")
            points.append({"id": str(k + 1), "label": f"{side} {role}", "description": desc,
                           "associatedNodeID": "", "position": pos,
                           "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                           "selected": True, "locked": False, "visibility": True,
                           "positionStatus": "defined"})
        markups.append({"type": "Line", "name": f"{side} screw", "coordinateSystem": "LPS",
                        "coordinateUnits": "mm", "locked": False,
                        "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
                        "lastUsedControlPointNumber": 2, "controlPoints": points,
                        "measurements": []})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"@schema": SCHEMA, "markups": markups}, indent=4) + "\n",
            encoding="utf-8")


# --- landmarks in ---------------------------------------------------------------------------


def _points(markup: dict, where: str) -> list[tuple[str, np.ndarray]]:
    """(label, LPS position) of a markup's defined control points."""
    system = markup.get("coordinateSystem", "LPS")
    if system not in ("LPS", "RAS"):
        raise QctfeaError(f"{where}: coordinateSystem {system!r} is not known (Slicer writes "
                          "'LPS' or 'RAS'); save the markups from Slicer again, or correct it")
    units = markup.get("coordinateUnits", "mm")
    if units not in ("mm", ["mm", "UCUM", "millimeter"]):
        raise QctfeaError(f"{where}: coordinateUnits {units!r}; the landmarks must be in mm")
    cps = markup.get("controlPoints") or []
    if not isinstance(cps, list):
        raise QctfeaError(f"{where}: 'controlPoints' is not a list; {_HELP}")
    out = []
    for k, cp in enumerate(cps):
        if not isinstance(cp, dict) or cp.get("positionStatus", "defined") == "undefined":
            continue  # a point Slicer holds a place for but that was never placed
        try:
            pos = np.asarray(cp["position"], float)
        except (KeyError, TypeError, ValueError) as exc:
            raise QctfeaError(f"{where}: control point {k + 1} has no position of 3 numbers "
                              f"({exc})") from exc
        if pos.shape != (3,) or not np.all(np.isfinite(pos)):
            raise QctfeaError(f"{where}: control point {k + 1}: position {cp['position']!r} "
                              "is not 3 finite numbers")
        if system == "RAS":
            pos = pos * np.array([-1.0, -1.0, 1.0])
        out.append((str(cp.get("label") or ""), pos))
    return out


def _side_of(text: str) -> str | None:
    """'left' or 'right' when the text names exactly one of them (case-insensitive)."""
    found = [s for s in SIDES if re.search(s, text, re.IGNORECASE)]
    return found[0] if len(found) == 1 else None


def _role_of(text: str) -> str | None:
    """'entry' or 'target' (a 'tip' is the target) when the label names exactly one."""
    low = text.lower()
    found = {"entry"} if "entry" in low else set()
    if "target" in low or "tip" in low:
        found.add("target")
    return found.pop() if len(found) == 1 else None


def read_landmarks_markups(path, context: str = "") -> dict:
    """qctfea's landmarks ``{"left": {"entry_mm", "target_mm"}, "right": {...}}`` (LPS mm)
    from a 3D Slicer markups file (``.mrk.json``). Accepted layouts:

    (a) one markup of type Line per side, its name containing "left" or "right"
        (case-insensitive, e.g. "left screw"): first control point the entry, second
        the target (or the screw's tip);
    (b) a single Fiducial, Line or Curve markup of four control points labelled
        "left entry", "left target" (or "left tip"), "right entry", "right target" in
        any order;
    (c) a single such markup of four unlabelled control points (labels naming no side
        and role, e.g. Slicer's "F-1") in the order left entry, left target, right
        entry, right target.

    Positions in RAS (``coordinateSystem: "RAS"``) are converted to LPS (x, y negated);
    a markup without the key is LPS (the schema's default). Control points whose
    ``positionStatus`` is "undefined" are skipped. Anything else is an error naming
    the file and what to change."""
    where = f"{context} ({path})" if context else str(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("markups"), list):
        raise QctfeaError(f"{where}: not a 3D Slicer markups file (no 'markups' list); "
                          f"{_HELP}")
    markups = [m for m in data["markups"] if isinstance(m, dict)]
    if not markups:
        raise QctfeaError(f"{where}: the file holds no markups; {_HELP}")

    named = [m for m in markups
             if m.get("type") == "Line" and _side_of(str(m.get("name", ""))) is not None]
    if named:  # layout (a)
        out = {}
        for m in named:
            side = _side_of(str(m.get("name", "")))
            name = m.get("name")
            if side in out:
                raise QctfeaError(f"{where}: more than one Line markup named for the {side} "
                                  f"side ('{name}'); keep one per side")
            pts = _points(m, f"{where}, markup '{name}'")
            if len(pts) != 2:
                raise QctfeaError(f"{where}: Line markup '{name}' has {len(pts)} placed "
                                  "control point(s); a line needs 2: the entry, then the "
                                  "target")
            out[side] = {"entry_mm": pts[0][1].tolist(), "target_mm": pts[1][1].tolist()}
        missing = [s for s in SIDES if s not in out]
        if missing:
            raise QctfeaError(f"{where}: no Line markup for the {missing[0]} side (found "
                              f"{[m.get('name') for m in named]}); add a Line named "
                              f"'{missing[0]} screw' from the entry to the target")
        return out

    usable = [m for m in markups if m.get("type") in POINT_TYPES]
    if len(usable) != 1:
        raise QctfeaError(
            f"{where}: {len(usable)} Fiducial/Line/Curve markups "
            f"({[m.get('name', '?') for m in usable]}) and none is a Line named 'left' or "
            f"'right'; {_HELP}")
    m = usable[0]
    pts = _points(m, f"{where}, markup '{m.get('name', '?')}'")
    if len(pts) != 4:
        raise QctfeaError(f"{where}: markup '{m.get('name', '?')}' has {len(pts)} placed "
                          f"control point(s); need 4 (entry and target per side), or {_HELP}")
    keys = [(_side_of(label), _role_of(label)) for label, _ in pts]
    labelled = [k[0] is not None and k[1] is not None for k in keys]
    if all(labelled):  # layout (b)
        if len(set(keys)) != 4:
            raise QctfeaError(f"{where}: control point labels {[lb for lb, _ in pts]} do not "
                              "name each of left entry, left target, right entry, right "
                              "target once")
    elif not any(k[0] is not None or k[1] is not None for k in keys):  # layout (c)
        keys = list(UNLABELLED_ORDER)
    else:
        raise QctfeaError(f"{where}: control point labels {[lb for lb, _ in pts]}: some name a "
                          "side and role and some do not; label all four ('left entry', "
                          "'left target', 'right entry', 'right target') or none (then the "
                          "order is left entry, left target, right entry, right target)")
    out = {s: {} for s in SIDES}
    for (side, role), (_, pos) in zip(keys, pts):
        out[side][f"{role}_mm"] = pos.tolist()
    return out


# --- surfaces ---------------------------------------------------------------------------------


def _index_to_physical(img) -> tuple[np.ndarray, np.ndarray]:
    """(M, o): physical LPS point = o + M @ (continuous index i, j, k)."""
    d = np.asarray(img.GetDirection(), float).reshape(3, 3)
    return d @ np.diag(img.GetSpacing()), np.asarray(img.GetOrigin(), float)


def _write_stl(points: np.ndarray, triangles: np.ndarray, path) -> None:
    """Binary STL with meshio; its 80-byte header then says the coordinate system."""
    import meshio

    mesh = meshio.Mesh(np.asarray(points, float), [("triangle", np.asarray(triangles))])
    with atomic_path(path) as tmp:
        meshio.write(str(tmp), mesh, file_format="stl", binary=True)
        with open(tmp, "r+b") as fh:
            fh.write(STL_HEADER.ljust(80).encode("ascii"))


def voxel_surface(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exterior voxel faces of a boolean mask (i, j, k = x, y, z index order) as a
    watertight triangle surface: (vertices in continuous index coordinates, triangles),
    oriented with outward normals in index space. A voxel spans its index +- 0.5."""
    m = np.pad(np.asarray(mask, bool), 1)
    shape = np.array(m.shape) + 1  # corner grid
    tris = []
    for a in range(3):
        b, c = (a + 1) % 3, (a + 2) % 3  # e_b x e_c = e_a
        d = np.diff(m.astype(np.int8), axis=a)
        for sign in (-1, 1):  # -1: inside before outside along a, outward normal +e_a
            base = np.argwhere(d == sign)
            if len(base) == 0:
                continue
            base[:, a] += 1  # the corner plane between the two voxels
            eb, ec = np.eye(3, dtype=int)[b], np.eye(3, dtype=int)[c]
            quad = [base, base + eb, base + eb + ec, base + ec]
            if sign == 1:
                quad = quad[::-1]
            ids = [np.ravel_multi_index(q.T, shape) for q in quad]
            tris += [np.stack([ids[0], ids[1], ids[2]], 1), np.stack([ids[0], ids[2], ids[3]], 1)]
    if not tris:
        return np.zeros((0, 3)), np.zeros((0, 3), int)
    tri = np.concatenate(tris)
    used, inv = np.unique(tri, return_inverse=True)
    verts = np.stack(np.unravel_index(used, shape), 1).astype(float) - 1.5
    return verts, inv.reshape(-1, 3)


def write_surface_stl(mask_image, path, transform=None) -> None:
    """The surface of a SimpleITK mask image (nonzero = inside) as binary STL in the
    scanner's LPS coordinates (mm): the voxel-face surface (:func:`voxel_surface`;
    neither scikit-image nor VTK is installed, so no marching cubes), each vertex mapped
    from voxel index to physical through the image's origin, spacing and direction, then
    through ``transform`` (a rigid SimpleITK transform, e.g. a follow-up's registration:
    the surface as it lies in that scan) if given."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(mask_image) != 0  # z, y, x
    if not arr.any():
        raise QctfeaError(f"{path}: the mask image is empty; no surface to write")
    lo = np.argwhere(arr).min(0)
    hi = np.argwhere(arr).max(0) + 1
    crop = arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].transpose(2, 1, 0)  # i, j, k
    verts, tri = voxel_surface(crop)
    verts = verts + lo[::-1]  # back to the full image's indices
    mat, origin = _index_to_physical(mask_image)
    if np.linalg.det(mat) < 0:  # a mirroring direction turns the triangles inside out
        tri = tri[:, ::-1]
    _write_stl(moved(origin + verts @ mat.T, transform), tri, path)


def moved(points: np.ndarray, transform=None) -> np.ndarray:
    """Points (N x 3, LPS mm) through a SimpleITK transform (unchanged without one)."""
    from qctfea.imaging.registration import transform_points

    pts = np.asarray(points, float).reshape(-1, 3)
    return pts if transform is None else transform_points(transform, pts)


def screw_surface(screw: dict, segments: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A closed cylinder of the screw's diameter from its entry to its tip (LPS mm):
    (vertices, triangles with outward normals). The cross-section is the regular
    ``segments``-gon inscribed in the circle."""
    entry = np.asarray(screw["entry_mm"], float)
    tip = np.asarray(screw["tip_mm"], float)
    r = float(screw["diameter_mm"]) / 2
    a = tip - entry
    if np.linalg.norm(a) == 0:
        raise QctfeaError(f"the {screw.get('side', '?')} screw's entry and tip coincide")
    a = a / np.linalg.norm(a)
    u = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(a, u)  # u x v = a
    ang = 2 * np.pi * np.arange(segments) / segments
    ring = r * (np.outer(np.cos(ang), u) + np.outer(np.sin(ang), v))
    verts = np.vstack([entry + ring, tip + ring, entry, tip])
    n = segments
    k = np.arange(n)
    k1 = (k + 1) % n
    ec, tc = 2 * n, 2 * n + 1
    tri = np.vstack([
        np.stack([k, k1, n + k1], 1), np.stack([k, n + k1, n + k], 1),  # side
        np.stack([np.full(n, tc), n + k, n + k1], 1),  # tip cap, normal +a
        np.stack([np.full(n, ec), k1, k], 1),  # entry cap, normal -a
    ])
    return verts, tri


def write_screw_stl(screw: dict, path, segments: int = 32, transform=None) -> None:
    """A screw (an entry of screws.json's "screws" list) as a closed cylinder STL from the
    entry to the tip, of its diameter, in LPS mm (binary, meshio); its vertices then through
    ``transform`` (rigid) if given."""
    verts, tri = screw_surface(screw, segments)
    _write_stl(moved(verts, transform), tri, path)


# --- one scan ---------------------------------------------------------------------------------


def export_scan(screws_json, parts_image_path, out_dir, context: str = "",
                transform_path=None) -> dict:
    """``screws.mrk.json``, ``vertebra.stl``, ``screw_left.stl`` and ``screw_right.stl`` of
    a scan into ``out_dir``, for viewing with the CT in 3D Slicer. The vertebra is the bone
    of the parts image (body, posterior elements, trabecular ROI; end caps left out).
    Refused screws are exported too (with a warning), so that they can be reviewed; when the
    planning made no screw at all (its refusal says why), the vertebra is exported and the
    markups file and the screws' STL files hold none.

    ``transform_path``: a follow-up's ``registration.tfm`` (baseline points to follow-up
    points). The screws and vertebra are then the baseline model's (``screws_json`` and
    ``parts_image_path`` of the baseline), carried into the follow-up's scanner coordinates,
    where its FE model puts them (docs/slicer.md)."""
    import SimpleITK as sitk

    from qctfea.imaging.masks import BONE_PARTS

    where = f"{context}: " if context else ""
    for p, what in ((screws_json, "screws file"), (parts_image_path, "vertebra parts image"),
                    *([(transform_path, "registration transform")] if transform_path else [])):
        if not Path(p).is_file():
            raise QctfeaError(f"{where}{what} {p} not found; run the pipeline up to it first, "
                              "or correct the path")
    data = read_json(screws_json)
    screws = data.get("screws") if isinstance(data, dict) else None
    refused = data.get("refused") if isinstance(data, dict) else None
    if not screws and not refused:
        raise QctfeaError(f"{where}{screws_json} holds no screws (no 'screws' list)")
    if refused:
        warnings.warn(f"{where}{screws_json}: " + (
            "these screws were refused at planning" if screws else
            "no screw was made at planning") + f" ({refused}); exported for review",
            stacklevel=2)
    screws = screws or []
    try:
        parts = sitk.ReadImage(str(parts_image_path))
    except RuntimeError as exc:
        raise QctfeaError(f"{where}vertebra parts image {parts_image_path} cannot be read "
                          f"({str(exc).strip()[-160:]})") from exc
    bone = sitk.GetImageFromArray(
        np.isin(sitk.GetArrayFromImage(parts), BONE_PARTS).astype(np.uint8))
    bone.CopyInformation(parts)
    tx = sitk.ReadTransform(str(transform_path)) if transform_path else None
    out = Path(out_dir)
    files = {"markups": out / "screws.mrk.json", "vertebra": out / "vertebra.stl"}
    write_markups([{**sc, "entry_mm": moved(sc["entry_mm"], tx)[0].tolist(),
                    "tip_mm": moved(sc["tip_mm"], tx)[0].tolist()} for sc in screws],
                  files["markups"])
    write_surface_stl(bone, files["vertebra"], tx)
    by_side = {sc["side"]: sc for sc in screws}
    for side in dict.fromkeys([*SIDES, *by_side]):
        files[f"screw_{side}"] = out / f"screw_{side}.stl"
        if side in by_side:
            write_screw_stl(by_side[side], files[f"screw_{side}"], transform=tx)
        else:  # no such screw (refused planning): an STL without triangles
            _write_stl(np.zeros((0, 3)), np.zeros((0, 3), int), files[f"screw_{side}"])
    return files
