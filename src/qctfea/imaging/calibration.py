"""Calibration: Hounsfield units to K2HPO4-equivalent density (mg/cm³).

Phantom calibration (the study's method): the rods of a calibration phantom
lying under the patient are found automatically, their mean HU is measured
in their cores over all slices, and a straight line
``density = intercept + slope * HU`` is fitted by least squares against the
rods' known densities. The fit is gated on R² (warn below 0.98, refuse below
0.90; Bonelab Ogo practice). The phantom is never assumed: the config names a
preset (:data:`PHANTOM_PRESETS`: ``calibration.phantom.preset``) or gives the
rods (``rod_densities_mg_cm3``); keys given next to a preset override it (a
phantom's own certificate values).

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
  0.5 keV steps) each tissue's theoretical HU is computed from its ICRU-44
  composition and density and the mass attenuation coefficients of xraydb
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

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from qctfea.errors import QctfeaError

#: Calibration phantoms by name (``calibration.phantom.preset``). Each gives its rods'
#: densities (mg/cm³, K2HPO4 or calcium hydroxyapatite), for K2HPO4-in-water phantoms the
#: rods' water-equivalent densities (QCT PRO equations), the rod diameter where a source
#: states it (None: not published in a source we could check; the config must then give
#: ``rod_diameter_mm``), and the source. Per-phantom values differ (each phantom has its
#: own calibration certificate): keys given in the config override the preset's.
PHANTOM_PRESETS: dict[str, dict] = {
    "mindways_model3": {
        "material": "K2HPO4 in water (5 rods A-E)",
        "rod_densities_mg_cm3": [-51.83, -53.40, 58.88, 157.05, 375.83],
        "water_equivalent_mg_cm3": [1012.25, 1056.95, 1103.57, 1119.52, 923.20],
        "rod_diameter_mm": None,
        "source": "Mindways Model 3 CT calibration phantom, rods A-E, certificate values of "
                  "phantoms #4541A/#4560 as published in Bonelab Ogo (University of Calgary "
                  "Bone Imaging Laboratory, ogo/util/Helper.py get_phantom, 2022); rod "
                  "diameter: not published in a source we could check",
    },
    "qrm_bdc_6": {
        "material": "calcium hydroxyapatite in water-equivalent resin (6 inserts)",
        "rod_densities_mg_cm3": [0.0, 100.0, 200.0, 400.0, 600.0, 800.0],
        "water_equivalent_mg_cm3": None,
        "rod_diameter_mm": None,
        "source": "QRM Bone Density Calibration phantom BDC, 6-rod version, values of "
                  "phantom #BDC-106 as published in Bonelab Ogo (ogo/util/Helper.py "
                  "get_phantom, 2022); insert diameter: not published in a source we could "
                  "check",
    },
    "qrm_bdc_3": {
        "material": "calcium hydroxyapatite in water-equivalent resin (3 inserts)",
        "rod_densities_mg_cm3": [100.0, 400.0, 800.0],
        "water_equivalent_mg_cm3": None,
        "rod_diameter_mm": None,
        "source": "QRM Bone Density Calibration phantom BDC, 3-rod version, values of "
                  "phantom #BDC-71 as published in Bonelab Ogo (ogo/util/Helper.py "
                  "get_phantom, 2022); insert diameter: not published in a source we could "
                  "check",
    },
    "demo_k2hpo4": {
        "material": "K2HPO4 solutions in water (the synthetic generator's phantom)",
        "rod_densities_mg_cm3": [0.0, 50.0, 100.0, 150.0, 200.0],
        "water_equivalent_mg_cm3": None,
        "rod_diameter_mm": 12.0,
        "source": "qctfea.demo.synth.SynthParams (rod_densities_mg_cm3, rod_diameter_mm): the "
                  "phantom of the demo cohorts, rendered by the generator; not a real phantom",
    },
}
#: The keys of a preset that are PhantomSpec fields (the others document it).
_PRESET_KEYS = ("rod_densities_mg_cm3", "water_equivalent_mg_cm3", "rod_diameter_mm")
#: Rod diameter of a phantom given by its rods alone (no preset), as before presets existed.
DEFAULT_ROD_DIAMETER_MM = 12.0


def phantom_presets_text() -> str:
    """One line per preset: name, rods, source (for error messages and docs)."""
    return "; ".join(f"{k} ({v['material']}: {v['rod_densities_mg_cm3']} mg/cm³)"
                     for k, v in PHANTOM_PRESETS.items())


@dataclass
class PhantomSpec:
    """A calibration phantom (config section ``calibration.phantom``): a ``preset`` of
    :data:`PHANTOM_PRESETS` and/or the rods (densities in mg/cm³, any order), rod diameter
    and rod finding settings. Keys given override the preset's; without a preset and without
    ``rod_densities_mg_cm3`` the phantom is undefined and refused (never assumed)."""

    preset: str | None = None
    rod_densities_mg_cm3: list[float] | None = None
    rod_diameter_mm: float | None = None
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
        where = "calibration.phantom"
        if self.preset is not None:
            if self.preset not in PHANTOM_PRESETS:
                raise QctfeaError(f"{where}.preset = {self.preset!r} is not a known phantom; "
                                  f"presets: {phantom_presets_text()}")
            p = PHANTOM_PRESETS[self.preset]
            for key in _PRESET_KEYS:
                if getattr(self, key) is None:
                    setattr(self, key, list(p[key]) if isinstance(p[key], list) else p[key])
        if self.rod_densities_mg_cm3 is None:  # undefined: refused by require_defined()
            return
        if len(self.rod_densities_mg_cm3) < 2:
            raise QctfeaError(f"{where}.rod_densities_mg_cm3: give at least 2 rods")
        if self.rod_diameter_mm is None:
            if self.preset is not None:
                raise QctfeaError(
                    f"{where}: preset {self.preset!r} has no published rod diameter; give "
                    f"calibration.phantom.rod_diameter_mm (mm) of your phantom "
                    f"(source of the preset: {PHANTOM_PRESETS[self.preset]['source']})")
            self.rod_diameter_mm = DEFAULT_ROD_DIAMETER_MM
        if not self.rod_diameter_mm > 0:
            raise QctfeaError(f"{where}.rod_diameter_mm must be > 0, not {self.rod_diameter_mm}")
        n = len(self.rod_densities_mg_cm3)
        for key in ("water_equivalent_mg_cm3", "rod_centres_mm"):
            v = getattr(self, key)
            if v is not None and len(v) != n:
                raise QctfeaError(f"calibration.phantom.{key} has {len(v)} entries, "
                                  f"rod_densities_mg_cm3 has {n}: give one per rod, same order")
        if self.rod_centres_mm is not None and not all(
                isinstance(c, (list, tuple)) and len(c) == 2 for c in self.rod_centres_mm):
            raise QctfeaError("calibration.phantom.rod_centres_mm: give [x, y] (mm) per rod")

    def require_defined(self) -> "PhantomSpec":
        """The phantom itself, or an error listing the presets when none is named (a phantom
        calibration never assumes one)."""
        if self.rod_densities_mg_cm3 is None:
            raise QctfeaError(
                "calibration.phantom: no phantom named: calibration.method 'phantom' (the "
                "default method) needs calibration.phantom.preset, one of "
                f"{phantom_presets_text()}, or the rods "
                "(calibration.phantom.rod_densities_mg_cm3, and rod_diameter_mm); a scan "
                "without a phantom needs calibration.method: phantomless or fixed")
        return self


# --- attenuation physics (effective-energy calibration and the demo generator) -------------

#: Elemental composition (mass fractions) and density (g/cm³) of the reference tissues:
#: ICRU Report 44 (1989) as tabulated by NIST (Hubbell & Seltzer, X-Ray Mass Attenuation
#: Coefficients, NIST Standard Reference Database 126, Table 2: "Adipose Tissue (ICRU-44)",
#: "Muscle, Skeletal (ICRU-44)", "Blood, Whole (ICRU-44)", "Bone, Cortical (ICRU-44)").
#: xraydb has no named tissues, so the compositions are given here; the attenuation
#: coefficients of every element come from xraydb (:func:`mass_attenuation`).
ICRU44 = {
    "fat": ({"H": 0.114, "C": 0.598, "N": 0.007, "O": 0.278, "Na": 0.001, "S": 0.001,
             "Cl": 0.001}, 0.95),
    "muscle": ({"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.710, "Na": 0.001, "P": 0.002,
                "S": 0.003, "Cl": 0.001, "K": 0.004}, 1.05),
    "blood": ({"H": 0.102, "C": 0.110, "N": 0.033, "O": 0.745, "Na": 0.001, "P": 0.001,
               "S": 0.002, "Cl": 0.003, "K": 0.002, "Fe": 0.001}, 1.06),
    "cortical_bone": ({"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001,
                       "Mg": 0.002, "P": 0.103, "S": 0.003, "Ca": 0.225}, 1.92),
}
#: Materials by chemical formula (xraydb parses it): mass attenuation needs no density.
FORMULAS = {"water": "H2O", "k2hpo4": "K2HPO4", "triglyceride": "C57H104O6",
            "polyethylene": "C2H4"}
#: Dry air (xraydb's named material 'air', density 1.225 mg/cm³).
AIR = "air"
#: Water displaced per gram of K2HPO4 (g/g) in the two-component model: the constant of the
#: QCT PRO equations (sigma_CT = sigma_ref - 0.2174, see :func:`k2hpo4_water_fit`).
QCT_PRO_WATER_DISPLACEMENT = 0.2174
#: Density (g/cm³) at which each tissue's theoretical HU is computed.
TISSUE_DENSITY = {k: v[1] for k, v in ICRU44.items()}


def _formula_of(fractions: dict) -> str:
    """A chemical formula with the atom ratios of the given mass fractions (for xraydb)."""
    import xraydb

    return "".join(f"{el}{w / xraydb.atomic_mass(el):.8g}" for el, w in fractions.items())


@functools.lru_cache(maxsize=256)
def _mass_attenuation(material: str, energies_kev: tuple) -> np.ndarray:
    import xraydb

    e_ev = np.asarray(energies_kev, float) * 1000.0
    if material == AIR:
        formula, density = xraydb.get_material("air")[:2]
        return np.atleast_1d(xraydb.material_mu(formula, e_ev, density=1.0, kind="total"))
    formula = (_formula_of(ICRU44[material][0]) if material in ICRU44
               else FORMULAS[material])
    # material_mu gives the linear coefficient (1/cm) at the given density: at 1 g/cm³ it
    # equals the mass attenuation coefficient (cm²/g).
    return np.atleast_1d(xraydb.material_mu(formula, e_ev, density=1.0, kind="total"))


def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """Mass attenuation coefficient mu/rho (cm²/g, coherent + incoherent + photoelectric;
    xraydb, Elam et al. tables) of ``material`` (a key of :data:`ICRU44`, of
    :data:`FORMULAS`, or 'air') at ``energy_kev`` (scalar or array)."""
    e = np.atleast_1d(np.asarray(energy_kev, float))
    out = _mass_attenuation(material, tuple(np.round(e, 6)))
    return out if np.ndim(energy_kev) else float(out[0])


def linear_attenuation(material: str, energy_kev, density: float | None = None):
    """Linear attenuation coefficient (1/cm) at ``density`` (g/cm³; the tissue's ICRU-44
    density, water 1.0 and air 1.225e-3 when None)."""
    if density is None:
        density = (TISSUE_DENSITY.get(material) or
                   {"water": 1.0, AIR: 1.225e-3}.get(material))
        if density is None:
            raise QctfeaError(f"linear_attenuation: give the density of {material!r}")
    return mass_attenuation(material, energy_kev) * density


def hu_of_mu(mu, energy_kev):
    """HU of a linear attenuation coefficient ``mu`` (1/cm) at ``energy_kev``:
    ``1000 (mu - mu_water) / (mu_water - mu_air)`` (water 0 HU, air -1000 HU)."""
    mw = linear_attenuation("water", energy_kev)
    ma = linear_attenuation(AIR, energy_kev)
    return 1000.0 * (np.asarray(mu) - mw) / (mw - ma)


def theoretical_hu(material: str, energy_kev, density: float | None = None):
    """Theoretical HU of a material (its ICRU-44 density unless given) at ``energy_kev``."""
    return hu_of_mu(linear_attenuation(material, energy_kev, density), energy_kev)


def k2hpo4_hu_per_mg(energy_kev, displacement: float = QCT_PRO_WATER_DISPLACEMENT):
    """HU per mg/cm³ of K2HPO4 in water at ``energy_kev`` (two-component model, see the module
    docstring): ``((mu/rho)_K2HPO4 - d (mu/rho)_water) / (mu_water - mu_air)``, d =
    ``displacement`` (g of water displaced per g of K2HPO4)."""
    mk = mass_attenuation("k2hpo4", energy_kev)
    mw = mass_attenuation("water", energy_kev)
    return (mk - displacement * mw) / (linear_attenuation("water", energy_kev)
                                       - linear_attenuation(AIR, energy_kev))


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

    model: str = "effective_energy"
    tissues: list[str] = field(default_factory=lambda: ["air", "fat", "muscle", "blood"])
    reference_mg_cm3: dict = field(default_factory=lambda: dict(REFERENCE_MG_CM3))
    air_hu: list[float] = field(default_factory=lambda: [-1100.0, -900.0])
    fat_hu: list[float] = field(default_factory=lambda: [-190.0, -30.0])
    muscle_hu: list[float] = field(default_factory=lambda: [0.0, 100.0])
    #: blood (inside ``blood_label``): wide, so that contrast-enhanced blood is seen (and
    #: then left out, see ``contrast_margin_hu``)
    blood_hu: list[float] = field(default_factory=lambda: [0.0, 1000.0])
    cortical_bone_hu: list[float] = field(default_factory=lambda: [1000.0, 3000.0])
    smooth_mm: float = 1.0  #: Gaussian sigma of the smoothing used to classify voxels
    erosion_mm: float = 1.5  #: voxels must lie deeper than this inside a tissue region
    bone_margin_mm: float = 3.0  #: air, fat, muscle voxels this near a labelled bone are left out
    min_voxels: int = 50  #: a tissue with fewer voxels is missing
    blood_label: int | None = None  #: label value of blood (a vessel) in the label map
    warn_r2: float = 0.98
    fail_r2: float = 0.90
    #: effective_energy: energies searched, [low, high] keV, and the step (keV)
    energy_range_kev: list[float] = field(default_factory=lambda: [40.0, 150.0])
    energy_step_kev: float = 0.5
    #: effective_energy: water displaced per gram of K2HPO4 (g/g) in the K2HPO4-water model
    water_displacement: float = QCT_PRO_WATER_DISPLACEMENT
    #: blood whose median exceeds unenhanced blood (ICRU-44, at the fitted energy; the
    #: textbook 40 HU for tissue_regression) by more than this is contrast-enhanced: left out
    contrast_margin_hu: float = 50.0

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
    #: uncertainty of the line from its fit: covariance of (intercept, slope) and its degrees
    #: of freedom (a Student t with ``dof``); ``covariance`` None when the fit cannot estimate
    #: it (``uncertainty_note`` says why). Used by :mod:`qctfea.uncertainty`.
    covariance: list | None = None
    dof: int = 0
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


def line_covariance(x, y) -> tuple[np.ndarray | None, int]:
    """Covariance of the least-squares (intercept, slope) of ``y = a + b x``: s² (XᵀX)⁻¹
    with s² the residual variance on n − 2 degrees of freedom; (None, 0) with fewer than
    3 points (no residual to estimate s² from)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    dof = len(x) - 2
    if dof < 1:
        return None, 0
    X = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    s2 = float(((y - X @ coef) ** 2).sum()) / dof
    return s2 * np.linalg.inv(X.T @ X), dof


