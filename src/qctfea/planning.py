"""Automatic pedicle screw planning from the vertebra mask, for scans without landmarks.

:func:`plan_from_mask` places one screw per side from the vertebra parts image
written by the mask step (:mod:`qctfea.masks`: 1 body, 2 posterior elements,
3 trabecular ROI inside the body). Everything is computed in the scan's
physical coordinates (DICOM LPS, mm) through the image's origin, spacing and
direction matrix, so oblique (non-axial) scans are planned like axial ones.

1. **Anatomical axes.** The superior axis is the body's axis of least extent
   (the body is a disc-like cylinder), found as in the mask step
   (:func:`qctfea.masks.body_axis`: the direction within 30 degrees of the
   patient's superior axis, LPS +z, along which the body is thinnest), so the
   screws and the load cases share one endplate normal. The smallest PCA
   eigenvector of the body voxels is not used: a lumbar body's height and depth
   give nearly equal variances (an elliptic cylinder 31 mm deep and 28 mm high:
   59 vs 65 mm²), and on the demo vertebra the PCA axis is tilted 17 degrees
   into the depth direction. The anterior axis is the line from the
   posterior-element centroid to the body centroid, orthogonalised against the
   superior axis: the spinous process pulls the posterior centroid down, and
   the trajectory should run parallel to the endplates. The lateral axis is
   superior x anterior, which in the right-handed LPS frame is the patient's
   left (+x): the left screw is the one on that side. The mid-sagittal plane
   passes through the body centroid, normal to the lateral axis.
2. **Pedicle isthmus** (per side). Planes perpendicular to the anterior axis
   are sampled every 0.5 mm from the body's posterior surface (0.5th
   percentile of the body voxels along the anterior axis) to 25 mm behind it;
   in each plane the posterior-element mask (linearly interpolated, >= 0.5) is
   sampled on a 0.5 mm grid on that side of the mid-sagittal plane and within
   the body's vertical extent. The pedicle is followed backwards from the body:
   in the first plane holding posterior elements, the largest 2-D component
   not touching the mid-sagittal plane, which must lie within 3 mm of the
   body's posterior surface (a structure starting further back, such as the
   arch of a side without a pedicle, is not attached to the body); in each
   later plane, the component overlapping the previous plane's most. The
   search stops where the cross-section becomes discontinuous (no overlapping
   component: the structure followed ends), where the followed component
   reaches the mid-sagittal plane (the arch has closed: lamina and spinous
   process, not pedicle), or where it grows beyond twice the smallest section
   so far (the pedicle has joined the lamina and the transverse and articular
   processes; without this stop the tapering lamina further back could pass
   for the isthmus). Sections beside body voxels in their plane are followed
   but are not candidates: the opening that separates the body (mask step)
   leaves the pedicle's base in the body, so they are cut short. The isthmus
   is the followed plane with the smallest cross-section; its centre is that
   cross-section's centroid, its width the equivalent diameter
   2 sqrt(area / pi) (the section is perpendicular to the anterior axis, so for
   a convergent pedicle it is slightly wider than the section perpendicular to
   the pedicle; the minor axis of the ellipse with the same second moments is
   recorded too).
3. **Aim point** in the body, at the isthmus centre's height, at
   ``target_depth_fraction`` of the body's depth (posterior to anterior surface,
   0.5th-99.5th percentiles of the body voxels) from its posterior surface.
   Laterally it lies half-way between the isthmus centre's sagittal line and
   the mid-sagittal plane (:data:`AIM_LATERAL_FRACTION`): the screws converge
   without their tips crossing the midline. For a typical L4 (isthmus centres
   about 17 mm from the midline, aim point about 33 mm in front of the
   isthmus) this is a medial convergence of about 15 degrees, within the
   10-20 degrees of the lumbar pedicles' own transverse angle; one third
   instead converged by 22-25 degrees on the demo and real vertebrae, more
   than their pedicles. With ``convergence_deg`` set, the aim point is instead
   where the line from the isthmus centre at that medial angle (to the
   sagittal plane, in the body's axial plane) reaches the aim depth.
4. **Screw.** The screw line passes through the isthmus centre and the aim
   point; its axis points anteriorly. Followed backwards from the isthmus
   centre (0.25 mm steps, nearest voxel of the vertebra mask), the axis leaves
   the bone at the posterior surface. That surface is oblique to the line, so
   a screw starting there would have part of its thread outside the bone for
   its first few millimetres (3.5-4 mm of surface on the real L3 sample: a
   breach warning with no wall breached). The entry is therefore the last
   point before the axis' exit, going back from the isthmus, at which the
   screw's whole circumference (radius ``screw.diameter_mm / 2``) is in bone:
   the screw is seated there, its head outside. (Where there is no such point,
   a pedicle narrower than the screw, the axis' exit is the entry.) Inserted
   length: ``min(screw.length_mm, d - margin_mm)``, where ``d`` is the
   distance from the entry to where the line, followed forwards from the aim
   point, leaves the bone at the anterior cortex. A side without a pedicle, or
   a fitted length below ``min_length_mm``, is refused with an error naming
   the scan and what to change; a screw wider than the isthmus is a warning.

The screws returned are :class:`PlannedScrew` objects: :class:`~qctfea.screw.Screw`
with the fitted length in their spec and a ``planning`` record (isthmus centre,
width, whether the screw is wider than the isthmus, convergence angle, lengths)
that :meth:`PlannedScrew.to_dict` adds to the screws file. The breach check
against the bone (:func:`qctfea.screw.breach_report`) is the screws step's, as
for landmark screws.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qctfea.masks import BONE_PARTS, BODY, POSTERIOR, TRABECULAR, body_axis
from qctfea.provenance import QctfeaError
from qctfea.screw import SIDES, Screw, ScrewSpec

METHODS = ("landmarks", "auto")  #: planning.method: from the sample sheet's landmarks, or this
PLANE_STEP_MM = 0.5  #: spacing of the isthmus search planes and of their in-plane grid
SEARCH_BEHIND_MM = 25.0  #: how far behind the body's posterior surface the isthmus is sought
LINE_STEP_MM = 0.25  #: step when following the screw line through the bone
MAX_LINE_MM = 150.0  #: longest distance followed along the screw line
AIM_LATERAL_FRACTION = 0.5  #: aim point's distance from the mid-plane / the isthmus'
JOIN_FACTOR = 2.0  #: a section this many times the smallest so far: the pedicle has joined the arch
MIDLINE_MM = 1.0  #: a cross-section this close to the mid-sagittal plane has closed the arch
START_MM = 3.0  #: a pedicle starts within this distance behind the body's posterior surface


@dataclass
class PlanParams:
    """Config section ``planning`` (see config/README.md)."""

    method: str = "landmarks"  #: "landmarks" (sample sheet) or "auto" (from the mask)
    margin_mm: float = 3.0  #: how far the tip stays inside the anterior cortex
    convergence_deg: float | None = None  #: medial angle to the sagittal plane; None: aim point
    target_depth_fraction: float = 0.8  #: aim point depth, posterior (0) to anterior (1) surface
    min_length_mm: float = 25.0  #: shorter fitted screws are refused

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QctfeaError(f"method must be one of {list(METHODS)}, not {self.method!r}")
        if self.margin_mm < 0:
            raise QctfeaError(f"margin_mm must be >= 0, not {self.margin_mm!r}")
        if self.convergence_deg is not None and not 0 <= self.convergence_deg < 45:
            raise QctfeaError("convergence_deg must be in [0, 45) degrees (medial) or null, "
                              f"not {self.convergence_deg!r}")
        if not 0 < self.target_depth_fraction < 1:
            raise QctfeaError("target_depth_fraction must be between 0 and 1, not "
                              f"{self.target_depth_fraction!r}")
        if self.min_length_mm <= 0:
            raise QctfeaError(f"min_length_mm must be > 0, not {self.min_length_mm!r}")


@dataclass
class PlannedScrew(Screw):
    """A screw planned from the mask, with the record of how (isthmus, angles, lengths)."""

    planning: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "planning": self.planning}


class _Grid:
    """The parts image cropped to the vertebra: masks and physical <-> index mapping."""

    def __init__(self, parts_img: sitk.Image, context: str) -> None:
        lab = sitk.GetArrayFromImage(parts_img)  # z, y, x
        if not (lab > 0).any():
            raise QctfeaError(f"{context}: the vertebra parts image is empty; rerun the mask "
                              "step (rule extract_vertebra) on this scan's label map")
        sl = ndimage.find_objects((lab > 0).astype(np.uint8))[0]
        lo = [max(0, s.start - 2) for s in sl[::-1]]  # x, y, z
        hi = [min(n, s.stop + 2) for s, n in zip(sl[::-1], lab.shape[::-1], strict=True)]
        #: the crop keeps its physical placement (origin, spacing, direction)
        self.image = sitk.RegionOfInterest(parts_img, [b - a for a, b in zip(lo, hi)], lo)
        lab = sitk.GetArrayFromImage(self.image)
        self.matrix = (np.array(self.image.GetDirection(), float).reshape(3, 3)
                       * np.array(self.image.GetSpacing(), float))  # index (x, y, z) -> mm
        self.origin = np.array(self.image.GetOrigin(), float)
        self.inverse = np.linalg.inv(self.matrix)
        self.shape = lab.shape
        self.bone = np.isin(lab, BONE_PARTS)
        self.body = np.isin(lab, (BODY, TRABECULAR))
        self.posterior = lab == POSTERIOR
        self._posterior_f = self.posterior.astype(np.float32)
        self._body_f = self.body.astype(np.float32)

    def points(self, mask: np.ndarray) -> np.ndarray:
        """Physical coordinates (N, 3) of the voxel centres of ``mask``."""
        return self.origin + np.argwhere(mask)[:, ::-1].astype(float) @ self.matrix.T

    def index(self, pts: np.ndarray) -> np.ndarray:
        """Continuous voxel index (N, 3), z, y, x order (array order), of physical points."""
        return ((np.asarray(pts, float) - self.origin) @ self.inverse.T)[:, ::-1]

    def in_bone(self, pts: np.ndarray) -> np.ndarray:
        """Whether points lie in a vertebra voxel (nearest voxel, like
        ``TransformPhysicalPointToIndex``); points off the grid are not bone."""
        idx = np.floor(self.index(pts) + 0.5).astype(int)
        ok = np.all((idx >= 0) & (idx < np.array(self.shape)), axis=1)
        out = np.zeros(len(idx), bool)
        out[ok] = self.bone[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        return out

    def in_posterior(self, pts: np.ndarray) -> np.ndarray:
        """Posterior-element mask, linearly interpolated, >= 0.5 (smooth cross-sections)."""
        return ndimage.map_coordinates(self._posterior_f, self.index(pts).T, order=1) >= 0.5

    def in_body(self, pts: np.ndarray) -> np.ndarray:
        """Body mask (trabecular ROI included), linearly interpolated, >= 0.5."""
        return ndimage.map_coordinates(self._body_f, self.index(pts).T, order=1) >= 0.5


@dataclass
class _Frame:
    """Anatomical frame: body centroid and unit axes (patient left, anterior, superior)."""

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


def anatomical_frame(grid: _Grid, context: str) -> tuple[_Frame, dict]:
    """The vertebra's anatomical axes and the body's extent along them (see module doc)."""
    body = grid.points(grid.body)
    post = grid.points(grid.posterior)
    for pts, what, lab in ((body, "vertebral body", f"{BODY}/{TRABECULAR}"),
                           (post, "posterior elements", f"{POSTERIOR}")):
        if len(pts) < 20:
            raise QctfeaError(f"{context}: the vertebra parts image has no {what} (label {lab}); "
                              "automatic screw planning needs both body and posterior elements: "
                              "check the mask step (mask.label, mask.body_opening_mm) or give "
                              "landmarks and set planning.method: landmarks")
    cb, cp = body.mean(axis=0), post.mean(axis=0)
    towards_body = cb - cp
    if np.linalg.norm(towards_body) < 1.0:
        raise QctfeaError(f"{context}: the body and posterior-element centroids coincide; the "
                          "parts image is not a vertebra's: check the mask step")
    towards_body /= np.linalg.norm(towards_body)
    sup = np.array(body_axis(grid.image, grid.body)["superior_axis"])
    ant = towards_body - (towards_body @ sup) * sup
    ant /= np.linalg.norm(ant)
    frame = _Frame(cb, np.cross(sup, ant), ant, sup)
    las = frame.to_frame(body)
    a_post, a_ant = np.percentile(las[:, 1], [0.5, 99.5])
    s_lo, s_hi = np.percentile(las[:, 2], [0.5, 99.5])
    ext = {"a_post": float(a_post), "a_ant": float(a_ant), "s_lo": float(s_lo),
           "s_hi": float(s_hi),
           "l_max": float(np.abs(frame.to_frame(grid.points(grid.bone))[:, 0]).max()) + 1.0}
    return frame, ext


def _isthmus(grid: _Grid, frame: _Frame, ext: dict, side: str, context: str) -> dict:
    """The narrowest cross-section of one side's pedicle (see module doc, step 2)."""
    sign = 1.0 if side == "left" else -1.0
    h = PLANE_STEP_MM
    ls = np.arange(0.0, ext["l_max"] + h, h)  # distance from the mid-plane, outwards
    ss = np.arange(ext["s_lo"], ext["s_hi"] + 1e-9, h)
    a_planes = ext["a_post"] - np.arange(0.0, SEARCH_BEHIND_MM + 1e-9, h)
    L, A, S = np.meshgrid(sign * ls, a_planes, ss, indexing="ij")  # (n_l, n_a, n_s)
    pts = frame.to_physical(np.column_stack([L.ravel(), A.ravel(), S.ravel()]))
    sec_all = grid.in_posterior(pts).reshape(L.shape)
    body_all = grid.in_body(pts).reshape(L.shape)
    at_midline = ls < MIDLINE_MM
    near = np.ones((3, 3), bool)
    prev = None
    profile = []
    for k, a in enumerate(a_planes):
        lab, n = ndimage.label(sec_all[:, k, :], structure=near)
        if n == 0:
            if prev is None and k * h <= START_MM:
                continue
            break  # the section ends (or never began): nothing here is this side's pedicle
        if prev is None:
            if k * h > START_MM:
                break  # nothing attached to the body: no pedicle on this side
            sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1))
            touching = set(np.unique(lab[at_midline])) - {0}
            ok = [(sizes[i - 1], i) for i in range(1, n + 1) if i not in touching]
            if not ok:
                continue
            pick = max(ok)[1]
        else:
            overlap = np.bincount(lab[prev], minlength=n + 1)[1:]
            if not overlap.any():
                break  # discontinuous: the followed structure has ended
            pick = int(np.argmax(overlap)) + 1
            if (lab[at_midline] == pick).any():
                break  # the arch has closed: lamina and spinous process from here on
        prev = lab == pick
        area = float(prev.sum() * h * h)
        # A section beside body voxels is cut short by the body mask (the opening that
        # separates the body leaves the pedicle's base in the body): not a candidate.
        cut = bool((ndimage.binary_dilation(prev, near, iterations=2) & body_all[:, k, :]).any())
        smallest = min((p["area_mm2"] for p in profile if not p["cut"]), default=np.inf)
        if not cut and area > JOIN_FACTOR * smallest:
            break  # the pedicle has joined the lamina and the processes
        il, is_ = np.nonzero(prev)
        profile.append({"depth_mm": float(k * h), "a": float(a), "area_mm2": area, "cut": cut,
                        "l": float(sign * ls[il].mean()), "s": float(ss[is_].mean()),
                        "cov": np.cov(np.vstack([ls[il], ss[is_]])) if len(il) > 2 else None})
    if not profile:
        raise QctfeaError(
            f"{context}: no {side} pedicle found: the posterior elements have no cross-section "
            f"on the patient's {side} side within {SEARCH_BEHIND_MM:g} mm behind the vertebral "
            "body; check the label map and the mask step (mask.label, mask.body_opening_mm), or "
            "give landmarks for this scan and set planning.method: landmarks")
    candidates = [p for p in profile if not p["cut"]] or profile
    best = min(candidates, key=lambda p: p["area_mm2"])
    eig = np.linalg.eigvalsh(best["cov"]) if best["cov"] is not None else np.zeros(2)
    return {
        "centre_las": np.array([best["l"], best["a"], best["s"]]),
        "depth_behind_body_mm": best["depth_mm"],
        "area_mm2": best["area_mm2"],
        "diameter_mm": float(2 * np.sqrt(best["area_mm2"] / np.pi)),
        # Ellipse of the same second moments: minor axis (the narrowest width).
        "min_width_mm": float(4 * np.sqrt(max(eig[0], 0.0))),
        "planes_followed": len(profile),
    }


