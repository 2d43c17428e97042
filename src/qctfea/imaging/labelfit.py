"""Does the label map sit on the CT's bone? (docs/screw_planning.md, "The label map on the CT")

Screws are graded against the target vertebra's label surface, to 2 mm between grades, so
a label map that lies a few millimetres off its CT (a header that lost its origin, the
labels of another series or visit given for this scan) would grade, mesh and measure the
wrong bone. The check: the vertebra's **edge contrast**, the mean CT value of the label's
inner boundary layer (one voxel thick: the cortex, when the label fits) minus that of the
layer just outside it (soft tissue, disc). Moved as a whole by t, the label's edge
contrast B(t) peaks where it lies on the bone's edges. The offset that maximises B is
sought by coordinate steps (each axis in turn, 1 mm or one voxel apart, up to
``SEARCH_MM``, repeated until it no longer moves). A label map whose best offset is at least
``MIN_OFFSET_MM`` away and raises the edge contrast by ``MIN_GAIN`` times or more (and by
``MIN_GAIN_UNITS``) does not sit on its CT; nor does one whose edge contrast where it lies is
below ``MIN_EDGE_CONTRAST`` and that no offset within reach fits by the rule before: a label
map far off its CT (an origin lost in cropping, a CT mirrored or transposed against its
labels) lies on no bone edge within the search's reach (a CT whose values around the
vertebra span less than that, 1st to 99th percentile, is not judged). Below that floor a
label map still lies on its bone's edges when its edge contrast is a **peak**: at least
``PEAK_RATIO`` times the largest of the six contrasts of the label moved by the search's
reach along each axis (and at least ``PEAK_MIN_UNITS``). A soft reconstruction kernel on a
low-density vertebra, or fine voxels, lower the edge contrast of a label map that fits (one
voxel layer holds less of a blurred cortex): the real L1 and L3 with their vertebrae's CT
numbers drawn toward soft tissue (30 + 0.4 (HU - 30)) and a 1.2 mm Gaussian blur gave 25 and
36 HU against 8 and 14 HU at the reach; on 0.5 mm grids with 30 + 0.6 (HU - 30) and a 0.8 or
1.2 mm blur, 23-31 HU against 8 HU. Label maps off their CT measured at most 0.8 times their
largest contrast at the reach (the L1's CT mirrored left-right 31 against 44 HU, up-down 15
against 19; the L3's mirrored along its second voxel axis 34 against 51), or no contrast
(below 10 HU). A specimen with end caps is not checked (its caps may be as dense as its
bone).

Measured on the real scans (docs/screw_planning.md): the labels as given have their
largest edge contrast at offset 0 (TotalSegmentator L1 211 HU, VerSe L3 300 HU); moved
4 mm along x, 66 and 34 HU, and the search finds the 4 mm back. As given, on every grid
the real scans were resampled to (0.5 to 5 mm voxels, turned grids): 92-300 HU, the lowest
on 0.5 mm grids interpolated from coarser scans (one voxel layer holds less of the blurred
cortex). Far off: the L1's CT mirrored left-right against its labels 31 HU, its labels moved 70 mm
along x -5 HU (tests/test_labels.py), its CT's x and y swapped -9 HU.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: largest offset searched, per axis (mm)
SEARCH_MM = 6.0
#: an offset this large (mm, length) ...
MIN_OFFSET_MM = 1.0
#: ... that raises the edge contrast this many times, and by at least this much (CT units:
#: HU, or mg/cm³ for a density image; a CT with no edge at all is not judged), means the
#: label map is off its CT
MIN_GAIN = 1.5
MIN_GAIN_UNITS = 40.0
#: a label map whose edge contrast where it lies is below this (CT units) lies on no bone
#: edge: about half the lowest measured on a label map as given (92 HU, module doc)
MIN_EDGE_CONTRAST = 50.0
#: ... unless it is this many times the largest edge contrast of the label moved by the
#: search's reach (``SEARCH_MM``, along each axis in turn): a peak where it lies (module doc)
PEAK_RATIO = 2.0
#: ... and at least this much (CT units): a label map on no edge, in flat tissue, may peak
#: by chance at a few units
PEAK_MIN_UNITS = 10.0


def _shells(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel indices (3, n) of the mask's inner boundary layer and of the layer outside."""
    inner = mask & ~ndimage.binary_erosion(mask)
    outer = ndimage.binary_dilation(mask) & ~mask
    return np.array(np.nonzero(inner)), np.array(np.nonzero(outer))


