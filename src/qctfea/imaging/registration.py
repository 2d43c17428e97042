"""Longitudinal registration: each follow-up onto the patient's baseline, on the vertebra.

A patient never lies the same way twice, so "the same screw" at 12 months must
mean the same bone as at baseline. Each follow-up scan is rigidly registered to
the patient's baseline scan (SimpleITK, Euler 3-D transform), entirely in physical
space, so that the result does not depend on how the files are written (axis order,
flips, origin; docs/registration.md):

* one axis order: the four images are put in LPS axis order (the same voxels) with their
  origins rounded to 1 µm (:func:`in_lps`), so files written in another order or with a
  header's single-precision origin reach the search as the same images bit for bit;
* canonical grids: both scans are first resampled (linear) onto grids that depend only
  on physical space: identity direction, spacing per physical axis the scan's own
  (at most ``grid_mm``), anchored at the vertebra's physical centroid and covering its
  bounding box plus ``margin_mm``. The same images written in LPS, LAS, RAS, RPI or an
  oblique grid give the same canonical images, hence the same pyramid, sampling and
  optimiser path;
* images: calibrated density (mg/cm³) of both scans, so that differences in
  scanner calibration between visits do not enter the metric;
* metric: Mattes mutual information (robust to the density changes treatment causes),
  restricted to the baseline vertebra mask dilated by ``mask_dilation_mm`` (at least
  ``coarse_dilation_ratio`` times the coarsest voxel spacing of the two scans, so that
  the bone's edge, smeared over a thick slice, lies inside it); random
  sampling with a fixed seed, at least ``min_samples`` points per level (small bone
  masks on coarse slices would otherwise leave a few hundred);
* initialisation: the physical centroids of the two vertebra masks; Euler centre at the
  baseline centroid; parameter scales from physical shifts;
* optimiser: regular-step gradient descent, multi-resolution (``shrink``,
  ``smoothing_mm``, each sigma at least ``coarse_smoothing_ratio`` times the coarsest
  voxel spacing: on 5 mm slices the in-plane detail, which the other scan's thick
  slices average away differently, would otherwise bias the result), stopping on its own criteria (step below ``min_step``);
  ``iterations`` is only a safety cap, and a run that reaches it is "not converged";
* several starts: centroids, principal axes of the masks, then the centroid start turned
  by ±``start_deg`` about each axis. The search ends when two converged starts agree
  within ``agree_mm`` at the points that matter; the spread between the best two is
  reported as the registration's repeatability.

The follow-up density is then resampled onto the baseline grid (cubic B-spline
interpolation: linear interpolation's averaging raised a real scan's trabecular vBMD by
several per cent, :data:`DENSITY_INTERPOLATOR`), and the follow-up's FE model is the
**baseline model** (mesh, screws, endplates) with the follow-up's density: the mesh does
not change between visits, so a change in strength comes from the bone, not from
remeshing (the longitudinal QCT-FE approach of e.g. Keaveny et al., J Bone Miner Res
2010;25:1974).

QC: the points that matter (the screws' entry and tip when the baseline screws are
given, else the 8 corners of the vertebra's bounding box): how far each moves between
the visits and how far the two best starts disagree there (mm); the Dice overlap of the
baseline vertebra mask with the follow-up mask carried to the baseline grid (nearest
neighbour), before (scanner coordinates as they are) and after registration; the metric
value; the transform (rotation in degrees, translation in mm); every start tried; a
picture (``plot_registration``). A Dice below ``min_dice_fail`` or a spread above
``max_spread_fail_mm`` is an error naming what was tried, below ``min_dice_warn`` /
above ``max_spread_warn_mm`` a warning; slices coarser than ``warn_spacing_mm`` warn.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from qctfea.errors import GateRefusal, QctfeaError
from qctfea.config import option


@dataclass
class RegistrationParams:
    #: register follow-ups to baseline and reuse the baseline model (false: every scan
    #: gets its own mesh and screws from its own landmarks)
    enabled: bool = option(
        True,
        doc=("register every follow-up to the patient's baseline (earliest scan) and give it "
             "the baseline's model: mesh, screws, endplates and BMD ROIs, with the follow-up's "
             "density resampled onto the baseline grid. `false`: every scan is modelled on its "
             "own (own mesh, screws from its own landmarks)"))
    mask_dilation_mm: float = option(
        3.0, minimum=0,
        doc="the metric is evaluated inside the baseline vertebra mask dilated by this")
    #: coarse slices: the mask dilation is at least this times the coarsest voxel
    #: spacing of the two scans, and every level's smoothing at least
    #: ``coarse_smoothing_ratio`` times it (docs/registration.md, "Coarse slices")
    coarse_dilation_ratio: float = option(
        1.2, minimum=0,
        doc=("coarse slices: the dilation is at least 1.2 x and every level's smoothing at "
             "least 0.4 x the coarsest voxel spacing of the two scans (5 mm slices: 6 mm, 2 "
             "mm); measured on the real CTs with 5 mm slices, this took the error from 0.65 to "
             "0.24 mm (docs/registration.md)"))
    coarse_smoothing_ratio: float = option(0.4, minimum=0, row="coarse_dilation_ratio")
    histogram_bins: int = option(
        64, minimum=2,
        doc=("Mattes mutual information: bins, random sample fraction, at least this many "
             "samples per level (all voxels of the mask if fewer: small bone masks on coarse "
             "slices), sampling seed"))
    sampling_fraction: float = option(0.25, exclusiveMinimum=0, maximum=1, row="histogram_bins")
    #: at least this many metric samples per level (all voxels of the mask if fewer)
    min_samples: int = option(20000, minimum=1, row="histogram_bins")
    learning_rate: float = option(
        1.0, exclusiveMinimum=0,
        doc=("regular-step gradient descent on physical parameter scales (1 = 1 mm at the "
             "vertebra); it stops when the step falls below `min_step`; `iterations` is only a "
             "safety cap per level, and a start that reaches it counts as not converged"))
    min_step: float = option(1e-3, exclusiveMinimum=0, row="learning_rate")
    #: safety cap per level; a start that reaches it counts as not converged
    iterations: int = option(1000, minimum=1, row="learning_rate")
    shrink: list = option(
        factory=lambda: [4, 2, 1], minItems=1, items={"type": "integer", "minimum": 1},
        doc=("multi-resolution levels on the canonical grid (shrink factors; Gaussian sigmas "
             "in mm)"))
    smoothing_mm: list = option(
        factory=lambda: [2.0, 1.5, 1.0], minItems=1, items={"type": "number", "minimum": 0},
        row="shrink")
    seed: int = option(1, row="histogram_bins")
    #: canonical grid: finest spacing (mm) and margin around the vertebra (mm)
    grid_mm: float = option(
        1.0, exclusiveMinimum=0,
        doc=("both scans are registered on canonical grids that depend on physical space only "
             "(identity direction, spacing per physical axis = the scan's own, at most "
             "`grid_mm`, anchored at the vertebra's centroid, its bounding box + `margin_mm`): "
             "the result does not depend on the files' axis order, flips or origin "
             "(docs/registration.md)"))
    margin_mm: float = option(10.0, minimum=0, row="grid_mm")
    #: further starts: the centroid start turned by this about each axis (degrees)
    start_deg: float = option(
        10.0, exclusiveMinimum=0, maximum=90,
        doc=("starts: the masks' centroids, their principal axes, then the centroid start "
             "turned ±`start_deg` about each axis; the search ends when two converged starts "
             "agree within `agree_mm` at the points that matter (screw entry and tip, else the "
             "vertebra's bounding-box corners)"))
    #: two converged starts agreeing within this at the points end the search (mm)
    agree_mm: float = option(0.2, exclusiveMinimum=0, row="start_deg")
    min_dice_warn: float = option(
        0.90, minimum=0, maximum=1,
        doc=("vertebra Dice after registration: warning below, error below (the error lists "
             "the starts tried)"))
    min_dice_fail: float = option(0.75, minimum=0, maximum=1, row="min_dice_warn")
    #: disagreement of the two best starts at the points (mm): warning / error above
    max_spread_warn_mm: float = option(
        0.5, minimum=0,
        doc=("disagreement (mm, at the points that matter) of the two best converged starts, "
             "reported as `point_spread_mm` in registration.json: warning above, error above "
             "(also an error when no two starts converged)"))
    max_spread_fail_mm: float = option(2.0, minimum=0, row="max_spread_warn_mm")
    #: a scan with voxels coarser than this (mm) along any axis gives a warning
    warn_spacing_mm: float = option(
        3.0, exclusiveMinimum=0,
        doc=("a baseline or follow-up with voxels coarser than this (e.g. 5 mm slices) is "
             "registered with a warning"))

    def __post_init__(self):
        if len(self.shrink) != len(self.smoothing_mm):
            raise QctfeaError("registration.shrink and registration.smoothing_mm need the same "
                              f"number of levels ({len(self.shrink)} vs {len(self.smoothing_mm)})")
        if not 0 < self.sampling_fraction <= 1:
            raise QctfeaError(f"registration.sampling_fraction must be in (0, 1], not "
                              f"{self.sampling_fraction}")


def _binary(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(img > 0, sitk.sitkUInt8)


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of two binary images on the same grid."""
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    s = int(x.sum()) + int(y.sum())
    return 2.0 * float(np.logical_and(x, y).sum()) / s if s else 0.0


