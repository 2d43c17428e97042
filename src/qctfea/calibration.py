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

Phantomless (internal, tissue-reference) calibration, for scans without a
phantom in view: the same straight line is fitted through tissues of the scan
itself, each with an assumed K2HPO4-equivalent density. This is the "simple
tissue-reference regression" of SCIENCE.md (the minimum); the Michalski 2020
method with its effective-energy search is NOT implemented.

- Default reference densities (:data:`REFERENCE_MG_CM3`) are textbook tissue
  HU (:data:`REFERENCE_HU`: air -1000, fat -100, muscle +50, blood +40,
  cortical bone +1500) converted with a typical 120 kVp K2HPO4 calibration of
  slope 0.78 mg/cm³ per HU and intercept 0 (:data:`REFERENCE_SLOPE`):
  air -780, fat -78, muscle 39, blood 31.2, cortical bone 1170 mg/cm³. They are
  generic placeholders. Users should replace them
  (``calibration.phantomless.reference_mg_cm3``) by values measured on
  phantom-calibrated scans of the same scanner and protocol: every phantom
  calibration records, in calibration.json under ``tissues``, each tissue's
  median HU and its phantom-calibrated density (``calibrated_mg_cm3``); the
  mean of the latter over a set of phantom scans is the reference to use.
- Tissue finding (:func:`find_tissues`): the HU image is smoothed (Gaussian,
  ``smooth_mm``) to classify voxels by the HU window of each tissue; the
  median HU is then measured on the unsmoothed image. The "body" is the
  connected region above -500 HU that holds the labelled vertebra (holes
  filled), so that a phantom, table or cushion is never taken for fat or
  muscle. Air is the air-window voxels outside the body (connected to the
  image border); flat regions (the constant padding outside the
  reconstruction circle, clipped values) are not air. Fat and muscle are
  window voxels inside the body and farther than ``bone_margin_mm`` from any
  labelled bone. Blood is used only where a label of the label map
  (``blood_label``) says where it is. Every region is eroded by
  ``erosion_mm`` against partial volume. Cortical bone is the voxels of the
  target vertebra at or above its window, not eroded: the vertebral cortex is
  thinner than a voxel, so its HU is lowered by partial volume and the median
  depends on the window; it is therefore not used by default.
- A tissue with fewer than ``min_voxels`` voxels is missing (a tightly cropped
  scan usually has no air); at least two tissues are needed. The fit has the
  R² gates of the phantom (with two tissues R² is 1 by construction) and a
  non-positive slope is refused. Muscle-window voxels include organs of
  similar HU (liver, kidney, bowel wall, unenhanced blood), and a scan with
  contrast medium or metal needs care: check the QC picture, which shows the
  voxels used for every tissue.
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
    #: water-equivalent density (mg/cm³) of each rod, in the order of
    #: ``rod_densities_mg_cm3``, for a K2HPO4-in-water phantom (Mindways Model 3: from the
    #: phantom's calibration certificate). Given, the fit follows the QCT PRO equations
    #: (see :func:`k2hpo4_water_fit`); None: a straight line through the rods.
    water_equivalent_mg_cm3: list[float] | None = None
    #: rod centres [x, y] in the scan's physical coordinates (mm), in the order of
    #: ``rod_densities_mg_cm3``; given, the rods are measured there instead of being found
    rod_centres_mm: list[list[float]] | None = None

    def __post_init__(self) -> None:
        n = len(self.rod_densities_mg_cm3)
        for key in ("water_equivalent_mg_cm3", "rod_centres_mm"):
            v = getattr(self, key)
            if v is not None and len(v) != n:
                raise QctfeaError(f"calibration.phantom.{key} has {len(v)} entries, "
                                  f"rod_densities_mg_cm3 has {n}: give one per rod, same order")
        if self.rod_centres_mm is not None and not all(
                isinstance(c, (list, tuple)) and len(c) == 2 for c in self.rod_centres_mm):
            raise QctfeaError("calibration.phantom.rod_centres_mm: give [x, y] (mm) per rod")


#: Textbook HU of the reference tissues (the basis of the default reference densities).
REFERENCE_HU = {"air": -1000.0, "fat": -100.0, "muscle": 50.0, "blood": 40.0,
                "cortical_bone": 1500.0}
