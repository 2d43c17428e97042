"""A phantom under a real patient: the real TotalSegmentator L1 CT lying on a five-rod
K2HPO4-in-water phantom, rendered for the rod finder's tests (tests/test_phantom.py) and its
check on more rod sizes (tools/phantom_check.py; docs/calibration.md, "Finding the rods")."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.imaging.phantoms import PhantomSpec

#: Mindways Model 3 rods A-E (the preset) and a QCT PRO line: HU - water = 1.45 K2HPO4 - 1003
SIGMA_REF, BETA_REF = 1.45, -1003.0


def real_l1_on_a_phantom(real: Path, *, body_hu: float, tilt_deg: float = 0.0,
                         rod_hu_override: dict | None = None, rod_mm: float = 14.0,
                         phantom_slices: slice = slice(None)):
    """The real TotalSegmentator L1 CT (its own 0.7 x 0.7 x 2.5 mm voxels, LPS) lying on a
    five-rod K2HPO4-in-water phantom as in a QCT study: a 260 x 28 mm slab under the
    patient, joined to the patient's back by a gel pad (10 HU) that fills the air between
    them, above the scan's own table; rods in the row C, A, D, B, E (not in density order),
    the row tilted by ``tilt_deg``, on the slices ``phantom_slices`` (air on the others: a
    phantom shorter than the scan); blurred (0.8 px) with 20 HU noise per voxel. Returns HU,
    spacing, the label map, the truth (slope, intercept) and each rod's centre (px) by
    K2HPO4 density."""
    from qctfea.imaging import ingest
    from scipy import ndimage

    ct = ingest.canonical_orientation(sitk.ReadImage(str(real / "totalseg_L1/ct.nii.gz")))
    lab = ingest.canonical_orientation(sitk.ReadImage(str(real / "totalseg_L1/labels.nii.gz")))
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    sx, sy, _ = ct.GetSpacing()
    mw = PhantomSpec(preset="mindways_model3", rod_diameter_mm=rod_mm)
    rod_hu = {k: w + SIGMA_REF * k + BETA_REF
              for k, w in zip(mw.rod_densities_mg_cm3, mw.water_equivalent_mg_cm3, strict=True)}
    rod_hu.update(rod_hu_override or {})
    yy, xx = np.indices(hu.shape[1:])
    xm, ym = xx * sx, yy * sy
    cx, cy = 256 * sx, 432 * sy  # the slab's centre: under the patient, above the table
    t = np.deg2rad(tilt_deg)
    u = (xm - cx) * np.cos(t) + (ym - cy) * np.sin(t)
    v = -(xm - cx) * np.sin(t) + (ym - cy) * np.cos(t)
    slab = (np.abs(u) <= 130) & (np.abs(v) <= 14)
    phantom = np.where(slab, body_hu, np.nan)
    centres = {}
    for along, k in zip((-80, -40, 0, 40, 80), (58.88, -51.83, 157.05, -53.40, 375.83),
                        strict=True):
        rx, ry = cx + along * np.cos(t), cy + along * np.sin(t)
        phantom[(xm - rx) ** 2 + (ym - ry) ** 2 <= (rod_mm / 2) ** 2] = rod_hu[k]
        centres[k] = (rx / sx, ry / sy)
    top = np.argmax(slab, axis=0)  # the slab's first row in each column (0: none)
    for s in hu[phantom_slices]:  # gel pad: the air between the patient's back and the slab
        for x in np.nonzero(slab.any(axis=0))[0]:
            body = np.nonzero(s[:top[x], x] > -500)[0]
            if body.size:
                s[body.max() + 1:top[x], x] = 10.0
        s[slab] = phantom[slab]
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(hu, (0, 0.8, 0.8))
    near = ndimage.binary_dilation(slab, iterations=3)
    hu[:, near] = blurred[:, near] + rng.normal(0.0, 20.0, (hu.shape[0], int(near.sum())))
    sigma_ct, beta_ct = SIGMA_REF - 0.2174, BETA_REF + 999.6
    return (hu, ct.GetSpacing(), sitk.GetArrayFromImage(lab), (1 / sigma_ct, -beta_ct / sigma_ct),
            centres)