def carry_mask(moving_mask: sitk.Image, fixed: sitk.Image, tx: sitk.Transform) -> sitk.Image:
    """The moving scan's mask on the fixed grid (nearest neighbour)."""
    return sitk.Resample(_binary(moving_mask), fixed, tx, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


# --- physical space -----------------------------------------------------------------------


def mask_points(mask: sitk.Image) -> np.ndarray:
    """Physical coordinates (N x 3, mm) of the voxel centres of a mask (> 0)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1].astype(float)
    d = np.asarray(mask.GetDirection()).reshape(3, 3)
    return np.asarray(mask.GetOrigin()) + (idx * np.asarray(mask.GetSpacing())) @ d.T


def box_corners(mask: sitk.Image) -> np.ndarray:
    """The 8 corners (mm) of the physical (LPS axis-aligned) bounding box of the mask's
    voxel centres: the same points whatever the file's axis order."""
    pts = mask_points(mask)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    return np.array([[(lo, hi)[b][k] for k, b in enumerate(bits)]
                     for bits in itertools.product((0, 1), repeat=3)])


def physical_spacing(img: sitk.Image) -> np.ndarray:
    """Spacing along each physical axis (x, y, z): that of the grid axis closest to it."""
    d = np.abs(np.asarray(img.GetDirection()).reshape(3, 3))
    return np.asarray(img.GetSpacing())[np.argmax(d, axis=1)]


def in_lps(img: sitk.Image) -> sitk.Image:
    """The image in LPS axis order, its origin rounded to 1 µm.

    The same voxels written in another axis order then give the same image bit for bit,
    and so the same mask moments, starts and optimiser path. The rounding removes the
    origin's storage noise (a NIfTI header holds it in single precision: the real L1
    written RPI and read back lay 6e-6 mm from its LPS file, and that was enough for the
    multi-start search to end 0.1 mm elsewhere, docs/registration.md)."""
    out = sitk.DICOMOrient(img, "LPS")
    out.SetOrigin([round(float(v), 3) for v in out.GetOrigin()])
    return out


def canonical_grid(img: sitk.Image, mask: sitk.Image, p: RegistrationParams) -> sitk.Image:
    """Identity-direction grid around the vertebra, anchored at its physical centroid,
    spacing min(own spacing along the axis, grid_mm): depends on physical space only."""
    pts = mask_points(mask)
    c = pts.mean(axis=0)
    s = np.minimum(physical_spacing(img), p.grid_mm)
    lo = np.floor((pts.min(axis=0) - p.margin_mm - c) / s)
    hi = np.ceil((pts.max(axis=0) + p.margin_mm - c) / s)
    ref = sitk.Image([int(v) for v in hi - lo + 1], sitk.sitkFloat32)
    ref.SetSpacing([float(v) for v in s])
    ref.SetOrigin([float(v) for v in c + lo * s])
    return ref


def _on(img: sitk.Image, ref: sitk.Image, default: float,
        interp=sitk.sitkLinear) -> sitk.Image:
    return sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, sitk.Transform(),
                         interp, default, sitk.sitkFloat32)


