"""Attenuation physics of the effective-energy calibration and the demo generator: tissue
compositions (ICRP adipose, ICRU-44 muscle, blood and cortical bone), mass attenuation from
xraydb, theoretical HU of a tissue and of K2HPO4 in water at an effective energy (:mod:`qctfea.imaging.calibration` describes the method).
"""

from __future__ import annotations

import functools

import numpy as np

from qctfea.errors import QctfeaError


#: Elemental composition (mass fractions) and density (g/cm³) of the reference tissues, as
#: tabulated by NIST (Hubbell & Seltzer, X-Ray Mass Attenuation Coefficients, NIST Standard
#: Reference Database 126, Table 2): "Adipose Tissue (ICRP)" (ICRP Publication 23), "Muscle,
#: Skeletal (ICRU-44)", "Blood, Whole (ICRU-44)", "Bone, Cortical (ICRU-44)". Fat is the ICRP
#: adipose tissue (0.92 g/cm³), not ICRU-44's (0.95 g/cm³): real fat reads -100 to -105 HU
#: on the two real scans (the usual value at 120 kVp), which ICRU-44 adipose reaches only at
#: 50-55 keV (-77 HU at 70 keV) and ICRP adipose at 67-73 keV (-103.5 HU at 70 keV), the
#: effective energies of 120 kVp CT; with ICRU-44 adipose the effective-energy calibration
#: put both real scans at 51-55 keV and their slopes 35-40 % below the tissue regression's
#: (docs/calibration.md). xraydb has no named tissues, so the compositions are given here;
#: the attenuation coefficients of every element come from xraydb (:func:`mass_attenuation`).
TISSUES = {
    "fat": ({"H": 0.119477, "C": 0.637240, "N": 0.007970, "O": 0.232333, "Na": 0.0005,
             "Mg": 0.00002, "P": 0.00016, "S": 0.00073, "Cl": 0.00119, "K": 0.00032,
             "Ca": 0.00002, "Fe": 0.00002, "Zn": 0.00002}, 0.92),
    "muscle": ({"H": 0.102, "C": 0.143, "N": 0.034, "O": 0.710, "Na": 0.001, "P": 0.002,
                "S": 0.003, "Cl": 0.001, "K": 0.004}, 1.05),
    "blood": ({"H": 0.102, "C": 0.110, "N": 0.033, "O": 0.745, "Na": 0.001, "P": 0.001,
               "S": 0.002, "Cl": 0.003, "K": 0.002, "Fe": 0.001}, 1.06),
    "cortical_bone": ({"H": 0.034, "C": 0.155, "N": 0.042, "O": 0.435, "Na": 0.001,
                       "Mg": 0.002, "P": 0.103, "S": 0.003, "Ca": 0.225}, 1.92),
}
#: Source of each reference tissue's composition and density (recorded in calibration.json).
TISSUE_SOURCES = {"fat": "Adipose Tissue (ICRP), NIST SRD 126 Table 2",
                  "muscle": "Muscle, Skeletal (ICRU-44), NIST SRD 126 Table 2",
                  "blood": "Blood, Whole (ICRU-44), NIST SRD 126 Table 2",
                  "cortical_bone": "Bone, Cortical (ICRU-44), NIST SRD 126 Table 2"}


#: Materials by chemical formula (xraydb parses it): mass attenuation needs no density.
FORMULAS = {"water": "H2O", "k2hpo4": "K2HPO4", "triglyceride": "C57H104O6",
            "polyethylene": "C2H4"}


#: Dry air (xraydb's named material 'air', density 1.225 mg/cm³).
AIR = "air"

#: Water displaced per gram of K2HPO4 (g/g) in the two-component model: the constant of the
#: QCT PRO equations (sigma_CT = sigma_ref - 0.2174, see :func:`k2hpo4_water_fit`).
QCT_PRO_WATER_DISPLACEMENT = 0.2174

#: Density (g/cm³) at which each tissue's theoretical HU is computed.
TISSUE_DENSITY = {k: v[1] for k, v in TISSUES.items()}


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
    formula = (_formula_of(TISSUES[material][0]) if material in TISSUES
               else FORMULAS[material])
    # material_mu gives the linear coefficient (1/cm) at the given density: at 1 g/cm³ it
    # equals the mass attenuation coefficient (cm²/g).
    return np.atleast_1d(xraydb.material_mu(formula, e_ev, density=1.0, kind="total"))


def mass_attenuation(material: str, energy_kev) -> np.ndarray:
    """Mass attenuation coefficient mu/rho (cm²/g, coherent + incoherent + photoelectric;
    xraydb, Elam et al. tables) of ``material`` (a key of :data:`TISSUES`, of
    :data:`FORMULAS`, or 'air') at ``energy_kev`` (scalar or array)."""
    e = np.atleast_1d(np.asarray(energy_kev, float))
    out = _mass_attenuation(material, tuple(np.round(e, 6)))
    return out if np.ndim(energy_kev) else float(out[0])


def linear_attenuation(material: str, energy_kev, density: float | None = None):
    """Linear attenuation coefficient (1/cm) at ``density`` (g/cm³; the tissue's tabulated
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
    """Theoretical HU of a material (its tabulated density unless given) at ``energy_kev``."""
    return hu_of_mu(linear_attenuation(material, energy_kev, density), energy_kev)


def k2hpo4_hu_per_mg(energy_kev, displacement: float = QCT_PRO_WATER_DISPLACEMENT):
    """HU per mg/cm³ of K2HPO4 in water at ``energy_kev`` (two-component model, see the module
    docstring): ``((mu/rho)_K2HPO4 - d (mu/rho)_water) / (mu_water - mu_air)``, d =
    ``displacement`` (g of water displaced per g of K2HPO4)."""
    mk = mass_attenuation("k2hpo4", energy_kev)
    mw = mass_attenuation("water", energy_kev)
    return (mk - displacement * mw) / (linear_attenuation("water", energy_kev)
                                       - linear_attenuation(AIR, energy_kev))
