"""Screw placement against the anatomy: distance to the bone surface, the spinal canal, and
the Gertzbein-Robbins grade of every screw (docs/screw_planning.md).

**Distance to the bone** (:class:`BoneField`). The vertebra's voxels (body, posterior
elements, trabecular ROI of the parts image) are resampled by nearest neighbour onto a
grid of ``fine_mm`` (0.5 mm, or the scan's finest spacing if smaller) cubes in the scan's
own orientation, padded by ``pad_mm`` around the vertebra. Two Euclidean distance
transforms (scipy) give, for every fine voxel, the distance to the nearest voxel of the
other kind; half a fine voxel less is the distance to the voxelised bone surface. The
signed field (positive outside the bone, negative inside) is interpolated linearly at any
point; beyond the padded grid it is ``pad_mm``. A 3 mm label map thus keeps its blocky
surface (the label map is the truth the screw is graded against), measured to about a
quarter of a fine voxel.

**Spinal canal** (:func:`find_canal`). In the vertebra's anatomical frame (body centroid;
patient-left, anterior and superior axes of :func:`qctfea.model.planning.anatomical_frame`) the
bone is projected along the superior axis (its shadow over the body's height and 15 mm
above and below, on a 0.5 mm grid): the canal runs along that axis, while the pedicles
and the lamina that close it around may lie at different heights (the lamina slopes
down behind the pedicles, so no single axial slice need close the ring). The holes of the
shadow (``scipy.ndimage.binary_fill_holes`` minus the shadow) are the openings enclosed
by bone; the canal is the largest that lies behind the body's posterior surface and
reaches within ``CANAL_MIDLINE_MM`` of the body's mid-sagittal plane: the vertebral
foramen, closed by the pedicles and the lamina. A column of the shadow counts as bone
when it holds at least a threshold of bone height, raised from 5 mm in 2.5 mm steps
(to 20 mm) until the canal found is at least 120 mm² in area: bone that overlaps the
canal only at some heights (a lamina that slopes under the canal of a tilted arch, an
articular process) then no longer closes it, while the pedicles and the lamina, tall
columns, still do.
Its centroid sets the mid-sagittal plane of the planning and grading (the body's
centroid can lie off the canal's axis in a rotated or asymmetric vertebra). A vertebra
whose arch is not closed in the label map has no canal: the body's centroid is then the
midline, and the record says so.

**Gertzbein-Robbins grade** (:func:`grade_screw`; Gertzbein and Robbins, Spine 1990;
15:11-14). The inserted part of the screw (entry to tip) is sampled on its surface
(24 lines around, 0.25 mm apart, and the tip's disc); the breach is the largest distance
of a sample outside the bone surface. Grade A: no breach (at most ``tolerance_mm``,
default 0.5 mm: the label map's surface is uncertain by about that much); B: < 2 mm;
C: 2 to < 4 mm; D: 4 to < 6 mm; E: >= 6 mm. The breach's direction is that from the
nearest bone to the worst sample, expressed in the anatomical frame and named by its
largest component: *medial* (towards the mid-sagittal plane: into the canal for a pedicle
screw; any sample over the canal's footprint is medial), *lateral*, *superior*,
*inferior*, *anterior*, *posterior*. Samples within one screw diameter of the entry
whose breach points posteriorly are not graded: there the screw's first thread meets the
oblique posterior surface where the head is seated, not a pedicle or body wall; their
largest distance is recorded as ``entry_outside_mm``.

**Resolution of a grade** (:func:`coarse_map_note`). The breach is measured on the label
map, and a coarse map's blocky surface lies up to about half a voxel from the bone's. The
record keeps the map's coarsest voxel spacing (``label_voxel_mm``); when the breach plus
half of it reaches the limit of the accepted grade (``planning.max_grade``), the screw is
accepted with a note saying so (``coarse_map_note``, in the rule's log and the patient
page).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

GRADES = "ABCDE"  #: Gertzbein-Robbins grades, best first
#: breach (mm) at which grades C, D and E begin; B is > tolerance and < 2 mm
GRADE_LIMITS_MM = (2.0, 4.0, 6.0)
DIRECTIONS = ("medial", "lateral", "anterior", "posterior", "superior", "inferior")
CANAL_MIDLINE_MM = 6.0  #: the canal must reach within this distance of the body's mid-plane
CANAL_MIN_AREA_MM2 = 20.0  #: smaller enclosed holes (vascular channels, noise) are not canal
CANAL_BEYOND_BODY_MM = 15.0  #: heights above and below the body included in the canal's shadow
#: a column of the shadow holding less bone than this (mm) is open: thin bone overlapping
#: the canal at some heights (articular processes, a lamina edge, a tilted arch) does not
#: close it. Tried in turn until the canal found is at least CANAL_TYPICAL_AREA_MM2.
CANAL_SHADOW_MM = (5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0)
#: thoracolumbar canals are 150-300 mm² in cross-section; a smaller opening at a low
#: threshold is taken as partly shadowed by bone at other heights
CANAL_TYPICAL_AREA_MM2 = 120.0


class BoneField:
    """Signed distance (mm) to the vertebra's voxelised surface, positive outside."""

    def __init__(self, bone_img: sitk.Image, fine_mm: float = 0.5, pad_mm: float = 15.0):
        arr = sitk.GetArrayFromImage(bone_img) > 0  # z, y, x
        if not arr.any():
            raise ValueError("the bone mask is empty")
        spacing = np.array(bone_img.GetSpacing(), float)
        self.fine = float(min(fine_mm, spacing.min()))
        self.pad = float(pad_mm)
        sl = ndimage.find_objects(arr.astype(np.uint8))[0]
        pad_vox = np.ceil(pad_mm / spacing).astype(int)  # x, y, z
        lo = np.array([s.start for s in sl[::-1]]) - pad_vox  # x, y, z (may be < 0)
        hi = np.array([s.stop for s in sl[::-1]]) + pad_vox
        direction = np.array(bone_img.GetDirection(), float).reshape(3, 3)
        origin = np.array(bone_img.GetOrigin(), float)
        # Lower corner of voxel lo, then the fine grid's first centre half a fine voxel in.
        corner = origin + direction @ ((lo - 0.5) * spacing)
        size = np.ceil((hi - lo) * spacing / self.fine).astype(int)
        f_origin = corner + direction @ np.full(3, self.fine / 2)
        ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
        ref.SetSpacing([self.fine] * 3)
        ref.SetDirection(bone_img.GetDirection())
        ref.SetOrigin(f_origin.tolist())
        src = sitk.GetImageFromArray(arr.astype(np.uint8))
        src.CopyInformation(bone_img)
        fine = sitk.GetArrayFromImage(sitk.Resample(src, ref, sitk.Transform(),
                                                    sitk.sitkNearestNeighbor, 0)) > 0
        self.bone = fine
        out, self._nearest = ndimage.distance_transform_edt(~fine, sampling=self.fine,
                                                           return_indices=True)
        inside = ndimage.distance_transform_edt(fine, sampling=self.fine)
        self.signed = np.where(fine, -(inside - self.fine / 2),
                               out - self.fine / 2).astype(np.float32)
        self.matrix = direction * self.fine  # index (x, y, z) -> mm
        self.origin = f_origin
        self.inverse = np.linalg.inv(self.matrix)

    def index(self, pts: np.ndarray) -> np.ndarray:
        """Continuous fine-grid index (N, 3) in array order (z, y, x)."""
        return ((np.asarray(pts, float).reshape(-1, 3) - self.origin) @ self.inverse.T)[:, ::-1]

    def distance(self, pts: np.ndarray) -> np.ndarray:
        """Signed distance (mm) to the bone surface at physical points (positive outside)."""
        return ndimage.map_coordinates(self.signed, self.index(pts).T, order=1,
                                       mode="constant", cval=self.pad)

    def nearest_bone(self, pts: np.ndarray) -> np.ndarray:
        """Physical centre of the bone voxel nearest each point (its own voxel if in bone)."""
        idx = np.clip(np.floor(self.index(pts) + 0.5).astype(int), 0,
                      np.array(self.bone.shape) - 1)
        near = self._nearest[:, idx[:, 0], idx[:, 1], idx[:, 2]].T  # z, y, x
        return self.origin + near[:, ::-1].astype(float) @ self.matrix.T