def _rot(axis: int, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _angle_deg(r: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))))


def principal_rotation(pf: np.ndarray, pm: np.ndarray) -> np.ndarray | None:
    """Rotation taking the principal axes of the fixed points onto the moving ones (the
    sign choice closest to identity); None when the axes are ill defined (two moments
    within 5 %)."""
    wf, ef = np.linalg.eigh(np.cov(pf.T))
    wm, em = np.linalg.eigh(np.cov(pm.T))
    if min(np.min(np.diff(wf) / wf[1:]), np.min(np.diff(wm) / wm[1:])) < 0.05:
        return None
    best = None
    for signs in itertools.product((1, -1), repeat=3):
        r = em @ np.diag(signs) @ ef.T
        if np.linalg.det(r) > 0 and (best is None or np.trace(r) > np.trace(best)):
            best = r
    return best


def euler(centre, matrix, translation) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter([float(v) for v in centre])
    t.SetMatrix([float(v) for v in np.asarray(matrix).ravel()], 1e-6)
    t.SetTranslation([float(v) for v in translation])
    return t


def transform_points(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint([float(v) for v in q]) for q in pts])


def point_distance(a: sitk.Transform, b: sitk.Transform, pts: np.ndarray) -> float:
    """Largest distance (mm) between where two transforms put the points."""
    return float(np.max(np.linalg.norm(transform_points(a, pts) - transform_points(b, pts),
                                       axis=1)))


