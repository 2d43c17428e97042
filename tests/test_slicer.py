"""Round trips with 3D Slicer (qctfea.qc.slicer): markups out and back, RAS files, the
accepted layouts and their errors, voxel lookup through an oriented image, STL surfaces,
and plan_screws / export-slicer on the demo scan."""
from __future__ import annotations

import gzip
import json
import struct

import meshio
import numpy as np
import pytest
import SimpleITK as sitk

from qctfea.model import screw as screw_mod
from qctfea.qc import slicer
from qctfea.steps import model as steps_model
from qctfea.errors import QctfeaError

SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
          "Resources/Schema/markups-schema-v1.0.3.json#")

#: two screws as screws.json holds them (entry, unit axis, tip = entry + 40 axis)
SCREWS = []
for _side, _entry, _dir in (("left", [31.25, 72.5, -101.75], [-0.2, -0.97, 0.1]),
                            ("right", [-28.5, 71.125, -99.0], [0.25, -0.96, -0.05])):
    _axis = np.array(_dir) / np.linalg.norm(_dir)
    SCREWS.append({"side": _side, "entry_mm": _entry, "axis": _axis.tolist(),
                   "tip_mm": (np.array(_entry) + 40.0 * _axis).tolist(),
                   "diameter_mm": 6.5, "length_mm": 40.0})


def _write(path, markups):
    path.write_text(json.dumps({"@schema": SCHEMA, "markups": markups}))
    return path


def _point(label, pos):
    return {"id": "1", "label": label, "position": pos, "positionStatus": "defined"}


# --- markups ------------------------------------------------------------------------------


def test_markups_round_trip_gives_entry_tip_and_axis(tmp_path):
    path = tmp_path / "screws.mrk.json"
    slicer.write_markups(SCREWS, path)
    data = json.loads(path.read_text())
    assert data["@schema"] == SCHEMA
    assert [m["type"] for m in data["markups"]] == ["Line", "Line"]
    assert [m["name"] for m in data["markups"]] == ["left screw", "right screw"]
    assert {m["coordinateSystem"] for m in data["markups"]} == {"LPS"}
    assert [cp["label"] for cp in data["markups"][0]["controlPoints"]] == [
        "left entry", "left tip"]
    lm = slicer.read_landmarks_markups(path)
    for sc in SCREWS:
        np.testing.assert_allclose(lm[sc["side"]]["entry_mm"], sc["entry_mm"], rtol=0,
                                   atol=1e-9)
        np.testing.assert_allclose(lm[sc["side"]]["target_mm"], sc["tip_mm"], rtol=0,
                                   atol=1e-9)
    back = screw_mod.screws_from_landmarks(lm, screw_mod.ScrewSpec())
    for sc, b in zip(SCREWS, back):
        assert b.side == sc["side"]
        np.testing.assert_allclose(b.axis, sc["axis"], rtol=0, atol=1e-12)


def test_ras_file_as_slicer_saves_it_maps_to_lps(tmp_path):
    """One Line per side in RAS, written literally as Slicer saves it (with its
    display block and the extra keys, which are ignored)."""
    line = {
        "type": "Line", "coordinateSystem": "RAS", "coordinateUnits": "mm", "locked": False,
        "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d",
        "lastUsedControlPointNumber": 2, "measurements": [{"name": "length", "enabled": True,
                                                          "value": 41.2, "units": "mm"}],
        "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0]},
    }
    markups = [
        {**line, "name": "Left pedicle", "controlPoints": [
            {"id": "1", "label": "Left pedicle-1", "position": [-31.5, -72.25, -101.0],
             "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
             "selected": True, "locked": False, "visibility": True,
             "positionStatus": "defined"},
            {"id": "2", "label": "Left pedicle-2", "position": [-24.0, -34.5, -98.75],
             "positionStatus": "defined"}]},
        {**line, "name": "RIGHT", "controlPoints": [
            {"id": "1", "label": "RIGHT-1", "position": [28.0, -71.0, -99.5],
             "positionStatus": "defined"},
            {"id": "2", "label": "RIGHT-2", "position": [18.5, -33.0, -100.25],
             "positionStatus": "defined"}]},
    ]
    lm = slicer.read_landmarks_markups(_write(tmp_path / "ras.mrk.json", markups))
    assert lm == {"left": {"entry_mm": [31.5, 72.25, -101.0], "target_mm": [24.0, 34.5, -98.75]},
                  "right": {"entry_mm": [-28.0, 71.0, -99.5],
                            "target_mm": [-18.5, 33.0, -100.25]}}


