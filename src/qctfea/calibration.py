"""Calibration: Hounsfield units to K2HPO4-equivalent density (mg/cm³).

Phantom calibration (the study's method): the rods of a calibration phantom
lying under the patient are found automatically, their mean HU is measured
in their cores over all slices, and a straight line
``density = intercept + slope * HU`` is fitted by least squares against the
rods' known densities. The fit is gated on R² (warn below 0.98, refuse below
0.90; Bonelab Ogo practice).

Rod finding: the scan is averaged along z (rods run along the table axis);
air is thresholded away; the connected component that holds the vertebra is
the patient, the largest other component is the phantom. Inside the phantom,
pixels that differ from the phantom body by more than ``min_contrast_hu`` form
the rod candidates; components whose area matches the configured rod diameter
are the rods. Rods are matched to the configured densities in order of HU
(density rises with HU), which holds for every K2HPO4 or hydroxyapatite
phantom.

A fixed calibration (slope and intercept from config) is also supported, for
data already in mg/cm³ (slope 1, intercept 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qctfea.provenance import QctfeaError


@dataclass
class PhantomSpec:
    """A calibration phantom: rod densities (mg/cm³, any order) and rod diameter."""

    rod_densities_mg_cm3: list[float] = field(
        default_factory=lambda: [0.0, 50.0, 100.0, 150.0, 200.0]
    )
    rod_diameter_mm: float = 12.0
    min_contrast_hu: float = 40.0  #: rod vs phantom body contrast used to find rods
    core_fraction: float = 0.6  #: fraction of the rod radius measured (avoids blur)
    warn_r2: float = 0.98
    fail_r2: float = 0.90


@dataclass
class Calibration:
    """density_mg_cm3 = intercept + slope * HU."""

    slope: float
    intercept: float
    r2: float
    method: str
    rods: list[dict] = field(default_factory=list)

    def apply(self, hu: np.ndarray) -> np.ndarray:
        return (self.intercept + self.slope * hu).astype(np.float32)


def fit_line(hu: np.ndarray, density: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``density = a + b * hu``; returns (slope b, intercept a, R²)."""
    hu = np.asarray(hu, float)
    density = np.asarray(density, float)
    A = np.stack([np.ones_like(hu), hu], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, density, rcond=None)
    pred = a + b * hu
    ss_res = float(((density - pred) ** 2).sum())
    ss_tot = float(((density - density.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return float(b), float(a), r2


def find_rods(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    patient_mask_zyx: np.ndarray,
    spec: PhantomSpec,
    context: str = "",
) -> list[dict]:
    """Locate the phantom rods; return per rod its centre (pixel x, y), area and mean HU."""
    sx, sy = spacing_xyz[0], spacing_xyz[1]
    mean2d = hu_zyx.mean(axis=0)
    fg = ndimage.binary_opening(mean2d > -500.0, iterations=2)
    lab, n = ndimage.label(fg)
    if n < 2:
        raise QctfeaError(
            f"{context}: no calibration phantom found (only {n} object(s) above -500 HU in the "
            "z-averaged scan); for a scan without a phantom set calibration.method: fixed with "
            "calibration.slope and calibration.intercept in the cohort config, or check the scan"
        )
    patient_ids = set(np.unique(lab[patient_mask_zyx.any(axis=0)])) - {0}
    sizes = ndimage.sum(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    cands = [(s, i + 1) for i, s in enumerate(sizes) if (i + 1) not in patient_ids]
    if not cands:
        raise QctfeaError(f"{context}: the phantom is not separate from the patient in the scan")
    phantom_id = max(cands)[1]
    phantom = lab == phantom_id
    body_hu = float(np.median(mean2d[phantom]))
    inner = ndimage.binary_erosion(phantom, iterations=2)
    smooth = ndimage.uniform_filter(mean2d, size=3)
    cand = inner & (np.abs(smooth - body_hu) > spec.min_contrast_hu)
    rl, rn = ndimage.label(cand)
    expected_area = np.pi * (spec.rod_diameter_mm / 2) ** 2 / (sx * sy)
    rods = []
    yy, xx = np.indices(mean2d.shape)
    for i in range(1, rn + 1):
        comp = rl == i
        area = comp.sum()
        if not 0.5 * expected_area <= area <= 1.6 * expected_area:
            continue
        cy, cx = ndimage.center_of_mass(comp)
        r_core = spec.core_fraction * spec.rod_diameter_mm / 2
        core = ((xx - cx) * sx) ** 2 + ((yy - cy) * sy) ** 2 <= r_core**2
        # Mean HU over every slice of the rod core (a 3-D mean, not the 2-D average).
        mean_hu = float(hu_zyx[:, core].mean())
        rods.append({"center_px": [float(cx), float(cy)], "area_px": int(area),
                     "mean_hu": mean_hu, "sd_hu": float(hu_zyx[:, core].std())})
    want = len(spec.rod_densities_mg_cm3)
    if len(rods) != want:
        # A rod of the same HU as the phantom body cannot be seen by contrast;
        # accept exactly one missing rod if it is the one nearest the body HU.
        raise QctfeaError(
            f"{context}: found {len(rods)} phantom rods, the phantom definition has {want}; "
            "check rod_diameter_mm / rod densities in the calibration config, or use a "
            "fixed calibration"
        )
    rods.sort(key=lambda r: r["mean_hu"])
    for r, rho in zip(rods, sorted(spec.rod_densities_mg_cm3), strict=True):
        r["density_mg_cm3"] = float(rho)
    return rods


def phantom_calibration(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    patient_mask_zyx: np.ndarray,
    spec: PhantomSpec | None = None,
    context: str = "",
) -> Calibration:
    """Fit the phantom calibration line and apply the R² gates."""
    spec = spec or PhantomSpec()
    rods = find_rods(hu_zyx, spacing_xyz, patient_mask_zyx, spec, context)
    slope, intercept, r2 = fit_line(
        [r["mean_hu"] for r in rods], [r["density_mg_cm3"] for r in rods]
    )
    if not r2 >= spec.fail_r2:
        fit = ", ".join(f"{r['mean_hu']:.0f} HU -> {r['density_mg_cm3']:g}" for r in rods)
        raise QctfeaError(
            f"{context}: phantom calibration R² = {r2:.3f} is below "
            f"calibration.phantom.fail_r2 = {spec.fail_r2} (rods, mean HU -> mg/cm³: {fit}); "
            "check the phantom definition (calibration.phantom.rod_densities_mg_cm3) or use a "
            "fixed calibration"
        )
    if r2 < spec.warn_r2:
        warnings.warn(f"{context}: phantom calibration R² = {r2:.4f} < {spec.warn_r2}", stacklevel=2)
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantom", rods=rods)


def fixed_calibration(slope: float, intercept: float) -> Calibration:
    """A calibration given in config (slope 1, intercept 0 for data in mg/cm³)."""
    return Calibration(slope=float(slope), intercept=float(intercept), r2=float("nan"),
                       method="fixed")


def plot_calibration(cal: Calibration, path, title: str = "") -> None:
    """Picture of the fit: rods' mean HU against known density, with the line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    if cal.rods:
        hu = np.array([r["mean_hu"] for r in cal.rods])
        rho = np.array([r["density_mg_cm3"] for r in cal.rods])
        ax.plot(hu, rho, "o", label="phantom rods")
        xs = np.linspace(hu.min() - 20, hu.max() + 20, 10)
    else:
        xs = np.linspace(-100, 400, 10)
    ax.plot(xs, cal.intercept + cal.slope * xs, "-",
            label=f"ρ = {cal.intercept:.2f} + {cal.slope:.4f}·HU\nR² = {cal.r2:.5f}")
    ax.set_xlabel("mean HU")
    ax.set_ylabel("K2HPO4 density (mg/cm³)")
    ax.set_title(title or f"calibration ({cal.method})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
