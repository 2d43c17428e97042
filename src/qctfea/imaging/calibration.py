"""Calibration: Hounsfield units to K2HPO4-equivalent density (mg/cm³).

Phantom calibration (the study's method): the rods of a calibration phantom
lying under the patient are found automatically, their mean HU is measured
in their cores over all slices, and a straight line
``density = intercept + slope * HU`` is fitted by least squares against the
rods' known densities. The fit is gated on R² (warn below 0.98, refuse below
0.90; Bonelab Ogo practice). The phantom is never assumed: the config names a
preset (:data:`qctfea.imaging.phantoms.PHANTOM_PRESETS`: ``calibration.phantom.preset``)
or gives the rods (``rod_densities_mg_cm3``); keys given next to a preset override it (a
phantom's own certificate values).

Rod finding (:mod:`qctfea.imaging.phantomrods`): in the scan averaged along z (rods run
along the table axis) the rods are disks of the configured diameter and of nearly one HU,
at least ``min_contrast_hu`` from their surroundings, in a row joined by the phantom's
body; the phantom may touch the patient (a gel pad) and the table. Rods are matched to the
configured densities in order of HU (density rises with HU), which holds for every K2HPO4
or hydroxyapatite phantom.

A fixed calibration (slope and intercept from config) is also supported, for
data already in mg/cm³ (slope 1, intercept 0).

Phantomless (internal) calibration, for scans without a phantom in view
(``calibration.phantomless``), two models:

- ``effective_energy`` (default): the effective-energy internal calibration of
  Michalski et al. (Med Eng Phys 2020, doi:10.1016/j.medengphy.2020.01.009,
  "CT-based internal density calibration for opportunistic skeletal assessment
  using abdominal CT scans"; docs/calibration.md), with the attenuation
  physics of :func:`theoretical_hu`. The scan's reference tissues (air,
  adipose tissue, skeletal muscle, blood where a vessel label says where it
  is, cortical bone on request) are sampled by
  :func:`find_tissues`; for every energy E of a grid (default 40-150 keV in
  0.5 keV steps) each tissue's theoretical HU is computed from its tabulated
  composition and density (ICRP adipose tissue for fat, ICRU-44 for the others;
  :data:`qctfea.imaging.attenuation.TISSUES`) and the mass attenuation coefficients of xraydb
  (a maintained X-ray data library), ``HU_t(E) = 1000 (mu_t(E) - mu_water(E)) /
  (mu_water(E) - mu_air(E))``; the measured medians are regressed on HU_t(E)
  (``HU = a + b HU_t``) and the energy of the smallest residual (largest R²) is
  the scan's effective energy. With only two tissues the line has no degree of
  freedom left: the HU scale of the scanner is then taken as exact (a = 0,
  b = 1) and E is the least-squares energy of ``HU = HU_t(E)``. The
  K2HPO4-equivalent density then follows from a two-component K2HPO4-water
  model at E (:func:`k2hpo4_hu_per_mg`): a voxel holding rho (g/cm³) of
  K2HPO4 is water whose own mass is reduced by ``d rho`` (d = the water
  displaced per gram of K2HPO4, 0.2174 by default: the constant of the QCT PRO
  equations of the Mindways K2HPO4-in-water phantoms, so that both
  calibrations define K2HPO4-equivalent density alike), so
  ``mu = mu_water + rho ((mu/rho)_K2HPO4 - d (mu/rho)_water)`` and
  ``HU_t = k rho_mg`` with ``k = ((mu/rho)_K2HPO4 - d (mu/rho)_water) /
  (mu_water - mu_air)`` (HU per mg/cm³). With the tissue line undone,
  ``density = (HU - a) / (b k)``: slope ``1 / (b k)``, intercept ``-a / (b k)``.
  Blood whose median lies more than ``contrast_margin_hu`` above unenhanced
  ICRU-44 blood at the fitted energy is contrast-enhanced and left out (recorded
  so in calibration.json).
- ``tissue_regression``: the same straight line fitted through tissues of the
  scan itself, each with an assumed K2HPO4-equivalent density (a simple
  tissue-reference regression; docs/calibration.md).

Tissue-regression details:

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
- Tissue finding (:func:`find_tissues`, both models): the HU image is smoothed
  (Gaussian, ``smooth_mm``) to classify voxels by the HU window of each tissue;
  the median HU is then measured on the unsmoothed image. The "body" is the
  connected region above -500 HU that holds the labelled vertebra (holes
  filled), so that a phantom, table or cushion is never taken for fat or
  muscle. Air is the air-window voxels outside the body (connected to the
  image border); flat regions (the constant padding outside the
  reconstruction circle, clipped values) are not air. Fat and muscle are
  window voxels inside the body and farther than ``bone_margin_mm`` from any
  labelled structure other than muscle (``muscle_labels``) and blood; muscle, by
  default (``muscle_region: paraspinal``), only behind the target vertebra
  (posterior of its centroid, within ``paraspinal_mm`` of it, within its
  superior-inferior extent): the erector spinae, the muscle QCT's internal
  calibration samples, where no organ lies. Blood is used only where a label of the label map
  (``blood_label``; by default the convention's aorta) says where it is. Every region is eroded by
  ``erosion_mm``, and by at least one voxel, against partial volume; air also
  leaves out padding (the constant fill outside the field of view or around a
  resampled grid, and two voxels around it). Cortical bone is the voxels of the
  target vertebra at or above its window, not eroded: the vertebral cortex is
  thinner than a voxel, so its HU is lowered by partial volume and the median
  depends on the window; it is therefore not used by default.
- A tissue with fewer than ``min_voxels`` voxels is missing (a tightly cropped
  scan usually has no air); at least two tissues are needed. The fit has the
  R² gates of the phantom (with two tissues R² is 1 by construction) and a
  non-positive slope is refused. Muscle-window voxels of the whole body
  (``muscle_region: body``, and the fallback when the paraspinal region holds
  fewer than ``min_voxels``) include organs of similar HU (liver, kidney, bowel
  wall, unenhanced blood), and a scan with contrast medium or metal needs care:
  check the QC picture, which shows the voxels used for every tissue.

Code: this module (phantom and fixed calibration, the configuration's specs, the
fitted line); :mod:`qctfea.imaging.phantomless` (tissues, both phantomless models),
:mod:`qctfea.imaging.attenuation` (the physics), :mod:`qctfea.imaging.calibration_plot`
(the QC picture).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from qctfea.errors import GateRefusal, QctfeaError
from qctfea.config import option
from qctfea.imaging import phantomrods
from qctfea.imaging.phantoms import PhantomSpec
from qctfea.imaging.attenuation import QCT_PRO_WATER_DISPLACEMENT


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


#: Phantomless calibration models (``calibration.phantomless.model``).
PHANTOMLESS_MODELS = ("effective_energy", "tissue_regression")

#: Where a follow-up's effective energy comes from (``TissueSpec.energy_from``).
ENERGY_FROM = ("baseline", "scan")


#: Where :func:`qctfea.imaging.phantomless.find_tissues` samples skeletal muscle.
MUSCLE_REGIONS = ("paraspinal", "body")


@dataclass
class TissueSpec:
    """Phantomless calibration (config section ``calibration.phantomless``).

    ``model``: ``effective_energy`` (Michalski 2020, see the module docstring) or
    ``tissue_regression``; ``tissues``: the reference tissues used (any of air, fat, muscle,
    blood, cortical_bone); ``reference_mg_cm3`` (tissue_regression only): their
    K2HPO4-equivalent densities (keys given replace the defaults of
    :data:`REFERENCE_MG_CM3`, the others keep them); ``<tissue>_hu``: the HU window
    [low, high] in which each tissue is looked for (on the smoothed image; cortical bone on
    the unsmoothed image).
    """

    model: str = option(
        "effective_energy", enum=list(PHANTOMLESS_MODELS),
        doc=("`effective_energy`: Michalski 2020, the scan's effective energy fitted to the "
             "tissues' theoretical HU (ICRP adipose, ICRU-44 muscle and blood compositions, xraydb attenuation), then a "
             "K2HPO4-water model at that energy "
             "([docs/calibration.md](../docs/calibration.md)); `tissue_regression`: a line "
             "through the tissues' assumed densities (`reference_mg_cm3`)"))
    tissues: list[str] = option(
        factory=lambda: ["air", "fat", "muscle", "blood"], minItems=2, uniqueItems=True,
        items={"enum": list(TISSUES)},
        doc=("reference tissues fitted (of air, fat, muscle, blood, cortical_bone; blood only "
             "with `blood_label`); at least 2 must be found"))
    reference_mg_cm3: dict = option(
        factory=lambda: dict(REFERENCE_MG_CM3),
        properties={t: {"type": "number"} for t in TISSUES},
        additionalProperties=False,
        doc=("`tissue_regression`: K2HPO4-equivalent density of each tissue; keys given "
             "replace the defaults. Defaults = textbook HU (−1000, −100, 50, 40, 1500) × 0.78 "
             "mg/cm³ per HU (typical 120 kVp slope, intercept 0): replace them by values from "
             "phantom-calibrated scans of the same scanner/protocol "
             "(`tissues[].calibrated_mg_cm3` in their calibration.json)"))
    air_hu: list[float] = option(
        factory=lambda: [-1100.0, -900.0], minItems=2, maxItems=2,
        doc="HU windows (on the smoothed image) in which the tissues are looked for")
    fat_hu: list[float] = option(
        factory=lambda: [-190.0, -30.0], minItems=2, maxItems=2, row="air_hu")
    muscle_hu: list[float] = option(
        factory=lambda: [0.0, 100.0], minItems=2, maxItems=2, row="air_hu")
    #: blood (inside ``blood_label``): wide, so that contrast-enhanced blood is seen (and
    #: then left out, see ``contrast_margin_hu``)
    blood_hu: list[float] = option(
        factory=lambda: [0.0, 1000.0], minItems=2, maxItems=2,
        doc=("blood window (inside `blood_label`; wide so that contrast-enhanced blood is seen "
             "and left out); cortical bone window (unsmoothed voxels of the target vertebra, "
             "lowered by partial volume: not used by default)"))
    cortical_bone_hu: list[float] = option(
        factory=lambda: [1000.0, 3000.0], minItems=2, maxItems=2, row="blood_hu")
    #: Gaussian sigma of the smoothing used to classify voxels
    smooth_mm: float = option(
        1.0, minimum=0,
        doc=("Gaussian sigma (mm) of the smoothing used to classify voxels (the median HU is "
             "measured unsmoothed)"))
    #: voxels must lie deeper than this inside a tissue region
    erosion_mm: float = option(
        1.5, minimum=0,
        doc=("tissue voxels must lie deeper than this inside their region, and (when > 0) at "
             "least one voxel deep along every axis (partial volume)"))
    #: air, fat, muscle voxels this near a labelled bone are left out
    bone_margin_mm: float = option(
        3.0, minimum=0,
        doc="air, fat and muscle voxels within this distance of any labelled bone are left out")
    #: where skeletal muscle is sampled
    muscle_region: str = option(
        "paraspinal", enum=list(MUSCLE_REGIONS),
        doc=("where muscle is sampled: `paraspinal`, the muscle-window voxels behind the target "
             "vertebra (posterior of its centroid, within `paraspinal_mm` of it and within "
             "its superior-inferior extent: the erector spinae, where no organ lies), or the "
             "whole body, with a warning, when fewer than `min_voxels` voxels or 5 cm³ are "
             "found there; `body`, every "
             "muscle-window voxel of the body (also liver, kidney, bowel wall, contrast-"
             "enhanced organs of similar HU: on the real L1 with only its vertebra labelled, "
             "muscle read 65 HU instead of 51)"))
    paraspinal_mm: float = option(30.0, exclusiveMinimum=0, row="muscle_region")
    #: labels of skeletal muscle in the label map (not bone: muscle may be sampled there)
    muscle_labels: list[int] | None = option(
        None, items={"type": "integer", "minimum": 1},
        shown="by `mask.convention`",
        doc=("label values of skeletal muscle in the label map: not treated as bone, so the "
             "muscle sample may lie in them. Default by `mask.convention`: "
             "TotalSegmentator v2 `total` autochthon and iliopsoas (86, 87, 88, 89; the "
             "structure masks of the same names in a folder); none otherwise"))
    #: a tissue with fewer voxels is missing
    min_voxels: int = option(50, minimum=1, doc="a tissue with fewer voxels is missing")
    #: label value of blood (a vessel) in the label map
    blood_label: int | None = option(
        None, minimum=1, shown="by `mask.convention`",
        doc=("label value of a vessel in the label map whose blood is sampled. Default by "
             "`mask.convention`: the aorta, TotalSegmentator v2 `total` 52 (the `aorta` mask "
             "of a structure folder); none otherwise. Blood is sampled only where this label "
             "is in the map, and contrast-enhanced blood is recognised and left out "
             "(`contrast_margin_hu`)"))
    warn_r2: float = option(
        0.98, minimum=0, maximum=1,
        doc=("R² gates (tissue regression: with 2 tissues R² is 1; effective energy: of "
             "measured vs theoretical HU, applied from 3 tissues); a slope ≤ 0 is refused"))
    fail_r2: float = option(0.90, minimum=0, maximum=1, row="warn_r2")
    #: effective_energy: energies searched, [low, high] keV, and the step (keV)
    energy_range_kev: list[float] = option(
        factory=lambda: [40.0, 150.0], minItems=2, maxItems=2,
        doc=("`effective_energy`: energies searched; an energy at the edge of the range gives "
             "a warning"))
    energy_step_kev: float = option(0.5, exclusiveMinimum=0, row="energy_range_kev")
    #: effective_energy: whose effective energy a follow-up's line is drawn at
    energy_from: str = option(
        "scan", enum=list(ENERGY_FROM),
        doc=("`effective_energy`, follow-ups: `scan`, every scan its own energy; `baseline`, "
             "the energy found on the patient's baseline scan, with `a` and `b` fitted to the "
             "follow-up's own tissues (3 or more; with 2 the baseline's line), when both "
             "scans record the same tube voltage and manufacturer or neither records them "
             "(NIfTI). The energy is the beam's, not the kernel's or the dose's, but found "
             "from soft-tissue contrasts it moves with them: on the real L1 a soft kernel "
             "raised a scan's own slope by 10 %, the baseline's energy by 0.2 %. Choose "
             "`baseline` for a study on one scanner and protocol; keep `scan` when scanners "
             "changed between visits, and for the demo generator, which draws a new energy "
             "for every scan at 120 kVp ([docs/calibration.md](../docs/calibration.md#a-"
             "follow-ups-effective-energy))"))
    #: effective_energy: water displaced per gram of K2HPO4 (g/g) in the K2HPO4-water model
    water_displacement: float = option(
        QCT_PRO_WATER_DISPLACEMENT, minimum=0, exclusiveMaximum=1,
        doc=("`effective_energy`: grams of water displaced per gram of K2HPO4 in the "
             "K2HPO4-water model (QCT PRO's constant, so that phantom and phantomless K2HPO4 "
             "densities agree; 0 = K2HPO4 added to unchanged water)"))
    #: blood whose median exceeds unenhanced blood (ICRU-44, at the fitted energy; the
    #: textbook 40 HU for tissue_regression) by more than this is contrast-enhanced: left out
    #: between-person scatter of a reference tissue's HU about the model's: the phantomless
    #: line's uncertainty (docs/uncertainty.md)
    tissue_sd_hu: float = option(
        8.0, minimum=0,
        doc=("SD (HU) of a reference tissue's HU about the calibration model's (its composition "
             "differs between people): the line's uncertainty is the fit's covariance with "
             "this scatter, or the residual's when larger, drawn normal "
             "([docs/uncertainty.md](../docs/uncertainty.md)); 2-4 tissues leave too few "
             "degrees of freedom to estimate the scatter from the residual alone. On the two "
             "real scans the tissues lay 0.5-8 HU from the effective-energy model's"))
    contrast_margin_hu: float = option(
        50.0, minimum=0,
        doc=("blood whose median exceeds unenhanced blood (ICRU-44 at the fitted energy; 40 HU "
             "for `tissue_regression`) by more than this is contrast-enhanced and left out "
             "(calibration.json: `note`)"))

    def __post_init__(self) -> None:
        where = "calibration.phantomless"
        if self.model not in PHANTOMLESS_MODELS:
            raise QctfeaError(f"{where}.model = {self.model!r}: give one of "
                              f"{list(PHANTOMLESS_MODELS)}")
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
        if self.muscle_region not in MUSCLE_REGIONS:
            raise QctfeaError(f"{where}.muscle_region = {self.muscle_region!r}: give one of "
                              f"{list(MUSCLE_REGIONS)}")
        if self.smooth_mm < 0 or self.erosion_mm < 0 or self.bone_margin_mm < 0:
            raise QctfeaError(f"{where}: smooth_mm, erosion_mm and bone_margin_mm must be >= 0")
        if self.min_voxels < 1:
            raise QctfeaError(f"{where}.min_voxels must be >= 1, not {self.min_voxels}")
        e = self.energy_range_kev
        if (len(e) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                               for v in e) or not 10.0 <= e[0] < e[1] <= 500.0):
            raise QctfeaError(f"{where}.energy_range_kev = {e!r}: give [low, high] in keV, "
                              "10 <= low < high <= 500")
        self.energy_range_kev = [float(e[0]), float(e[1])]
        if not 0 < self.energy_step_kev <= (e[1] - e[0]) / 2:
            raise QctfeaError(f"{where}.energy_step_kev = {self.energy_step_kev}: must be > 0 "
                              "and at most half the energy range")
        if not 0 <= self.water_displacement < 1:
            raise QctfeaError(f"{where}.water_displacement = {self.water_displacement}: give "
                              "0 <= d < 1 (g of water per g of K2HPO4)")
        if self.contrast_margin_hu < 0:
            raise QctfeaError(f"{where}.contrast_margin_hu must be >= 0")


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
    #: phantomless effective_energy model: the energy, the fit against theoretical HU, the
    #: fit error at every energy searched, the K2HPO4 model (see the module docstring)
    effective_energy: dict = field(default_factory=dict)
    #: what the calibrated density is of: K2HPO4 (the phantomless model's and most QCT
    #: phantoms') or hydroxyapatite (a hydroxyapatite phantom, PhantomSpec.equivalent)
    equivalent: str = "k2hpo4"
    #: uncertainty of the line from its fit: covariance of (intercept, slope) and its degrees
    #: of freedom (a Student t with ``dof``; None: a known scatter, normal, as phantomless
    #: calibrations have); ``covariance`` None when the fit cannot estimate it
    #: (``uncertainty_note`` says why). Used by :mod:`qctfea.uncertainty`.
    covariance: list | None = None
    dof: int | None = 0
    uncertainty_note: str = ""

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


def line_covariance(x, y, known_sd: float | None = None) -> tuple[np.ndarray | None, int | None]:
    """Covariance of the least-squares (intercept, slope) of ``y = a + b x``: s² (XᵀX)⁻¹
    with s² the residual variance on n − 2 degrees of freedom; (None, 0) with fewer than
    3 points (no residual to estimate s² from). ``known_sd``: the points' scatter is known
    (in ``y``'s units): s² is its square, or the residual variance when larger, and the
    degrees of freedom None (normal draws); needs 2 points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    X = np.stack([np.ones_like(x), x], axis=1)
    dof = len(x) - 2
    s2 = 0.0
    if dof >= 1:
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        s2 = float(((y - X @ coef) ** 2).sum()) / dof
    if known_sd is not None and len(x) >= 2:
        return max(known_sd ** 2, s2) * np.linalg.inv(X.T @ X), None
    if dof < 1:
        return None, 0
    return s2 * np.linalg.inv(X.T @ X), dof


def _not_estimable(n: int, what: str) -> str:
    return (f"calibration uncertainty not estimable: {n} {what} leave no residual degree of "
            "freedom; intervals leave the calibration out")


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
        raise GateRefusal(f"K2HPO4-in-water phantom fit gives sigma_CT = {sigma_ct:.4f} (not > "
                          "0): check calibration.phantom.water_equivalent_mg_cm3 and the rod "
                          "densities against the phantom's certificate")
    cov_ref, dof = line_covariance(k, lhs)  # of (beta_ref, sigma_ref)
    if cov_ref is not None:
        # (intercept, slope) = (-beta_CT / sigma_CT, 1 / sigma_CT): first-order propagation
        J = np.array([[-1.0 / sigma_ct, beta_ct / sigma_ct ** 2], [0.0, -1.0 / sigma_ct ** 2]])
        coef["covariance"] = (J @ cov_ref @ J.T).tolist()
        coef["dof"] = dof
    return 1.0 / sigma_ct, -beta_ct / sigma_ct, r2, coef


def _rod_fit(rods: list[dict], spec: PhantomSpec) -> tuple[float, float, float, dict]:
    """Slope, intercept, R² and coefficients of the calibration line through the rods."""
    if spec.water_equivalent_mg_cm3:
        return k2hpo4_water_fit(rods)
    slope, intercept, r2 = fit_line([r["mean_hu"] for r in rods],
                                    [r["density_mg_cm3"] for r in rods])
    return slope, intercept, r2, {}


def _rod_r2(rods: list[dict], spec: PhantomSpec) -> float:
    """R² of the line through a candidate row of rods (-inf when no line fits)."""
    try:
        r2 = _rod_fit(rods, spec)[2]
    except QctfeaError:  # e.g. sigma_CT <= 0: not this phantom's rods
        return -np.inf
    return r2 if np.isfinite(r2) else -np.inf


def phantom_calibration(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    anatomy_zyx: np.ndarray | None,
    spec: PhantomSpec | None = None,
    context: str = "",
    rod_centres_px: list[tuple[float, float]] | None = None,
) -> Calibration:
    """Fit the phantom calibration line and apply the R² gates. Rods are found
    automatically (never on ``anatomy_zyx``, the labelled anatomy's voxels), or measured at ``rod_centres_px`` (pixel x, y; from
    ``spec.rod_centres_mm``, converted by the caller who knows the image geometry)."""
    if spec is None:
        raise QctfeaError(f"{context}: phantom calibration needs the phantom (PhantomSpec)")
    spec.require_defined()
    if rod_centres_px is not None:
        rods = phantomrods.rods_at(hu_zyx, spacing_xyz, rod_centres_px, spec)
    else:
        rods = phantomrods.find_rods(hu_zyx, spacing_xyz, anatomy_zyx, spec, context,
                                     lambda found: _rod_r2(found, spec))
    slope, intercept, r2, coef = _rod_fit(rods, spec)
    if not r2 >= spec.fail_r2:
        fit = ", ".join(f"{r['mean_hu']:.0f} HU -> {r['density_mg_cm3']:g}" for r in rods)
        raise GateRefusal(
            f"{context}: phantom calibration R² = {r2:.3f} is below "
            f"calibration.phantom.fail_r2 = {spec.fail_r2} (rods, mean HU -> mg/cm³: {fit}); "
            "check the phantom definition (calibration.phantom.rod_densities_mg_cm3) or use a "
            "fixed calibration"
        )
    if r2 < spec.warn_r2:
        warnings.warn(f"{context}: phantom calibration R² = {r2:.4f} < {spec.warn_r2}",
                      stacklevel=2)
    if coef:
        cov, dof = coef.pop("covariance", None), coef.pop("dof", 0)
    else:
        cov, dof = line_covariance([r["mean_hu"] for r in rods],
                                   [r["density_mg_cm3"] for r in rods])
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantom", rods=rods,
                       coefficients=coef, equivalent=spec.equivalent or "k2hpo4",
                       **uncertainty_keys(cov, dof, len(rods), "rods"))


def uncertainty_keys(cov, dof: int | None, n: int, what: str, known: str = "") -> dict:
    """calibration.json's uncertainty keys; ``dof`` None: a known scatter (``known`` says
    which), normal draws."""
    if cov is None:
        return {"covariance": None, "dof": 0, "uncertainty_note": _not_estimable(n, what)}
    if dof is None:
        return {"covariance": np.asarray(cov, float).tolist(), "dof": None,
                "uncertainty_note": f"least-squares fit of {n} {what} with {known}; normal"}
    return {"covariance": np.asarray(cov, float).tolist(), "dof": int(dof),
            "uncertainty_note": f"least-squares fit of {n} {what}, {dof} degrees of freedom"}


def fixed_calibration(slope: float, intercept: float) -> Calibration:
    """A calibration given in config (slope 1, intercept 0 for data in mg/cm³)."""
    return Calibration(slope=float(slope), intercept=float(intercept), r2=float("nan"),
                       uncertainty_note="fixed calibration: taken as exact (no fit)",
                       method="fixed")