# --- registration -------------------------------------------------------------------------


def _run(fixed_c, metric_mask, moving_c, init: sitk.Euler3DTransform, n_mask: int,
         p: RegistrationParams, smoothing: list[float]) -> dict:
    reg = sitk.ImageRegistrationMethod()
    # One thread, for the metric and for the filters the method runs (the pyramid, the
    # parameter scales): ITK's threads add partial sums in an order that varies between
    # runs, so two runs on the same images gave transforms 1e-13 to 3e-9 apart with the
    # metric alone on one thread (2026-12-07; a study run again must give the same tables)
    reg.SetNumberOfThreads(1)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=p.histogram_bins)
    reg.SetMetricFixedMask(metric_mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(
        [float(min(1.0, max(p.sampling_fraction, p.min_samples * f ** 3 / n_mask)))
         for f in p.shrink], p.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=p.learning_rate, minStep=p.min_step, numberOfIterations=p.iterations,
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(p.shrink))
    reg.SetSmoothingSigmasPerLevel(list(smoothing))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.Euler3DTransform(init), inPlace=False)
    t0 = time.perf_counter()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        tx = as_euler(reg.Execute(fixed_c, moving_c))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    stop = reg.GetOptimizerStopConditionDescription()
    return {"tx": tx, "metric_value": float(reg.GetMetricValue()),
            "iterations": int(reg.GetOptimizerIteration()), "stop_condition": stop,
            "converged": "Maximum number of iterations" not in stop,
            "seconds": time.perf_counter() - t0}