@dataclass
class Frame:
    """Anatomical frame: origin on the mid-sagittal plane, unit axes (left, anterior,
    superior) in the scan's physical coordinates."""

    centre: np.ndarray
    left: np.ndarray
    anterior: np.ndarray
    superior: np.ndarray

    @property
    def axes(self) -> np.ndarray:
        return np.column_stack([self.left, self.anterior, self.superior])

    def to_frame(self, pts: np.ndarray) -> np.ndarray:
        """(l, a, s) coordinates (mm) of physical points (N, 3)."""
        return (np.asarray(pts, float) - self.centre) @ self.axes

    def to_physical(self, las: np.ndarray) -> np.ndarray:
        return self.centre + np.asarray(las, float) @ self.axes.T


def find_canal(field: BoneField, frame: Frame, ext: dict, step: float = 0.5) -> dict:
    """The spinal canal (see the module doc): ``found``, its centroid's lateral offset
    ``l_mm`` from the body's mid-plane and anterior coordinate ``a_mm``, its width and
    depth, and its footprint (``mask`` on the ``grid_l``/``grid_a`` axes, not serialised).
    ``ext``: the body's extent in the frame (a_post, s_lo, s_hi, l_max)."""
    ls = np.arange(-ext["l_max"], ext["l_max"] + 1e-9, step)
    as_ = np.arange(ext["a_post"] - 45.0, ext["a_post"] + 5.0 + 1e-9, step)
    ss = np.arange(ext["s_lo"] - CANAL_BEYOND_BODY_MM, ext["s_hi"] + CANAL_BEYOND_BODY_MM
                   + 1e-9, 2 * step)
    L, A = np.meshgrid(ls, as_, indexing="ij")
    height = np.zeros(L.shape)
    for s_ in ss:
        pts = frame.to_physical(np.column_stack([L.ravel(), A.ravel(), np.full(L.size, s_)]))
        height += (field.distance(pts) <= 0).reshape(L.shape) * 2 * step
    best, best_n, used = None, 0, None
    for threshold in CANAL_SHADOW_MM:
        holes = ndimage.binary_fill_holes(height >= threshold) & ~(height >= threshold)
        lab, n = ndimage.label(holes)
        for i in range(1, n + 1):
            m = lab == i
            il, ia = np.nonzero(m)
            if m.sum() * step * step < CANAL_MIN_AREA_MM2:
                continue
            if as_[ia].mean() > ext["a_post"] + 1.0 or np.abs(ls[il]).min() > CANAL_MIDLINE_MM:
                continue  # in the body, or beside the arch: not the vertebral foramen
            if m.sum() > best_n:
                best, best_n, used = m, int(m.sum()), threshold
        if best_n * step * step >= CANAL_TYPICAL_AREA_MM2:
            break
    if best is None:
        return {"found": False, "reason": "no opening enclosed by the vertebral arch behind "
                "the body (the arch is not closed in the label map)"}
    il, ia = np.nonzero(best)
    return {"found": True, "l_mm": float(ls[il].mean()), "a_mm": float(as_[ia].mean()),
            "width_mm": float(np.ptp(ls[il]) + step), "depth_mm": float(np.ptp(as_[ia]) + step),
            "area_mm2": float(best_n * step * step), "shadow_threshold_mm": used,
            "mask": best, "grid_l": ls, "grid_a": as_}


