"""Clinical categories of a scan: vertebral strength and trabecular vBMD.

Two published classifications are applied to every scan of the long table
(:func:`qctfea.cohort.longtable.scan_row`), each reported with its source:

* **vertebral strength** (the FE compression strength, N) by the Biomechanical CT (BCT)
  thresholds of Keaveny et al. 2020 (:data:`BCT_SOURCE`, their Table 1, spine): women
  fragile <= 4500 N, low > 4500 to < 6000 N, normal >= 6000 N; men fragile <= 6500 N, low
  > 6500 to < 8500 N, normal >= 8500 N. The thresholds differ by sex: a scan whose patient
  has no ``sex`` in the sample sheet is :data:`UNKNOWN_SEX`, never a guess.
* **trabecular vBMD** (mg/cm³) by the ACR QCT classes (:data:`ACR_SOURCE`): osteoporosis
  < 80 mg/cm³, low bone mass (osteopenia) 80 to 120 mg/cm³ (both ends included), normal
  > 120 mg/cm³.

Boundaries, as the sources state them: strength <= ``fragile`` is fragile, strength >=
``normal`` is normal, in between low; vBMD < ``osteoporosis`` is osteoporosis, vBMD >
``normal`` is normal, ``osteoporosis`` <= vBMD <= ``normal`` is low bone mass.

The thresholds are configuration (section ``clinical``, :class:`ClinicalParams`). The
categories are indicative only (:data:`CAVEAT`): the BCT thresholds were derived for
VirtuOst's L1/L2 compression model (its own boundary conditions and material law), and
this pipeline's strength of its target vertebra (L4 in the study; its own material law,
platens and mesh) is not calibrated to them; the ACR classes are defined for the clinical
QCT measurement (mean trabecular BMD of two lumbar vertebrae), not for one vertebra's ROI
on this pipeline's calibration. A lab with thresholds calibrated for its model sets them
in the cohort config; the sources columns then say so (:func:`strength_source`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from qctfea.errors import QctfeaError
from qctfea.config import option

#: The BCT source (vertebral strength thresholds, Table 1).
BCT_SOURCE = ("Keaveny TM, Clarke BL, Cosman F, et al. Biomechanical Computed Tomography "
              "analysis (BCT) for clinical assessment of osteoporosis. Osteoporos Int "
              "2020;31:1025-1048 (Table 1, spine)")
#: The ACR source (trabecular spine vBMD classes).
ACR_SOURCE = ("American College of Radiology. ACR-SPR-SSR Practice Parameter for the "
              "Performance of Musculoskeletal Quantitative Computed Tomography (QCT), "
              "revised 2018")
#: Short forms used in the tables' source columns.
BCT_SHORT = "BCT vertebral strength thresholds (Keaveny et al. 2020)"
ACR_SHORT = "ACR QCT trabecular spine vBMD classes (ACR-SPR-SSR practice parameter 2018)"

#: What the categories can and cannot say; shown with them on the pages.
CAVEAT = (
    "Indicative only. The BCT strength thresholds were derived for VirtuOst's L1/L2 "
    "compression model, with its own boundary conditions and material law; this "
    "pipeline's compression strength of its target vertebra (its own material law, platens "
    "and mesh) is not calibrated to them. The ACR classes are defined for the clinical QCT "
    "measurement (mean trabecular BMD of two lumbar vertebrae), not for one vertebra's "
    "trabecular ROI on this pipeline's calibration. The thresholds are configuration "
    "(section clinical of the cohort config), so that a lab can use values calibrated for "
    "its model.")

#: Vertebral strength thresholds (N) of the BCT, per sex: fragile at or below ``fragile``,
#: normal at or above ``normal``, low in between.
BCT_STRENGTH_N: dict[str, dict[str, float]] = {
    "female": {"fragile": 4500.0, "normal": 6000.0},
    "male": {"fragile": 6500.0, "normal": 8500.0},
}
#: Trabecular vBMD thresholds (mg/cm³) of the ACR: osteoporosis below ``osteoporosis``,
#: normal above ``normal``, low bone mass from one to the other (both included).
ACR_VBMD_MG_CM3: dict[str, float] = {"osteoporosis": 80.0, "normal": 120.0}

#: Sample-sheet ``sex`` values (case-insensitive) -> the code kept in the tables.
SEX_CODES: dict[str, str] = {"f": "F", "female": "F", "m": "M", "male": "M"}
#: Sex code -> key of :attr:`ClinicalParams.strength_thresholds_n`.
SEX_KEYS: dict[str, str] = {"F": "female", "M": "male"}

STRENGTH_CATEGORIES = ("fragile", "low", "normal")
VBMD_CATEGORIES = ("osteoporosis", "low bone mass", "normal")
#: The strength category of a scan whose patient has no sex in the sample sheet.
UNKNOWN_SEX = "unknown (sex not given)"
NO_STRENGTH = "unknown (no strength)"
NO_VBMD = "unknown (no vBMD)"


def sex_code(value: object) -> str:
    """``"F"``, ``"M"`` or ``""`` (not given) from a sample-sheet cell: F/M or female/male,
    any case; ``ValueError`` for anything else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    if not text:
        return ""
    try:
        return SEX_CODES[text.lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a sex: give F or M (female/male accepted, any "
                         "case), or leave the cell empty") from None


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise QctfeaError(f"{where} = {value!r} is not a number > 0")
    return float(value)


def _thresholds(given: object, default: dict, lower: str, upper: str, where: str) -> dict:
    """``default`` updated with ``given`` (a mapping of some of its keys); every value a
    number > 0 and ``lower`` < ``upper``."""
    if not isinstance(given, dict):
        raise QctfeaError(f"{where} must be a mapping {{{lower}: ..., {upper}: ...}}, "
                          f"not {given!r}")
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise QctfeaError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(default)}")
    out = {k: _number(given.get(k, v), f"{where}.{k}") for k, v in default.items()}
    if not out[lower] < out[upper]:
        raise QctfeaError(f"{where}: {lower} ({out[lower]:g}) must be below {upper} "
                          f"({out[upper]:g})")
    return out


