"""Calibration phantoms (config section ``calibration.phantom``): the presets of the QCT
phantoms used in spine studies with their rod values and sources, what their densities are
of (K2HPO4 or hydroxyapatite), and the phantom's settings (:class:`PhantomSpec`). The
calibration itself is :func:`qctfea.imaging.calibration.phantom_calibration`; finding the
rods, :mod:`qctfea.imaging.phantomrods` (docs/calibration.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from qctfea.config import option
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
        "equivalent": "k2hpo4",
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
        "equivalent": "hydroxyapatite",
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
        "equivalent": "hydroxyapatite",
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
        "equivalent": "k2hpo4",
        "rod_densities_mg_cm3": [0.0, 50.0, 100.0, 150.0, 200.0],
        "water_equivalent_mg_cm3": None,
        "rod_diameter_mm": 12.0,
        "source": "qctfea.demo.synth.SynthParams (rod_densities_mg_cm3, rod_diameter_mm): the "
                  "phantom of the demo cohorts, rendered by the generator; not a real phantom",
    },
}


#: The keys of a preset that are PhantomSpec fields (the others document it).
_PRESET_KEYS = ("rod_densities_mg_cm3", "water_equivalent_mg_cm3", "rod_diameter_mm",
                "equivalent")

#: What a phantom's rod densities are of (``calibration.phantom.equivalent``): the density
#: the calibrated scan then holds.
EQUIVALENTS = ("k2hpo4", "hydroxyapatite")


def require_ash_relation(spec: "PhantomSpec", materials_cfg: dict) -> None:
    """A hydroxyapatite phantom calibrates to hydroxyapatite-equivalent density, which the
    materials step's default conversion to ash density (a K2HPO4 relation) does not fit:
    refuse such a cohort unless its ``materials`` section gives both ``ash_slope`` and
    ``ash_intercept``."""
    missing = [k for k in ("ash_slope", "ash_intercept") if k not in materials_cfg]
    if spec.equivalent == "hydroxyapatite" and missing:
        name = f"preset {spec.preset}" if spec.preset else "equivalent: hydroxyapatite"
        raise QctfeaError(
            f"calibration.phantom ({name}) gives hydroxyapatite-equivalent density, but the "
            "materials laws' conversion to ash density is a K2HPO4 relation by default "
            "(materials.ash_slope, ash_intercept); give materials."
            f"{' and materials.'.join(missing)} for hydroxyapatite-calibrated CT (from your "
            "own ashing data or a published relation; docs/calibration.md)")


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

    preset: str | None = option(
        None, enum=list(PHANTOM_PRESETS),
        doc=("a known phantom ([docs/calibration.md](../docs/calibration.md)): "
             "`mindways_model3` (K2HPO4 rods A–E with their water equivalents, QCT PRO "
             "equations), `qrm_bdc_6`, `qrm_bdc_3` (hydroxyapatite), `demo_k2hpo4` (the demo "
             "generator's phantom). Keys given beside it override the preset's (your "
             "certificate's values). The Mindways and QRM presets state no rod diameter (none "
             "published in a source we could check): it is measured in the scan unless "
             "`rod_diameter_mm` is given"))
    rod_densities_mg_cm3: list[float] | None = option(
        None, minItems=2, shown="from the preset; no default",
        doc=("known densities of the rods (K2HPO4 or hydroxyapatite equivalent, mg/cm³), any "
             "order"))
    equivalent: str | None = option(
        None, enum=list(EQUIVALENTS), shown="from the preset; else `k2hpo4`",
        doc=("what the rods' densities are of, and so the calibrated density: `k2hpo4` "
             "(Mindways and most QCT phantoms) or `hydroxyapatite` (QRM BDC, European Spine "
             "Phantom). Recorded in calibration.json. The materials laws' conversion to ash "
             "density (`materials.ash_slope`, `ash_intercept`) defaults to a K2HPO4 relation, "
             "so a cohort with a hydroxyapatite phantom must set both (a relation for "
             "hydroxyapatite-calibrated CT, from your own ashing data or a published one): "
             "the dry-run refuses it otherwise"))
    rod_diameter_mm: float | None = option(
        None, exclusiveMinimum=0, shown="from the preset; else measured in the scan",
        doc=("rod diameter (mm), used to find and measure the rods; not given (and not in "
             "the preset), the rods are searched at diameters from 5 to 30 mm and it is "
             "measured from the rods found (recorded per rod in calibration.json); needed "
             "with `rod_centres_mm`"))
    #: rod vs surroundings contrast used to find rods
    min_contrast_hu: float = option(
        40.0, exclusiveMinimum=0,
        doc=("least contrast (HU, either sign) of a rod against the phantom body around it, "
             "for finding rods; lower it for a rod close to the body's HU"))
    #: fraction of the rod radius measured (avoids blur)
    core_fraction: float = option(
        0.6, exclusiveMinimum=0, maximum=1, doc="fraction of the rod radius measured")
    warn_r2: float = option(0.98, minimum=0, maximum=1, doc="R² gates")
    fail_r2: float = option(0.90, minimum=0, maximum=1, row="warn_r2")
    #: water-equivalent density (mg/cm³) of each rod, in the order of
    #: ``rod_densities_mg_cm3``, for a K2HPO4-in-water phantom (Mindways Model 3: from the
    #: phantom's calibration certificate). Given, the fit follows the QCT PRO equations
    #: (see :func:`k2hpo4_water_fit`); None: a straight line through the rods.
    water_equivalent_mg_cm3: list[float] | None = option(
        None, shown="from the preset; null",
        doc=("a K2HPO4-in-water phantom (e.g. Mindways Model 3): each rod's water-equivalent "
             "density from the phantom's certificate, in the order of `rod_densities_mg_cm3`; "
             "the fit then follows the QCT PRO equations (HU − ρ_water = σ_ref·ρ_K2HPO4 + "
             "β_ref; σ_CT = σ_ref − 0.2174, β_CT = β_ref + 999.6; ρ = (HU − β_CT)/σ_CT), "
             "recorded under `coefficients` in calibration.json. A hydroxyapatite phantom "
             "(e.g. 0/50/100/150/200 mg/cm³ HA rods) or any other solid-rod phantom is a plain "
             "`rod_densities_mg_cm3` list"))
    #: rod centres [x, y] in the scan's physical coordinates (mm), in the order of
    #: ``rod_densities_mg_cm3``; given, the rods are measured there instead of being found
    rod_centres_mm: list[list[float]] | None = option(
        None, items={"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}},
        doc=("rod centres `[x, y]` in the scan's physical coordinates (mm), in the order of "
             "`rod_densities_mg_cm3`: the rods are measured there (over every slice) instead "
             "of being found automatically"))

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
        if self.equivalent is None:
            self.equivalent = "k2hpo4"
        if len(self.rod_densities_mg_cm3) < 2:
            raise QctfeaError(f"{where}.rod_densities_mg_cm3: give at least 2 rods")
        if self.rod_diameter_mm is not None and not self.rod_diameter_mm > 0:
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
        # without a diameter it is measured in the scan (phantomrods.find_rods), from rods found
        if self.rod_centres_mm is not None and self.rod_diameter_mm is None:
            raise QctfeaError(
                f"{where}.rod_centres_mm needs calibration.phantom.rod_diameter_mm (mm) of your "
                "phantom: the rods are measured over their cores, a fraction (core_fraction) "
                "of that diameter")

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