EXPECTED = {"left": {"entry_mm": [30.0, 70.0, -100.0], "target_mm": [22.0, 32.0, -97.0]},
            "right": {"entry_mm": [-29.0, 71.0, -101.0], "target_mm": [-20.0, 33.0, -99.0]}}


def test_labelled_four_points_in_any_order(tmp_path):
    """Layout (b): one point list, labels name side and role ('tip' is the target)."""
    pts = [_point("Right Target", EXPECTED["right"]["target_mm"]),
           _point("left entry", EXPECTED["left"]["entry_mm"]),
           _point("right entry", EXPECTED["right"]["entry_mm"]),
           _point("LEFT tip", EXPECTED["left"]["target_mm"])]
    path = _write(tmp_path / "b.mrk.json", [{"type": "Fiducial", "name": "F",
                                              "coordinateSystem": "LPS", "controlPoints": pts}])
    assert slicer.read_landmarks_markups(path) == EXPECTED


def test_unlabelled_four_points_in_documented_order(tmp_path):
    """Layout (c): Slicer's default labels, order left entry, left target, right entry,
    right target; here in RAS, and with an unplaced point Slicer keeps a place for."""
    ras = [[-x, -y, z] for x, y, z in (EXPECTED["left"]["entry_mm"],
                                        EXPECTED["left"]["target_mm"],
                                        EXPECTED["right"]["entry_mm"],
                                        EXPECTED["right"]["target_mm"])]
    pts = [_point(f"F-{k + 1}", p) for k, p in enumerate(ras)]
    pts.append({"id": "5", "label": "F-5", "position": [0.0, 0.0, 0.0],
                "positionStatus": "undefined"})
    path = _write(tmp_path / "c.mrk.json", [{"type": "Fiducial", "name": "F",
                                              "coordinateSystem": "RAS", "controlPoints": pts}])
    assert slicer.read_landmarks_markups(path) == EXPECTED


def test_markups_errors_name_the_file(tmp_path):
    left_only = _write(tmp_path / "left_only.mrk.json", [
        {"type": "Line", "name": "left screw", "coordinateSystem": "LPS", "controlPoints": [
            _point("a", [1.0, 2.0, 3.0]), _point("b", [4.0, 5.0, 6.0])]}])
    with pytest.raises(QctfeaError, match=r"left_only\.mrk\.json.*right side"):
        slicer.read_landmarks_markups(left_only, "patient P9, timepoint M00")
    with pytest.raises(QctfeaError, match="patient P9"):
        slicer.read_landmarks_markups(left_only, "patient P9, timepoint M00")
    three = _write(tmp_path / "three.mrk.json", [
        {"type": "Fiducial", "name": "F", "coordinateSystem": "LPS",
         "controlPoints": [_point(f"F-{k}", [k, 0.0, 0.0]) for k in range(3)]}])
    with pytest.raises(QctfeaError, match=r"three\.mrk\.json.*3 placed control point"):
        slicer.read_landmarks_markups(three)
    ijk = _write(tmp_path / "ijk.mrk.json", [
        {"type": "Fiducial", "name": "F", "coordinateSystem": "IJK",
         "controlPoints": [_point(f"F-{k}", [k, 0.0, 0.0]) for k in range(4)]}])
    with pytest.raises(QctfeaError, match=r"ijk\.mrk\.json.*'IJK'"):
        slicer.read_landmarks_markups(ijk)
    mixed = _write(tmp_path / "mixed.mrk.json", [
        {"type": "Fiducial", "name": "F", "controlPoints": [
            _point("left entry", [0.0, 0, 0]), _point("F-2", [1.0, 0, 0]),
            _point("right entry", [2.0, 0, 0]), _point("right target", [3.0, 0, 0])]}])
    with pytest.raises(QctfeaError, match=r"mixed\.mrk\.json.*some name a side"):
        slicer.read_landmarks_markups(mixed)


# --- coordinates through an oriented image ---------------------------------------------------


