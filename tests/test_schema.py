"""One source of truth between the cohort schema, the library and config/README.md.

The sections are found from the library itself: every ``params_from(<dataclass>, ...,
"<section>")`` call in ``src/qctfea`` names a dataclass and the config section it reads.
For each, the schema's properties of that section must be exactly the dataclass's
fields (a key the schema accepts reaches the library, and every library parameter can be
set), each field's default must be valid under its property (types agree), and every
key must be documented in config/README.md's table."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "qctfea"
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "cohort.schema.yaml").read_text())


def _class_modules() -> dict[str, str]:
    """Class name -> module (qctfea.<...>) for every class defined in src/qctfea."""
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        mod = "qctfea." + ".".join(f.relative_to(SRC).with_suffix("").parts)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef):
                out.setdefault(node.name, mod)
    return out


def config_sections() -> dict[str, str]:
    """``{section: "module:Class"}`` of every params_from call in the library."""
    classes = _class_modules()
    found: dict[str, str] = {}
    for f in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.Call) and len(node.args) >= 3):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            where = node.args[2]
            if name != "params_from" or not isinstance(where, ast.Constant):
                continue
            cls = node.args[0]
            cls_name = cls.attr if isinstance(cls, ast.Attribute) else cls.id
            path = f"{classes[cls_name]}:{cls_name}"
            assert found.setdefault(where.value, path) == path, (
                f"config section {where.value!r} read into both {found[where.value]} and "
                f"{path} ({f.name})")
    return found


SECTIONS = config_sections()


def _dataclass(path: str):
    mod, name = path.split(":")
    return getattr(importlib.import_module(mod), name)


def _schema_node(section: str) -> dict:
    node = SCHEMA
    for part in section.split("."):
        node = node.get("properties", {}).get(part)
        assert node is not None, f"workflow/schemas/cohort.schema.yaml has no section {section}"
    return node


def _readme_keys() -> dict[str, set[str]]:
    """``{section: {key, ...}}`` documented in config/README.md's table (first column:
    `section.key`, then `key2` or `.key2` of the same section; `section.*` = all keys)."""
    out: dict[str, set[str]] = {}
    for line in (REPO / "config" / "README.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        section = None
        for tok in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if section is None or ("." in tok.lstrip(".") and not tok.startswith(".")):
                section, _, key = tok.rpartition(".")
            else:
                key = tok.lstrip(".")
            out.setdefault(section, set()).add(key)
    return out


def test_the_library_reads_the_expected_sections():
    """The discovery itself: the sections every cohort config may hold."""
    assert {"mask", "screw", "planning", "bmd", "registration", "mesh", "materials", "loads",
            "ingest", "calibration.phantom", "calibration.phantomless",
            "demo.synth", "clinical"} <= set(SECTIONS), SECTIONS


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_section_equals_dataclass(section):
    cls = _dataclass(SECTIONS[section])
    node = _schema_node(section)
    fields = {f.name for f in dataclasses.fields(cls)}
    props = set(node.get("properties", {}))
    assert node.get("additionalProperties") is False, (
        f"schema section {section}: additionalProperties must be false")
    assert props == fields, (
        f"schema section {section} vs {SECTIONS[section]}: only in the schema "
        f"{sorted(props - fields)}, only in the library {sorted(fields - props)}")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_library_defaults_are_valid_under_the_schema(section):
    """Each default (and null where the field allows None) passes its property's schema."""
    cls = _dataclass(SECTIONS[section])
    default = cls()
    node = _schema_node(section)
    bad = []
    for f in dataclasses.fields(cls):
        prop = node.get("properties", {}).get(f.name)
        if prop is None:
            continue
        value = yaml.safe_load(yaml.safe_dump(_plain(getattr(default, f.name))))
        errors = list(Draft202012Validator({**prop, "$defs": SCHEMA.get("$defs", {})})
                      .iter_errors(value))
        if errors:
            bad.append(f"{f.name}={value!r}: {errors[0].message}")
        if "None" in str(f.type) and not Draft202012Validator(
                {**prop, "$defs": SCHEMA.get("$defs", {})}).is_valid(None):
            bad.append(f"{f.name}: the library accepts null, the schema does not")
    assert not bad, f"schema section {section}: " + "; ".join(bad)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_is_documented(section):
    cls = _dataclass(SECTIONS[section])
    documented = _readme_keys().get(section, set())
    if "*" in documented:
        return
    missing = sorted({f.name for f in dataclasses.fields(cls)} - documented)
    assert not missing, f"config/README.md documents no {section}.{{{', '.join(missing)}}}"


def test_enums_follow_the_library():
    from qctfea.model import materials
    from qctfea.fea import plasticity

    mat = _schema_node("materials")["properties"]
    assert set(mat["law"]["enum"]) == set(materials.LAWS) | {"custom"}
    assert set(mat["yield_law"]["enum"]) == {
        k for k, v in materials.LAWS.items() if v[1] is not None} | {"none"}
    loads = _schema_node("loads")["properties"]
    assert set(loads["constitutive"]["enum"]) == set(plasticity.CONSTITUTIVE_MODELS)


def test_every_cohort_config_of_the_repository_is_valid():
    validator = Draft202012Validator(SCHEMA)
    for cfg in sorted([*(REPO / "config" / "cohorts").glob("*/config.yaml"),
                       *(REPO / "tests" / "cohorts").glob("*/config.yaml")]):
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(cfg.read_text()))]
        assert not errors, f"{cfg}: {errors}"
