"""Meshing: labelled image of bone and screws to conforming tetrahedra (CGAL Mesh_3).

The vertebra (from the mask step) and the screws (from the screw step) are
rasterised on an axis-aligned grid in the scan's physical coordinates
(spacing ``voxel_mm``, covering the vertebra and the screw heads). The bone
mask is interpolated linearly from the CT grid and thresholded at 0.5, which
gives a smoother surface than nearest-neighbour copying; screws are drawn
analytically on the grid and override bone. CGAL's Mesh_3 (through
pygalmesh) meshes the labelled image with sizes from the config, finer in the
screws; the subdomain labels become cell tags:

=====  ======================
 tag   region
=====  ======================
 1     vertebral body (bone)
 2     posterior elements (bone)
 3     left screw (titanium)
 4     right screw (titanium)
=====  ======================

Vertices are in the scan's physical coordinates (mm), so that a screw axis, a
ROI and a mesh vertex mean the same point in every file. The mesh is written
as XDMF (+HDF5) with the cell tags, readable by DOLFINx and ParaView.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.imaging.masks import BODY, CAP, POSTERIOR, TRABECULAR
from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_files
from qctfea.model.screw import Screw
from qctfea.model.tags import TAG_BODY, TAG_CAP, TAG_POSTERIOR, TAG_SCREW
from qctfea.config import option

log = logging.getLogger(__name__)

#: labels of the bone near a screw during meshing only (own cell size); they become the
#: body and posterior tags again in the mesh
_PERI = {TAG_BODY: 6, TAG_POSTERIOR: 7}


@dataclass
class MeshParams:
    #: grid spacing of the labelled image given to CGAL
    voxel_mm: float = option(0.5, exclusiveMinimum=0, doc="labelled-image spacing given to CGAL")
    # Defaults from the mesh-convergence study (docs/mesh_convergence.md): the level whose
    # stiffnesses are within 3.1 % of the next finer one.
    #: max tetrahedron circumradius in bone
    bone_cell_size_mm: float = option(
        2.0, exclusiveMinimum=0,
        doc=("max tet circumradius in bone and in the screws (defaults from the "
             "mesh-convergence study, docs/mesh_convergence.md)"))
    #: max circumradius in the screws
    screw_cell_size_mm: float = option(1.0, exclusiveMinimum=0, row="bone_cell_size_mm")
    #: bone within this distance (mm) of a screw's surface is meshed with
    #: ``peri_screw_cell_size_mm`` (0: no zone). The pedicle wall around a screw is only a
    #: few mm thick: coarse cells there make the pullout stiffness mesh-dependent
    peri_screw_mm: float = option(
        3.0, minimum=0,
        doc=("bone within `peri_screw_mm` of a screw's surface gets its own max circumradius "
             "(the thin pedicle wall around the screw); `peri_screw_mm: 0` turns the zone off"))
    #: max circumradius in the bone near the screws
    peri_screw_cell_size_mm: float = option(0.67, exclusiveMinimum=0, row="peri_screw_mm")
    #: max surface approximation error
    facet_distance_mm: float = option(0.3, exclusiveMinimum=0, doc="CGAL criteria")
    #: min facet angle on surfaces
    facet_angle_deg: float = option(25.0, exclusiveMinimum=0, maximum=90, row="facet_distance_mm")
    cell_radius_edge_ratio: float = option(3.0, exclusiveMinimum=0, row="facet_distance_mm")
    #: grid margin around vertebra and screws
    margin_mm: float = option(2.0, minimum=0, doc="grid margin; CGAL seed")
    #: CGAL random seed (same seed, same mesh)
    seed: int = option(0, minimum=0, row="margin_mm")
    #: CGAL's sliver perturbation. Off by default: make_mesh_3 limits it by wall time (the
    #: refinement's), so with it the same input gives meshes that differ by a few cells from
    #: run to run and machine to machine. Sliver exudation (always on) is not time-limited.
    perturb: bool = option(
        False,
        doc=("CGAL sliver perturbation; `true` raises the worst dihedral angle but CGAL bounds "
             "it by wall time, so meshes (and every result) then differ slightly from run to "
             "run. Off, the same input and seed give the same mesh"))
    #: move the screws' lateral surface vertices radially so that each screw subdomain has the
    #: screw's geometric volume (the faceted cylinder is otherwise inscribed: about -3.5 %
    #: with the default sizes). The shift is at most ``facet_distance_mm``.
    match_screw_volume: bool = option(
        True,
        doc=("move each screw's lateral surface vertices radially (by at most "
             "`facet_distance_mm`; 0.06 mm on the demo) so the meshed screw has the cylinder's "
             "volume; without it the faceted screw is inscribed, 3.5 % too small at the demo "
             "sizes"))
    #: gap (mm) kept free of bone around the screw head (the part behind the entry point):
    #: the head is not bonded to bone, the pullout load enters the bone along the inserted
    #: length only. 0 keeps whatever bone the head passes through (an entry point inside
    #: the bone then bonds the loaded head face to bone: mesh-dependent pullout stiffness)
    head_clearance_mm: float = option(
        1.0, minimum=0,
        doc=("no bone within this gap around the screw head (the part behind the entry point): "
             "only the inserted length is bonded to bone; 0 keeps the bone the head passes "
             "through"))


def labelled_grid(
    parts_img: sitk.Image, screws: list[Screw], params: MeshParams
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labelled uint8 volume (x, y, z order, for INR), its origin (mm) and spacing."""
    arr = sitk.GetArrayFromImage(parts_img)
    idx = np.argwhere(arr > 0)
    if idx.size == 0:
        raise QctfeaError("vertebra mask is empty")
    # Physical bounding box of the vertebra and the screws.
    lo_i, hi_i = idx.min(0), idx.max(0)  # z, y, x
    corners = [
        parts_img.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)])
        for z in (lo_i[0], hi_i[0]) for y in (lo_i[1], hi_i[1]) for x in (lo_i[2], hi_i[2])
    ]
    for sc in screws:
        r = sc.spec.diameter_mm / 2
        for p in (sc.head_end_mm, sc.tip_mm):
            corners.extend([p - r, p + r])
    corners = np.array(corners)
    h = params.voxel_mm
    lo = corners.min(0) - params.margin_mm
    hi = corners.max(0) + params.margin_mm
    n = np.ceil((hi - lo) / h).astype(int) + 1
    # Resample each part's mask (linear, threshold 0.5) onto the axis-aligned grid.
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetOrigin(lo.tolist())
    ref.SetSpacing([h, h, h])
    lab = np.zeros(n[::-1], np.uint8)  # z, y, x
    for values, tag in (((CAP,), TAG_CAP), ((BODY, TRABECULAR), TAG_BODY),
                        ((POSTERIOR,), TAG_POSTERIOR)):
        if values == (CAP,) and not (arr == CAP).any():
            continue
        m = sitk.Cast(sum(parts_img == v for v in values), sitk.sitkFloat32)
        r = sitk.Resample(m, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        lab[sitk.GetArrayFromImage(r) >= 0.5] = tag
    zz, yy, xx = np.indices(lab.shape)
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1) * h + lo
    if params.head_clearance_mm > 0:
        # The head stands free: no bone around it or behind the entry point (a counterbore
        # of radius r + clearance), so only the inserted length is bonded to bone.
        for sc in screws:
            s_ax, rad = sc.axial_radial(pts)
            c = params.head_clearance_mm
            free = ((s_ax < 0) & (s_ax >= -sc.spec.head_length_mm - c)
                    & (rad <= sc.spec.diameter_mm / 2 + c)).reshape(lab.shape)
            lab[free] = 0
    if params.peri_screw_mm > 0:
        near = np.zeros(lab.shape, bool)
        for sc in screws:
            near |= sc.contains(pts, pad_mm=params.peri_screw_mm).reshape(lab.shape)
        for tag, peri in _PERI.items():
            lab[near & (lab == tag)] = peri
    for sc in screws:
        inside = sc.contains(pts).reshape(lab.shape)
        lab[inside] = TAG_SCREW[sc.side]
    return np.ascontiguousarray(lab.transpose(2, 1, 0)), lo, h