#: Typical 120 kVp K2HPO4 calibration slope (mg/cm³ per HU, intercept 0) used to turn
#: :data:`REFERENCE_HU` into the default reference densities.
REFERENCE_SLOPE = 0.78
#: Default K2HPO4-equivalent densities (mg/cm³): REFERENCE_HU x REFERENCE_SLOPE
#: (air -780, fat -78, muscle 39, blood 31.2, cortical_bone 1170).
REFERENCE_MG_CM3 = {k: round(v * REFERENCE_SLOPE, 6) for k, v in REFERENCE_HU.items()}
TISSUES = tuple(REFERENCE_HU)


@dataclass
class TissueSpec:
    """Phantomless calibration (config section ``calibration.phantomless``).

    ``tissues``: the reference tissues used (any of air, fat, muscle, blood,
    cortical_bone); ``reference_mg_cm3``: their K2HPO4-equivalent densities (keys given
    replace the defaults of :data:`REFERENCE_MG_CM3`, the others keep them); ``<tissue>_hu``:
    the HU window [low, high] in which each tissue is looked for (on the smoothed image;
    cortical bone on the unsmoothed image).
    """

    tissues: list[str] = field(default_factory=lambda: ["air", "fat", "muscle"])
    reference_mg_cm3: dict = field(default_factory=lambda: dict(REFERENCE_MG_CM3))
    air_hu: list[float] = field(default_factory=lambda: [-1100.0, -900.0])
    fat_hu: list[float] = field(default_factory=lambda: [-190.0, -30.0])
    muscle_hu: list[float] = field(default_factory=lambda: [0.0, 100.0])
    blood_hu: list[float] = field(default_factory=lambda: [0.0, 100.0])  #: unenhanced blood
    cortical_bone_hu: list[float] = field(default_factory=lambda: [1000.0, 3000.0])
    smooth_mm: float = 1.0  #: Gaussian sigma of the smoothing used to classify voxels
    erosion_mm: float = 1.5  #: voxels must lie deeper than this inside a tissue region
    bone_margin_mm: float = 3.0  #: air, fat, muscle voxels this near a labelled bone are left out
    min_voxels: int = 50  #: a tissue with fewer voxels is missing
    blood_label: int | None = None  #: label value of blood (a vessel) in the label map
    warn_r2: float = 0.98
    fail_r2: float = 0.90

    def __post_init__(self) -> None:
        where = "calibration.phantomless"
        tissues = list(self.tissues)
        bad = [t for t in tissues if t not in TISSUES]
        if bad or len(set(tissues)) != len(tissues) or len(tissues) < 2:
            raise QctfeaError(f"{where}.tissues = {tissues}: give at least 2 different tissues "
                              f"of {list(TISSUES)}")
        if not isinstance(self.reference_mg_cm3, dict):
            raise QctfeaError(f"{where}.reference_mg_cm3 must be a mapping tissue -> mg/cm³, "
                              f"not {self.reference_mg_cm3!r}")
        bad = sorted(set(self.reference_mg_cm3) - set(TISSUES))
        if bad:
            raise QctfeaError(f"{where}.reference_mg_cm3: unknown tissue(s) {bad}; allowed: "
                              f"{list(TISSUES)}")
        for k, v in self.reference_mg_cm3.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise QctfeaError(f"{where}.reference_mg_cm3.{k} = {v!r} is not a finite number")
        self.reference_mg_cm3 = {**REFERENCE_MG_CM3,
                                 **{k: float(v) for k, v in self.reference_mg_cm3.items()}}
        for t in TISSUES:
            w = getattr(self, f"{t}_hu")
            if (len(w) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                   for v in w) or not w[0] < w[1]):
                raise QctfeaError(f"{where}.{t}_hu = {w!r}: give [low, high] in HU, low < high")
            setattr(self, f"{t}_hu", [float(w[0]), float(w[1])])
        if self.smooth_mm < 0 or self.erosion_mm < 0 or self.bone_margin_mm < 0:
            raise QctfeaError(f"{where}: smooth_mm, erosion_mm and bone_margin_mm must be >= 0")
        if self.min_voxels < 1:
            raise QctfeaError(f"{where}.min_voxels must be >= 1, not {self.min_voxels}")


@dataclass
class Calibration:
    """density_mg_cm3 = intercept + slope * HU."""

    slope: float
    intercept: float
    r2: float
    method: str
    rods: list[dict] = field(default_factory=list)
    #: reference tissues measured in the scan (phantomless: the fitted points; phantom: for
    #: information, with their phantom-calibrated density), one dict per tissue
    tissues: list[dict] = field(default_factory=list)
    #: K2HPO4-in-water phantom: sigma/beta of the QCT PRO equations
    coefficients: dict = field(default_factory=dict)

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
    _assign_rod_densities(rods, spec)
    return rods