def _not_estimable(n: int, what: str) -> str:
    return (f"calibration uncertainty not estimable: {n} {what} leave no residual degree of "
            "freedom; intervals leave the calibration out")


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
    cov_ref, dof = line_covariance(k, lhs)  # of (beta_ref, sigma_ref)
    if cov_ref is not None:
        # (intercept, slope) = (-beta_CT / sigma_CT, 1 / sigma_CT): first-order propagation
        J = np.array([[-1.0 / sigma_ct, beta_ct / sigma_ct ** 2], [0.0, -1.0 / sigma_ct ** 2]])
        coef["covariance"] = (J @ cov_ref @ J.T).tolist()
        coef["dof"] = dof
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
    if spec is None:
        raise QctfeaError(f"{context}: phantom calibration needs the phantom (PhantomSpec)")
    spec.require_defined()
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
    if coef:
        cov, dof = coef.pop("covariance", None), coef.pop("dof", 0)
    else:
        cov, dof = line_covariance([r["mean_hu"] for r in rods],
                                   [r["density_mg_cm3"] for r in rods])
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantom", rods=rods,
                       coefficients=coef, **_uncertainty(cov, dof, len(rods), "rods"))


def _uncertainty(cov, dof: int, n: int, what: str) -> dict:
    if cov is None:
        return {"covariance": None, "dof": 0, "uncertainty_note": _not_estimable(n, what)}
    return {"covariance": np.asarray(cov, float).tolist(), "dof": int(dof),
            "uncertainty_note": f"least-squares fit of {n} {what}, {dof} degrees of freedom"}


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
            "median_hu": robust_median(vals) if n_vox else None,
            "sd_hu": float(vals.std()) if n_vox else None,
            "reference_mg_cm3": float(spec.reference_mg_cm3[name]),
        })
        if found and masks is not None:
            masks[name] = region
    return out