def tet_quality(points: np.ndarray, cells: np.ndarray) -> dict[str, np.ndarray]:
    """Volumes, minimum dihedral angles (deg) and radius ratios (3 r_in / r_circ) per tet."""
    p = points[cells]
    a, b, c, d = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    vol = np.einsum("ij,ij->i", b - a, np.cross(c - a, d - a)) / 6.0
    faces = [(b, c, d), (a, c, d), (a, b, d), (a, b, c)]
    normals, areas = [], []
    for f in faces:
        nrm = np.cross(f[1] - f[0], f[2] - f[0])
        ar = np.linalg.norm(nrm, axis=1)
        normals.append(nrm / ar[:, None])
        areas.append(ar / 2)
    # Dihedral angle at the edge shared by faces i and j: pi - angle between outward normals.
    # Orient normals outward: face i is opposite vertex i.
    verts = [a, b, c, d]
    for i, f in enumerate(faces):
        sign = np.sign(np.einsum("ij,ij->i", normals[i], f[0] - verts[i]))
        normals[i] *= sign[:, None]
    dihedral = []
    for i in range(4):
        for j in range(i + 1, 4):
            cosang = np.clip(-np.einsum("ij,ij->i", normals[i], normals[j]), -1, 1)
            dihedral.append(np.degrees(np.arccos(cosang)))
    min_dih = np.min(dihedral, axis=0)
    r_in = 3 * np.abs(vol) / np.sum(areas, axis=0)
    # Circumradius from the standard formula.
    ab, ac, ad = b - a, c - a, d - a
    num = (np.sum(ad**2, 1)[:, None] * np.cross(ab, ac) + np.sum(ac**2, 1)[:, None]
           * np.cross(ad, ab) + np.sum(ab**2, 1)[:, None] * np.cross(ac, ad))
    r_circ = np.linalg.norm(num, axis=1) / (12 * np.abs(vol))
    return {"volume": vol, "min_dihedral_deg": min_dih, "radius_ratio": 3 * r_in / r_circ}