@pytest.mark.parametrize("orientation", ["RAS", "PIL", "SAR"])
def test_axis_point_lands_on_same_voxel_both_ways(tmp_path, orientation):
    """A point on the screw axis, written to markups (LPS, and by hand in RAS) and read
    back, falls in the voxel ITK computes and in the voxel numpy computes from origin,
    spacing and direction alone."""
    img = sitk.Image([20, 24, 16], sitk.sitkUInt8)
    img.SetSpacing([0.7, 0.9, 1.3])
    img.SetOrigin([-41.0, 17.5, -230.0])
    img = sitk.DICOMOrient(img, orientation)
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    assert not np.allclose(d, np.eye(3))
    want = (3, 7, 5)
    mid = np.array(img.TransformContinuousIndexToPhysicalPoint([3.2, 6.9, 5.3]))
    axis = np.array([0.3, -0.9, 0.2]) / np.linalg.norm([0.3, -0.9, 0.2])
    screw = {"side": "left", "entry_mm": (mid - 12 * axis).tolist(),
             "tip_mm": (mid + 12 * axis).tolist(), "diameter_mm": 6.5, "length_mm": 24.0}
    slicer.write_markups([screw, {**screw, "side": "right"}], tmp_path / "s.mrk.json")
    ras = json.loads((tmp_path / "s.mrk.json").read_text())
    for m in ras["markups"]:
        m["coordinateSystem"] = "RAS"
        for cp in m["controlPoints"]:
            cp["position"] = [-cp["position"][0], -cp["position"][1], cp["position"][2]]
    (tmp_path / "ras.mrk.json").write_text(json.dumps(ras))
    m_inv = np.linalg.inv(d @ np.diag(img.GetSpacing()))
    for name in ("s.mrk.json", "ras.mrk.json"):
        lm = slicer.read_landmarks_markups(tmp_path / name)
        p = (np.array(lm["left"]["entry_mm"]) + np.array(lm["left"]["target_mm"])) / 2
        by_itk = img.TransformPhysicalPointToIndex(p.tolist())
        by_numpy = tuple(int(v) for v in np.round(m_inv @ (p - np.array(img.GetOrigin()))))
        assert by_itk == by_numpy == want


def _nifti_index_to_ras(path) -> tuple[np.ndarray, str]:
    """The 4 x 4 matrix from voxel index (i, j, k, 1) to RAS mm that a NIfTI-1 file's header
    holds, parsed from its bytes (not through ITK or nibabel), and which form it is: the
    sform (srow_x/y/z, float32 at bytes 280, 296, 312) when sform_code (int16 at 254) > 0,
    as 3D Slicer reads it, else the qform (quatern_b/c/d at 256, qoffset at 268, pixdim at
    76 with qfac in pixdim[0]; qform_code at 252)."""
    with gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb") as fh:
        h = fh.read(348)
    end = "<" if struct.unpack("<i", h[:4])[0] == 348 else ">"
    assert struct.unpack(end + "i", h[:4])[0] == 348, "not a NIfTI-1 header"
    qform_code, sform_code = struct.unpack(end + "hh", h[252:256])
    m = np.eye(4)
    if sform_code > 0:
        m[:3] = np.array([struct.unpack(end + "4f", h[o:o + 16]) for o in (280, 296, 312)])
        return m, "sform"
    assert qform_code > 0, "neither an sform nor a qform"
    b, c, d = struct.unpack(end + "3f", h[256:268])
    a = np.sqrt(max(0.0, 1.0 - b * b - c * c - d * d))
    r = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                  [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                  [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    pixdim = struct.unpack(end + "8f", h[76:108])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    m[:3, :3] = r @ np.diag([pixdim[1], pixdim[2], qfac * pixdim[3]])
    m[:3, 3] = struct.unpack(end + "3f", h[268:280])
    return m, "qform"


def _slicer_ras(markups_path) -> dict:
    """{label: RAS position} of every control point of a markups file, read from the JSON
    as 3D Slicer does: each markup's coordinateSystem says how its numbers are stored
    (absent: LPS, the schema's default), and an LPS point (x, y, z) is (-x, -y, z) in
    RAS."""
    out = {}
    for m in json.loads(markups_path.read_text())["markups"]:
        system = m.get("coordinateSystem", "LPS")
        assert system in ("LPS", "RAS"), system
        for cp in m["controlPoints"]:
            pos = np.asarray(cp["position"], float)
            out[cp["label"]] = pos * [-1, -1, 1] if system == "LPS" else pos
    return out


def _oriented(kind: str) -> np.ndarray:
    """A direction matrix: oblique and mirrored (determinant -1), or one axis flipped and
    the axes permuted (PIL: i towards posterior, j inferior, k left)."""
    if kind == "oblique mirrored":
        return _rotation([1, -2, 0.5], 25) @ np.diag([1.0, -1.0, 1.0])
    return np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])