def _assign_rod_densities(rods: list[dict], spec: PhantomSpec) -> None:
    """Match found rods to the phantom definition by HU order: K2HPO4 density alone, or for
    a K2HPO4-in-water phantom the expected HU water + 1.5 x K2HPO4 (a typical sigma_ref)."""
    water = spec.water_equivalent_mg_cm3 or [0.0] * len(spec.rod_densities_mg_cm3)
    defs = sorted(zip(spec.rod_densities_mg_cm3, water, strict=True),
                  key=lambda d: d[1] + 1.5 * d[0] if spec.water_equivalent_mg_cm3 else d[0])
    rods.sort(key=lambda r: r["mean_hu"])
    for r, (rho, w) in zip(rods, defs, strict=True):
        r["density_mg_cm3"] = float(rho)
        if spec.water_equivalent_mg_cm3:
            r["water_mg_cm3"] = float(w)


def rods_at(hu_zyx: np.ndarray, spacing_xyz, centres_px: list[tuple[float, float]],
            spec: PhantomSpec) -> list[dict]:
    """Rods measured at given centres (pixel x, y), densities in the definition's order."""
    sx, sy = spacing_xyz[0], spacing_xyz[1]
    yy, xx = np.indices(hu_zyx.shape[1:])
    r_core = spec.core_fraction * spec.rod_diameter_mm / 2
    rods = []
    for (cx, cy), rho, w in zip(centres_px, spec.rod_densities_mg_cm3,
                                spec.water_equivalent_mg_cm3 or [None] * len(centres_px),
                                strict=True):
        core = ((xx - cx) * sx) ** 2 + ((yy - cy) * sy) ** 2 <= r_core**2
        if not core.any():
            raise QctfeaError(f"calibration.phantom.rod_centres_mm: a rod centre ({cx:.0f}, "
                              f"{cy:.0f} px) lies outside the image")
        rod = {"center_px": [float(cx), float(cy)], "area_px": int(core.sum()),
               "mean_hu": float(hu_zyx[:, core].mean()), "sd_hu": float(hu_zyx[:, core].std()),
               "density_mg_cm3": float(rho), "given": True}
        if w is not None:
            rod["water_mg_cm3"] = float(w)
        rods.append(rod)
    return rods


def k2hpo4_water_fit(rods: list[dict]) -> tuple[float, float, float, dict]:
    """Calibration of a K2HPO4-in-water phantom (QCT PRO User Guide, Mindways 2011; as in
    Bonelab Ogo's MindwaysCalibration): fit ``HU - rho_water = sigma_ref rho_K2HPO4 +
    beta_ref`` over the rods, then ``sigma_CT = sigma_ref - 0.2174``, ``beta_CT = beta_ref +
    999.6`` and ``rho_K2HPO4 = (HU - beta_CT) / sigma_CT``. Returns slope, intercept, R² of
    the rod fit and the coefficients."""
    k = np.array([r["density_mg_cm3"] for r in rods])
    lhs = np.array([r["mean_hu"] - r["water_mg_cm3"] for r in rods])
    sigma_ref, beta_ref, r2 = fit_line(k, lhs)
    sigma_ct, beta_ct = sigma_ref - 0.2174, beta_ref + 999.6
    coef = {"sigma_ref": sigma_ref, "beta_ref": beta_ref, "sigma_ct": sigma_ct,
            "beta_ct": beta_ct, "model": "HU - rho_water = sigma_ref rho_K2HPO4 + beta_ref"}
    if not sigma_ct > 0:
        raise QctfeaError(f"K2HPO4-in-water phantom fit gives sigma_CT = {sigma_ct:.4f} (not > "
                          "0): check calibration.phantom.water_equivalent_mg_cm3 and the rod "
                          "densities against the phantom's certificate")
    return 1.0 / sigma_ct, -beta_ct / sigma_ct, r2, coef