def robust_median(values) -> float:
    """Median; for integer-valued data (HU stored as integers, as in DICOM) the median of the
    grouped data (each integer v standing for [v - 0.5, v + 0.5), interpolated within the
    median's class), which is not stuck on an integer: a plain median of noisy integer HU is
    off by up to 0.5 HU, enough to move an effective energy by about half a keV."""
    v = np.asarray(values, float).ravel()
    if v.size == 0:
        return float("nan")
    m = float(np.median(v))
    if not np.all(v == np.round(v)):
        return m
    below = np.count_nonzero(v < m)
    at = np.count_nonzero(v == m)
    return m - 0.5 + (v.size / 2 - below) / at if at else m


def _tissue_list(tissues: list[dict]) -> str:
    return ", ".join(
        f"{t['name']} ({t['n_voxels']} voxels"
        + (f", median {t['median_hu']:.0f} HU" if t["median_hu"] is not None else "") + ")"
        for t in tissues)


def _too_few(context: str, spec: TissueSpec, tissues: list[dict], used: list[dict]) -> None:
    missing = [t["name"] for t in tissues if not t["found"]]
    left = [f"{t['name']} ({t['note']})" for t in tissues if t["found"] and not t["used"]]
    raise QctfeaError(
        f"{context}: phantomless calibration needs at least 2 reference tissues, found "
        f"{len(used)} with >= calibration.phantomless.min_voxels = {spec.min_voxels} "
        f"voxels; measured: {_tissue_list(tissues)}; missing: {', '.join(missing) or 'none'}"
        + (f"; left out: {', '.join(left)}" if left else "") + ". "
        "Check or widen the tissue HU windows (calibration.phantomless.<tissue>_hu), "
        "lower erosion_mm / bone_margin_mm / min_voxels, add tissues to "
        "calibration.phantomless.tissues, or use calibration.method: fixed with "
        "calibration.slope and calibration.intercept"
    )