# Long on purpose: one multi-start registration (grids, starts, runs, the best), in order.
def register_rigid(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image,
                   moving_mask: sitk.Image, p: RegistrationParams,
                   points: np.ndarray | None = None) -> tuple[sitk.Transform, dict]:
    """Rigid transform mapping fixed (baseline) points to moving (follow-up) points.

    ``points`` (N x 3, mm, baseline space): where accuracy matters (screw entry and tip);
    default the corners of the baseline vertebra's bounding box."""
    fixed, fixed_mask, moving, moving_mask = (
        in_lps(im) for im in (fixed, fixed_mask, moving, moving_mask))
    fm, mm = _binary(fixed_mask), _binary(moving_mask)
    if not sitk.GetArrayViewFromImage(fm).any():
        raise QctfeaError("the baseline vertebra mask is empty")
    if not sitk.GetArrayViewFromImage(mm).any():
        raise QctfeaError("the follow-up vertebra mask is empty")
    pf, pm = mask_points(fm), mask_points(mm)
    cf, cm = pf.mean(axis=0), pm.mean(axis=0)
    pts = box_corners(fm) if points is None else np.asarray(points, float).reshape(-1, 3)
    # Canonical grids (physical space only), the masks by linear interpolation > 0.5.
    ref_f, ref_m = canonical_grid(fixed, fm, p), canonical_grid(moving, mm, p)
    low_f = float(np.percentile(sitk.GetArrayViewFromImage(fixed), 1))
    low_m = float(np.percentile(sitk.GetArrayViewFromImage(moving), 1))
    fixed_c = _on(fixed, ref_f, low_f)
    moving_c = _on(moving, ref_m, low_m)
    fm_c = sitk.Cast(_on(fm, ref_f, 0.0) > 0.5, sitk.sitkUInt8)
    s = np.asarray(ref_f.GetSpacing())
    # Coarse slices: wider metric region and smoother levels (see the module docstring).
    coarsest = float(max(physical_spacing(fixed).max(), physical_spacing(moving).max()))
    dilation = max(p.mask_dilation_mm, p.coarse_dilation_ratio * coarsest)
    smoothing = [max(float(v), p.coarse_smoothing_ratio * coarsest) for v in p.smoothing_mm]
    metric_mask = sitk.BinaryDilate(fm_c, [max(1, int(round(dilation / v)))
                                           for v in s], sitk.sitkBall)
    n_mask = int(sitk.GetArrayViewFromImage(metric_mask).sum())
    # Starts: centroids; principal axes; centroids turned about each axis.
    starts = [("centroids", np.eye(3))]
    rpa = principal_rotation(pf, pm)
    if rpa is not None and _angle_deg(rpa) > 2.0:
        starts.append(("principal axes", rpa))
    for ax, sign in itertools.product(range(3), (1, -1)):
        starts.append((f"centroids turned {sign * p.start_deg:+g} deg about {'xyz'[ax]}",
                       _rot(ax, sign * p.start_deg)))
    runs, pair = [], None
    for name, r in starts:
        run = _run(fixed_c, metric_mask, moving_c, euler(cf, r, cm - cf), n_mask, p,
                   smoothing)
        run["start"] = name
        for other in runs:
            if other["converged"] and run["converged"]:
                d = point_distance(other["tx"], run["tx"], pts)
                if d <= p.agree_mm:
                    pair = (other, run, d)
                    break
        runs.append(run)
        if pair:
            break
    if pair:
        best = min(pair[:2], key=lambda q: q["metric_value"])
        spread = pair[2]
    else:
        pool = [q for q in runs if q["converged"]] or runs
        best = min(pool, key=lambda q: q["metric_value"])
        others = [point_distance(best["tx"], q["tx"], pts) for q in pool if q is not best]
        spread = min(others) if others else None
    tx = best["tx"]
    moved = transform_points(tx, pts)
    for q in runs:
        q["dice_after"] = dice(fm, carry_mask(mm, fixed, q["tx"]))
    info = {
        "metric": "mattes_mutual_information",
        "metric_value": best["metric_value"],
        "iterations": best["iterations"],
        "stop_condition": best["stop_condition"],
        "converged": best["converged"],
        "start": best["start"],
        "rotation_deg": [float(np.rad2deg(a)) for a in tx.GetParameters()[:3]],
        "translation_mm": [float(t) for t in tx.GetParameters()[3:]],
        "center_mm": [float(c) for c in tx.GetCenter()],
        "dice_before": dice(fm, carry_mask(mm, fixed, sitk.Euler3DTransform())),
        "dice_after": best["dice_after"],
        "points": "screws" if points is not None else "vertebra bounding-box corners",
        "points_mm": pts.tolist(),
        "point_motion_mm": np.linalg.norm(moved - pts, axis=1).tolist(),
        # rounded to 0.1 µm: below that it is floating-point noise (a resumed run must write
        # the same tables as an uninterrupted one)
        "point_spread_mm": None if spread is None else round(float(spread), 4),
        "spacing_mm": {"baseline": physical_spacing(fixed).tolist(),
                       "follow_up": physical_spacing(moving).tolist()},
        "grid_mm": s.tolist(),
        "mask_dilation_mm": dilation,
        "smoothing_mm": smoothing,
        "metric_samples_fine": n_mask,
        "starts": [{k: v for k, v in q.items() if k != "tx"} |
                   {"rotation_deg": [float(np.rad2deg(a)) for a in q["tx"].GetParameters()[:3]],
                    "translation_mm": [float(t) for t in q["tx"].GetParameters()[3:]]}
                   for q in runs],
    }
    return tx, info


