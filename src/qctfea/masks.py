"""Masks: the target vertebra from a label map, its body and trabecular ROI.

The label map (VerSe, TotalSegmentator or the demo generator's) is read and,
when it is on a different grid than the CT, resampled onto it by nearest
neighbour. The target vertebra is the configured label. Its parts:

- **vertebral body**: the largest component left after a morphological opening
  of the vertebra with a ball of radius ``body_opening_mm`` (default 7 mm):
  pedicles, lamina and processes are thinner than that ball and vanish, the
  body survives; the result is dilated back inside the vertebra.
- **trabecular ROI** (standard QCT): body voxels farther than
  ``trabecular_margin_mm`` (default 3 mm) from the body surface, so cortex,
  endplates and their blur are excluded.
- **axis**: the body's superior direction (endplate normal): the direction
  near the patient's superior axis along which the body is thinnest; and the
  body's extent along it, which the load cases use for the endplates.

Output label image: 1 = vertebral body outside the trabecular ROI, 2 = posterior
elements, 3 = trabecular ROI (part of the body).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from qctfea.provenance import QctfeaError

BODY, POSTERIOR, TRABECULAR = 1, 2, 3  #: part labels (trabecular ROI is inside the body)


@dataclass
class MaskParams:
    label: int = 23  #: target vertebra label (VerSe L4 = 23, TotalSegmentator L4 = 28)
    body_opening_mm: float = 7.0
    trabecular_margin_mm: float = 3.0


def voxel_centres_mm(image: sitk.Image, idx_zyx: np.ndarray) -> np.ndarray:
    """Physical coordinates (N, 3) of voxel indices given as (N, 3) rows in z, y, x order."""
    o = np.array(image.GetOrigin())
    s = np.array(image.GetSpacing())
    d = np.array(image.GetDirection()).reshape(3, 3)
    ijk = idx_zyx[:, ::-1].astype(float)
    return o + (ijk * s) @ d.T


def resample_labels_to(labels: sitk.Image, reference: sitk.Image, context: str = "") -> sitk.Image:
    """Labels on the reference grid, nearest neighbour; warn when a resampling was needed.

    An error when the label map has labels but none of them lands on the reference grid
    (the two images do not overlap: another scan's labels, or a wrong origin/direction).
    """
    same = (
        labels.GetSize() == reference.GetSize()
        and np.allclose(labels.GetOrigin(), reference.GetOrigin(), atol=1e-3)
        and np.allclose(labels.GetSpacing(), reference.GetSpacing(), atol=1e-5)
        and np.allclose(labels.GetDirection(), reference.GetDirection(), atol=1e-5)
    )
    if same:
        return labels
    warnings.warn(f"{context}: label map is on another grid than the CT; resampled "
                  "(nearest neighbour)", stacklevel=2)
    out = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                        labels.GetPixelID())
    if sitk.GetArrayViewFromImage(labels).any() and not sitk.GetArrayViewFromImage(out).any():
        raise QctfeaError(
            f"{context}: the label map does not overlap the CT: it covers "
            f"{_bounds(labels)} mm, the CT {_bounds(reference)} mm (physical LPS "
            "coordinates); give the label map of this scan, or correct its origin/direction"
        )
    return out


def _bounds(image: sitk.Image) -> str:
    """Physical bounding box of an image's grid, as text: [min x, y, z] to [max x, y, z]."""
    size = np.array(image.GetSize()) - 1.0
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint(
        (size * np.array(c)).tolist()) for c in np.ndindex(2, 2, 2)])
    return (f"{np.round(corners.min(axis=0), 1).tolist()} to "
            f"{np.round(corners.max(axis=0), 1).tolist()}")


def _ball(radius_mm: float, spacing_xyz) -> np.ndarray:
    r = [max(1, int(np.ceil(radius_mm / s))) for s in spacing_xyz[::-1]]
    zz, yy, xx = np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    sz, sy, sx = spacing_xyz[::-1]
    return (zz * sz) ** 2 + (yy * sy) ** 2 + (xx * sx) ** 2 <= radius_mm**2