def phantomless_calibration(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    labels_zyx: np.ndarray | None,
    spec: TissueSpec | None = None,
    context: str = "",
    target_label: int | None = None,
    masks: dict | None = None,
) -> Calibration:
    """Fit ``density = intercept + slope * HU`` from the scan's reference tissues, by the
    effective-energy model or the tissue regression (``spec.model``; module docstring).

    Tissues come from :func:`find_tissues` (``masks`` as there). Refused (QctfeaError naming
    ``context``): fewer than 2 tissues found, R² below ``fail_r2``, a slope not > 0.
    Warns below ``warn_r2``. Every requested tissue is recorded in ``Calibration.tissues``
    (``found``: enough voxels; ``used``: fitted; ``note``: why a found tissue was left out;
    fitted ones get ``calibrated_mg_cm3``, and under effective_energy ``theoretical_hu`` and
    ``residual_hu``)."""
    spec = spec or TissueSpec()
    tissues = find_tissues(hu_zyx, spacing_xyz, labels_zyx, spec, context, target_label,
                           masks)
    if spec.model == "effective_energy":
        cal = effective_energy_calibration(tissues, spec, context)
    else:
        cal = _tissue_regression(tissues, spec, context)
    if masks is not None:  # the picture shows the voxels of the tissues used
        for t in cal.tissues:
            if not t["used"]:
                masks.pop(t["name"], None)
    return cal