@pytest.mark.parametrize("kind", ["oblique mirrored", "PIL"])
@pytest.mark.parametrize("saved_as", ["LPS", "RAS"])
def test_exported_markups_land_on_itk_voxel_the_way_slicer_reads_them(tmp_path, kind,
                                                                      saved_as):
    """Slicer's own path, independent of qctfea's reader: the exported markups file's raw
    control points (converted to RAS by their coordinateSystem, as Slicer does on load;
    also for a file re-saved in RAS) mapped to voxels through the NIfTI header's sform
    parsed from the file's bytes, against SimpleITK's continuous index of the LPS points of
    screws.json, on an oblique mirrored grid and on a flipped, permuted one. A sign error
    in either path (x or y not negated) moves the point by many voxels."""
    d = _oriented(kind)
    assert not np.allclose(d, np.eye(3)) and not np.allclose(np.abs(d), np.eye(3))
    arr = np.zeros((18, 24, 20), np.uint8)  # z, y, x
    arr[4:14, 6:18, 5:15] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([0.7, 0.9, 1.3])
    img.SetDirection(d.ravel().tolist())
    img.SetOrigin([41.0, -17.5, -230.0])
    parts = tmp_path / "vertebra.nii.gz"
    sitk.WriteImage(img, str(parts))
    screws, want = [], {}
    for side, idx, axis in (("left", [7.2, 11.6, 8.3], [0.3, -0.9, 0.2]),
                            ("right", [12.9, 9.1, 6.4], [-0.4, -0.8, 0.1])):
        mid = np.array(img.TransformContinuousIndexToPhysicalPoint(idx))
        a = np.array(axis) / np.linalg.norm(axis)
        screws.append({"side": side, "entry_mm": (mid - 8 * a).tolist(),
                       "tip_mm": (mid + 8 * a).tolist(), "axis": a.tolist(),
                       "diameter_mm": 6.5, "length_mm": 16.0})
        want[side] = np.round(idx).astype(int)
    (tmp_path / "screws.json").write_text(json.dumps({"screws": screws}))
    files = slicer.export_scan(tmp_path / "screws.json", parts, tmp_path / "slicer")
    mrk = files["markups"]
    if saved_as == "RAS":  # as Slicer may save it: RAS numbers, and the file says so
        data = json.loads(mrk.read_text())
        for m in data["markups"]:
            assert m["coordinateSystem"] == "LPS"
            m["coordinateSystem"] = "RAS"
            for cp in m["controlPoints"]:
                cp["position"] = [-cp["position"][0], -cp["position"][1], cp["position"][2]]
        mrk = tmp_path / "ras.mrk.json"
        mrk.write_text(json.dumps(data))
    ras = _slicer_ras(mrk)
    to_ras, form = _nifti_index_to_ras(parts)
    assert form == "sform"
    to_index = np.linalg.inv(to_ras)
    on_disk = sitk.ReadImage(str(parts))
    for sc in screws:
        side = sc["side"]
        for label, key in ((f"{side} entry", "entry_mm"), (f"{side} tip", "tip_mm")):
            by_slicer = (to_index @ np.append(ras[label], 1.0))[:3]
            by_itk = on_disk.TransformPhysicalPointToContinuousIndex(sc[key])
            np.testing.assert_allclose(by_slicer, by_itk, rtol=0, atol=1e-3)
        mid = (ras[f"{side} entry"] + ras[f"{side} tip"]) / 2
        by_slicer = (to_index @ np.append(mid, 1.0))[:3]
        lps_mid = ((np.array(sc["entry_mm"]) + np.array(sc["tip_mm"])) / 2).tolist()
        by_itk = on_disk.TransformPhysicalPointToContinuousIndex(lps_mid)
        np.testing.assert_allclose(by_slicer, by_itk, rtol=0, atol=1e-3)
        assert tuple(np.round(by_slicer).astype(int)) == on_disk.TransformPhysicalPointToIndex(
            lps_mid) == tuple(want[side])
        # the check can tell: the RAS point taken for LPS (no sign flip) is far off
        wrong = (to_index @ np.append(mid * [-1, -1, 1], 1.0))[:3]
        assert np.abs(wrong - by_itk).max() > 5
    # the header's qform says the same (Slicer falls back to it without an sform)
    h = bytearray(gzip.open(parts, "rb").read())
    h[254:256] = struct.pack("<h", 0)
    qonly = tmp_path / "qform_only.nii"
    qonly.write_bytes(bytes(h))
    q, form = _nifti_index_to_ras(qonly)
    assert form == "qform"
    np.testing.assert_allclose(q, to_ras, rtol=0, atol=1e-4)