def canal_record(canal: dict) -> dict:
    """The canal's record without its footprint arrays (for JSON)."""
    return {k: v for k, v in canal.items() if k not in ("mask", "grid_l", "grid_a")}


def in_canal(canal: dict, las: np.ndarray) -> np.ndarray:
    """Whether frame coordinates (N, 3) lie over the canal's footprint (any height)."""
    if not canal.get("found"):
        return np.zeros(len(las), bool)
    ls, as_ = canal["grid_l"], canal["grid_a"]
    step = ls[1] - ls[0]
    i = np.floor((las[:, 0] - ls[0]) / step + 0.5).astype(int)
    j = np.floor((las[:, 1] - as_[0]) / step + 0.5).astype(int)
    ok = (i >= 0) & (i < len(ls)) & (j >= 0) & (j < len(as_))
    out = np.zeros(len(las), bool)
    out[ok] = canal["mask"][i[ok], j[ok]]
    return out


def grade_of(breach_mm: float, tolerance_mm: float = 0.5) -> str:
    """Gertzbein-Robbins grade of a breach (mm outside the cortex)."""
    if breach_mm <= tolerance_mm:
        return "A"
    return GRADES[1 + sum(breach_mm >= lim for lim in GRADE_LIMITS_MM)]


def grade_worse(grade: str, limit: str) -> bool:
    return GRADES.index(grade) > GRADES.index(limit)


