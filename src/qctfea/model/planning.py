"""Automatic pedicle screw planning from the vertebra mask, for scans without landmarks.

:func:`plan_from_mask` places one screw per side from the vertebra parts image
written by the mask step (:mod:`qctfea.imaging.masks`: 1 body, 2 posterior elements,
3 trabecular ROI inside the body). Everything is computed in the scan's
physical coordinates (DICOM LPS, mm) through the image's origin, spacing and
direction matrix, so oblique (non-axial) scans are planned like axial ones.

1. **Anatomical axes.** The superior axis is the body's axis of least extent
   (the body is a disc-like cylinder), found as in the mask step
   (:func:`qctfea.imaging.masks.body_axis`: the direction within 45 degrees of the
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
   every 2-D component of at least 8 mm² not touching the mid-sagittal plane in
   the planes within 3 mm of the body's posterior surface is a candidate start
   (a structure starting further back, such as the arch of a side without a
   pedicle, is not attached to the body), and the one followed furthest back is
   the pedicle (a fragment of the body's rim left outside the opened body ends
   within a few planes); in each later plane, the component overlapping the
   previous plane's most. The
   search stops where the cross-section becomes discontinuous (no overlapping
   component: the structure followed ends), where the followed component
   reaches the mid-sagittal plane (the arch has closed: lamina and spinous
   process, not pedicle), where it grows beyond twice the smallest section
   so far (the pedicle has joined the lamina and the transverse and articular
   processes; without this stop the tapering lamina further back could pass
   for the isthmus), or where it branches: a second component of the plane
   takes at least 20 % of the previous section (lamina and articular process
   part; on 3 mm label maps the short lumbar pedicles flare into the processes
   by less than twice their section, and without this stop the search ran on
   into the lamina behind the canal). Sections beside body voxels in their plane are followed
   but are not candidates: the opening that separates the body (mask step)
   leaves the pedicle's base in the body, so they are cut short. Nor are the
   sections behind the widest one when the profile only narrows after it (within
   2 %): that taper is lamina and processes parting behind the pedicle (a 3 mm
   label map resampled onto a turned grid: its short pedicle lay wholly beside
   the body, and the smallest section left was that taper, C-shaped, its centre
   outside bone). The isthmus
   is the followed plane with the smallest cross-section; its centre is that
   cross-section's centroid, its width the equivalent diameter
   2 sqrt(area / pi) (the section is perpendicular to the anterior axis, so for
   a convergent pedicle it is slightly wider than the section perpendicular to
   the pedicle; the minor axis of the ellipse with the same second moments is
   recorded too).
3. **Midline from the spinal canal.** The canal (:func:`qctfea.model.placement.find_canal`:
   the opening enclosed by the vertebral arch behind the body) sets the mid-sagittal
   plane; without a closed canal in the mask, the body's centroid does. The isthmus
   search of step 2 runs on either side of that plane.
4. **Trajectory search** (per side). Lines through the isthmus (its centre, and points
   up to :data:`OFFSET_MM` from it laterally and vertically) are tried at every
   combination of the trajectory's medial and cranial angles (:data:`TRAJECTORIES`,
   :data:`ANGLE_STEP` apart): the traditional trajectory converges 5-25 degrees (at L5,
   whose pedicles converge about 30 degrees, 5-35: :data:`LEVEL_TRAJECTORIES`) and
   runs within 10 degrees of the endplates; the cortical bone trajectory (Santoni et al.,
   Spine J 2009) enters caudo-medially and aims 5-15 degrees laterally and 15-30 degrees
   cranially. ``planning.convergence_deg`` fixes the medial angle instead. For each
   line the screw is seated (going back from the isthmus, the last point before the axis
   leaves the bone at which the screw's whole circumference is in bone, within one
   diameter of that exit: the head sits outside, and the screw starts at the bone's
   surface, not inside the pedicle), its length is ``min(screw.length_mm, d - margin_mm)``
   with ``d`` the distance from the entry to where the line leaves the bone in front, and
   its clearance is the smallest depth of its surface inside the bone beyond its first
   radius (:class:`qctfea.model.placement.BoneField`). Each line's score is its
   clearance, plus 0.2 x the mean depth of its surface inside the bone (each point's depth
   counted up to 3 mm: centring where the smallest clearance ties, e.g. a pedicle taller
   than wide), with small preferences (0.02 per mm and per degree) for longer screws and
   for the trajectory's nominal angles among near-equal ones: the screw is centred in its
   pedicle and kept off the canal and the endplates. The :data:`GRADED_CANDIDATES`
   best-scoring lines are graded (:func:`qctfea.model.placement.grade_screw`, the whole
   surface, entry included) and the best grade wins, then the smallest breach, then the
   score: the clearance leaves the first radius out, where the thread meets an oblique
   surface, so a line that breaches there is not chosen over one fully in bone. A line
   whose axis, from the head's end to the tip, passes outside bone over the canal's
   footprint (a screw inserted from, or through, the spinal canal) is not a candidate,
   nor is a line too short (``min_length_mm``); a side with none is refused with an error
   naming the scan and what to change. A screw wider than the isthmus is a warning;
   ``planning.fit_diameter: true`` reduces it to 0.8 x the isthmus width (rounded down
   to 0.5 mm, at least 4 mm) and records both diameters.

Every screw, planned or from landmarks, is then graded on the Gertzbein-Robbins scale by
the screws step (:func:`qctfea.model.placement.grade_screw`); a grade worse than
``planning.max_grade`` fails the scan. A screw from landmarks is also measured against its
side's isthmus (:func:`isthmus_check`, the same search as step 2): a wider screw is a
warning and recorded, its diameter kept (the landmarks are the user's plan).

The screws returned are :class:`PlannedScrew` objects: :class:`~qctfea.model.screw.Screw`
with the fitted length in their spec and a ``planning`` record (isthmus centre,
width, whether the screw is wider than the isthmus, convergence angle, lengths)
that :meth:`PlannedScrew.to_dict` adds to the screws file. The breach check
against the bone (:func:`qctfea.model.screw.breach_report`) is the screws step's, as
for landmark screws.
"""