def phantom_calibration(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    patient_mask_zyx: np.ndarray,
    spec: PhantomSpec | None = None,
    context: str = "",
    rod_centres_px: list[tuple[float, float]] | None = None,
) -> Calibration:
    """Fit the phantom calibration line and apply the R² gates. Rods are found
    automatically, or measured at ``rod_centres_px`` (pixel x, y; from
    ``spec.rod_centres_mm``, converted by the caller who knows the image geometry)."""
    spec = spec or PhantomSpec()
    if rod_centres_px is not None:
        rods = rods_at(hu_zyx, spacing_xyz, rod_centres_px, spec)
    else:
        rods = find_rods(hu_zyx, spacing_xyz, patient_mask_zyx, spec, context)
    coef = {}
    if spec.water_equivalent_mg_cm3:
        slope, intercept, r2, coef = k2hpo4_water_fit(rods)
    else:
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
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantom", rods=rods,
                       coefficients=coef)


def axial_axis(direction) -> int:
    """Numpy axis (of a z, y, x array) of the image axis nearest the patient's z axis.

    ``direction`` is SimpleITK's row-major 3x3 direction matrix; its column c is the
    direction of image axis c (x, y, z), i.e. numpy axis 2 - c."""
    d = np.asarray(direction, float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(d[2])))


def _deep(region: np.ndarray, depth_mm: float, sampling_zyx) -> np.ndarray:
    """Voxels of ``region`` farther than ``depth_mm`` from its outside (erosion in mm)."""
    if depth_mm <= 0 or not region.any():
        return region
    return ndimage.distance_transform_edt(region, sampling=sampling_zyx) > depth_mm


def find_tissues(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    labels_zyx: np.ndarray | None,
    spec: TissueSpec | None = None,
    context: str = "",
    target_label: int | None = None,
    masks: dict | None = None,
) -> list[dict]:
    """Find the reference tissues of ``spec.tissues`` in the scan (see the module docstring).

    ``labels_zyx``: the label map on the CT grid (nonzero = bone, except ``blood_label``),
    or None; ``target_label``: the vertebra used to find the body (any label when None) and
    for cortical bone. Returns one dict per requested tissue: name, found (at least
    ``min_voxels`` voxels), n_voxels, median_hu (None when no voxel), sd_hu and
    reference_mg_cm3. ``masks``, when a dict, receives the voxel mask of each found tissue.
    Never raises for missing tissues (see :func:`phantomless_calibration`).
    """
    spec = spec or TissueSpec()
    sampling = tuple(float(v) for v in spacing_xyz[::-1])
    hu = np.asarray(hu_zyx, np.float32)
    smooth = (ndimage.gaussian_filter(hu, sigma=[spec.smooth_mm / s for s in sampling])
              if spec.smooth_mm > 0 else hu)
    labels = (np.zeros(hu.shape, np.int32) if labels_zyx is None
              else np.asarray(labels_zyx))
    bone = (labels != 0) & (labels != (spec.blood_label if spec.blood_label is not None
                                       else 0))
    target = (labels == target_label) if target_label is not None else bone
    near_bone = (ndimage.distance_transform_edt(~bone, sampling=sampling)
                 <= spec.bone_margin_mm if bone.any() else np.zeros(hu.shape, bool))

    # Body: the connected region above -500 HU holding the vertebra, holes filled.
    dense = smooth > -500.0
    comp, n = ndimage.label(dense)
    ids = np.unique(comp[target & dense]) if target.any() else np.array([], int)
    ids = ids[ids > 0]
    if ids.size == 0 and n:  # no vertebra given or found: the largest dense object
        ids = np.array([int(np.argmax(np.bincount(comp.ravel())[1:])) + 1])
    body = ndimage.binary_fill_holes(np.isin(comp, ids))
    del comp, dense

    def window(name, img):
        lo, hi = getattr(spec, f"{name}_hu")
        return (img >= lo) & (img <= hi)

    out = []
    for name in spec.tissues:
        if name == "air":
            # Air outside the body; a flat 3x3x3 neighbourhood is padding or clipping.
            flat = ndimage.maximum_filter(hu, size=3) == ndimage.minimum_filter(hu, size=3)
            region = window("air", smooth) & ~body & ~near_bone & ~flat
            region = _deep(region, spec.erosion_mm, sampling)
        elif name in ("fat", "muscle"):
            region = _deep(window(name, smooth) & body & ~near_bone, spec.erosion_mm, sampling)
        elif name == "blood":
            region = (np.zeros(hu.shape, bool) if spec.blood_label is None else
                      _deep(window("blood", smooth) & (labels == spec.blood_label),
                            spec.erosion_mm, sampling))
        else:  # cortical_bone: the densest voxels of the target vertebra, not eroded
            region = window("cortical_bone", hu) & (labels == target_label
                                                     if target_label is not None else bone)
        vals = hu[region]
        n_vox = int(vals.size)
        found = n_vox >= spec.min_voxels
        out.append({
            "name": name, "found": found, "n_voxels": n_vox,
            "median_hu": float(np.median(vals)) if n_vox else None,
            "sd_hu": float(vals.std()) if n_vox else None,
            "reference_mg_cm3": float(spec.reference_mg_cm3[name]),
        })
        if found and masks is not None:
            masks[name] = region
    return out