def edge_fit(values_zyx: np.ndarray, mask_zyx: np.ndarray, spacing_xyz) -> dict:
    """The edge contrast of ``mask_zyx`` on ``values_zyx`` (a box around the vertebra with
    at least ``SEARCH_MM`` + 1 voxel of margin) at offset 0 and at its best offset.

    Returns ``edge_contrast`` (at 0), ``best_edge_contrast``, ``best_offset_mm`` (x, y, z:
    where the label would fit best), ``offset_mm`` (its length), ``reach_edge_contrast`` (the
    largest of the label moved by the search's reach along each axis), ``peak`` (the edge
    contrast where it lies stands out against that) and ``fits`` (False when the label map is
    off its CT by the module's rule)."""
    sp = np.asarray(spacing_xyz, float)[::-1]  # z, y, x
    inner, outer = _shells(mask_zyx)
    hi = np.array(values_zyx.shape)[:, None] - 1

    def contrast(t) -> float:
        t = np.asarray(t)[:, None]
        i, o = np.clip(inner + t, 0, hi), np.clip(outer + t, 0, hi)
        return float(values_zyx[tuple(i)].mean() - values_zyx[tuple(o)].mean())

    step = np.maximum(1, np.round(1.0 / sp)).astype(int)  # 1 mm or one voxel
    reach = np.floor(SEARCH_MM / sp).astype(int)
    t, b0 = np.zeros(3, int), contrast((0, 0, 0))
    best = b0
    for _ in range(4):  # coordinate steps until the offset settles
        moved = False
        for ax in range(3):
            for k in range(-reach[ax], reach[ax] + 1, step[ax]):
                cand = t.copy()
                cand[ax] = k
                b = contrast(cand)
                if b > best + 1e-9:
                    best, t, moved = b, cand, True
        if not moved:
            break
    off = (t * sp)[::-1]  # x, y, z mm (array axes reversed)
    length = float(np.linalg.norm(off))
    moved = bool(length >= MIN_OFFSET_MM and best >= MIN_GAIN * b0
                 and best - b0 >= MIN_GAIN_UNITS)
    # a CT without contrast around the vertebra (a synthetic test image) is not judged;
    # the 1-99 % range, so that one stray voxel does not make a flat image contrasted
    at_reach = max(contrast(np.eye(3, dtype=int)[ax] * sign * reach[ax])
                   for ax in range(3) for sign in (-1, 1))
    peak = bool(b0 >= max(PEAK_RATIO * at_reach, PEAK_MIN_UNITS))
    p1, p99 = np.percentile(values_zyx, [1, 99])
    no_edge = bool(not moved and not peak and b0 < MIN_EDGE_CONTRAST <= p99 - p1)
    return {"edge_contrast": b0, "best_edge_contrast": best,
            "best_offset_mm": [float(v) for v in off], "offset_mm": length,
            "reach_edge_contrast": at_reach, "peak": peak,
            "fits": not (moved or no_edge), "moved": moved, "no_edge": no_edge,
            "rule": (f"off its CT when an offset of at least {MIN_OFFSET_MM:g} mm raises the "
                     f"edge contrast {MIN_GAIN:g} times or more and by {MIN_GAIN_UNITS:g} or "
                     f"more (searched to {SEARCH_MM:g} mm per axis), or when the edge "
                     f"contrast where it lies is below {MIN_EDGE_CONTRAST:g} and below "
                     f"{PEAK_RATIO:g} times its largest with the label moved {SEARCH_MM:g} mm "
                     f"along an axis (or below {PEAK_MIN_UNITS:g})")}