# --- surfaces ---------------------------------------------------------------------------------


def _edge_counts(tri):
    """How many triangles share each edge."""
    e = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    return np.unique(e, axis=0, return_counts=True)[1]


def _edges_closed(tri):
    """Every edge shared by exactly two triangles."""
    return bool(np.all(_edge_counts(tri) == 2))


def _volume(pts, tri):
    a, b, c = pts[tri[:, 0]], pts[tri[:, 1]], pts[tri[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6)


def _read_stl(path):
    with open(path, "rb") as fh:
        header = fh.read(80).decode("ascii")
    mesh = meshio.read(path)
    return header, mesh.points.astype(float), mesh.get_cells_type("triangle")


def _rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.mark.parametrize("mirror", [False, True])
def test_vertebra_stl_of_box_on_oblique_grid(tmp_path, mirror):
    """A 10 x 12 x 14 voxel box on an anisotropic, oblique (and mirroring) grid: the
    STL's bounding box is the box's physical bounding box computed with numpy from
    the 8 outer corners (to float32 precision, well within a voxel), it is closed, and
    its volume is the voxels' volume."""
    spacing = np.array([0.5, 0.7, 1.0])
    d = _rotation([1, 2, 3], 35) @ (np.diag([1, -1, 1]) if mirror else np.eye(3))
    d = d[:, [2, 0, 1]]  # permuted axes too
    origin = np.array([12.0, -80.5, 301.25])
    arr = np.zeros((20, 18, 16), np.uint8)  # z, y, x
    lo = np.array([3, 2, 4])  # x, y, z index of the box's first voxel
    n = np.array([10, 12, 14])
    arr[lo[2]:lo[2] + n[2], lo[1]:lo[1] + n[1], lo[0]:lo[0] + n[0]] = 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(d.ravel().tolist())
    img.SetOrigin(origin.tolist())
    path = tmp_path / "box.stl"
    slicer.write_surface_stl(img, path)
    header, pts, tri = _read_stl(path)
    assert "SPACE=LPS" in header
    corners = np.array([[i, j, k] for i in (lo[0] - 0.5, lo[0] + n[0] - 0.5)
                        for j in (lo[1] - 0.5, lo[1] + n[1] - 0.5)
                        for k in (lo[2] - 0.5, lo[2] + n[2] - 0.5)])
    phys = origin + corners @ (d @ np.diag(spacing)).T
    np.testing.assert_allclose(pts.min(0), phys.min(0), atol=1e-4)
    np.testing.assert_allclose(pts.max(0), phys.max(0), atol=1e-4)
    assert _edges_closed(tri)
    assert _volume(pts, tri) == pytest.approx(n.prod() * spacing.prod(), rel=1e-5)


def test_voxel_surface_of_a_notched_mask():
    """Not only boxes: an L-shaped mask with a notch is closed and has the voxels'
    volume, with outward normals (positive volume); two voxels touching along an edge
    share that edge between four triangles (no edge is left open)."""
    m = np.zeros((6, 5, 4), bool)
    m[:, :2, :] = True
    m[:2, :, :] = True
    m[3, 0, 1:3] = False  # a notch open on the j = 0 side
    verts, tri = slicer.voxel_surface(m)
    assert _edges_closed(tri)
    assert _volume(verts, tri) == pytest.approx(m.sum())
    assert verts.min() == -0.5 and verts.max(0).tolist() == [5.5, 4.5, 3.5]
    m2 = np.zeros((3, 3, 3), bool)
    m2[0, 0, 0] = m2[1, 1, 0] = True
    verts, tri = slicer.voxel_surface(m2)
    counts = _edge_counts(tri)
    assert sorted(set(counts.tolist())) == [2, 4] and (counts == 4).sum() == 1
    assert _volume(verts, tri) == pytest.approx(2.0)


def test_screw_stl_closed_cylinder(tmp_path):
    sc = SCREWS[1]
    path = tmp_path / "screw.stl"
    slicer.write_screw_stl(sc, path, segments=32)
    header, pts, tri = _read_stl(path)
    assert "SPACE=LPS" in header
    assert _edges_closed(tri)
    r, length = sc["diameter_mm"] / 2, 40.0
    vol = _volume(pts, tri)
    assert vol > 0  # outward normals
    assert abs(vol / (np.pi * r * r * length) - 1) < 0.02
    rel = pts - np.array(sc["entry_mm"])
    s = rel @ np.array(sc["axis"])
    radial = np.linalg.norm(rel - np.outer(s, sc["axis"]), axis=1)
    assert s.min() == pytest.approx(0, abs=1e-4) and s.max() == pytest.approx(length, abs=1e-4)
    assert np.all((radial < 1e-4) | (np.abs(radial - r) < 1e-4))


# --- the demo scan ---------------------------------------------------------------------------


def test_plan_screws_from_markups_equals_landmarks_json(demo_scan, tmp_path):
    """The demo landmarks as a Slicer markups file in RAS (one Line per side) plan the same
    screws as the landmarks JSON."""
    lm = json.loads((demo_scan["src"] / "landmarks.json").read_text())
    markups = [{"type": "Line", "name": f"{side.title()} screw", "coordinateSystem": "RAS",
                "controlPoints": [
                    _point("", [-lm[side][k][0], -lm[side][k][1], lm[side][k][2]])
                    for k in ("entry_mm", "target_mm")]}
               for side in ("right", "left")]
    mrk = _write(tmp_path / "landmarks.mrk.json", markups)
    parts = demo_scan["results"] / "vertebra.nii.gz"
    steps_model.plan_screws(landmarks_path=demo_scan["src"] / "landmarks.json", parts_path=parts,
                            out_json=tmp_path / "a.json", cfg={}, context=demo_scan["context"])
    steps_model.plan_screws(landmarks_path=mrk, parts_path=parts, out_json=tmp_path / "b.json",
                            cfg={}, context=demo_scan["context"])
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["provenance"]["inputs"]["landmarks"]["path"] == str(mrk)
    assert [s["side"] for s in b["screws"]] == ["left", "right"]
    for sa, sb in zip(a["screws"], b["screws"]):
        for key in ("entry_mm", "axis", "tip_mm"):
            np.testing.assert_allclose(sb[key], sa[key], rtol=0, atol=1e-9)
        assert sb["placement"] == sa["placement"] and sb["breach"] == sa["breach"]


def test_export_slicer_cli_on_demo_scan(demo_scan, tmp_path, capsys):
    from qctfea.cli import main

    r = demo_scan["results"]
    out = tmp_path / "slicer"
    assert main(["export-slicer", "--screws", str(r / "screws.json"), "--parts",
                 str(r / "vertebra.nii.gz"), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("screws.mrk.json", "vertebra.stl", "screw_left.stl", "screw_right.stl"):
        assert (out / name).is_file() and str(out / name) in printed
    screws = json.loads((r / "screws.json").read_text())["screws"]
    lm = slicer.read_landmarks_markups(out / "screws.mrk.json")
    for sc in screws:
        np.testing.assert_allclose(lm[sc["side"]]["entry_mm"], sc["entry_mm"], atol=1e-9)
        np.testing.assert_allclose(lm[sc["side"]]["target_mm"], sc["tip_mm"], atol=1e-9)
    # the vertebra surface encloses the bone volume of the parts image
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    bone = np.isin(sitk.GetArrayFromImage(parts), (1, 2, 3))
    _, pts, tri = _read_stl(out / "vertebra.stl")
    assert np.all(_edge_counts(tri) % 2 == 0)  # closed (voxels touching along an edge: 4)
    assert _volume(pts, tri) == pytest.approx(bone.sum() * np.prod(parts.GetSpacing()),
                                              rel=1e-4)
    assert main(["export-slicer", "--screws", str(tmp_path / "none.json"), "--parts",
                 str(r / "vertebra.nii.gz"), "--out-dir", str(out)]) == 2
    assert "none.json not found" in capsys.readouterr().err


def test_export_of_a_planning_that_made_no_screw(demo_scan, tmp_path):
    """A screws record refused without screws (the planning step's error, as the workflow
    records it): the vertebra is exported for review, the markups file has no markup and
    each side's STL no triangle; a record without screws and without a refusal is an
    error."""
    r = demo_scan["results"]
    rec = tmp_path / "screws.json"
    rec.write_text(json.dumps({"refused": "patient P01, timepoint M12: no left pedicle found"}))
    with pytest.warns(UserWarning, match="no screw was made at planning .*no left pedicle"):
        files = slicer.export_scan(rec, r / "vertebra.nii.gz", tmp_path / "out", "P01 M12")
    assert json.loads(files["markups"].read_text())["markups"] == []
    for side in ("left", "right"):
        _, pts, tri = _read_stl(files[f"screw_{side}"])
        assert len(pts) == 0 and len(tri) == 0
    _, pts, tri = _read_stl(files["vertebra"])
    bone = np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(r / "vertebra.nii.gz"))),
                   (1, 2, 3))
    assert _volume(pts, tri) == pytest.approx(
        bone.sum() * np.prod(sitk.ReadImage(str(r / "vertebra.nii.gz")).GetSpacing()), rel=1e-4)
    rec.write_text(json.dumps({"screws": []}))
    with pytest.raises(QctfeaError, match="holds no screws"):
        slicer.export_scan(rec, r / "vertebra.nii.gz", tmp_path / "out", "P01 M12")