@dataclass
class ClinicalParams:
    """Thresholds of the clinical categories (config section ``clinical``).

    ``strength_thresholds_n``: ``{female|male: {fragile, normal}}`` in N (default
    :data:`BCT_STRENGTH_N`); ``vbmd_thresholds_mg_cm3``: ``{osteoporosis, normal}`` in
    mg/cm³ (default :data:`ACR_VBMD_MG_CM3`). Keys given replace the defaults, the others
    keep them; the lower threshold must be below the upper one.
    """

    strength_thresholds_n: dict = option(
        factory=lambda: copy.deepcopy(BCT_STRENGTH_N),
        properties={sex: {"type": "object",
                          "properties": {"fragile": {"type": "number", "exclusiveMinimum": 0},
                                         "normal": {"type": "number", "exclusiveMinimum": 0}},
                          "additionalProperties": False} for sex in ("female", "male")},
        additionalProperties=False,
        doc=("vertebral strength category of every scan (long table `strength_category` with "
             "`strength_category_source`, Table 1, summary and patient pages), from its "
             "compression strength and the sample sheet's `sex`: ≤ `fragile` N fragile, ≥ "
             "`normal` N normal, low in between; without a sex \"unknown (sex not given)\", "
             "never a guess. Defaults: the Biomechanical CT (BCT) spine thresholds, Keaveny et "
             "al. 2020 (Osteoporos Int 31:1025–1048, Table 1), derived for VirtuOst's L1/L2 "
             "compression model with its own boundary conditions and material law: this "
             "pipeline's strength (its own material law, platens, mesh) is not calibrated to "
             "them, so the category is indicative; give values calibrated for your model here. "
             "Keys given replace the defaults, the others keep them; `fragile` must be below "
             "`normal` ([docs/science.md](../docs/science.md#clinical-categories))"))
    vbmd_thresholds_mg_cm3: dict = option(
        factory=lambda: dict(ACR_VBMD_MG_CM3),
        properties={"osteoporosis": {"type": "number", "exclusiveMinimum": 0},
                    "normal": {"type": "number", "exclusiveMinimum": 0}},
        additionalProperties=False,
        doc=("trabecular vBMD category of every scan (`vbmd_category`, "
             "`vbmd_category_source`): < `osteoporosis` osteoporosis, from `osteoporosis` to "
             "`normal` (both included) low bone mass (osteopenia), > `normal` normal. "
             "Defaults: the ACR-SPR-SSR practice parameter for musculoskeletal QCT (2018), "
             "defined for the clinical measurement (mean trabecular BMD of two lumbar "
             "vertebrae): indicative for this pipeline's single-vertebra ROI"))

    def __post_init__(self) -> None:
        where = "clinical.strength_thresholds_n"
        given = self.strength_thresholds_n
        if not isinstance(given, dict):
            raise QctfeaError(f"{where} must be a mapping {{female: ..., male: ...}}, "
                              f"not {given!r}")
        unknown = sorted(set(given) - set(BCT_STRENGTH_N))
        if unknown:
            raise QctfeaError(f"{where}: unknown key(s) {unknown}; allowed: "
                              f"{sorted(BCT_STRENGTH_N)}")
        self.strength_thresholds_n = {
            sex: _thresholds(given.get(sex, {}), d, "fragile", "normal", f"{where}.{sex}")
            for sex, d in BCT_STRENGTH_N.items()}
        self.vbmd_thresholds_mg_cm3 = _thresholds(
            self.vbmd_thresholds_mg_cm3, ACR_VBMD_MG_CM3, "osteoporosis", "normal",
            "clinical.vbmd_thresholds_mg_cm3")