def _tet_volumes(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    p = points[cells]
    return np.einsum("ij,ij->i", p[:, 1] - p[:, 0],
                     np.cross(p[:, 2] - p[:, 0], p[:, 3] - p[:, 0])) / 6.0


def screw_volume_mm3(screw: Screw) -> float:
    """Geometric volume of the screw (inserted length and head, threads if on), mm³."""
    return screw.spec.volume_mm3()


def match_screw_volume(points: np.ndarray, cells: np.ndarray, tags: np.ndarray, screw: Screw,
                       tag: int, max_shift_mm: float,
                       end_clearance_mm: float = 1.0) -> tuple[np.ndarray, dict]:
    """Make the screw subdomain's volume equal the screw's geometric volume.

    CGAL puts surface vertices on the cylinder (up to the labelled image's
    resolution) and joins them by flat facets, so the meshed screw is an
    inscribed polyhedron, smaller than the cylinder by roughly
    (perimeter x mean chord sagitta) per unit length. Here every vertex of the
    screw's boundary facets that lies on the lateral surface (within
    ``max_shift_mm`` of the radius and more than ``end_clearance_mm`` from
    the flat ends, whose rims are left alone) moves radially outwards by the
    same distance delta (|delta| <= max_shift_mm), found by the secant method
    so that the screw's tetrahedra add up to pi r² L exactly.
    Bone cells sharing those vertices shrink by the same volume (the mesh
    stays conforming). A shift that would invert a cell is refused: the
    mesh is then returned unchanged and the report says so.
    """
    r = screw.spec.diameter_mm / 2
    target = screw_volume_mm3(screw)
    sel = tags == tag
    sc = cells[sel]
    faces = np.sort(np.concatenate([sc[:, [1, 2, 3]], sc[:, [0, 2, 3]], sc[:, [0, 1, 3]],
                                    sc[:, [0, 1, 2]]]), axis=1)
    uniq, count = np.unique(faces, axis=0, return_counts=True)
    boundary = np.unique(uniq[count == 1])
    s_ax, rad = screw.axial_radial(points[boundary])
    length, head = screw.spec.length_mm, screw.spec.head_length_mm
    lateral = boundary[(np.abs(rad - r) <= max_shift_mm) & (s_ax > -head + end_clearance_mm)
                       & (s_ax < length - end_clearance_mm)]
    before = float(np.abs(_tet_volumes(points, sc)).sum())
    rep = {"geometry_mm3": target, "mesh_mm3_before": before, "shift_mm": 0.0,
           "moved_vertices": int(len(lateral))}
    if len(lateral) == 0:
        rep["mesh_mm3"] = before
        return points, rep
    rel = points[lateral] - screw.entry_mm
    radial_dir = rel - np.outer(rel @ screw.axis, screw.axis)
    radial_dir /= np.linalg.norm(radial_dir, axis=1, keepdims=True)
    touched = np.isin(cells, lateral).any(axis=1)
    sign0 = np.sign(_tet_volumes(points, cells[touched]))

    def moved(delta: float) -> np.ndarray:
        q = points.copy()
        q[lateral] = points[lateral] + delta * radial_dir
        return q

    def vol(delta: float) -> float:
        return float(np.abs(_tet_volumes(moved(delta), sc)).sum())

    # V(delta) is close to linear: V(0) + perimeter x length x delta. Secant from 0 and a guess.
    d0, v0 = 0.0, vol(0.0)
    d1 = float(np.clip((target - v0) / (2 * np.pi * r * (screw.spec.length_mm
                                                         + screw.spec.head_length_mm)),
                       -max_shift_mm, max_shift_mm))
    v1 = vol(d1)
    for _ in range(6):
        if abs(v1 - target) < 1e-6 * target or v1 == v0:
            break
        d0, v0, d1 = d1, v1, float(np.clip(d1 + (target - v1) * (d1 - d0) / (v1 - v0),
                                           -max_shift_mm, max_shift_mm))
        v1 = vol(d1)
    q = moved(d1)
    if np.any(np.sign(_tet_volumes(q, cells[touched])) != sign0):
        rep.update(mesh_mm3=before, refused="a cell would be inverted")
        return points, rep
    rep.update(shift_mm=d1, mesh_mm3=v1)
    return q, rep


def _restore_labels(centroids: np.ndarray, out_tags: np.ndarray, vol: np.ndarray,
                    h: float) -> np.ndarray:
    """Map CGAL's subdomain numbers back to the image labels.

    The medit output renumbers subdomains consecutively (labels {1, 3} come back
    as {1, 2}), so each output subdomain takes the label that most of its cell
    centroids fall on in the labelled grid (x, y, z order, voxel i at i*h).
    """
    idx = np.clip(np.rint(centroids / h).astype(int), 0, np.array(vol.shape) - 1)
    under = vol[idx[:, 0], idx[:, 1], idx[:, 2]]
    mapping = {}
    for k in np.unique(out_tags):
        vals = under[(out_tags == k) & (under > 0)]
        if len(vals) == 0:
            raise QctfeaError(f"mesh subdomain {k} lies outside every labelled region")
        mapping[int(k)] = int(np.bincount(vals).argmax())
    if len(set(mapping.values())) != len(mapping):
        raise QctfeaError(f"two mesh subdomains map to the same label: {mapping}; "
                          "lower mesh.voxel_mm or the cell sizes")
    return np.vectorize(mapping.__getitem__, otypes=[np.int32])(out_tags)


# Long on purpose: one meshing run (grid, CGAL sizes, mesh, tags, quality), in order.
def generate_mesh(
    parts_img: sitk.Image, screws: list[Screw], params: MeshParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Mesh bone and screws; returns points (mm), tets, cell tags, and a report."""
    import pygalmesh

    t0 = time.perf_counter()
    vol, lo, h = labelled_grid(parts_img, screws, params)
    present = sorted(int(v) for v in np.unique(vol) if v)
    log.info(f"[mesh] labelled grid {vol.shape} at {h} mm, labels {present}")
    with tempfile.TemporaryDirectory() as td:
        inr = os.path.join(td, "labels.inr")
        with warnings.catch_warnings():
            # pygalmesh.save_inr leaves its file to the garbage collector (closed, and so
            # flushed, when the function returns): not a leak of ours
            warnings.simplefilter("ignore", ResourceWarning)
            pygalmesh.save_inr(vol, (h, h, h), inr)
        sizes = {TAG_BODY: params.bone_cell_size_mm, TAG_POSTERIOR: params.bone_cell_size_mm,
                 "default": params.bone_cell_size_mm}
        for side, tag in TAG_SCREW.items():
            if tag in present:
                sizes[tag] = params.screw_cell_size_mm
        for peri in _PERI.values():
            if peri in present:
                sizes[peri] = params.peri_screw_cell_size_mm
        if TAG_CAP in present:
            sizes[TAG_CAP] = params.bone_cell_size_mm
        # Keywords only: pygalmesh's generate_from_array passes these positionally
        # in the wrong order.
        m = pygalmesh.generate_from_inr(
            inr,
            max_cell_circumradius=sizes,
            max_facet_distance=params.facet_distance_mm,
            min_facet_angle=params.facet_angle_deg,
            max_radius_surface_delaunay_ball=params.bone_cell_size_mm,
            max_circumradius_edge_ratio=params.cell_radius_edge_ratio,
            lloyd=False,
            odt=False,
            perturb=params.perturb,
            exude=True,
            exude_time_limit=0.0,  # no wall-time limit: the same input gives the same mesh
            verbose=False,
            seed=params.seed,
        )
    t_mesh = time.perf_counter() - t0
    cells = None
    for block, data in zip(m.cells, m.cell_data["medit:ref"], strict=True):
        if block.type == "tetra":
            cells, tags = block.data.astype(np.int64), np.asarray(data, np.int32)
    if cells is None or len(cells) == 0:
        raise QctfeaError("CGAL produced no tetrahedra; check the mask and mesh sizes")
    tags = _restore_labels(m.points[cells].mean(axis=1), tags, vol, h)
    for tag, peri in _PERI.items():
        tags[tags == peri] = tag
    # CGAL places voxel i's centre at i*h: shift into scan coordinates.
    points = m.points.astype(np.float64) + lo
    used = np.unique(cells)
    remap = -np.ones(len(points), np.int64)
    remap[used] = np.arange(len(used))
    points, cells = points[used], remap[cells]
    screw_volumes = {}
    for sc in screws:
        if sc.spec.threads and TAG_SCREW[sc.side] in tags:  # no cylinder to match: report
            meshed = float(np.abs(_tet_volumes(points, cells[tags == TAG_SCREW[sc.side]])).sum())
            screw_volumes[sc.side] = {"geometry_mm3": screw_volume_mm3(sc),
                                      "mesh_mm3_before": meshed, "mesh_mm3": meshed,
                                      "shift_mm": 0.0, "moved_vertices": 0, "refused": "threads"}
        elif params.match_screw_volume and TAG_SCREW[sc.side] in tags:
            points, screw_volumes[sc.side] = match_screw_volume(
                points, cells, tags, sc, TAG_SCREW[sc.side], params.facet_distance_mm)
    q = tet_quality(points, cells)
    neg = q["volume"] < 0
    cells[neg] = cells[neg][:, [0, 2, 1, 3]]  # positive orientation
    report = {
        "n_cells": int(len(cells)),
        "n_vertices": int(len(points)),
        "cells_per_tag": {int(t): int((tags == t).sum()) for t in np.unique(tags)},
        "volume_per_tag_mm3": {int(t): float(np.abs(q["volume"][tags == t]).sum())
                               for t in np.unique(tags)},
        "screw_volume": screw_volumes,
        "min_dihedral_deg": float(q["min_dihedral_deg"].min()),
        "dihedral_below_10deg": int((q["min_dihedral_deg"] < 10).sum()),
        "radius_ratio_min": float(q["radius_ratio"].min()),
        "radius_ratio_quartiles": np.percentile(q["radius_ratio"], [25, 50, 75]).tolist(),
        "grid_shape": list(vol.shape),
        "grid_origin_mm": lo.tolist(),
        "grid_spacing_mm": h,
        "seconds": round(t_mesh, 2),
    }
    missing = [s.side for s in screws if TAG_SCREW[s.side] not in report["cells_per_tag"]]
    if missing:
        raise QctfeaError(f"screw(s) {missing} have no cells in the mesh; lower "
                          "mesh.screw_cell_size_mm or mesh.voxel_mm")
    log.info(f"[mesh] {report['n_cells']} tets, {report['n_vertices']} vertices, "
             f"min dihedral {report['min_dihedral_deg']:.1f} deg, {t_mesh:.1f} s")
    return points, cells, tags, report


_XDMF = """<?xml version="1.0"?>
<!DOCTYPE Xdmf SYSTEM "Xdmf.dtd" []>
<Xdmf Version="3.0" xmlns:xi="https://www.w3.org/2001/XInclude">
  <Domain>
    <Grid Name="mesh" GridType="Uniform">
      <Topology TopologyType="Tetrahedron" NumberOfElements="{nc}" NodesPerElement="4">
        <DataItem Dimensions="{nc} 4" NumberType="Int" Format="HDF">{h5}:/Mesh/mesh/topology</DataItem>
      </Topology>
      <Geometry GeometryType="XYZ">
        <DataItem Dimensions="{nv} 3" Format="HDF">{h5}:/Mesh/mesh/geometry</DataItem>
      </Geometry>
    </Grid>
    <Grid Name="cell_tags" GridType="Uniform">
      <xi:include xpointer="xpointer(/Xdmf/Domain/Grid/Geometry)" />
      <Topology TopologyType="Tetrahedron" NumberOfElements="{nc}" NodesPerElement="4">
        <DataItem Dimensions="{nc} 4" NumberType="Int" Format="HDF">{h5}:/Mesh/mesh/topology</DataItem>
      </Topology>
      <Attribute Name="cell_tags" AttributeType="Scalar" Center="Cell">
        <DataItem Dimensions="{nc} 1" Format="HDF">{h5}:/MeshTags/cell_tags/Values</DataItem>
      </Attribute>
    </Grid>
  </Domain>
</Xdmf>
"""


def write_mesh(path: str | Path, points: np.ndarray, cells: np.ndarray, tags: np.ndarray) -> None:
    """XDMF + HDF5 in DOLFINx's layout: grid ``mesh`` and cell tags ``cell_tags``.

    Both files appear together or not at all. ParaView opens the XDMF.
    """
    import h5py

    path = Path(path)
    h5_name = path.with_suffix(".h5").name
    with atomic_files(path.with_suffix(".h5"), path) as scratch:
        with h5py.File(scratch / h5_name, "w") as f:
            f["Mesh/mesh/geometry"] = np.asarray(points, np.float64)
            f["Mesh/mesh/topology"] = np.asarray(cells, np.int64)
            f["MeshTags/cell_tags/Values"] = np.asarray(tags, np.int32).reshape(-1, 1)
        (scratch / path.name).write_text(_XDMF.format(nc=len(cells), nv=len(points), h5=h5_name),
            encoding="utf-8")


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, tets and cell tags (file order) of a mesh written by :func:`write_mesh`."""
    import h5py

    path = Path(path)
    with h5py.File(path.with_suffix(".h5"), "r") as f:
        return (f["Mesh/mesh/geometry"][:], f["Mesh/mesh/topology"][:],
                f["MeshTags/cell_tags/Values"][:, 0])