# Long on purpose (about 700 lines): one planning method (frame, canal, pedicles, isthmus,
# trajectory search) whose steps pass geometry to each other; the grading is in
# qctfea.model.placement.

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qctfea.imaging.masks import BONE_PARTS, BODY, POSTERIOR, TRABECULAR, body_axis
from qctfea.model.placement import (GRADES, BoneField, Frame, canal_record, find_canal,
                                    grade_screw, in_canal, screw_surface)
from qctfea.errors import QctfeaError
from qctfea.model.screw import SIDES, Screw, ScrewSpec
from qctfea.config import option

METHODS = ("landmarks", "auto")  #: planning.method: from the sample sheet's landmarks, or this
PLANE_STEP_MM = 0.5  #: spacing of the isthmus search planes and of their in-plane grid
SEARCH_BEHIND_MM = 25.0  #: how far behind the body's posterior surface the isthmus is sought
LINE_STEP_MM = 0.25  #: step when following the screw line through the bone
MAX_LINE_MM = 150.0  #: longest distance followed along the screw line
MAX_BACK_MM = 40.0  #: longest distance followed backwards from the isthmus to the entry
ANGLE_STEP = 2.5  #: degrees between the trajectory angles tried
OFFSET_MM = 1.5  #: the screw passes within this distance of the isthmus centre (l and s)
OFFSET_STEP_MM = 0.75
CENTRING_CAP_MM = 3.0  #: depths inside the bone beyond this add nothing to the centring term
CENTRING_WEIGHT = 0.2  #: weight of the mean capped depth (centring) beside the clearance
GRADED_CANDIDATES = 40  #: the best-scoring lines graded (Gertzbein-Robbins) before one is chosen
FIT_FRACTION = 0.8  #: fit_diameter: screw diameter at most this fraction of the isthmus width
FIT_STEP_MM = 0.5  #: fitted diameters are rounded down to this step
MIN_FIT_DIAMETER_MM = 4.0  #: fit_diameter never goes below this
#: planning.trajectory: angle ranges (degrees) searched, nominal angles preferred among
#: near-equal clearances, and the screw size used when the screw section gives none
TRAJECTORIES = {
    # traditional trajectory: converging 5-25 deg medially, parallel to the endplates
    "traditional": {"medial_deg": (5.0, 25.0), "cranial_deg": (-10.0, 10.0),
                    "nominal_medial_deg": 15.0, "nominal_cranial_deg": 0.0,
                    "diameter_mm": 6.5, "length_mm": 40.0},
    # cortical bone trajectory: caudo-medial entry at the pars, aimed cranio-laterally
    "cortical": {"medial_deg": (-15.0, -5.0), "cranial_deg": (15.0, 30.0),
                 "nominal_medial_deg": -8.0, "nominal_cranial_deg": 25.0,
                 "diameter_mm": 5.5, "length_mm": 35.0},
}
#: Level-specific angles of a trajectory (over :data:`TRAJECTORIES`): the pedicles' transverse
#: angle grows down the lumbar spine to about 30° at L5 (Zindrick et al. 1987; docs/science.md
#: "Screws"), beyond the traditional range that suits L1-L4
LEVEL_TRAJECTORIES = {("traditional", "L5"): {"medial_deg": (5.0, 35.0)}}


