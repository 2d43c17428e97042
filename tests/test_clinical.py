"""The clinical categories (qctfea.cohort.clinical) against hand-computed cases, boundaries included,
and the sample sheet's sex column."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from qctfea.cohort import clinical
from qctfea.cohort.clinical import ClinicalParams, clinical_params
from qctfea.errors import QctfeaError
from qctfea.cohort.samples import read_sample_sheet

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- strength


@pytest.mark.parametrize(("strength", "sex", "expected"), [
    # women (Keaveny et al. 2020, Table 1, spine): fragile <= 4500 < low < 6000 <= normal
    (1200.0, "F", "fragile"),
    (4500.0, "F", "fragile"),
    (4500.5, "F", "low"),
    (5999.0, "F", "low"),
    (6000.0, "F", "normal"),
    (9000.0, "F", "normal"),
    # men: fragile <= 6500 < low < 8500 <= normal
    (4500.5, "M", "fragile"),
    (6000.0, "M", "fragile"),
    (6500.0, "M", "fragile"),
    (6501.0, "M", "low"),
    (8499.0, "M", "low"),
    (8500.0, "M", "normal"),
    # no sex: never a guess, whatever the strength
    (1000.0, "", clinical.UNKNOWN_SEX),
    (9000.0, "", clinical.UNKNOWN_SEX),
    # no strength
    (math.nan, "F", clinical.NO_STRENGTH),
    (None, "M", clinical.NO_STRENGTH),
])
def test_strength_category(strength, sex, expected) -> None:
    assert clinical.strength_category(strength, sex) == expected


def test_same_strength_differs_by_sex() -> None:
    """7000 N: normal for a woman (>= 6000), low for a man (6500 < 7000 < 8500)."""
    assert clinical.strength_category(7000, "F") == "normal"
    assert clinical.strength_category(7000, "M") == "low"
    assert clinical.strength_category(7000, "") == "unknown (sex not given)"


# --------------------------------------------------------------------------- vBMD


@pytest.mark.parametrize(("vbmd", "expected"), [
    # ACR: osteoporosis < 80 <= low bone mass <= 120 < normal
    (-5.0, "osteoporosis"),
    (79.99, "osteoporosis"),
    (80.0, "low bone mass"),
    (100.0, "low bone mass"),
    (120.0, "low bone mass"),
    (120.01, "normal"),
    (180.0, "normal"),
    (math.nan, clinical.NO_VBMD),
    ("", clinical.NO_VBMD),
])
def test_vbmd_category(vbmd, expected) -> None:
    assert clinical.vbmd_category(vbmd) == expected


# --------------------------------------------------------------------------- configuration


def test_configured_thresholds_replace_only_the_keys_given() -> None:
    p = clinical_params({"strength_thresholds_n": {"male": {"normal": 8000}},
                         "vbmd_thresholds_mg_cm3": {"osteoporosis": 70}})
    assert p.strength_thresholds_n == {"female": {"fragile": 4500.0, "normal": 6000.0},
                                       "male": {"fragile": 6500.0, "normal": 8000.0}}
    assert p.vbmd_thresholds_mg_cm3 == {"osteoporosis": 70.0, "normal": 120.0}
    assert clinical.strength_category(8000, "M", p) == "normal"  # 8000 >= 8000
    assert clinical.strength_category(8000, "M") == "low"  # published: 8000 < 8500
    assert clinical.vbmd_category(75, p) == "low bone mass"  # 70 <= 75
    assert clinical.vbmd_category(75) == "osteoporosis"  # published: 75 < 80
    assert clinical_params(None) == ClinicalParams()


@pytest.mark.parametrize(("section", "message"), [
    ({"strength_thresholds_n": {"female": {"fragile": 6000, "normal": 5000}}},
     "strength_thresholds_n.female: fragile (6000) must be below normal (5000)"),
    ({"strength_thresholds_n": {"female": {"fragile": 7000}}},
     "fragile (7000) must be below normal (6000)"),
    ({"vbmd_thresholds_mg_cm3": {"osteoporosis": 120, "normal": 120}},
     "osteoporosis (120) must be below normal (120)"),
    ({"strength_thresholds_n": {"women": {"fragile": 4000}}}, "unknown key(s) ['women']"),
    ({"strength_thresholds_n": {"male": {"low": 8000}}}, "unknown key(s) ['low']"),
    ({"strength_thresholds_n": {"male": {"fragile": "6500"}}}, "is not a number > 0"),
    ({"strength_thresholds_n": {"male": {"fragile": True}}}, "is not a number > 0"),
    ({"vbmd_thresholds_mg_cm3": {"normal": -1}}, "is not a number > 0"),
    ({"vbmd_thresholds_mg_cm3": {"normal": math.inf}}, "is not a number > 0"),
    ({"vbmd_thresholds_mg_cm3": [80, 120]}, "must be a mapping"),
    ({"thresholds": {}}, "unknown key(s) ['thresholds']"),
])
def test_bad_configuration_is_refused_naming_the_key(section, message) -> None:
    with pytest.raises(QctfeaError) as exc:
        clinical_params(section)
    assert message in str(exc.value) and "clinical" in str(exc.value)


def test_schema_accepts_and_refuses_what_the_library_does() -> None:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "cohort.schema.yaml").read_text())
    v = Draft202012Validator(schema)
    ok = {"samples": "s.tsv", "clinical": {
        "strength_thresholds_n": {"female": {"fragile": 4000, "normal": 5500}},
        "vbmd_thresholds_mg_cm3": {"osteoporosis": 70, "normal": 110}}}
    assert v.is_valid(ok)
    clinical_params(ok["clinical"])
    for bad in ({"strength_thresholds_n": {"female": {"low": 5000}}},
                {"strength_thresholds_n": {"other": {"fragile": 5000}}},
                {"vbmd_thresholds_mg_cm3": {"normal": "120"}},
                {"vbmd_thresholds_mg_cm3": {"normal": 0}},
                {"categories": True}):
        assert not v.is_valid({"samples": "s.tsv", "clinical": bad}), bad
        with pytest.raises(QctfeaError):
            clinical_params(bad)


# --------------------------------------------------------------------------- sources


def test_sources_name_the_reference_and_the_thresholds_applied() -> None:
    women = clinical.strength_source("F")
    assert "Keaveny et al. 2020" in women and "women" in women
    assert "fragile <= 4500 N < low < 6000 N <= normal" in women
    assert "fragile <= 6500 N < low < 8500 N <= normal" in clinical.strength_source("M")
    assert "differ by sex" in clinical.strength_source("")
    acr = clinical.vbmd_source()
    assert "ACR" in acr and "osteoporosis < 80 <= low bone mass <= 120 < normal" in acr
    # configured thresholds are named as such, for the sex whose values changed only
    p = clinical_params({"strength_thresholds_n": {"male": {"fragile": 6000}}})
    assert clinical.strength_source("F", p) == women
    men = clinical.strength_source("M", p)
    assert men.startswith("configured thresholds") and "fragile <= 6000 N" in men
    assert "Keaveny" not in men
    assert clinical.strength_source("", p).startswith("configured thresholds")
    assert "Osteoporos Int 2020;31:1025-1048" in clinical.BCT_SOURCE
    assert "VirtuOst" in clinical.CAVEAT and "not calibrated" in clinical.CAVEAT


def test_categories_of_one_scan() -> None:
    assert clinical.categories(5200.0, 95.0, "F") == {
        "sex": "F", "strength_category": "low",
        "strength_category_source": clinical.strength_source("F"),
        "vbmd_category": "low bone mass", "vbmd_category_source": clinical.vbmd_source()}


# --------------------------------------------------------------------------- sample sheet

SEX_VALUES = {"F": "F", "f": "F", "female": "F", "FEMALE": "F", " Female ": "F", "M": "M",
              "m": "M", "male": "M", "Male": "M", "": ""}


@pytest.mark.parametrize(("value", "code"), list(SEX_VALUES.items()))
def test_sex_code(value, code) -> None:
    assert clinical.sex_code(value) == code


@pytest.mark.parametrize("value", ["w", "x", "FM", "fem", "1", "unknown", "mâle"])
def test_sex_code_refuses_other_values(value) -> None:
    with pytest.raises(ValueError, match="is not a sex: give F or M"):
        clinical.sex_code(value)


def test_sample_schema_agrees_with_the_library_on_sex() -> None:
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "samples.schema.yaml").read_text())
    prop = schema["properties"]["sex"]
    v = Draft202012Validator(prop)
    for value in SEX_VALUES:
        assert v.is_valid(value.strip()), value  # the workflow strips cells
    for value in ("w", "x", "FM", "fem", "unknown"):
        assert not v.is_valid(value), value


def _sheet(path: Path, sexes: list[str] | None) -> Path:
    head = ["patient", "timepoint", "months", "image", "labels"] + (["sex"] if sexes else [])
    rows = [["P01", "M00", "0", "a", "b"], ["P01", "M12", "12", "a", "b"],
            ["P02", "M00", "0", "a", "b"]]
    lines = ["\t".join(head)] + ["\t".join(r + ([sexes[i]] if sexes else []))
                                 for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sample_sheet_reads_sex(tmp_path: Path) -> None:
    df = read_sample_sheet(_sheet(tmp_path / "s.tsv", ["female", "F", ""]))
    assert df["sex"].tolist() == ["F", "F", ""]
    df = read_sample_sheet(_sheet(tmp_path / "s.tsv", ["Male", "m", "F"]))
    assert df["sex"].tolist() == ["M", "M", "F"]
    assert read_sample_sheet(_sheet(tmp_path / "s.tsv", None))["sex"].tolist() == [""] * 3


def test_sample_sheet_refuses_a_bad_sex_naming_the_line(tmp_path: Path) -> None:
    with pytest.raises(QctfeaError, match=r"s\.tsv, line 3, column sex: 'w' is not a sex"):
        read_sample_sheet(_sheet(tmp_path / "s.tsv", ["F", "w", "M"]))
    with pytest.raises(QctfeaError, match=r"patient P01 has different sexes \(line 2: F, "
                                          r"line 3: M\)"):
        read_sample_sheet(_sheet(tmp_path / "s.tsv", ["F", "male", "M"]))
