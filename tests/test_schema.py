"""One source of truth between the parameter classes, the cohort schema and config/README.md.

The parameter classes' fields (``qctfea.config.option``: default, constraints, doc) are the
source; ``workflow/schemas/cohort.schema.yaml`` and the option table of config/README.md
are generated from them by ``python -m qctfea.config --write``. These tests read the
committed files as they are: they fail when a file drifts from the classes, when a
documented key is refused (by the schema or by ``params_from``) or an accepted key is
undocumented, and when an unknown key or a wrong value is not refused with a useful message.
The config sections are also found independently of ``qctfea.config.SECTIONS``: every
``params_from(<dataclass>, ..., "<section>")`` call in ``src/qctfea``."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shutil
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from qctfea import config
from qctfea.config import params_from
from qctfea.errors import QctfeaError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "qctfea"
SCHEMA_FILE = REPO / "workflow" / "schemas" / "cohort.schema.yaml"
README_FILE = REPO / "config" / "README.md"
SCHEMA = yaml.safe_load(SCHEMA_FILE.read_text())
REGENERATE = "run `python -m qctfea.config --write` (with src on PYTHONPATH) and commit"


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


def _schema_node(dotted: str, schema: dict = SCHEMA) -> dict | None:
    node = schema
    for part in dotted.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return None
    return node


def _readme_table() -> str:
    text = README_FILE.read_text()
    assert text.count(config.BEGIN) == 1 and text.count(config.END) == 1, (
        f"config/README.md needs one {config.BEGIN} and one {config.END} line")
    return text.split(config.BEGIN)[1].split(config.END)[0].strip("\n") + "\n"


def _readme_keys() -> dict[str, set[str]]:
    """``{section: {key, ...}}`` documented in config/README.md's table (first column:
    `section.key`, then `key2` or `.key2` of the same section; `section.*` = any key)."""
    out: dict[str, set[str]] = {}
    for line in _readme_table().splitlines():
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


def _documented() -> list[str]:
    return sorted(f"{s}.{k}" if s else k for s, keys in _readme_keys().items() for k in keys)


def _accepted(node: dict = SCHEMA, prefix: str = "") -> list[str]:
    """Every key the committed schema accepts: the fields of each parameter section, and
    the keys of the hand-written objects around them (``solver.*``: any key)."""
    out = []
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        if path in SECTIONS:
            out += [f"{path}.{k}" for k in sub.get("properties", {})]
        elif sub.get("type") == "object" and "properties" in sub:
            out += _accepted(sub, f"{path}.")
        elif sub.get("type") == "object" and isinstance(sub.get("additionalProperties"), dict):
            out.append(f"{path}.*")
        else:
            out.append(path)
    return out


def _nested(dotted: str, value) -> dict:
    """``a.b.c`` = value as a config (with the required ``samples``)."""
    out: dict = {"samples": "samples.tsv"}
    node = out
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


# --- the generated files are what the classes give ----------------------------------------

def test_the_schema_file_is_generated_from_the_classes():
    assert SCHEMA == config.cohort_schema(), (
        f"workflow/schemas/cohort.schema.yaml differs from the parameter classes: {REGENERATE}")
    assert SCHEMA_FILE.read_text() == config.schema_text(), (
        f"workflow/schemas/cohort.schema.yaml is not formatted as generated: {REGENERATE}")


def test_the_readme_table_is_generated_from_the_classes():
    assert _readme_table() == config.options_table(), (
        f"config/README.md's option table differs from the parameter classes: {REGENERATE}")


def test_the_check_command_notices_drift(tmp_path):
    """``python -m qctfea.config --check`` fails on a hand-edited table; --write repairs it
    and leaves the prose outside the markers alone."""
    for rel in (config.SCHEMA_FILE, config.README_FILE):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    assert config.main(["--check", "--root", str(tmp_path)]) == 0
    readme = tmp_path / config.README_FILE
    edited = readme.read_text().replace("| `bmd.shell_mm` | 2 |", "| `bmd.shell_mm` | 3 |")
    edited = edited.replace("# Cohort configuration", "# Cohort configuration (edited)")
    assert edited != readme.read_text()
    readme.write_text(edited)
    assert config.main(["--check", "--root", str(tmp_path)]) == 1
    assert config.main(["--write", "--root", str(tmp_path)]) == 0
    assert config.main(["--check", "--root", str(tmp_path)]) == 0
    text = readme.read_text()
    assert "| `bmd.shell_mm` | 2 |" in text and "# Cohort configuration (edited)" in text


def test_hand_picked_keys_as_documented():
    """Known values, independent of the generator: a key, its default, its constraint and
    its explanation in all three places."""
    table = _readme_table()
    assert '| `bmd.shell_mm` | 2 | shell around the screw for "vBMD around the screw" |' in table
    shell = _schema_node("bmd.shell_mm")
    assert shell["type"] == "number" and shell["minimum"] == 0 and shell["default"] == 2.0
    assert params_from(_dataclass(SECTIONS["bmd"]), {}, "bmd").shell_mm == 2.0
    assert "| `mesh.bone_cell_size_mm`, `screw_cell_size_mm` | 2, 1 | max tet circumradius" in table
    voxel = _schema_node("mesh.voxel_mm")
    assert voxel["exclusiveMinimum"] == 0 and voxel["default"] == 0.5
    law = _schema_node("materials.law")
    assert {"keyak1998", "kopperdahl2002", "custom"} <= set(law["enum"])
    assert _schema_node("loads.cases")["contains"] == {"const": "compression"}
    assert _schema_node("mask.label")["type"] == ["integer", "null"]
    assert "| `mask.label` | null (→ 23) |" in table
    assert _schema_node("calibration.phantom.preset")["enum"][-1] is None
    assert "| `solver.*` | see `DEFAULT_PETSC_OPTIONS` |" in table


# --- documented == accepted ---------------------------------------------------------------

def test_the_library_reads_the_expected_sections():
    """The discovery itself, and the registry of qctfea.config agrees with it."""
    assert {"mask", "screw", "planning", "bmd", "registration", "mesh", "materials", "loads",
            "ingest", "calibration.phantom", "calibration.phantomless",
            "demo.synth", "clinical", "uncertainty"} <= set(SECTIONS), SECTIONS
    assert {s: p for s, (p, _) in config.SECTIONS.items()} == SECTIONS


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_section_equals_dataclass(section):
    cls = _dataclass(SECTIONS[section])
    node = _schema_node(section)
    assert node is not None, f"workflow/schemas/cohort.schema.yaml has no section {section}"
    fields = {f.name for f in dataclasses.fields(cls)}
    props = set(node.get("properties", {}))
    assert node.get("additionalProperties") is False, (
        f"schema section {section}: additionalProperties must be false")
    assert props == fields, (
        f"schema section {section} vs {SECTIONS[section]}: only in the schema "
        f"{sorted(props - fields)}, only in the library {sorted(fields - props)}")


def test_every_accepted_key_is_documented():
    accepted, documented = set(_accepted()), set(_documented())
    assert len(accepted) > 150, sorted(accepted)
    assert {"samples", "demo.seed", "calibration.method", "solver.*", "mpi.tasks", "exclude",
            "loads.cases", "demo.synth.noise_hu"} <= accepted
    missing = sorted(accepted - documented)
    assert not missing, f"config/README.md documents no {missing}"
    cells = [re.split(r"(?<!\\)\|", line) for line in _readme_table().splitlines()
             if line.startswith("| `")]
    unexplained = [c[1].strip() for c in cells if len(c) < 5 or not c[3].strip()]
    assert not unexplained, f"config/README.md: no explanation for {unexplained}: give doc=..."


def test_every_documented_key_is_accepted():
    """Each key of the table is in the schema, and a parameter-class key set to its library
    default passes the schema and params_from (which returns that default)."""
    documented = _documented()
    assert set(documented) == set(_accepted()), sorted(set(documented) ^ set(_accepted()))
    validator = Draft202012Validator(SCHEMA)
    for key in documented:
        section, _, name = key.rpartition(".")
        if section not in SECTIONS:
            node = _schema_node(section) if name == "*" else _schema_node(key)
            assert node is not None, f"config/README.md documents {key}, the schema has none"
            if name == "*":
                assert isinstance(node.get("additionalProperties"), dict), key
            continue
        cls = _dataclass(SECTIONS[section])
        default = getattr(cls(), name)
        errors = [e.message for e in validator.iter_errors(_nested(key, _plain(default)))]
        assert not errors, f"{key}: {default!r} refused by the schema: {errors}"
        got = params_from(cls, {name: _plain(default)}, section)
        assert _plain(getattr(got, name)) == _plain(default), key


# --- refused: unknown keys, wrong types, values outside the constraints -------------------

def test_an_unknown_key_is_refused_with_the_allowed_ones():
    bmd = _dataclass(SECTIONS["bmd"])
    with pytest.raises(QctfeaError) as exc:
        params_from(bmd, {"shel_mm": 1.0}, "bmd")
    assert str(exc.value) == ("config section 'bmd': unknown key(s) ['shel_mm']; "
                              "allowed: ['shell_mm']")
    mesh = _dataclass(SECTIONS["mesh"])
    with pytest.raises(QctfeaError, match=r"unknown key\(s\) \['voxel'\]; allowed: \[.*"
                                          r"'voxel_mm'") as exc:
        params_from(mesh, {"voxel": 0.5}, "mesh")
    allowed = re.search(r"allowed: (\[.*\])", str(exc.value)).group(1)
    assert ast.literal_eval(allowed) == sorted(_schema_node("mesh")["properties"])
    errors = list(Draft202012Validator(SCHEMA).iter_errors(_nested("mesh.voxel", 0.5)))
    assert [e.validator for e in errors] == ["additionalProperties"]
    assert "voxel_mm" in errors[0].schema["properties"]


def test_a_wrong_type_is_refused():
    mesh = _dataclass(SECTIONS["mesh"])
    with pytest.raises(QctfeaError, match=r"config section 'mesh', key voxel_mm: 'fine' is "
                                          r"not a float \(the default is 0.5\)"):
        params_from(mesh, {"voxel_mm": "fine"}, "mesh")
    assert not Draft202012Validator(SCHEMA).is_valid(_nested("mesh.voxel_mm", "fine"))
    with pytest.raises(QctfeaError, match="key perturb"):
        params_from(mesh, {"perturb": "yes"}, "mesh")
    assert not Draft202012Validator(SCHEMA).is_valid(_nested("mesh.perturb", "yes"))


def test_a_value_outside_the_constraints_is_refused_by_both():
    """A constraint of the metadata holds for the steps called directly as for the workflow."""
    mesh = _dataclass(SECTIONS["mesh"])
    assert not Draft202012Validator(SCHEMA).is_valid(_nested("mesh.voxel_mm", 0))
    with pytest.raises(QctfeaError, match=r"config section 'mesh', key voxel_mm: 0.0 is less "
                                          r"than or equal to the minimum of 0"):
        params_from(mesh, {"voxel_mm": 0}, "mesh")
    reg = _dataclass(SECTIONS["registration"])
    with pytest.raises(QctfeaError, match=r"key shrink\.0: 0 is less than the minimum of 1"):
        params_from(reg, {"shrink": [0, 1], "smoothing_mm": [1.0, 0.5]}, "registration")
    assert params_from(mesh, {"voxel_mm": 0.25}, "mesh").voxel_mm == 0.25


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
        errors = list(Draft202012Validator(prop).iter_errors(value))
        if errors:
            bad.append(f"{f.name}={value!r}: {errors[0].message}")
        if "None" in str(f.type) and not Draft202012Validator(prop).is_valid(None):
            bad.append(f"{f.name}: the library accepts null, the schema does not")
    assert not bad, f"schema section {section}: " + "; ".join(bad)


def test_enums_follow_the_library():
    from qctfea.fea import plasticity
    from qctfea.model import materials

    mat = _schema_node("materials")["properties"]
    assert set(mat["law"]["enum"]) == set(materials.LAWS) | {"custom"}
    assert set(mat["yield_law"]["enum"]) == {
        k for k, v in materials.LAWS.items() if v[1] is not None} | {"none"}
    loads = _schema_node("loads")["properties"]
    assert set(loads["constitutive"]["enum"]) == set(plasticity.CONSTITUTIVE_MODELS)


def test_every_cohort_config_of_the_repository_is_valid():
    validator = Draft202012Validator(SCHEMA)
    configs = sorted([*(REPO / "config" / "cohorts").glob("*/config.yaml"),
                      *(REPO / "tests" / "cohorts").glob("*/config.yaml")])
    assert len(configs) >= 4
    for cfg in configs:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(cfg.read_text()))]
        assert not errors, f"{cfg}: {errors}"