def vertebra_parts(
    labels_zyx: np.ndarray, spacing_xyz, params: MaskParams, context: str = ""
) -> dict[str, np.ndarray]:
    """Vertebra, body, posterior and trabecular-ROI masks (boolean arrays, z, y, x)."""
    vert = labels_zyx == params.label
    if not vert.any():
        present = sorted(int(v) for v in np.unique(labels_zyx) if v != 0)
        if not present:
            raise QctfeaError(f"{context}: the label map is empty (every voxel is 0); give the "
                              "segmentation of this scan (labels column of the sample sheet)")
        raise QctfeaError(
            f"{context}: label {params.label} is not in the label map (labels present: "
            f"{present}); set mask.label in the cohort config"
        )
    lab, n = ndimage.label(vert)
    if n > 1:
        sizes = ndimage.sum(vert, lab, range(1, n + 1))
        vert = lab == (1 + int(np.argmax(sizes)))
    # Crop to the vertebra for the morphology (fast), then paste back.
    sl = ndimage.find_objects(vert.astype(np.uint8))[0]
    pad = 8
    sl = tuple(slice(max(0, s.start - pad), min(n_, s.stop + pad))
               for s, n_ in zip(sl, vert.shape, strict=True))
    v = vert[sl]
    ball = _ball(params.body_opening_mm, spacing_xyz)
    opened = ndimage.binary_opening(v, structure=ball)
    blab, bn = ndimage.label(opened)
    if bn == 0:
        raise QctfeaError(f"{context}: no vertebral body found (vertebra thinner than "
                          f"{2 * params.body_opening_mm} mm everywhere); lower mask.body_opening_mm")
    sizes = ndimage.sum(opened, blab, range(1, bn + 1))
    body = blab == (1 + int(np.argmax(sizes)))
    body = ndimage.binary_dilation(body, structure=_ball(1.0, spacing_xyz)) & v
    dist = ndimage.distance_transform_edt(body, sampling=spacing_xyz[::-1])
    trab = dist > params.trabecular_margin_mm
    out = {}
    for name, m in (("vertebra", v), ("body", body), ("trabecular", trab)):
        full = np.zeros(vert.shape, bool)
        full[sl] = m
        out[name] = full
    out["posterior"] = out["vertebra"] & ~out["body"]
    if not out["trabecular"].any():
        raise QctfeaError(f"{context}: trabecular ROI is empty; lower mask.trabecular_margin_mm")
    return out


def body_axis(image: sitk.Image, body_zyx: np.ndarray, max_tilt_deg: float = 30.0) -> dict:
    """Body centroid, superior axis (unit, mm) and extent along it.

    The superior axis is the endplate normal: the direction, within
    ``max_tilt_deg`` of the patient's superior axis (LPS +z), along which the
    body is thinnest (robust extent, 0.5-99.5 percentiles). A principal-axis
    fit is not used because a vertebral body's height and depth are often
    nearly equal, which makes its principal axes ill-defined.
    """
    idx = np.argwhere(body_zyx)
    pts = voxel_centres_mm(image, idx)
    c = pts.mean(axis=0)
    rel = pts - c
    if len(rel) > 40000:
        rel_s = rel[np.random.default_rng(0).choice(len(rel), 40000, replace=False)]
    else:
        rel_s = rel

    def extent(theta, phi):
        d = np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
        lo, hi = np.percentile(rel_s @ d, [0.5, 99.5])
        return hi - lo, d

    best = (np.inf, np.array([0.0, 0.0, 1.0]))
    tmax = np.deg2rad(max_tilt_deg)
    for theta in np.linspace(0, tmax, 16):
        for phi in np.linspace(0, 2 * np.pi, 1 if theta == 0 else 24, endpoint=False):
            best = min(best, extent(theta, phi), key=lambda t: t[0])
    # Refine around the best direction.
    th0 = np.arccos(np.clip(best[1][2], -1, 1))
    ph0 = np.arctan2(best[1][1], best[1][0])
    step = tmax / 15
    for theta in np.linspace(max(0, th0 - step), th0 + step, 9):
        for phi in np.linspace(ph0 - 0.15, ph0 + 0.15, 9):
            best = min(best, extent(theta, phi), key=lambda t: t[0])
    axis = best[1]
    h = rel @ axis
    return {
        "centroid_mm": c.tolist(),
        "superior_axis": axis.tolist(),
        "inferior_extent_mm": float(h.min()),
        "superior_extent_mm": float(h.max()),
        "height_mm": float(h.max() - h.min()),
    }


def contact_with_neighbours(labels_zyx: np.ndarray, vert: np.ndarray, label: int) -> dict:
    """Count of vertebra surface voxels touching each other non-zero label (QC)."""
    ring = ndimage.binary_dilation(vert) & ~vert
    vals, counts = np.unique(labels_zyx[ring], return_counts=True)
    return {int(a): int(b) for a, b in zip(vals, counts, strict=True) if a not in (0, label)}