def _mark_contrast(t: dict, unenhanced_hu: float, margin: float, basis: str) -> None:
    """Blood above unenhanced blood + margin: contrast-enhanced, left out (``used`` False)."""
    if t["name"] == "blood" and t["found"] and t["median_hu"] > unenhanced_hu + margin:
        t["used"] = False
        t["note"] = (f"contrast-enhanced, left out (median {t['median_hu']:.0f} HU > "
                     f"unenhanced blood {unenhanced_hu:.0f} HU {basis} + "
                     f"calibration.phantomless.contrast_margin_hu {margin:g})")


def _tissue_regression(tissues: list[dict], spec: TissueSpec, context: str) -> Calibration:
    """The straight line through the tissues' (median HU, reference density) points."""
    for t in tissues:
        t["used"], t["note"] = t["found"], None if t["found"] else "not found"
        _mark_contrast(t, REFERENCE_HU["blood"], spec.contrast_margin_hu, "(textbook)")
    used = [t for t in tissues if t["used"]]
    if len(used) < 2:
        _too_few(context, spec, tissues, used)
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
    cov, dof = line_covariance([t["median_hu"] for t in used],
                               [t["reference_mg_cm3"] for t in used])
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantomless",
                       tissues=tissues, coefficients={"model": "tissue_regression"},
                       **_uncertainty(cov, dof, len(used), "tissues"))


def _material(tissue: str) -> str:
    return AIR if tissue == "air" else tissue