def _tissue_list(tissues: list[dict]) -> str:
    return ", ".join(
        f"{t['name']} ({t['n_voxels']} voxels"
        + (f", median {t['median_hu']:.0f} HU" if t["median_hu"] is not None else "") + ")"
        for t in tissues)


def phantomless_calibration(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    labels_zyx: np.ndarray | None,
    spec: TissueSpec | None = None,
    context: str = "",
    target_label: int | None = None,
    masks: dict | None = None,
) -> Calibration:
    """Fit ``density = intercept + slope * HU`` through the scan's reference tissues.

    Tissues come from :func:`find_tissues` (``masks`` as there). Refused (QctfeaError naming
    ``context``): fewer than 2 tissues found, R² below ``fail_r2``, a slope not > 0.
    Warns below ``warn_r2``. Every requested tissue is recorded in ``Calibration.tissues``
    (``found`` says whether it was fitted; fitted ones get ``calibrated_mg_cm3``)."""
    spec = spec or TissueSpec()
    tissues = find_tissues(hu_zyx, spacing_xyz, labels_zyx, spec, context, target_label,
                           masks)
    used = [t for t in tissues if t["found"]]
    if len(used) < 2:
        missing = [t["name"] for t in tissues if not t["found"]]
        raise QctfeaError(
            f"{context}: phantomless calibration needs at least 2 reference tissues, found "
            f"{len(used)} with >= calibration.phantomless.min_voxels = {spec.min_voxels} "
            f"voxels; measured: {_tissue_list(tissues)}; missing: {', '.join(missing)}. "
            "Check or widen the tissue HU windows (calibration.phantomless.<tissue>_hu), "
            "lower erosion_mm / bone_margin_mm / min_voxels, add tissues to "
            "calibration.phantomless.tissues, or use calibration.method: fixed with "
            "calibration.slope and calibration.intercept"
        )
    slope, intercept, r2 = fit_line([t["median_hu"] for t in used],
                                    [t["reference_mg_cm3"] for t in used])
    fit = ", ".join(f"{t['name']} {t['median_hu']:.0f} HU -> {t['reference_mg_cm3']:g}"
                    for t in used)
    if not slope > 0:
        raise QctfeaError(
            f"{context}: phantomless calibration slope {slope:.4f} mg/cm³ per HU is not "
            f"positive (tissues, median HU -> mg/cm³: {fit}); a tissue was found in the wrong "
            "place: check the QC picture and the tissue HU windows "
            "(calibration.phantomless.<tissue>_hu), or use calibration.method: fixed"
        )
    if not r2 >= spec.fail_r2:
        raise QctfeaError(
            f"{context}: phantomless calibration R² = {r2:.3f} is below "
            f"calibration.phantomless.fail_r2 = {spec.fail_r2} (tissues, median HU -> "
            f"mg/cm³: {fit}); check the reference densities "
            "(calibration.phantomless.reference_mg_cm3), the tissue HU windows and the QC "
            "picture, drop the outlying tissue from calibration.phantomless.tissues, or use "
            "calibration.method: fixed"
        )
    if r2 < spec.warn_r2:
        warnings.warn(f"{context}: phantomless calibration R² = {r2:.4f} < {spec.warn_r2} "
                      f"({fit})", stacklevel=2)
    for t in used:
        t["calibrated_mg_cm3"] = intercept + slope * t["median_hu"]
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantomless",
                       tissues=tissues)


def tissue_densities(cal: Calibration, tissues: list[dict]) -> list[dict]:
    """``tissues`` (from :func:`find_tissues`) with each found tissue's density under ``cal``
    (``calibrated_mg_cm3``): from phantom scans, the data to derive reference densities."""
    out = []
    for t in tissues:
        t = dict(t)
        if t["found"]:
            t["calibrated_mg_cm3"] = cal.intercept + cal.slope * t["median_hu"]
        out.append(t)
    return out


