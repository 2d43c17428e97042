"""QC picture of a mesh: planar cuts through the screws, elements coloured by subdomain.

Two cuts are drawn: the *screw plane* (the plane through both screw axes, or the one
nearest their entries and tips when the axes pass each other; a
transverse section through the pedicles) and a *sagittal* cut along the left
screw (the plane through its axis perpendicular to the screw plane). Each
tetrahedron that the plane crosses contributes its section polygon (a
triangle or a quadrilateral), filled by subdomain (body, posterior elements,
left and right screw) with its edges drawn, so that element sizes, the
conforming screw-bone interface and the screw's position in the pedicle are
visible at a glance. The screw axes are overlaid as dashed lines. A third
panel lists the mesh report (cells, quality, screw volumes). A model without
screws (``loads.cases`` without pullout) is cut sagittally and coronally
through its centroid instead.
"""

from __future__ import annotations

import numpy as np

from qctfea.model.tags import TAG_BODY, TAG_CAP, TAG_POSTERIOR, TAG_SCREW

COLOURS = {TAG_BODY: "#e8c07d", TAG_POSTERIOR: "#c9a0dc", TAG_SCREW["left"]: "#4a7bd0",
           TAG_SCREW["right"]: "#d05a4a", TAG_CAP: "#9ecae1"}
NAMES = {TAG_BODY: "vertebral body", TAG_POSTERIOR: "posterior elements",
         TAG_SCREW["left"]: "left screw", TAG_SCREW["right"]: "right screw",
         TAG_CAP: "end caps"}
_EDGES = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def plane_section(points: np.ndarray, cells: np.ndarray, origin: np.ndarray,
                  normal: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Section polygons (3-D vertices, ordered) of the tets the plane crosses, and their
    cell indices. A polygon's vertices are where the plane cuts the tet's edges."""
    normal = normal / np.linalg.norm(normal)
    d = (points - origin) @ normal
    dc = d[cells]
    hit = np.flatnonzero((dc.min(1) < 0) & (dc.max(1) > 0))
    polys = []
    for k in hit:
        v, dv = points[cells[k]], dc[k]
        pts = [v[i] + dv[i] / (dv[i] - dv[j]) * (v[j] - v[i])
               for i, j in _EDGES if (dv[i] < 0) != (dv[j] < 0)]
        p = np.array(pts)
        c = p.mean(0)
        # Order around the centroid within the plane.
        u = p[0] - c
        u /= np.linalg.norm(u) or 1.0
        w = np.cross(normal, u)
        ang = np.arctan2((p - c) @ w, (p - c) @ u)
        polys.append(p[np.argsort(ang)])
    return polys, hit


def _frame(normal: np.ndarray, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = normal / np.linalg.norm(normal)
    u = first - (first @ n) * n
    u /= np.linalg.norm(u)
    return u, np.cross(n, u)


def screw_planes(screws) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(origin, normal, in-plane first axis) of the screw plane and the sagittal cut."""
    by = {s.side: s for s in screws}
    a = by.get("left") or screws[0]
    b = by.get("right") or screws[-1]
    n = np.cross(a.axis, b.axis)
    origin = (a.entry_mm + b.entry_mm) / 2
    if a is not b and np.linalg.norm(n) >= 0.05:
        # The plane nearest both screws' entries and tips (least squares): the plane of both
        # axes when they meet, and one that cuts both when they do not (screws planned at
        # different cranial angles, whose axes pass each other millimetres apart).
        ends = np.array([a.entry_mm, a.tip_mm, b.entry_mm, b.tip_mm])
        origin = ends.mean(axis=0)
        n = np.linalg.svd(ends - origin)[2][-1]
    # Parallel screws: the plane through both entries; one screw: any plane along its axis.
    for other in (b.entry_mm - a.entry_mm, [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]):
        if np.linalg.norm(n) >= 0.05:
            break
        n = np.cross(a.axis, other)
    n /= np.linalg.norm(n)
    sag_n = np.cross(a.axis, n)
    return {"screw plane": (origin, n, a.axis),
            f"{a.side} screw, sagittal cut": (a.entry_mm, sag_n, a.axis)}


def centroid_planes(points: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A model without screws: sagittal and coronal cuts through the mesh centroid."""
    c = points.mean(axis=0)
    z = np.array([0.0, 0.0, 1.0])
    return {"sagittal cut": (c, np.array([1.0, 0.0, 0.0]), z),
            "coronal cut": (c, np.array([0.0, 1.0, 0.0]), z)}


def mesh_picture(points: np.ndarray, cells: np.ndarray, tags: np.ndarray, screws,
                 report: dict, path, title: str = "") -> None:
    """Write the cut-plane QC picture (PNG) of a mesh with its screws."""
    from matplotlib.figure import Figure
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Patch

    planes = screw_planes(screws) if screws else centroid_planes(points)
    fig = Figure(figsize=(15, 5.2))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.2, 0.75]})
    for ax, (name, (origin, normal, first)) in zip(axes, planes.items(), strict=False):
        polys, idx = plane_section(points, cells, origin, normal)
        u, w = _frame(normal, first)
        poly2d = [np.stack([(p - origin) @ u, (p - origin) @ w], 1) for p in polys]
        cols = [COLOURS.get(int(t), "#999999") for t in tags[idx]]
        ax.add_collection(PolyCollection(poly2d, facecolors=cols, edgecolors="k",
                                         linewidths=0.15))
        for sc in screws:  # axes lying in this plane (a projected one would mislead)
            ends = np.array([sc.head_end_mm, sc.tip_mm]) - origin
            if np.abs(ends @ normal).max() < 1.0:
                ax.plot(ends @ u, ends @ w, "--", color="k", lw=0.8)
        if poly2d:
            allp = np.concatenate(poly2d)
            ax.set_xlim(allp[:, 0].min() - 2, allp[:, 0].max() + 2)
            ax.set_ylim(allp[:, 1].min() - 2, allp[:, 1].max() + 2)
        ax.set_aspect("equal")
        ax.set_title(f"{name}: {len(idx)} cells cut", fontsize=9)
        ax.set_xlabel("mm along the (left) screw axis" if screws else "mm along the scan z axis")
        ax.set_ylabel("mm")
    ax = axes[-1]
    ax.axis("off")
    vols = report.get("screw_volume", {})
    lines = [f"cells {report.get('n_cells')}, vertices {report.get('n_vertices')}",
             f"min dihedral angle {report.get('min_dihedral_deg', float('nan')):.1f}°",
             f"cells with dihedral < 10°: {report.get('dihedral_below_10deg')}",
             "radius ratio quartiles\n  "
             + ", ".join(f"{q:.2f}" for q in report.get("radius_ratio_quartiles", []))]
    for side, v in vols.items():
        lines.append(f"{side} screw: {v['mesh_mm3']:.0f} mm³ meshed\n  vs {v['geometry_mm3']:.0f} "
                     f"geometry ({100 * (v['mesh_mm3'] / v['geometry_mm3'] - 1):+.1f} %), "
                     f"\n  surface shifted {v['shift_mm']:+.3f} mm")
    ax.text(0.0, 0.98, "\n".join(lines), va="top", fontsize=8.5, family="monospace",
            transform=ax.transAxes, wrap=True)
    present = [t for t in COLOURS if t in set(np.unique(tags).tolist())]
    ax.legend(handles=[Patch(facecolor=COLOURS[t], edgecolor="k", label=NAMES[t])
                       for t in present], loc="lower left", fontsize=8.5)
    fig.suptitle(title or "mesh QC", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