def fit_effective_energy(names: list[str], measured_hu, energies_kev) -> dict:
    """The energy at which the tissues' measured HU fit their theoretical HU best.

    Three or more tissues: for every energy the least-squares line ``measured = a + b HU_t``
    and its residual sum of squares; the energy of the smallest one (largest R², as measured
    HU is the dependent variable its total sum of squares does not depend on E). Two
    tissues: ``a = 0, b = 1`` (the scanner's HU scale taken as exact) and the least-squares
    energy of ``measured = HU_t(E)``. Returns energy_kev, a, b, r2, mode, and per energy
    the RMS residual (HU)."""
    m = np.asarray(measured_hu, float)
    e = np.asarray(energies_kev, float)
    T = np.stack([np.atleast_1d(theoretical_hu(_material(n), e)) for n in names])  # (n, nE)
    if len(names) >= 3:
        tm = T.mean(axis=0)
        dt = T - tm
        b = (dt * (m - m.mean())[:, None]).sum(axis=0) / (dt ** 2).sum(axis=0)
        a = m.mean() - b * tm
        mode = "line HU = a + b HU_t fitted (3 or more tissues)"
    else:
        a, b = np.zeros_like(e), np.ones_like(e)
        mode = "HU scale of the scanner taken as exact: a = 0, b = 1 (2 tissues)"
    ss = ((m[:, None] - (a + b * T)) ** 2).sum(axis=0)
    j = int(np.argmin(ss))
    ss_tot = float(((m - m.mean()) ** 2).sum())
    return {"energy_kev": float(e[j]), "a": float(a[j]), "b": float(b[j]),
            "r2": 1.0 - float(ss[j]) / ss_tot if ss_tot > 0 else float("nan"), "mode": mode,
            "theoretical_hu": T[:, j].tolist(),
            "rms_residual_hu": np.sqrt(ss / len(m)).tolist(), "at_edge": j in (0, len(e) - 1)}


def effective_energy_calibration(tissues: list[dict], spec: TissueSpec,
                                 context: str = "") -> Calibration:
    """Effective-energy internal calibration (Michalski 2020; module docstring) from the
    tissues measured by :func:`find_tissues`. Blood is fitted only when it is not
    contrast-enhanced at the energy found without it (with fewer than 2 other tissues, at the
    energy found with it)."""
    import xraydb

    lo, hi = spec.energy_range_kev
    energies = np.arange(lo, hi + spec.energy_step_kev / 2, spec.energy_step_kev)
    for t in tissues:
        t["used"], t["note"] = t["found"], None if t["found"] else "not found"
        t.pop("reference_mg_cm3", None)  # tissue_regression only

    def fit(ts):
        return fit_effective_energy([t["name"] for t in ts], [t["median_hu"] for t in ts],
                                    energies)

    used = [t for t in tissues if t["used"]]
    others = [t for t in used if t["name"] != "blood"]
    blood = [t for t in used if t["name"] == "blood"]
    if len(used) < 2:
        _too_few(context, spec, tissues, used)
    res = fit(others if len(others) >= 2 else used)
    for t in blood:
        _mark_contrast(t, float(theoretical_hu("blood", res["energy_kev"])),
                       spec.contrast_margin_hu, f"at {res['energy_kev']:g} keV")
    used = [t for t in tissues if t["used"]]
    if len(used) < 2:
        _too_few(context, spec, tissues, used)
    if blood and blood[0]["used"] and len(others) >= 2:
        res = fit(used)
    E, a, b, r2 = res["energy_kev"], res["a"], res["b"], res["r2"]
    fit_txt = ", ".join(f"{t['name']} {t['median_hu']:.0f} HU (theory {ht:.0f})"
                        for t, ht in zip(used, res["theoretical_hu"], strict=True))
    if not b > 0:
        raise QctfeaError(
            f"{context}: effective-energy calibration: measured HU fall as theoretical HU rise "
            f"(b = {b:.3f} at {E:g} keV; {fit_txt}); a tissue was found in the wrong place: "
            "check the QC picture and the tissue HU windows "
            "(calibration.phantomless.<tissue>_hu)")
    if len(used) >= 3 and not r2 >= spec.fail_r2:
        raise QctfeaError(
            f"{context}: effective-energy calibration R² = {r2:.3f} at {E:g} keV is below "
            f"calibration.phantomless.fail_r2 = {spec.fail_r2} ({fit_txt}); check the QC "
            "picture and the tissue HU windows, drop the outlying tissue from "
            "calibration.phantomless.tissues, or use calibration.method: fixed")
    if len(used) >= 3 and r2 < spec.warn_r2:
        warnings.warn(f"{context}: effective-energy calibration R² = {r2:.4f} < "
                      f"{spec.warn_r2} ({fit_txt})", stacklevel=2)
    if res["at_edge"]:
        warnings.warn(f"{context}: effective energy {E:g} keV is at the edge of "
                      f"calibration.phantomless.energy_range_kev {spec.energy_range_kev} "
                      f"({fit_txt}): the fit may want an energy outside it", stacklevel=2)
    if len(used) == 2:
        warnings.warn(f"{context}: effective energy {E:g} keV from 2 tissues only ({fit_txt});"
                      " the scanner's HU scale is taken as exact", stacklevel=2)
    k = float(k2hpo4_hu_per_mg(E, spec.water_displacement))
    slope, intercept = 1.0 / (b * k), -a / (b * k)
    for t, ht in zip(used, res["theoretical_hu"], strict=True):
        t["theoretical_hu"] = ht
        t["residual_hu"] = t["median_hu"] - (a + b * ht)
        t["calibrated_mg_cm3"] = intercept + slope * t["median_hu"]
    for t in tissues:
        if t["found"] and not t["used"] and t["name"] in ("blood", "cortical_bone"):
            t["theoretical_hu"] = float(theoretical_hu(t["name"], E))
    mats = ["water", AIR, "k2hpo4", "triglyceride", *ICRU44]
    info = {
        "energy_kev": E,
        "energy_range_kev": spec.energy_range_kev, "energy_step_kev": spec.energy_step_kev,
        "fit": {"a": a, "b": b, "r2": r2, "mode": res["mode"], "n_tissues": len(used),
                "model": "median HU = a + b * theoretical HU at E"},
        "energies_kev": energies.tolist(), "rms_residual_hu": res["rms_residual_hu"],
        "k2hpo4_hu_per_mg_cm3": k, "water_displacement": spec.water_displacement,
        "k2hpo4_model": "mu = mu_water + rho_K2HPO4 ((mu/rho)_K2HPO4 - d (mu/rho)_water); "
                        "density = (HU - a) / (b k), k = HU per mg/cm³ at E",
        "mass_attenuation_cm2_g": {("air" if m == AIR else m): float(mass_attenuation(m, E))
                                   for m in mats},
        "tissue_composition": "ICRU-44 (NIST Table 2)",
        "attenuation_data": f"xraydb {xraydb.__version__} (Elam tables, total incl. coherent)",
    }
    cov, dof = _effective_energy_covariance(used, res, spec.water_displacement)
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantomless",
                       tissues=tissues, coefficients={"model": "effective_energy"},
                       effective_energy=info,
                       **_uncertainty(cov, dof, len(used), "tissues (3 fitted parameters)"))