@pytest.mark.slow
def test_follow_up_export_carries_the_baseline_model_by_its_registration(demo_scan, tmp_path):
    """A follow-up's export: the baseline's screws and vertebra through its registration
    transform (baseline points to follow-up points), written as SimpleITK writes
    registration.tfm. The expected points by hand: 90 degrees about z (x, y -> -y, x) about
    a centre c, then a shift t; every surface vertex of the baseline's export moved so."""
    r = demo_scan["results"]
    c, t = np.array([5.0, -3.0, 12.0]), np.array([2.0, -1.5, 4.0])
    tx = sitk.Euler3DTransform()
    tx.SetCenter(c.tolist())
    tx.SetRotation(0.0, 0.0, np.pi / 2)
    tx.SetTranslation(t.tolist())
    sitk.WriteTransform(tx, str(tmp_path / "registration.tfm"))

    def by_hand(p):
        q = np.asarray(p, float) - c
        return np.array([-q[..., 1], q[..., 0], q[..., 2]]).T.reshape(np.shape(p)) + c + t

    base = slicer.export_scan(r / "screws.json", r / "vertebra.nii.gz", tmp_path / "base")
    follow = slicer.export_scan(r / "screws.json", r / "vertebra.nii.gz", tmp_path / "follow",
                                transform_path=tmp_path / "registration.tfm")
    lm = slicer.read_landmarks_markups(follow["markups"])
    for sc in json.loads((r / "screws.json").read_text())["screws"]:
        np.testing.assert_allclose(lm[sc["side"]]["entry_mm"], by_hand(sc["entry_mm"]),
                                   atol=1e-9)
        np.testing.assert_allclose(lm[sc["side"]]["target_mm"], by_hand(sc["tip_mm"]),
                                   atol=1e-9)
    for name in ("vertebra", "screw_left", "screw_right"):
        _, p0, tri0 = _read_stl(base[name])
        _, p1, tri1 = _read_stl(follow[name])
        np.testing.assert_array_equal(tri1, tri0)
        np.testing.assert_allclose(p1, by_hand(p0), atol=1e-4)  # STL: single precision
        assert _volume(p1, tri1) == pytest.approx(_volume(p0, tri0), rel=1e-5)
    with pytest.raises(QctfeaError, match="registration transform .*none.tfm not found"):
        slicer.export_scan(r / "screws.json", r / "vertebra.nii.gz", tmp_path / "x",
                           transform_path=tmp_path / "none.tfm")