def clinical_params(section: dict | None) -> ClinicalParams:
    """The cohort config's ``clinical`` section as :class:`ClinicalParams` (unknown keys,
    wrong types and crossed thresholds are errors naming the key)."""
    from qctfea.steps import params_from

    return params_from(ClinicalParams, section, "clinical")


def _finite(value: object) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def strength_category(strength_n: object, sex: str,
                      params: ClinicalParams | None = None) -> str:
    """``fragile``, ``low`` or ``normal`` for a vertebral strength (N) and a sex code
    (``"F"``/``"M"``; ``""``: :data:`UNKNOWN_SEX`); :data:`NO_STRENGTH` without a value."""
    params = params or ClinicalParams()
    f = _finite(strength_n)
    if f is None:
        return NO_STRENGTH
    if sex not in SEX_KEYS:
        return UNKNOWN_SEX
    t = params.strength_thresholds_n[SEX_KEYS[sex]]
    if f <= t["fragile"]:
        return "fragile"
    return "normal" if f >= t["normal"] else "low"


def vbmd_category(vbmd_mg_cm3: object, params: ClinicalParams | None = None) -> str:
    """``osteoporosis``, ``low bone mass`` or ``normal`` for a trabecular vBMD (mg/cm³);
    :data:`NO_VBMD` without a value."""
    params = params or ClinicalParams()
    f = _finite(vbmd_mg_cm3)
    if f is None:
        return NO_VBMD
    t = params.vbmd_thresholds_mg_cm3
    if f < t["osteoporosis"]:
        return "osteoporosis"
    return "normal" if f > t["normal"] else "low bone mass"


def strength_source(sex: str, params: ClinicalParams | None = None) -> str:
    """Where a scan's strength category comes from, with the thresholds applied: the BCT's
    when they are the published ones, else the configured ones named as such."""
    params = params or ClinicalParams()
    key = SEX_KEYS.get(sex)
    own = (params.strength_thresholds_n != BCT_STRENGTH_N if key is None
           else params.strength_thresholds_n[key] != BCT_STRENGTH_N[key])
    origin = ("configured thresholds (clinical.strength_thresholds_n), not the BCT values"
              if own else BCT_SHORT)
    if key is None:
        return f"{origin}; they differ by sex, which the sample sheet does not give"
    t = params.strength_thresholds_n[key]
    word = "women" if key == "female" else "men"
    return (f"{origin}, {word}: fragile <= {t['fragile']:g} N < low < {t['normal']:g} N "
            "<= normal")


def vbmd_source(params: ClinicalParams | None = None) -> str:
    """Where a scan's vBMD category comes from, with the thresholds applied."""
    params = params or ClinicalParams()
    t = params.vbmd_thresholds_mg_cm3
    origin = ("configured thresholds (clinical.vbmd_thresholds_mg_cm3), not the ACR values"
              if t != ACR_VBMD_MG_CM3 else ACR_SHORT)
    return (f"{origin}: osteoporosis < {t['osteoporosis']:g} <= low bone mass <= "
            f"{t['normal']:g} < normal (mg/cm³)")


def categories(strength_n: object, vbmd_mg_cm3: object, sex: str,
               params: ClinicalParams | None = None) -> dict[str, str]:
    """The long table's clinical columns of one scan: ``sex``, ``strength_category``,
    ``strength_category_source``, ``vbmd_category``, ``vbmd_category_source``."""
    params = params or ClinicalParams()
    return {"sex": sex,
            "strength_category": strength_category(strength_n, sex, params),
            "strength_category_source": strength_source(sex, params),
            "vbmd_category": vbmd_category(vbmd_mg_cm3, params),
            "vbmd_category_source": vbmd_source(params)}