def as_euler(tx: sitk.Transform) -> sitk.Euler3DTransform:
    t = tx.Downcast()
    while isinstance(t, sitk.CompositeTransform):
        if t.GetNumberOfTransforms() != 1:
            raise QctfeaError(f"unexpected registration result: {t.GetNumberOfTransforms()} "
                              "transforms")
        t = t.GetNthTransform(0).Downcast()
    if not isinstance(t, sitk.Euler3DTransform):
        raise QctfeaError(f"unexpected registration transform {t.GetName()}")
    return t


#: Interpolation of the follow-up density onto the baseline grid: cubic B-spline. Linear
#: interpolation averages neighbouring voxels, and on thick slices the trabecular region
#: (3 mm inside the body) lies one voxel from the endplates: resampled through a motion and
#: back, a real T12's trabecular vBMD (2.5 mm slices) rose 6.8-9.5 % with linear
#: interpolation and 0.7-1.1 % with cubic B-spline, its around-screw vBMD 2.4-3.9 % against
#: -0.2 to +0.3 % (docs/real_spine.md), so a follow-up measured on the baseline grid read
#: several per cent denser than its bone. Densities below zero that the spline's overshoot
#: makes at bone edges are clipped by the material laws, as the scan's own are.
DENSITY_INTERPOLATOR = sitk.sitkBSpline


def resample_density(moving_density: sitk.Image, fixed: sitk.Image,
                     tx: sitk.Transform) -> sitk.Image:
    """The follow-up density on the baseline grid (cubic B-spline interpolation,
    :data:`DENSITY_INTERPOLATOR`; 0 outside)."""
    return sitk.Resample(sitk.Cast(moving_density, sitk.sitkFloat32), fixed, tx,
                         DENSITY_INTERPOLATOR, 0.0, sitk.sitkFloat32)


def _tried(info: dict) -> str:
    starts = info.get("starts") or []
    if not starts:
        return ""
    parts = [f"{q['start']} ({'converged' if q['converged'] else 'not converged'}, Dice "
             f"{q.get('dice_after', float('nan')):.3f})" for q in starts]
    return "; tried " + str(len(starts)) + " start(s): " + ", ".join(parts)