def coarse_map_note(breach_mm: float, voxel_mm: float, max_grade: str,
                    tolerance_mm: float = 0.5) -> str | None:
    """A breach measured on a label map of ``voxel_mm`` (its coarsest spacing) is uncertain
    by about half a voxel: screws planned on 1 x 1 x 3 and 3 mm versions of real scans and
    graded again on the scans' own label maps moved by up to 0.8 mm (docs/screw_planning.md,
    "Coarse label maps"). When the breach plus that half voxel reaches the limit of
    ``max_grade`` (``tolerance_mm`` for A, 2 mm for B, ...), the text saying so; else None
    (also for voxels up to 1 mm, whose half voxel is within the grading tolerance)."""
    if voxel_mm <= 1.0 or max_grade == GRADES[-1]:
        return None
    limit = tolerance_mm if max_grade == "A" else GRADE_LIMITS_MM[GRADES.index(max_grade) - 1]
    if breach_mm + voxel_mm / 2 < limit:
        return None
    return (f"breach {breach_mm:.1f} mm measured on a label map of {voxel_mm:g} mm voxels, "
            f"uncertain by about half a voxel ({voxel_mm / 2:g} mm): the screw may lie beyond "
            f"grade {max_grade}'s {limit:g} mm; check screws.png, or plan on a finer scan or "
            "from landmarks")


def screw_surface(entry: np.ndarray, axis: np.ndarray, radius: float, length: float,
                  step: float = 0.25, n_around: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, 3) on the inserted screw's side and tip disc, and their depth (mm)."""
    u = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    ang = np.linspace(0, 2 * np.pi, n_around, endpoint=False)
    ring = np.outer(np.cos(ang), u) + np.outer(np.sin(ang), v)
    s = np.arange(0.0, length + 1e-9, step)
    side = entry + s[:, None, None] * axis + radius * ring[None]
    rr = np.arange(step, radius + 1e-9, step)
    disc = entry + length * axis + rr[:, None, None] * ring[None]
    pts = np.concatenate([side.reshape(-1, 3), disc.reshape(-1, 3), (entry + length * axis)[None]])
    depth = np.concatenate([np.repeat(s, n_around), np.full(len(rr) * n_around + 1, length)])
    return pts, depth


def direction_name(vec: np.ndarray, frame: Frame, side_sign: float) -> str:
    """Name of a physical direction's largest anatomical component (see the module doc);
    ``side_sign``: +1 for a screw on the patient's left, -1 on the right."""
    l, a, s = frame.axes.T @ np.asarray(vec, float)
    k = int(np.argmax(np.abs([l, a, s])))
    if k == 0:
        return "medial" if l * side_sign < 0 else "lateral"
    if k == 1:
        return "anterior" if a > 0 else "posterior"
    return "superior" if s > 0 else "inferior"


def grade_screw(entry: np.ndarray, axis: np.ndarray, diameter_mm: float, length_mm: float,
                side: str, field: BoneField, frame: Frame, tolerance_mm: float = 0.5,
                canal: dict | None = None) -> dict:
    """Gertzbein-Robbins grade of one screw (see the module doc). With the ``canal`` of
    :func:`find_canal`, a sample outside bone over the canal's footprint is a medial breach
    whatever its nearest bone: the screw is in the spinal canal."""
    pts, depth = screw_surface(np.asarray(entry, float), np.asarray(axis, float),
                               diameter_mm / 2, length_mm)
    d = field.distance(pts)
    out = d > tolerance_mm
    nearest = field.nearest_bone(pts[out]) if out.any() else np.zeros((0, 3))
    sign = 1.0 if side == "left" else -1.0
    names = np.array([direction_name(p - q, frame, sign) for p, q in zip(pts[out], nearest,
                                                                        strict=True)])
    if canal is not None and out.any():
        names[in_canal(canal, frame.to_frame(pts[out]))] = "medial"
    entry_zone = (depth[out] < diameter_mm) & (names == "posterior")
    seated = np.zeros(len(d), bool)  # samples outside where the head is seated: not graded
    seated[np.flatnonzero(out)[entry_zone]] = True
    graded = np.flatnonzero(out & ~seated)
    entry_out = float(d[seated].max()) if seated.any() else 0.0
    if len(graded):
        w = graded[np.argmax(d[graded])]
        breach = float(d[w])
        direction = str(names[~entry_zone][np.argmax(d[graded])])
        worst = pts[w].tolist()
        depth_w = float(depth[w])
    else:  # no graded sample outside the tolerance: the largest of the graded ones
        breach = max(0.0, float(d[~seated].max())) if (~seated).any() else 0.0
        direction, worst, depth_w = "none", None, None
    grade = grade_of(breach, tolerance_mm)
    if grade == "A":
        direction = "none"
    return {"grade": grade, "breach_mm": round(breach, 2), "direction": direction,
            "worst_point_mm": worst, "worst_depth_mm": depth_w,
            "min_clearance_mm": round(float(-d[depth >= diameter_mm].max()), 2)
            if (depth >= diameter_mm).any() else None,
            "entry_outside_mm": round(entry_out, 2), "tolerance_mm": tolerance_mm,
            "scale": "Gertzbein-Robbins (A none, B < 2 mm, C 2-4 mm, D 4-6 mm, E > 6 mm)"}