def _effective_energy_covariance(used: list[dict], res: dict, displacement: float):
    """Covariance of (intercept, slope) of the effective-energy line: the fit ``HU_i = a +
    b HU_t,i(E)`` has three parameters (a, b, E); their covariance s² (JᵀJ)⁻¹ (Gauss-Newton,
    s² on n − 3 degrees of freedom) is carried to ``slope = 1 / (b k(E))``, ``intercept =
    -a / (b k(E))`` to first order. None with fewer than 4 tissues."""
    n = len(used)
    if n < 4:
        return None, 0
    names = [t["name"] for t in used]
    m = np.array([t["median_hu"] for t in used])
    E, a, b = res["energy_kev"], res["a"], res["b"]
    h = 0.25

    def T(e):
        return np.array([float(theoretical_hu(_material(nm), e)) for nm in names])

    t0, dT = T(E), (T(E + h) - T(E - h)) / (2 * h)
    J = np.stack([np.ones(n), t0, b * dT], axis=1)
    s2 = float(((m - (a + b * t0)) ** 2).sum()) / (n - 3)
    cov_abe = s2 * np.linalg.pinv(J.T @ J)

    def line(p):
        k = float(k2hpo4_hu_per_mg(p[2], displacement))
        return np.array([-p[0] / (p[1] * k), 1.0 / (p[1] * k)])

    p0 = np.array([a, b, E])
    steps = np.array([1e-3, 1e-6, h])
    G = np.stack([(line(p0 + dp) - line(p0 - dp)) / (2 * dp[i])
                  for i, dp in enumerate(np.diag(steps))], axis=1)
    return G @ cov_abe @ G.T, n - 3


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
                       uncertainty_note="fixed calibration: taken as exact (no fit)",
                       method="fixed")


#: Colours of the tissues in the QC picture.
TISSUE_COLOURS = {"air": "tab:blue", "fat": "gold", "muscle": "tab:red", "blood": "tab:purple",
                  "cortical_bone": "tab:green"}


