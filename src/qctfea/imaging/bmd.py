"""Bone mineral density measures from the calibrated CT (mg/cm³ and g/cm²).

- trabecular vBMD: mean density in the trabecular ROI of the vertebral body
  (see :mod:`qctfea.imaging.masks`);
- integral vBMD: mean density over the whole vertebral body;
- vBMD around each screw: mean density of the vertebra's voxels inside the
  screw's volume and a shell of ``shell_mm`` around it, over its inserted
  length (0 to ``length_mm`` from the entry);
- CT-derived areal BMD: the calibrated density of the whole vertebra projected
  onto the coronal plane (antero-posterior projection, like a DXA scan),
  BMC / projected area, in g/cm².
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from qctfea.imaging.masks import voxel_centres_mm
from qctfea.errors import QctfeaError
from qctfea.model.screw import Screw
from qctfea.config import option


@dataclass
class BmdParams:
    #: shell around the screw included in "around the screw"
    shell_mm: float = option(
        2.0, minimum=0, doc="shell around the screw for \"vBMD around the screw\"")


def around_screw_vbmd(
    density_zyx: np.ndarray, image: sitk.Image, vertebra: np.ndarray, screw: Screw, shell_mm: float,
    context: str = "",
) -> tuple[float, int]:
    """Mean density (mg/cm³) and voxel count of bone in the screw + shell cylinder."""
    idx = np.argwhere(vertebra)
    pts = voxel_centres_mm(image, idx)
    sel = screw.around(pts, shell_mm)
    if sel.sum() == 0:
        raise QctfeaError(f"{context}: no bone voxels around the {screw.side} screw; check the "
                          "landmarks and that the screws were planned on this scan's vertebra")
    vals = density_zyx[tuple(idx[sel].T)]
    return float(vals.mean()), int(sel.sum())


def areal_bmd(density_zyx: np.ndarray, image: sitk.Image, vertebra: np.ndarray) -> dict:
    """AP projection of the vertebra: BMC (g), projected area (cm²), aBMD (g/cm²)."""
    d = np.array(image.GetDirection()).reshape(3, 3)
    sp = np.array(image.GetSpacing())
    # Image axis (x, y, z) closest to the patient's antero-posterior axis (LPS y).
    ap_axis_xyz = int(np.argmax(np.abs(d[1, :])))
    ap_axis_zyx = 2 - ap_axis_xyz
    voxel_cm3 = float(np.prod(sp)) / 1000.0
    bmc_g = float(np.clip(density_zyx[vertebra], 0, None).sum() * voxel_cm3 / 1000.0)
    proj = vertebra.any(axis=ap_axis_zyx)
    other = [k for k in range(3) if k != ap_axis_xyz]
    area_cm2 = float(proj.sum() * sp[other[0]] * sp[other[1]] / 100.0)
    return {"bmc_g": bmc_g, "projected_area_cm2": area_cm2, "areal_bmd_g_cm2": bmc_g / area_cm2}


def measure_bmd(
    density_zyx: np.ndarray,
    image: sitk.Image,
    parts: dict[str, np.ndarray],
    screws: list[Screw],
    params: BmdParams,
    context: str = "",
) -> dict:
    """All BMD measures of one scan (``context`` names the scan in errors)."""
    out = {
        "trabecular_vbmd_mg_cm3": float(density_zyx[parts["trabecular"]].mean()),
        "trabecular_roi_voxels": int(parts["trabecular"].sum()),
        "integral_vbmd_mg_cm3": float(density_zyx[parts["body"]].mean()),
        "around_screw_vbmd_mg_cm3": {},
        "around_screw_voxels": {},
    }
    for sc in screws:
        m, n = around_screw_vbmd(density_zyx, image, parts["vertebra"], sc, params.shell_mm,
                                 context)
        out["around_screw_vbmd_mg_cm3"][sc.side] = m
        out["around_screw_voxels"][sc.side] = n
    a = areal_bmd(density_zyx, image, parts["vertebra"])
    out["areal_bmd_g_cm2"] = a["areal_bmd_g_cm2"]
    out["bmc_g"] = a["bmc_g"]
    out["projected_area_cm2"] = a["projected_area_cm2"]
    return out