def fixed_calibration(slope: float, intercept: float) -> Calibration:
    """A calibration given in config (slope 1, intercept 0 for data in mg/cm³)."""
    return Calibration(slope=float(slope), intercept=float(intercept), r2=float("nan"),
                       method="fixed")


#: Colours of the tissues in the QC picture.
TISSUE_COLOURS = {"air": "tab:blue", "fat": "gold", "muscle": "tab:red", "blood": "tab:purple",
                  "cortical_bone": "tab:green"}


def plot_calibration(cal: Calibration, path, title: str = "", hu_zyx: np.ndarray | None = None,
                     masks: dict | None = None, axis: int = 0,
                     index: int | None = None) -> None:
    """Picture of the fit (one png).

    Left: the phantom rods' mean HU (phantom) or the reference tissues' median HU
    (phantomless, named on the line) against their density, with the fitted line; tissues
    measured in a phantom scan are drawn (not fitted) at their phantom-calibrated density.
    Right, when ``hu_zyx`` and ``masks`` (tissue -> voxel mask) are given: the CT slice
    ``index`` along numpy ``axis`` (the axial one, see :func:`axial_axis`; middle when None)
    in grey (-200..1500 HU) with the tissue voxels overlaid in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    panel = hu_zyx is not None and bool(masks)
    fig, axes = plt.subplots(1, 2 if panel else 1, figsize=(9.5 if panel else 4.5, 4.0))
    ax = axes[0] if panel else axes
    found = [t for t in cal.tissues if t.get("found")]
    pts = []
    if cal.rods:
        hu = np.array([r["mean_hu"] for r in cal.rods])
        rho = np.array([r["density_mg_cm3"] for r in cal.rods])
        ax.plot(hu, rho, "o", label="phantom rods")
        pts.append(hu)
    if found:
        fitted = cal.method == "phantomless"
        for t in found:
            y = t["reference_mg_cm3"] if fitted else t["calibrated_mg_cm3"]
            ax.plot(t["median_hu"], y, "s" if fitted else "D",
                    mfc=TISSUE_COLOURS[t["name"]] if fitted else "none",
                    mec=TISSUE_COLOURS[t["name"]], ms=7)
            ax.annotate(t["name"], (t["median_hu"], y), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        pts.append(np.array([t["median_hu"] for t in found]))
        ax.plot([], [], "s" if fitted else "D", mfc="grey" if fitted else "none", mec="grey",
                label="reference tissues" if fitted else "tissues (not fitted)")
    if pts:
        allhu = np.concatenate(pts)
        pad = 0.05 * (allhu.max() - allhu.min()) + 20
        xs = np.linspace(allhu.min() - pad, allhu.max() + pad, 10)
    else:
        xs = np.linspace(-100, 400, 10)
    ax.plot(xs, cal.intercept + cal.slope * xs, "-", color="k", lw=1,
            label=f"ρ = {cal.intercept:.2f} + {cal.slope:.4f}·HU\nR² = {cal.r2:.5f}")
    ax.set_xlabel("mean HU (rods) / median HU (tissues)" if found and cal.rods
                  else "median HU" if found else "mean HU")
    ax.set_ylabel("K2HPO4 density (mg/cm³)")
    ax.set_title(title or f"calibration ({cal.method})", fontsize=9)
    ax.legend(fontsize=7)
    if panel:
        ax2 = axes[1]
        k = hu_zyx.shape[axis] // 2 if index is None else int(index)
        ax2.imshow(np.take(hu_zyx, k, axis=axis), cmap="gray", vmin=-200, vmax=1500,
                   interpolation="nearest")
        handles = []
        for name, m in masks.items():
            sl = np.take(m, k, axis=axis)
            colour = TISSUE_COLOURS[name]
            ax2.imshow(np.ma.masked_where(~sl, sl), cmap=ListedColormap([colour]), alpha=0.55,
                       interpolation="nearest", vmin=0, vmax=1)
            handles.append(Patch(color=colour, alpha=0.7,
                                 label=f"{name} ({int(m.sum())} voxels in 3-D)"))
        ax2.legend(handles=handles, fontsize=7, loc="lower right")
        ax2.set_title(f"tissue voxels, slice {k} of axis {axis} (grey -200..1500 HU)",
                      fontsize=8)
        ax2.set_xticks([])
        ax2.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
