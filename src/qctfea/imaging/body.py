"""The vertebral body within the target vertebra: from a sub-region map or by opening.

With a sub-region map (sample-sheet column ``subregions``: VerSe/TPTBox sub-regions, 41-48
posterior elements, 49 the body's cortical shell ``Vertebra_Corpus_border``, 50 its
interior ``Vertebra_Corpus``): the target vertebra's voxels whose sub-region is one of
``body_subregion_labels`` (default 49 and 50, the whole body), largest component, holes
filled.

Without one: the largest component left after a morphological opening of the vertebra with
a ball of radius ``body_opening_mm`` (default 7 mm): pedicles, lamina and processes are
thinner than that ball and vanish, the body survives. A larger vertebra's pedicles survive
a 7 mm ball and stay joined to the body (the real L3 scaled by 1.3, as large as an L4-L5:
11 % of its "body" was posterior elements; the real L1 widened by 1.25: no screw could be
planned), so the radius grows, in steps of 5 % of the vertebra's largest inscribed radius
(the body's half-thickness) up to 75 % of it, until the body kept is convex: at least
``body_opening_solidity`` (0.88) of the voxels inside its convex hull are its own
(:func:`qctfea.imaging.morphology.solidity`). Bodies with pedicles attached: 0.72-0.84 (the
real L3 scaled by 1.3, the real L1 widened by 1.25-1.4); bodies alone: 0.90-0.97 (both real
scans at their own voxels, at 1 x 1 x 3, 3 mm and 5 mm slices, on grids turned 12-15°),
0.997-0.999 on the demo. A pedicle thicker than the ball on one side only leaves the body
convex enough but one-sided, so the radius also grows until the body is mirror-symmetric
about a mid-sagittal plane: at most ``body_opening_asymmetry`` (0.12) of its voxels mirror
outside it, for the best plane through its centroid whose normal is within 30° of the
patient's left-right axis about the superior axis and 15° about the anterior one
(:func:`qctfea.imaging.morphology.mirror_asymmetry`). Bodies alone: 0.05-0.08
(TotalSegmentator's 3 mm L1-L4, the real L3 and L1); TotalSegmentator's 3 mm L5 with its
thick left pedicle attached: 0.18 (solidity 0.89), alone at 7.4 mm.

The ball rounds the body's edges off (the endplate rims), so the vertebra's voxels within
the radius of the opened body are given back to it, except those within the radius of the
arch (the vertebra farther than the radius from the opened body), which are the pedicles'
roots (:func:`restore_rim`). Against the body of a sub-region map this raised the Dice
overlap from 0.90 to 0.998 on the real L3 (1.5 mm voxels; body 39.3 cm³ in both, 32.5 cm³
before), from 0.88-0.90 to 0.975-0.986 on TotalSegmentator's 3 mm L1-L4 and, with the
symmetry test, from 0.90 to 0.94 on its L5 (docs/screw_planning.md). The trabecular ROI is
taken from the opened body (see :mod:`qctfea.imaging.masks`).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from qctfea.errors import QctfeaError
from qctfea.imaging import morphology

if TYPE_CHECKING:  # masks imports this module
    from qctfea.imaging.masks import MaskParams


#: The opening's radius grows in steps of this fraction of the vertebra's largest inscribed
#: radius, up to :data:`BODY_OPENING_MAX_FRACTION` of it (see the module doc)
BODY_OPENING_STEP_FRACTION = 0.05
BODY_OPENING_MAX_FRACTION = 0.75


def from_opening(v: np.ndarray, spacing_xyz, params: MaskParams, context: str,
                 direction=None):
    """The body: largest component of the vertebra opened by a ball with its rim restored;
    the ball's radius grows until that component is convex and mirror-symmetric (see the
    module doc; ``direction``: the grid's direction matrix, which the left-right axis of
    the symmetry needs; identity when None). Returns the body, the opened body dilated by
    1 mm (the trabecular ROI's source: its edges stay rounded) and a record of the radii
    tried."""
    sampling = tuple(spacing_xyz)[::-1]
    inscribed = float(ndimage.distance_transform_edt(v, sampling=sampling).max())
    radii = [params.body_opening_mm]
    if params.body_opening_solidity > 0 or params.body_opening_asymmetry < 1:
        steps = np.arange(BODY_OPENING_STEP_FRACTION, BODY_OPENING_MAX_FRACTION + 1e-9,
                          BODY_OPENING_STEP_FRACTION) * inscribed
        radii += [float(r) for r in steps if r > params.body_opening_mm]
    tried = []  # {radius, solidity, asymmetry}, and the body
    for r in radii:
        opened = morphology.opening(v, r, sampling)
        if not opened.any():
            break
        body = morphology.largest_component(opened)
        t = {"radius_mm": r,
             "solidity": morphology.solidity(body, sampling)
             if params.body_opening_solidity else 1.0,
             "asymmetry": morphology.mirror_asymmetry(body, sampling, direction)
             if params.body_opening_asymmetry < 1 else 0.0}
        tried.append((t, body))
        if _body_alone(t, params):
            break
    if not tried:
        span = [(b.stop - b.start) * s
                for b, s in zip(morphology.box_around(v, 0), sampling, strict=True)][::-1]
        raise QctfeaError(
            f"{context}: no vertebral body found (vertebra thinner than "
            f"{2 * params.body_opening_mm} mm everywhere; the target label spans "
            f"{' x '.join(f'{x:.0f}' for x in span)} mm along the image axes x, y, z, where an "
            "adult vertebra with its processes spans 30-90 mm each way): lower "
            "mask.body_opening_mm for a small vertebra; if the span is far off, check the "
            "label map's voxel spacing in its header against the CT's")
    t, body = tried[-1] if _body_alone(tried[-1][0], params) else _closest(tried, params)
    if not _body_alone(t, params):
        warnings.warn(
            f"{context}: the vertebral body found by opening is not convex and symmetric at "
            f"any radius from {radii[0]:g} to {tried[-1][0]['radius_mm']:.1f} mm (kept "
            f"{t['radius_mm']:.1f} mm: solidity {t['solidity']:.2f}, mask.body_opening_"
            f"solidity {params.body_opening_solidity:g}; asymmetry {t['asymmetry']:.2f}, "
            f"mask.body_opening_asymmetry {params.body_opening_asymmetry:g}): a pedicle may "
            "be part of it. Look at the parts picture; give a sub-region map (sample sheet "
            "column subregions) or set mask.body_opening_mm", stacklevel=2)
    whole = restore_rim(body, v, t["radius_mm"], sampling)
    record = {**t, "inscribed_radius_mm": inscribed, "tried": [x for x, _ in tried],
              "rim_restored_fraction": float(1.0 - body.sum() / max(int(whole.sum()), 1))}
    return whole, morphology.dilate(body, 1.0, sampling) & v, record


def _body_alone(t: dict, params: MaskParams) -> bool:
    """The opened body has no pedicle attached: convex enough and mirror-symmetric enough."""
    return (t["solidity"] >= params.body_opening_solidity
            and t["asymmetry"] <= params.body_opening_asymmetry)


def _closest(tried: list, params: MaskParams):
    """Of radii none of which passed: the first convex one with the least asymmetry, or,
    when none is convex, the most convex one."""
    convex = [x for x in tried if x[0]["solidity"] >= params.body_opening_solidity]
    if convex:
        return min(convex, key=lambda x: x[0]["asymmetry"])
    return max(tried, key=lambda x: x[0]["solidity"])


def restore_rim(core: np.ndarray, v: np.ndarray, radius_mm: float, sampling) -> np.ndarray:
    """The body from the opening's ``core``: the ball of ``radius_mm`` rounds the body's edges
    off (the endplate rims), so the vertebra's voxels within ``radius_mm`` of the core are
    added back, except those within ``radius_mm`` of the arch (the largest component of the
    vertebra farther than ``radius_mm`` from the core), which are the pedicles' roots."""
    near = morphology.dilate(core, radius_mm, sampling) & v
    arch = morphology.largest_component(v & ~near)
    if arch.sum() < ARCH_MIN_FRACTION * v.sum():  # no arch: a body-only specimen or map
        return near
    roots = morphology.dilate(arch, radius_mm, sampling)
    return morphology.largest_component(core | (near & ~roots))


#: The arch is the largest piece of the vertebra farther than the opening's radius from the
#: opened body when it holds at least this fraction of the vertebra (posterior elements are
#: a third of a lumbar vertebra: 34 % of the real L3, 32 % of TotalSegmentator's L4); a
#: smaller piece is a corner of a body-only label and the rim is given back whole
ARCH_MIN_FRACTION = 0.05


def from_subregions(v: np.ndarray, sub: np.ndarray, params: MaskParams, context: str,
                    target: str):
    """The body: the vertebra's voxels in the body sub-regions, largest component, holes
    filled (inside the vertebra). ``target`` names the target vertebra in the error."""
    body = v & np.isin(sub, params.body_subregion_labels)
    if not body.any():
        there = sorted(int(x) for x in np.unique(sub[v]) if x != 0)
        raise QctfeaError(
            f"{context}: the sub-region map has none of the body labels "
            f"{params.body_subregion_labels} (mask.body_subregion_labels) inside "
            f"{target} of the label map (its sub-region labels there: "
            f"{there or 'none'}); set mask.body_subregion_labels to this map's label(s) of the "
            "vertebral body (VerSe/TPTBox: [49, 50]), give the sub-region map of this scan, or "
            "leave the subregions column of the sample sheet empty to find the body by opening")
    return ndimage.binary_fill_holes(morphology.largest_component(body)) & v