def _run_in_bone(grid: _Grid, start: np.ndarray, direction: np.ndarray) -> float:
    """Distance from ``start`` to the last bone sample before the line leaves the bone."""
    t = np.arange(0.0, MAX_LINE_MM, LINE_STEP_MM)
    inside = grid.in_bone(start + np.outer(t, direction))
    out = np.flatnonzero(~inside)
    return float(t[out[0] - 1]) if len(out) else float(t[-1])


def _seated(grid: _Grid, centre: np.ndarray, axis: np.ndarray, radius: float,
            t_axis: float) -> float:
    """Distance behind ``centre`` of the screw's entry: the last point, going back from the
    isthmus towards where the axis leaves the bone (``t_axis``), at which the screw's whole
    circumference (16 points at ``radius``) is in bone; ``t_axis`` when there is none."""
    u = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = radius * (np.outer(np.cos(ang), u) + np.outer(np.sin(ang), v))
    for t in np.arange(t_axis, -1e-9, -LINE_STEP_MM):
        if grid.in_bone(centre - t * axis + ring).all():
            return float(t)
    return t_axis


def plan_from_mask(parts_img: sitk.Image, spec: ScrewSpec, params: PlanParams,
                   context: str) -> list[Screw]:
    """Left and right screws planned from a vertebra parts image (see the module doc)."""
    grid = _Grid(parts_img, context)
    frame, ext = anatomical_frame(grid, context)
    depth = ext["a_ant"] - ext["a_post"]
    a_aim = ext["a_post"] + params.target_depth_fraction * depth
    screws = []
    for side in SIDES:
        isth = _isthmus(grid, frame, ext, side, context)
        c = isth["centre_las"]
        if params.convergence_deg is None:
            l_aim = AIM_LATERAL_FRACTION * c[0]
        else:
            l_aim = c[0] - np.sign(c[0]) * np.tan(np.deg2rad(params.convergence_deg)) * (
                a_aim - c[1])
        if a_aim - c[1] < 1.0:
            raise QctfeaError(f"{context}: the {side} pedicle isthmus lies in front of the aim "
                              "point; the parts image is not a vertebra's: check the mask step")
        aim_las = np.array([l_aim, a_aim, c[2]])
        axis_las = (aim_las - c) / np.linalg.norm(aim_las - c)
        centre, aim = frame.to_physical(c), frame.to_physical(aim_las)
        axis = frame.axes @ axis_las
        if not grid.in_bone(centre[None])[0]:
            raise QctfeaError(f"{context}: the centre of the {side} pedicle's narrowest "
                              f"cross-section ({np.round(centre, 1).tolist()} mm) is not bone: "
                              "the pedicle is not a closed tube in the mask; check the label map, "
                              "or give landmarks and set planning.method: landmarks")
        t_axis = _run_in_bone(grid, centre, -axis)
        entry = centre - _seated(grid, centre, axis, spec.diameter_mm / 2, t_axis) * axis
        front = aim if grid.in_bone(aim[None])[0] else centre
        exit_ = front + (_run_in_bone(grid, front, axis) + LINE_STEP_MM / 2) * axis
        available = float((exit_ - entry) @ axis) - params.margin_mm
        length = min(spec.length_mm, available)
        if length < params.min_length_mm:
            raise QctfeaError(
                f"{context}: the {side} screw would be {length:.1f} mm long (entry to anterior "
                f"cortex {available + params.margin_mm:.1f} mm, less the {params.margin_mm:g} mm "
                f"margin), shorter than planning.min_length_mm = {params.min_length_mm:g}; "
                "lower planning.min_length_mm or planning.margin_mm, change "
                "planning.convergence_deg, or give landmarks and set planning.method: landmarks")
        exceeds = spec.diameter_mm > isth["diameter_mm"]
        if exceeds:
            warnings.warn(
                f"{context}: the {side} pedicle isthmus is {isth['diameter_mm']:.1f} mm wide "
                f"(equivalent diameter of its narrowest cross-section), less than the "
                f"{spec.diameter_mm:g} mm screw: the screw will breach the pedicle wall; choose "
                "a thinner screw (screw.diameter_mm) or plan this scan with landmarks",
                stacklevel=2)
        convergence = float(np.degrees(np.arctan2(-np.sign(c[0]) * axis_las[0], axis_las[1])))
        screws.append(PlannedScrew(
            side, entry, axis, replace(spec, length_mm=float(length)),
            planning={
                "method": "auto",
                "isthmus_centre_mm": centre.tolist(),
                "isthmus_depth_behind_body_mm": isth["depth_behind_body_mm"],
                "isthmus_area_mm2": isth["area_mm2"],
                "isthmus_diameter_mm": isth["diameter_mm"],
                "isthmus_min_width_mm": isth["min_width_mm"],
                "screw_exceeds_isthmus": bool(exceeds),
                "aim_mm": aim.tolist(),
                "convergence_deg": convergence,
                "available_length_mm": available,
                "anterior_exit_mm": exit_.tolist(),
                "frame": {"left": frame.left.tolist(), "anterior": frame.anterior.tolist(),
                          "superior": frame.superior.tolist(),
                          "body_centroid_mm": frame.centre.tolist(),
                          "body_depth_mm": float(depth)},
            }))
    return screws