def check_dice(info: dict, p: RegistrationParams, where: str) -> str | None:
    """The registration's gates: an error (naming what was tried) when the vertebra Dice is
    below ``min_dice_fail`` or the two best starts disagree by more than
    ``max_spread_fail_mm`` at the points (or no two converged starts could be compared); a
    warning text below ``min_dice_warn``, above ``max_spread_warn_mm`` or for voxels
    coarser than ``warn_spacing_mm``; None when fine."""
    d = info["dice_after"]
    if d < p.min_dice_fail:
        raise GateRefusal(
            f"{where}: registration to baseline failed: vertebra Dice {d:.3f} < "
            f"{p.min_dice_fail} (before {info['dice_before']:.3f}){_tried(info)}; check that "
            "both scans show the same vertebra (mask.label) or exclude the scan in the cohort "
            "config")
    spread = info.get("point_spread_mm", 0.0)
    if "point_spread_mm" in info and (spread is None or spread > p.max_spread_fail_mm):
        what = ("no two starts converged" if spread is None else
                f"the two best starts disagree by {spread:.2f} mm > {p.max_spread_fail_mm} mm")
        raise GateRefusal(
            f"{where}: registration to baseline failed: {what} at the {info['points']}"
            f"{_tried(info)}; look at registration.png, check both scans show the same "
            "vertebra, or exclude the scan in the cohort config")
    notes = []
    if d < p.min_dice_warn:
        notes.append(f"vertebra Dice after registration {d:.3f} < {p.min_dice_warn}")
    if spread is not None and spread > p.max_spread_warn_mm:
        notes.append(f"the two best starts disagree by {spread:.2f} mm > "
                     f"{p.max_spread_warn_mm} mm at the {info['points']}")
    coarse = max(max(v) for v in info.get("spacing_mm", {"": [0.0]}).values())
    if coarse > p.warn_spacing_mm:
        notes.append(f"voxels up to {coarse:.1f} mm (> {p.warn_spacing_mm} mm): registration "
                     "is less precise on such slices")
    if notes:
        return f"{where}: " + "; ".join(notes) + "; look at registration.png"
    return None


def plot_registration(fixed: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
                      tx: sitk.Transform, info: dict, path, title: str = "") -> None:
    """Baseline density through the vertebra's centre (axial and sagittal), with the
    baseline mask outline (green) and the follow-up mask outline before (red) and after
    (yellow) registration, and the points that matter (cyan) with their motion and the
    starts' spread."""
    from matplotlib.figure import Figure

    arr = sitk.GetArrayFromImage(fixed)
    fm = sitk.GetArrayFromImage(_binary(fixed_mask)) > 0
    before = sitk.GetArrayFromImage(carry_mask(moving_mask, fixed, sitk.Euler3DTransform())) > 0
    after = sitk.GetArrayFromImage(carry_mask(moving_mask, fixed, tx)) > 0
    zc, yc, xc = (int(round(c)) for c in np.argwhere(fm).mean(axis=0))
    sx, sy, sz = fixed.GetSpacing()
    fig = Figure(figsize=(8, 4.4))
    axes = fig.subplots(1, 2)
    views = [("axial", lambda a: a[zc], sy / sx, (0, 1)),
             ("sagittal", lambda a: a[:, :, xc], sz / sy, (1, 2))]
    pts = np.asarray(info.get("points_mm", []), float).reshape(-1, 3)
    idx = np.array([fixed.TransformPhysicalPointToContinuousIndex([float(v) for v in q])
                    for q in pts]).reshape(-1, 3)
    for ax, (name, cut, aspect, (i, j)) in zip(axes, views):
        ax.imshow(cut(arr), cmap="gray", vmin=-50, vmax=400, aspect=aspect, origin="lower")
        for m, colour in ((fm, "lime"), (before, "red"), (after, "yellow")):
            if cut(m).any():
                ax.contour(cut(m).astype(float), levels=[0.5], colors=colour, linewidths=0.8)
        if len(idx):
            ax.plot(idx[:, i], idx[:, j], "c+", ms=6)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    spread = info.get("point_spread_mm")
    motion = info.get("point_motion_mm") or [float("nan")]
    fig.suptitle((title + "\n" if title else "") +
                 f"baseline (green), follow-up before (red) / after (yellow); Dice "
                 f"{info['dice_before']:.3f} -> {info['dice_after']:.3f}\n"
                 f"{info.get('points', 'points')} (cyan, projected): motion up to "
                 f"{max(motion):.1f} mm; starts agree to "
                 f"{'n/a' if spread is None else f'{spread:.2f} mm'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