def trajectory(name: str, level: str | None = None) -> dict:
    """Angle ranges, nominal angles and screw size of trajectory ``name`` at the target
    ``level`` (a level name such as ``L5``; None: not known, the trajectory's own)."""
    return {**TRAJECTORIES[name], **LEVEL_TRAJECTORIES.get((name, level), {})}


JOIN_FACTOR = 2.0  #: a section this many times the smallest so far: the pedicle has joined the arch
MIDLINE_MM = 1.0  #: a cross-section this close to the mid-sagittal plane has closed the arch
START_MM = 3.0  #: a pedicle starts within this distance behind the body's posterior surface
#: the followed section branches (a second component of this plane takes at least this
#: fraction of the previous section): the pedicle is behind, lamina and processes divide
SPLIT_FRACTION = 0.2
#: a section may exceed the one in front of it by this factor and still count as narrowing
#: (sampling noise of the 0.5 mm section grid) in the taper behind the widest section
TAPER_TOLERANCE = 1.02
MIN_START_AREA_MM2 = 8.0  #: smaller sections attached to the body are not pedicle starts


@dataclass
class PlanParams:
    """Config section ``planning`` (see config/README.md)."""

    #: "landmarks" (sample sheet) or "auto" (from the mask)
    method: str = option(
        "landmarks", enum=list(METHODS),
        doc=("`landmarks`: screws on the entry->target lines of the sample sheet's landmarks "
             "files (every row needs one); `auto`: planned from the vertebra mask "
             "(`src/qctfea/model/planning.py`, docs/screw_planning.md): the spinal canal sets "
             "the mid-sagittal plane, each pedicle's isthmus (narrowest cross-section behind "
             "the body) is found, and the trajectory through it with the largest clearance to "
             "the bone surface is chosen within `planning.trajectory`'s angle range; the "
             "landmarks column may then be empty or absent"))
    #: how far the tip stays inside the anterior cortex
    margin_mm: float = option(
        3.0, minimum=0,
        doc=("`auto`: the screw tip stays this far inside the anterior cortex (inserted length "
             "= min(`screw.length_mm`, entry to where the axis leaves the bone − margin))"))
    #: medial angle to the sagittal plane (negative: lateral); None: searched in the
    #: trajectory's range
    convergence_deg: float | None = option(
        None, exclusiveMinimum=-45, exclusiveMaximum=45,
        doc=("`auto`: fixes the medial angle to the sagittal plane (negative: lateral); "
             "`null`: searched within the trajectory's range"))
    #: shorter fitted screws are refused
    min_length_mm: float = option(
        25.0, exclusiveMinimum=0,
        doc=("`auto`: trajectories whose fitted screw is shorter than this are not candidates; "
             "a side with none is refused"))
    #: "traditional" (converging, 6.5 x 40 mm) or "cortical" (cortical bone trajectory,
    #: caudo-medial to cranio-lateral, 5.5 x 35 mm); the size applies when the screw
    #: section gives none
    trajectory: str = option(
        "traditional", enum=list(TRAJECTORIES),
        doc=("`auto`: `traditional` (converging 5–25° medially, at L5 5–35° (its pedicles "
             "converge about 30°), within ±10° of the endplates; "
             "6.5 × 40 mm screws when the `screw` section gives no size) or `cortical` "
             "(cortical bone trajectory: caudo-medial entry, aimed 5–15° laterally and 15–30° "
             "cranially; 5.5 × 35 mm)"))
    #: worst Gertzbein-Robbins grade accepted (A-E); a worse screw fails the scan
    max_grade: str = option(
        "B", enum=list(GRADES),
        doc=("worst Gertzbein-Robbins grade accepted for any screw, planned or from landmarks "
             "(A: in bone; B: < 2 mm outside; C: 2–4; D: 4–6; E: > 6 mm). A worse screw fails "
             "the scan at rule `accept_screws` with the grade, breach (mm, direction) and what "
             "to do; with `--keep-going` the cohort tables are built without it and "
             "`tables/exclusions.csv` lists it"))
    #: breach (mm) up to which a screw still counts as fully in bone (grade A)
    grade_tolerance_mm: float = option(
        0.5, minimum=0, exclusiveMaximum=2,
        doc=("a breach up to this (mm, outside the voxelised bone surface of the label map) "
             "still counts as grade A"))
    #: planned screws: a diameter above 0.8 x the isthmus width is reduced to fit it
    fit_diameter: bool = option(
        False,
        doc=("`auto`: `true` reduces a screw wider than 0.8 × the pedicle isthmus' narrowest "
             "width to that (rounded down to 0.5 mm, at least 4 mm); screws.json records the "
             "configured and used diameters. `false`: a screw wider than the isthmus is a "
             "warning, and its grade decides. Screws from landmarks are measured against "
             "their isthmus too (warned, recorded in screws.json and the long table) but keep "
             "their diameter"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QctfeaError(f"method must be one of {list(METHODS)}, not {self.method!r}")
        if self.margin_mm < 0:
            raise QctfeaError(f"margin_mm must be >= 0, not {self.margin_mm!r}")
        if self.convergence_deg is not None and not -45 < self.convergence_deg < 45:
            raise QctfeaError("convergence_deg must be in (-45, 45) degrees (medial positive, "
                              f"lateral negative) or null, not {self.convergence_deg!r}")
        if self.min_length_mm <= 0:
            raise QctfeaError(f"min_length_mm must be > 0, not {self.min_length_mm!r}")
        if self.trajectory not in TRAJECTORIES:
            raise QctfeaError(f"trajectory must be one of {list(TRAJECTORIES)}, not "
                              f"{self.trajectory!r}")
        if self.max_grade not in GRADES:
            raise QctfeaError(f"max_grade must be one of {list(GRADES)} (Gertzbein-Robbins), "
                              f"not {self.max_grade!r}")
        if self.grade_tolerance_mm < 0 or self.grade_tolerance_mm >= 2:
            raise QctfeaError("grade_tolerance_mm must be in [0, 2) mm, not "
                              f"{self.grade_tolerance_mm!r}")


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


def anatomical_frame(grid: _Grid, context: str) -> tuple[Frame, dict]:
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
    frame = Frame(cb, np.cross(sup, ant), ant, sup)
    las = frame.to_frame(body)
    a_post, a_ant = np.percentile(las[:, 1], [0.5, 99.5])
    s_lo, s_hi = np.percentile(las[:, 2], [0.5, 99.5])
    ext = {"a_post": float(a_post), "a_ant": float(a_ant), "s_lo": float(s_lo),
           "s_hi": float(s_hi),
           "l_max": float(np.abs(frame.to_frame(grid.points(grid.bone))[:, 0]).max()) + 1.0}
    return frame, ext


# Long on purpose: one search (planes, sections followed backwards, the narrowest kept).
def _isthmus(grid: _Grid, frame: Frame, ext: dict, side: str, context: str) -> dict:
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
    labels = [ndimage.label(sec_all[:, k, :], structure=near) for k in range(len(a_planes))]

    def follow(k0: int, start: np.ndarray) -> list[dict]:
        """The cross-sections of the structure whose section in plane k0 is ``start``,
        followed backwards (see the module doc for the stops)."""
        prev, profile = None, []
        for k in range(k0, len(a_planes)):
            lab, n = labels[k]
            if prev is None:
                pick_mask = start
            else:
                if n == 0:
                    break  # the section ends
                overlap = np.bincount(lab[prev], minlength=n + 1)[1:]
                if not overlap.any():
                    break  # discontinuous: the followed structure has ended
                pick = int(np.argmax(overlap)) + 1
                if n > 1 and np.partition(overlap, -2)[-2] >= SPLIT_FRACTION * prev.sum():
                    break  # it branches: the arch divides into lamina and processes
                if (lab[at_midline] == pick).any():
                    break  # the arch has closed: lamina and spinous process from here on
                pick_mask = lab == pick
            prev = pick_mask
            area = float(prev.sum() * h * h)
            # A section beside body voxels is cut short by the body mask (the opening that
            # separates the body leaves the pedicle's base in the body): not a candidate.
            cut = bool((ndimage.binary_dilation(prev, near, iterations=2)
                        & body_all[:, k, :]).any())
            smallest = min((p["area_mm2"] for p in profile if not p["cut"]), default=np.inf)
            if not cut and area > JOIN_FACTOR * smallest:
                break  # the pedicle has joined the lamina and the processes
            il, is_ = np.nonzero(prev)
            profile.append({"depth_mm": float(k * h), "a": float(a_planes[k]),
                            "area_mm2": area, "cut": cut,
                            "l": float(sign * ls[il].mean()), "s": float(ss[is_].mean()),
                            "cov": np.cov(np.vstack([ls[il], ss[is_]])) if len(il) > 2
                            else None})
        return profile

    # Every section attached to the body (in the planes within START_MM behind it, not
    # touching the mid-plane, at least MIN_START_AREA_MM2) is a candidate start; the
    # pedicle is the structure followed furthest back (a fragment of the body's rim left
    # outside the opened body, or a lip, ends within a few planes), ties to the larger.
    profile, best_key = [], None
    for k in range(len(a_planes)):
        if k * h > START_MM:
            break
        lab, n = labels[k]
        touching = set(np.unique(lab[at_midline])) - {0}
        sizes = ndimage.sum(np.ones_like(lab), lab, range(1, n + 1)) * h * h
        for i in range(1, n + 1):
            if i in touching or sizes[i - 1] < MIN_START_AREA_MM2:
                continue
            run = follow(k, lab == i)
            key = (len(run), sizes[i - 1])
            if run and (best_key is None or key > best_key):
                profile, best_key = run, key
    if not profile:
        raise QctfeaError(
            f"{context}: no {side} pedicle found: the posterior elements have no cross-section "
            f"on the patient's {side} side within {SEARCH_BEHIND_MM:g} mm behind the vertebral "
            "body; check the label map and the mask step (mask.label, mask.body_opening_mm), or "
            "give landmarks for this scan and set planning.method: landmarks")
    candidates = [p for p in profile if not p["cut"]] or profile
    # A profile that widens to an interior maximum and only narrows after it: the narrowing
    # is the taper where lamina and processes part, behind the pedicle, not its isthmus.
    areas = [p["area_mm2"] for p in candidates]
    top = int(np.argmax(areas))
    if 0 < top < len(areas) - 1 and all(b <= a * TAPER_TOLERANCE
                                        for a, b in zip(areas[top:], areas[top + 1:])):
        candidates = candidates[:top]
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


def _trajectory_axis(frame: Frame, side: str, medial_deg: float, cranial_deg: float
                     ) -> np.ndarray:
    """Unit axis (physical) of a screw on ``side`` pointing anteriorly, converging
    ``medial_deg`` towards the mid-sagittal plane (negative: diverging) and rising
    ``cranial_deg`` towards superior (negative: caudal)."""
    sign = 1.0 if side == "left" else -1.0
    t, c = np.deg2rad(medial_deg), np.deg2rad(cranial_deg)
    return frame.axes @ np.array([-sign * np.sin(t) * np.cos(c), np.cos(t) * np.cos(c),
                                  np.sin(c)])


def _candidate(field: BoneField, through: np.ndarray, axis: np.ndarray, radius: float,
               spec_length: float, params: PlanParams, crosses_canal=None) -> dict | None:
    """One trajectory through ``through``: seated entry, fitted length and clearance (the
    smallest depth of the screw's surface inside the bone beyond its first radius)."""
    t = np.arange(0.0, MAX_BACK_MM + 1e-9, LINE_STEP_MM)
    u = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    ring = radius * (np.outer(np.cos(ang), u) + np.outer(np.sin(ang), v))
    back = through - np.outer(t, axis)
    axis_in = field.distance(back) <= 0
    if not axis_in[0]:
        return None
    t_axis = int(np.argmin(axis_in)) if not axis_in.all() else len(t) - 1
    ring_in = (field.distance((back[: t_axis + 1, None, :] + ring[None]).reshape(-1, 3))
               .reshape(t_axis + 1, -1) <= 0).all(axis=1)
    # The seat lies within one diameter of where the axis leaves the bone: a screw is
    # inserted from the bone surface, it cannot start inside the pedicle.
    seated = np.flatnonzero(ring_in & (t[: t_axis + 1] >= t[t_axis] - 2 * radius))
    t_entry = float(t[seated[-1]]) if len(seated) else float(max(t[t_axis] - 2 * radius, 0.0))
    fwd = field.distance(through + np.outer(np.arange(0.0, MAX_LINE_MM, LINE_STEP_MM), axis))
    leaves = np.flatnonzero(fwd > 0)
    t_front = float(leaves[0] * LINE_STEP_MM) if len(leaves) else MAX_LINE_MM
    entry = through - t_entry * axis
    available = t_entry + t_front - params.margin_mm
    length = min(spec_length, available)
    if length <= 2 * radius:
        return None
    if crosses_canal is not None and crosses_canal(entry, axis, length):
        return None  # inserted through, or ending in, the spinal canal
    pts, depth = screw_surface(entry, axis, radius, length, step=0.5, n_around=16)
    inside = -field.distance(pts[depth >= radius])
    clearance = float(inside.min())
    centring = float(np.clip(inside, 0.0, CENTRING_CAP_MM).mean())
    return {"entry": entry, "axis": axis, "length": float(length), "available": available,
            "clearance": clearance, "centring": centring,
            "exit": through + (t_front + LINE_STEP_MM / 2) * axis}


# Long on purpose: the planning algorithm of the module doc, per side, read top to bottom.
def plan_from_mask(parts_img: sitk.Image, spec: ScrewSpec, params: PlanParams,
                   context: str, anatomy: Anatomy | None = None,
                   level: str | None = None) -> list[Screw]:
    """Left and right screws planned from a vertebra parts image (see the module doc);
    ``anatomy``: its :func:`vertebra_anatomy`, when the caller has it already; ``level``: the
    target's level name, when known (:func:`trajectory`)."""
    a = anatomy or vertebra_anatomy(parts_img, context)
    grid, field, frame, ext, canal = a.grid, a.field, a.frame, a.ext, a.canal
    traj = trajectory(params.trajectory, level)

    def crosses_canal(entry, axis, length):
        """Whether the screw's axis, from its head's end to its tip, passes outside bone over
        the canal's footprint."""
        if not canal.get("found"):
            return False
        t = np.arange(-spec.head_length_mm, length + 1e-9, LINE_STEP_MM)
        pts = entry + np.outer(t, axis)
        hit = bool((in_canal(canal, frame.to_frame(pts)) & (field.distance(pts) > 0)).any())
        through_canal[0] += hit
        return hit

    through_canal = [0]  # trajectories left out because they cross the canal (per side)

    screws = []
    for side in SIDES:
        isth = _isthmus(grid, frame, ext, side, context)
        c = isth["centre_las"]
        centre = frame.to_physical(c)
        if field.distance(centre[None])[0] > 0:
            raise QctfeaError(f"{context}: the centre of the {side} pedicle's narrowest "
                              f"cross-section ({np.round(centre, 1).tolist()} mm) is not bone: "
                              "the pedicle is not a closed tube in the mask; check the label map, "
                              "or give landmarks and set planning.method: landmarks")
        diameter = spec.diameter_mm
        fitted = False
        width = isth["min_width_mm"]
        if params.fit_diameter and diameter > FIT_FRACTION * width:
            diameter = max(MIN_FIT_DIAMETER_MM,
                           np.floor(FIT_FRACTION * width / FIT_STEP_MM) * FIT_STEP_MM)
            fitted = diameter < spec.diameter_mm
        exceeds = diameter > width
        if exceeds:
            warnings.warn(
                f"{context}: the {side} pedicle isthmus is {width:.1f} mm wide (narrowest "
                f"width of its smallest cross-section), less than the {diameter:g} mm screw: "
                "the screw may breach the pedicle wall (see its grade); choose a thinner screw "
                "(screw.diameter_mm), set planning.fit_diameter: true, or plan this scan with "
                "landmarks", stacklevel=2)
        medial = params.convergence_deg if params.convergence_deg is not None else None
        angles_m = ([medial] if medial is not None else
                    np.arange(traj["medial_deg"][0], traj["medial_deg"][1] + 1e-9, ANGLE_STEP))
        angles_c = np.arange(traj["cranial_deg"][0], traj["cranial_deg"][1] + 1e-9, ANGLE_STEP)
        offsets = np.arange(-OFFSET_MM, OFFSET_MM + 1e-9, OFFSET_STEP_MM)
        scored = []  # (score, candidate, medial, cranial, through)
        tried = 0
        through_canal[0] = 0
        for dl in offsets:
            for ds in offsets:
                through = frame.to_physical(c + np.array([dl, 0.0, ds]))
                if field.distance(through[None])[0] > 0:
                    continue
                for m in angles_m:
                    for cr in angles_c:
                        axis = _trajectory_axis(frame, side, float(m), float(cr))
                        cand = _candidate(field, through, axis, diameter / 2, spec.length_mm,
                                          params, crosses_canal)
                        tried += 1
                        if cand is None or cand["length"] < params.min_length_mm:
                            continue
                        # Clearance first; among near-equal ones the nominal angles, longer
                        score = (cand["clearance"] + CENTRING_WEIGHT * cand["centring"]
                                 + 0.02 * cand["length"]
                                 - 0.02 * abs(m - traj["nominal_medial_deg"])
                                 - 0.02 * abs(cr - traj["nominal_cranial_deg"]))
                        scored.append((score, cand, float(m), float(cr), through))
        if not scored:
            raise QctfeaError(
                f"{context}: no {params.trajectory} trajectory through the {side} pedicle "
                f"leaves room for a screw of at least planning.min_length_mm = "
                f"{params.min_length_mm:g} mm outside the spinal canal ({tried} trajectories "
                f"tried, {through_canal[0]} of them crossing the canal: medial angle "
                f"{traj['medial_deg']} deg, cranial angle {traj['cranial_deg']} deg, through "
                f"the isthmus within {OFFSET_MM:g} mm); lower planning.min_length_mm or "
                "planning.margin_mm, try the other planning.trajectory, or give landmarks and "
                "set planning.method: landmarks. If roi.png shows a pedicle kept in the body "
                "(a body separated by the opening), give a map of the vertebral body as the "
                "sample sheet's subregions column (VerSe sub-regions, or TotalSegmentator's "
                "vertebrae_body task with mask.body_subregion_labels: [1])")
        # The clearance leaves out the screw's first radius, where the thread meets an
        # oblique surface at the entry: of the best-scoring lines, the best grade (then the
        # best score) wins, so that a line fully in bone is not passed over for one whose
        # entry breaches the wall (the real L1's right screw: grade B, 0.7 mm lateral at
        # the entry, chosen over grade A lines).
        scored.sort(key=lambda c: -c[0])
        top = scored[:GRADED_CANDIDATES]
        grades = [grade_screw(c[1]["entry"], c[1]["axis"], diameter, c[1]["length"], side,
                              field, frame, params.grade_tolerance_mm, canal)
                  for c in top]
        pick = min(range(len(top)), key=lambda i: (GRADES.index(grades[i]["grade"]),
                                                   grades[i]["breach_mm"] * (
                                                       grades[i]["grade"] != "A"), i))
        _, cand, m, cr, through = top[pick]
        axis = cand["axis"]
        axis_las = frame.axes.T @ axis
        screws.append(PlannedScrew(
            side, cand["entry"], axis,
            replace(spec, length_mm=float(cand["length"]), diameter_mm=float(diameter)),
            planning={
                "method": "auto",
                "trajectory": params.trajectory,
                **_isthmus_record(frame, isth, diameter),
                "isthmus_depth_behind_body_mm": isth["depth_behind_body_mm"],
                "diameter_fitted_to_isthmus": bool(fitted),
                "diameter_configured_mm": spec.diameter_mm,
                "through_mm": through.tolist(),
                "convergence_deg": float(np.degrees(np.arctan2(
                    -(1.0 if side == "left" else -1.0) * axis_las[0], axis_las[1]))),
                "cranial_deg": float(np.degrees(np.arcsin(np.clip(axis_las[2], -1, 1)))),
                "clearance_mm": cand["clearance"],
                "candidate_rank": pick + 1,  # by score, among the graded ones
                "trajectories_tried": tried,
                "level": level,
                "medial_range_deg": list(traj["medial_deg"]),
                "cranial_range_deg": list(traj["cranial_deg"]),
                "available_length_mm": cand["available"],
                "anterior_exit_mm": cand["exit"].tolist(),
            }))
    return screws


def isthmus_check(anatomy: Anatomy, side: str, diameter_mm: float, context: str) -> dict:
    """A screw not planned here (from landmarks) against its side's pedicle isthmus, found as
    planning finds it (module doc, step 2; it does not depend on the screw's line): the
    isthmus' centre, equivalent diameter and narrowest width, and whether the screw is wider
    than that width (``screw_exceeds_isthmus``, as for planned screws). A pedicle the search
    does not find (a label map whose arch is not closed) is recorded as ``isthmus_note``
    with the other values None: the screw's grade decides, as it does anyway."""
    try:
        isth = _isthmus(anatomy.grid, anatomy.frame, anatomy.ext, side, context)
    except QctfeaError as exc:
        return {"isthmus_min_width_mm": None, "isthmus_diameter_mm": None,
                "screw_exceeds_isthmus": None, "isthmus_note": str(exc)}
    return _isthmus_record(anatomy.frame, isth, diameter_mm)


def _isthmus_record(frame, isth: dict, diameter_mm: float) -> dict:
    """A screw's planning record of its pedicle isthmus (planned screws and landmarks')."""
    width = isth["min_width_mm"]
    return {"isthmus_centre_mm": frame.to_physical(isth["centre_las"]).tolist(),
            "isthmus_area_mm2": isth["area_mm2"], "isthmus_diameter_mm": isth["diameter_mm"],
            "isthmus_min_width_mm": width, "screw_exceeds_isthmus": bool(diameter_mm > width)}


def bone_field(parts_img: sitk.Image) -> BoneField:
    """Signed distance to the vertebra (body, posterior elements) of a parts image."""
    lab = sitk.GetArrayFromImage(parts_img)
    img = sitk.GetImageFromArray(np.isin(lab, BONE_PARTS).astype(np.uint8))
    img.CopyInformation(parts_img)
    return BoneField(img)


def vertebra_frame(grid: _Grid, field: BoneField, context: str) -> tuple[Frame, dict, dict]:
    """Anatomical frame whose mid-sagittal plane passes through the spinal canal (the body's
    centroid when the canal is not closed in the mask), the body's extent, the canal."""
    frame, ext = anatomical_frame(grid, context)
    canal = find_canal(field, frame, ext)
    if canal["found"]:
        shift = canal["l_mm"]
        frame = Frame(frame.to_physical([shift, 0.0, 0.0]), frame.left, frame.anterior,
                      frame.superior)
        ext = {**ext, "l_max": ext["l_max"] + abs(shift)}
        canal = {**canal, "l_mm": 0.0, "grid_l": canal["grid_l"] - shift,
                 "offset_from_body_centroid_mm": shift}
    return frame, ext, canal


@dataclass
class Anatomy:
    """What planning and grading need of a parts image: its crop, the distance to its bone,
    the anatomical frame through the canal, the body's extent and the canal."""

    grid: _Grid
    field: BoneField
    frame: Frame
    ext: dict
    canal: dict

    def record(self) -> dict:
        """The frame and canal for screws.json."""
        f = self.frame
        return {"left": f.left.tolist(), "anterior": f.anterior.tolist(),
                "superior": f.superior.tolist(), "midline_point_mm": f.centre.tolist(),
                "body_depth_mm": float(self.ext["a_ant"] - self.ext["a_post"]),
                "canal": canal_record(self.canal)}


def vertebra_anatomy(parts_img: sitk.Image, context: str) -> Anatomy:
    """The :class:`Anatomy` of a parts image (computed once per screws step)."""
    grid = _Grid(parts_img, context)
    field = bone_field(parts_img)
    return Anatomy(grid, field, *vertebra_frame(grid, field, context))