def plot_calibration(cal: Calibration, path, title: str = "", hu_zyx: np.ndarray | None = None,
                     masks: dict | None = None, axis: int = 0,
                     index: int | None = None) -> None:
    """Picture of the fit (one png).

    First panel: the phantom rods' mean HU (phantom) or the reference tissues' median HU
    (phantomless, named on the line) against their density, with the fitted line; tissues
    measured in a phantom scan are drawn (not fitted) at their phantom-calibrated density.
    Effective-energy calibrations add two panels: each tissue's median HU against its
    theoretical HU at the effective energy with the fitted line (tissues left out, e.g.
    contrast-enhanced blood, as open symbols), and the RMS fit error against energy.
    Last panel, when ``hu_zyx`` and ``masks`` (tissue -> voxel mask) are given: the CT slice
    ``index`` along numpy ``axis`` (the axial one, see :func:`axial_axis`; middle when None)
    in grey (-200..1500 HU) with the tissue voxels overlaid in colour."""
    from matplotlib.figure import Figure
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    panel = hu_zyx is not None and bool(masks)
    ee = cal.effective_energy
    n = 1 + (2 if ee else 0) + (1 if panel else 0)
    if n <= 2:
        fig = Figure(figsize=(4.75 * n, 4.0))
        axes = fig.subplots(1, n)
        axes = np.atleast_1d(axes)
    else:
        fig = Figure(figsize=(9.5, 8.0))
        axes = fig.subplots(2, 2)
        axes = axes.ravel()
    ax = axes[0]
    found = [t for t in cal.tissues if t.get("used", t.get("found"))]
    pts = []
    if cal.rods:
        hu = np.array([r["mean_hu"] for r in cal.rods])
        rho = np.array([r["density_mg_cm3"] for r in cal.rods])
        ax.plot(hu, rho, "o", label="phantom rods")
        pts.append(hu)
    if found:
        fitted = cal.method == "phantomless"
        for t in found:
            y = (t["reference_mg_cm3"] if fitted and not ee else t["calibrated_mg_cm3"])
            ax.plot(t["median_hu"], y, "s" if fitted else "D",
                    mfc=TISSUE_COLOURS[t["name"]] if fitted else "none",
                    mec=TISSUE_COLOURS[t["name"]], ms=7)
            ax.annotate(t["name"], (t["median_hu"], y), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        pts.append(np.array([t["median_hu"] for t in found]))
        ax.plot([], [], "s" if fitted else "D", mfc="grey" if fitted else "none", mec="grey",
                label=("reference tissues (on the K2HPO4 line)" if ee else
                       "reference tissues" if fitted else "tissues (not fitted)"))
    if pts:
        allhu = np.concatenate(pts)
        pad = 0.05 * (allhu.max() - allhu.min()) + 20
        xs = np.linspace(allhu.min() - pad, allhu.max() + pad, 10)
    else:
        xs = np.linspace(-100, 400, 10)
    ax.plot(xs, cal.intercept + cal.slope * xs, "-", color="k", lw=1,
            label=f"ρ = {cal.intercept:.2f} + {cal.slope:.4f}·HU\nR² = {cal.r2:.5f}"
            + (f"\nE_eff = {ee['energy_kev']:g} keV" if ee else ""))
    ax.set_xlabel("mean HU (rods) / median HU (tissues)" if found and cal.rods
                  else "median HU" if found else "mean HU")
    ax.set_ylabel("K2HPO4 density (mg/cm³)")
    ax.set_title(title or f"calibration ({cal.method})", fontsize=9)
    ax.legend(fontsize=7)
    if ee:
        ax = axes[1]
        f = ee["fit"]
        for t in cal.tissues:
            if t.get("theoretical_hu") is None or not t.get("found"):
                continue
            c = TISSUE_COLOURS[t["name"]]
            ax.plot(t["theoretical_hu"], t["median_hu"], "s", mec=c,
                    mfc=c if t["used"] else "none", ms=7)
            ax.annotate(t["name"] + ("" if t["used"] else " (left out)"),
                        (t["theoretical_hu"], t["median_hu"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        xt = np.array([t["theoretical_hu"] for t in cal.tissues
                       if t.get("theoretical_hu") is not None and t.get("found")])
        xx = np.linspace(min(xt.min(), 0) - 50, max(xt.max(), 0) + 50, 10)
        ax.plot(xx, f["a"] + f["b"] * xx, "-", color="k", lw=1,
                label=f"HU = {f['a']:.1f} + {f['b']:.4f}·HU_t\nR² = {f['r2']:.5f}")
        ax.set_xlabel(f"theoretical HU at {ee['energy_kev']:g} keV (ICRU-44, xraydb)")
        ax.set_ylabel("measured median HU")
        ax.set_title("tissues: measured vs theoretical HU", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[2]
        ax.plot(ee["energies_kev"], ee["rms_residual_hu"], "-", color="k", lw=1)
        ax.axvline(ee["energy_kev"], color="tab:red", lw=1,
                   label=f"effective energy {ee['energy_kev']:g} keV")
        ax.set_yscale("log")
        ax.set_xlabel("energy (keV)")
        ax.set_ylabel("RMS fit error (HU)")
        ax.set_title(f"fit error against energy ({f['n_tissues']} tissues)", fontsize=9)
        ax.legend(fontsize=7)
    if panel:
        ax2 = axes[-1]
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