def _plane(field: BoneField, origin: np.ndarray, u: np.ndarray, v: np.ndarray,
           u_range: tuple[float, float], v_range: tuple[float, float], step: float = 0.25):
    uu = np.arange(u_range[0], u_range[1] + 1e-9, step)
    vv = np.arange(v_range[0], v_range[1] + 1e-9, step)
    U, V = np.meshgrid(uu, vv, indexing="xy")
    pts = origin + U.ravel()[:, None] * u + V.ravel()[:, None] * v
    return field.distance(pts).reshape(U.shape), pts.reshape(*U.shape, 3), uu, vv


def plot_placement(field: BoneField, frame: Frame, canal: dict, screws: list[dict], path,
                   title: str = "") -> None:
    """QC picture: for each screw, the axial cut through its axis (canal, pedicle, screw,
    worst breach point and grade) and the cut through its axis and the superior axis."""
    from matplotlib.figure import Figure
    from matplotlib.colors import ListedColormap

    fig = Figure(figsize=(5.2 * len(screws), 9.5))
    axes = fig.subplots(2, len(screws), squeeze=False)
    cmap = ListedColormap(["white", "#bdbdbd", "#9ecae1"])
    for j, sc in enumerate(screws):
        entry, axis = np.asarray(sc["entry_mm"], float), np.asarray(sc["axis"], float)
        length, r = float(sc["length_mm"]), float(sc["diameter_mm"]) / 2
        g = sc["placement"]
        across_ax = np.cross(frame.superior, axis)  # about the patient's left
        across_ax *= (-1.0 if sc["side"] == "left" else 1.0) / np.linalg.norm(across_ax)
        up = np.cross(axis, across_ax)
        for i, (v, vname) in enumerate(((across_ax, "towards medial (axial cut)"),
                                        (up, "towards superior"))):
            ax = axes[i, j]
            d, pts, uu, vv = _plane(field, entry, axis, v, (-15.0, length + 12.0),
                                    (-30.0, 30.0))
            img = (d <= 0).astype(int)
            if canal.get("found"):
                over = in_canal(canal, frame.to_frame(pts.reshape(-1, 3))).reshape(d.shape)
                img[over & (d > 0)] = 2
            ax.imshow(img, cmap=cmap, vmin=0, vmax=2, origin="lower", interpolation="nearest",
                      extent=[uu[0], uu[-1], vv[0], vv[-1]])
            ok = g["grade"] in "AB"
            colour = "tab:green" if ok else "tab:red"
            ax.plot([0, length, length, 0, 0], [-r, -r, r, r, -r], color=colour, lw=1.5)
            ax.plot([-6, 0], [0, 0], color=colour, lw=3)  # head
            if g.get("worst_point_mm") is not None:
                w = np.asarray(g["worst_point_mm"]) - entry
                ax.plot(w @ axis, w @ v, "x", color="black", ms=9, mew=2)
            ax.set_xlabel("along the screw from its entry (mm)")
            ax.set_ylabel(f"{vname} (mm)")
            if i == 0:
                text = f"{sc['side']}: grade {g['grade']}"
                if g["grade"] != "A":
                    text += f", {g['breach_mm']:.1f} mm {g['direction']}"
                ax.set_title(text, color=colour, fontsize=12)
            ax.set_aspect("equal")
    fig.suptitle(f"{title}\ngrey: bone; blue: spinal canal; x: worst breach", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
