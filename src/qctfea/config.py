"""The cohort configuration's one source of truth: the parameter classes.

Every config section a step reads is a dataclass (``MeshParams``, ``LoadParams``, ...) whose
fields are declared with :func:`option`: the default, the JSON-schema constraints
(``minimum``, ``exclusiveMinimum``, ``enum``, ``items``, ...), the text of the option table
in ``config/README.md`` (``doc``) and, where the value alone would mislead, how the table
shows the default (``shown``). From them come

* :func:`params_from`: a section of the cohort config as the step's dataclass; unknown keys,
  wrong types and values outside the constraints are refused with the section, the key and
  (for unknown keys) the allowed ones;
* :func:`section_schema` / :func:`cohort_schema`: ``workflow/schemas/cohort.schema.yaml``,
  which Snakemake's ``workflow/rules/common.smk`` checks every cohort config against;
* :func:`options_table`: the option table of ``config/README.md`` (between the
  ``<!-- options:begin -->`` and ``<!-- options:end -->`` markers).

``python -m qctfea.config --write`` regenerates both files; ``tests/test_schema.py`` fails
when they differ from what this module derives. To add an option: add the field with
:func:`option` (default, constraints, ``doc``) to its dataclass and run that command.

The few keys no parameter class reads (``samples``, ``demo.seed``, ``calibration.method``,
``solver``, ``mpi``, ``exclude``: the workflow reads them itself) are written by hand in
:data:`SKELETON` and :data:`WORKFLOW_ROWS` below, beside the registry of sections
(:data:`SECTIONS`), so that the whole layout of the config is in this one file.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import math
import re
import sys
from pathlib import Path

from qctfea.errors import QctfeaError

#: metadata keys of :func:`option` that are not JSON-schema keywords
_META = ("doc", "shown", "row")


def option(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, doc: str = "",
           shown: str | None = None, row: str | None = None, **schema):
    """A parameter-class field: ``default`` (or ``factory`` for mutable defaults), its
    explanation in the option table (``doc``, markdown), the table's display of the default
    when the value alone is not what a reader needs (``shown``), ``row``: the field whose
    table row also lists this one (keys explained together), and JSON-schema keywords
    (``minimum=0``, ``enum=[...]``, ``items={...}``) added to the type from the annotation."""
    metadata = {"doc": doc, "shown": shown, "row": row, "schema": schema}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


# --- the layout of the cohort config ------------------------------------------------------

#: Config sections read into a parameter class (``params_from(cls, cfg, section)``), in the
#: order of the option table: section -> ("module:Class", description in the schema).
SECTIONS: dict[str, tuple[str, str]] = {
    "demo.synth": ("qctfea.demo.synth:SynthParams",
                   "scanner and phantom settings of the generator"),
    "ingest": ("qctfea.imaging.dicomio:IngestParams",
               "which series to read from a DICOM folder holding several, and uneven slice "
               "spacing"),
    "calibration.phantom": (
        "qctfea.imaging.phantoms:PhantomSpec",
        "the calibration phantom, a preset and/or its rods (docs/calibration.md); method "
        "phantom needs a preset or rod_densities_mg_cm3"),
    "calibration.phantomless": (
        "qctfea.imaging.calibration:TissueSpec",
        "phantomless calibration, effective-energy model or tissue regression "
        "(docs/calibration.md)"),
    "mask": ("qctfea.imaging.masks:MaskParams",
             "target vertebra (a label, or a named label convention and level), vertebral "
             "body and trabecular ROI"),
    "screw": ("qctfea.model.screw:ScrewSpec", "pedicle screw geometry and material"),
    "planning": ("qctfea.model.planning:PlanParams",
                 "screw trajectories from the landmarks or planned from the vertebra mask"),
    "registration": ("qctfea.imaging.registration:RegistrationParams",
                     "longitudinal registration of follow-ups to baseline"),
    "bmd": ("qctfea.imaging.bmd:BmdParams", "BMD regions"),
    "mesh": ("qctfea.model.meshing:MeshParams",
             "tetrahedral mesh of bone, screws and end caps"),
    "materials": ("qctfea.model.materials:MaterialParams",
                  "density-modulus law, yield law and end caps"),
    "loads": ("qctfea.fea.loadcases:LoadParams",
              "load cases, boundary conditions and analysis"),
    "clinical": ("qctfea.cohort.clinical:ClinicalParams",
                 "thresholds of the clinical categories, vertebral strength (BCT, Keaveny et "
                 "al. 2020) and trabecular vBMD (ACR QCT) (docs/science.md#clinical-categories)"),
    "uncertainty": ("qctfea.uncertainty:UncertaintyParams",
                    "intervals and least significant change"),
}

#: The cohort schema apart from the parameter sections, written by hand: the keys the
#: workflow reads itself. ``None`` marks where the section of :data:`SECTIONS` of that path
#: goes; the order is the option table's.
SKELETON: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "description": "cohort configuration (config/cohorts/<name>/config.yaml); see "
                   "config/README.md. Checked by workflow/rules/common.smk; errors name the "
                   "file and the key. Generated by `python -m qctfea.config --write` from "
                   "the parameter classes (src/qctfea/config.py): do not edit.",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "samples": {"type": "string",
                    "description": "sample sheet (TSV) relative to the cohort folder"},
        "demo": {
            "type": "object",
            "description": "present only for synthetic cohorts generated by the workflow",
            "properties": {"seed": {"type": "integer"}, "synth": None},
            "additionalProperties": False,
        },
        "ingest": None,
        "calibration": {
            "type": "object",
            "properties": {
                "method": {"enum": ["phantom", "phantomless", "fixed"]},
                "slope": {"type": "number"},
                "intercept": {"type": "number"},
                "phantom": None,
                "phantomless": None,
            },
            "additionalProperties": False,
        },
        "mask": None,
        "screw": None,
        "planning": None,
        "registration": None,
        "bmd": None,
        "mesh": None,
        "materials": None,
        "loads": None,
        "clinical": None,
        "uncertainty": None,
        "solver": {
            "type": "object",
            "description": "PETSc options without the leading dash, applied over the "
                           "defaults (config/README.md)",
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        },
        "mpi": {
            "type": "object",
            "properties": {"tasks": {"type": "integer", "minimum": 1}},
            "additionalProperties": False,
        },
        "exclude": {
            "type": "array",
            "description": "scans left out of the analysis, each with its reason (listed in "
                           "tables/exclusions.csv and the reports)",
            "items": {
                "type": "object",
                "properties": {
                    "patient": {"type": "string", "description": "patient id of the sample "
                                "sheet"},
                    "timepoint": {"type": "string", "description": "timepoint id; omitted: "
                                  "every scan of the patient"},
                    "reason": {"type": "string", "minLength": 1,
                               "description": "why the scan is excluded"},
                },
                "required": ["patient", "reason"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["samples"],
}

#: Option-table rows of the keys of :data:`SKELETON` (first key's path -> (keys shown,
#: default shown, meaning)); ``solver.*``: any key of the section.
WORKFLOW_ROWS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "samples": (("samples",), "—", "sample sheet, relative to the cohort folder"),
    "demo.seed": (("demo.seed",), "2021",
                  "present only for synthetic cohorts: seed of the generator"),
    "calibration.method": (
        ("calibration.method",), "`phantom`",
        "`phantom` (the phantom must be named: `calibration.phantom.preset` or "
        "`rod_densities_mg_cm3`, else the dry-run is refused listing the presets), "
        "`phantomless` (for scans without a phantom) or `fixed`"),
    "calibration.slope": (("calibration.slope", "intercept"), "—",
                          "for `fixed`: density = intercept + slope·HU"),
    "solver": (
        ("solver.*",), "see `DEFAULT_PETSC_OPTIONS`",
        "PETSc options without the leading dash, applied over the defaults (`ksp_rtol`, "
        "`pc_type`, `mg_levels_ksp_max_it`, ...). Defaults (`src/qctfea/fea/elasticity.py`): "
        "CG + GAMG (aggregation, rigid-body near-null space), rtol 1e-10; smoothing per "
        "level: one Chebyshev step with point-block Jacobi for linear analyses (scalar Jacobi "
        "on a level with a singular block), two with "
        "scalar Jacobi and the GAMG interpolation reused between Newton steps for nonlinear "
        "ones (`NONLINEAR_PETSC_OPTIONS` in `fea/stepping.py`); why: "
        "[docs/performance.md](../docs/performance.md)"),
    "mpi.tasks": (("mpi.tasks",), "1", "MPI ranks per solve"),
    "exclude": (
        ("exclude",), "none",
        "scans left out of the analysis, each `{patient, timepoint, reason}` (`timepoint` "
        "omitted: all of the patient's scans). They get no jobs, are listed with their "
        "reasons in `tables/exclusions.csv`, `stats/summary.json`, the headline data "
        "sentence and the summary page, and are not counted as missing. An entry naming no "
        "scan of the sheet, or without a reason, is an error"),
}


def section_class(section: str):
    """The parameter class of a config section of :data:`SECTIONS`."""
    mod, name = SECTIONS[section][0].split(":")
    return getattr(importlib.import_module(mod), name)


# --- params_from: a config section as its dataclass ---------------------------------------

def params_from(cls, section: dict | None, where: str = ""):
    """Dataclass ``cls`` from a config section; unknown keys are an error naming them and
    the allowed ones, a value of the wrong type or outside the field's constraints (the
    schema's) an error naming the key."""
    section = dict(section or {})
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = sorted(set(section) - known)
    if unknown:
        raise QctfeaError(f"config section '{where}': unknown key(s) {unknown}; "
                          f"allowed: {sorted(known)}")
    default = cls()
    for f in fields:
        if f.name in section:
            section[f.name] = _typed(section[f.name], getattr(default, f.name), str(f.type),
                                     f"config section '{where}', key {f.name}")
    try:
        params = cls(**section)
    except QctfeaError as exc:
        raise QctfeaError(f"config section '{where}': {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise QctfeaError(f"config section '{where}': {exc}; see config/README.md") from exc
    _check_constraints(cls, section, where)
    return params


def _check_constraints(cls, section: dict, where: str) -> None:
    """The given keys against the section's schema (what the workflow's check enforces, for
    the steps called directly too)."""
    for e in _validator(cls).iter_errors(_plain(section)):
        key = ".".join(str(k) for k in e.absolute_path)
        doc = _field_doc(cls, str(e.absolute_path[0])) if e.absolute_path else ""
        raise QctfeaError(f"config section '{where}', key {key}: {e.message}"
                          + (f" ({_short(doc)})" if doc else "") + "; see config/README.md")


@functools.lru_cache(maxsize=None)
def _validator(cls):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(_section_schema(cls))


def _typed(value, default, annotation: str, where: str):
    """``value`` as the type of the parameter's default (annotation when the default is
    None); None only where the annotation allows it. Numbers must be finite."""
    if value is None:
        if "None" in annotation or default is None:
            return None
        raise QctfeaError(f"{where}: must not be empty (null); the default is {default!r}")
    kind = type(default) if default is not None else {
        "float": float, "int": int, "str": str, "bool": bool}.get(annotation.split("|")[0]
                                                                   .strip(), object)
    bad = QctfeaError(f"{where}: {value!r} is not a {getattr(kind, '__name__', kind)} (the "
                      f"default is {default!r}); see config/README.md")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise QctfeaError(f"{where}: {value!r} is not a finite number")
        if kind is int:
            if float(value) != int(value):
                raise bad
            return int(value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        return kind(value)
    return value


# --- the schema ---------------------------------------------------------------------------

_SCALARS = {"float": "number", "int": "integer", "str": "string", "bool": "boolean",
            "dict": "object"}


def _annotation_schema(annotation: str) -> tuple[dict, bool]:
    """JSON schema of a field's annotation (``float``, ``list[float] | None``,
    ``tuple[float, float]``, ...) and whether it admits null."""
    parts = [p.strip() for p in _split_top(annotation, "|")]
    nullable = "None" in parts
    base = next((p for p in parts if p != "None"), "None")
    return _type_schema(base), nullable


def _type_schema(base: str) -> dict:
    if base in _SCALARS:
        return {"type": _SCALARS[base]}
    m = re.fullmatch(r"(list|tuple)(?:\[(.*)\])?", base)
    if not m:
        raise TypeError(f"no JSON schema for the annotation {base!r}")
    out: dict = {"type": "array"}
    if m.group(2):
        args = [a.strip() for a in _split_top(m.group(2), ",")]
        if m.group(1) == "tuple" and "..." not in args:
            out.update(minItems=len(args), maxItems=len(args))
        out["items"] = _type_schema(args[0])
    return out


def _split_top(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def _plain(v):
    """A default as YAML/JSON data (tuples as lists)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _row_of(cls, name: str) -> dataclasses.Field:
    """The field whose option-table row explains ``name`` (itself, or its ``row``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return fields[fields[name].metadata.get("row") or name]


def _field_doc(cls, name: str) -> str:
    try:
        return _row_of(cls, name).metadata.get("doc", "")
    except KeyError:
        return ""


def _short(doc: str, n: int = 160) -> str:
    text = _unmarkdown(doc)
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def _unmarkdown(doc: str) -> str:
    """Option-table text as a plain description (table escapes and backticks removed)."""
    return doc.replace("\\|", "|").replace("`", "")


def field_schema(cls, f: dataclasses.Field) -> dict:
    """JSON schema of one field: the annotation's type, the metadata's constraints, its
    description and the library default."""
    schema, nullable = _annotation_schema(str(f.type))
    extra = copy.deepcopy(dict(f.metadata.get("schema", {})))
    if "items" in extra and isinstance(schema.get("items"), dict):
        extra["items"] = {**schema["items"], **extra["items"]}
    schema.update(extra)
    if nullable:
        t = schema.get("type")
        if t is not None and "null" not in (t if isinstance(t, list) else [t]):
            schema["type"] = (t if isinstance(t, list) else [t]) + ["null"]
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
    doc = _field_doc(cls, f.name)
    out = {"description": _unmarkdown(doc)} if doc else {}
    return {**out, **schema, "default": _plain(_field_default(f))}


@functools.lru_cache(maxsize=None)
def _section_schema(cls) -> dict:
    return {
        "type": "object",
        "properties": {f.name: field_schema(cls, f) for f in dataclasses.fields(cls)},
        "additionalProperties": False,
    }


def section_schema(cls, description: str | None = None) -> dict:
    """JSON schema of a config section read into ``cls``: one property per field, no other
    key (``additionalProperties: false``)."""
    out = copy.deepcopy(_section_schema(cls))
    if description:
        out = {"description": description, **out}
    return out


def cohort_schema() -> dict:
    """The whole cohort schema: :data:`SKELETON` with every section of :data:`SECTIONS` in
    its place (``workflow/schemas/cohort.schema.yaml``)."""
    schema = copy.deepcopy(SKELETON)
    placed = set()

    def fill(node: dict, prefix: str) -> None:
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            if sub is None:
                if path not in SECTIONS:
                    raise KeyError(f"SKELETON has a place for {path}, SECTIONS no class")
                cls_path, text = SECTIONS[path]
                node["properties"][key] = section_schema(
                    section_class(path),
                    f"{text} (config/README.md, {cls_path.replace(':', '.')})")
                placed.add(path)
            else:
                fill(sub, f"{path}.")

    fill(schema, "")
    missing = sorted(set(SECTIONS) - placed)
    if missing:
        raise KeyError(f"SECTIONS {missing} have no place in SKELETON")
    return schema


# --- the option table ---------------------------------------------------------------------

def show(value) -> str:
    """A default as the option table shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, dict)):
        return f"`{_show_plain(value)}`"
    return _show_plain(value)


def _show_plain(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1).lstrip("+") + m.group(2),
                      text)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show_plain(v)}" for k, v in value.items()) + "}"
    return str(value)


def section_rows(section: str, cls=None) -> list[tuple[tuple[str, ...], str, str]]:
    """Option-table rows (keys, default shown, meaning) of a section, in field order; the
    fields of a ``row`` join the row of the field they name."""
    cls = cls or section_class(section)
    fields = dataclasses.fields(cls)
    members: dict[str, list[dataclasses.Field]] = {}
    for f in fields:
        members.setdefault(f.metadata.get("row") or f.name, []).append(f)
    rows = []
    for f in fields:
        if f.metadata.get("row"):
            continue
        group = members[f.name]
        keys = (f"{section}.{group[0].name}", *(g.name for g in group[1:]))
        shown = f.metadata.get("shown") or ", ".join(show(_field_default(g)) for g in group)
        doc = f.metadata.get("doc")
        if not doc:
            raise QctfeaError(f"{section}.{f.name} ({cls.__name__}) has no explanation: "
                              "declare it with option(..., doc=...) or row=<field>")
        rows.append((keys, shown, doc))
    return rows


def table_rows() -> list[tuple[tuple[str, ...], str, str]]:
    """Every row of the option table, in the order of :data:`SKELETON`."""
    rows = []

    def walk(node: dict, prefix: str) -> None:
        for key, sub in node.get("properties", {}).items():
            path = f"{prefix}{key}"
            if path in WORKFLOW_ROWS:
                rows.append(WORKFLOW_ROWS[path])
            if sub is None:
                rows.extend(section_rows(path))
            else:
                walk(sub, f"{path}.")

    walk(SKELETON, "")
    return rows


def options_table() -> str:
    """The option table of config/README.md (markdown). Written row by row, not by
    :func:`qctfea.mdtable.pipe_table`: tabulate pads every cell to its column's widest, and
    the longest explanation (about 960 characters) would pad all 150 rows to that width
    (the table 36 kB -> 151 kB) and make an edit of one explanation rewrite every row."""
    lines = ["| section.key | default | meaning |", "| --- | --- | --- |"]
    for keys, shown, doc in table_rows():
        cell = ", ".join(f"`{k}`" for k in keys)
        lines.append(f"| {cell} | {shown} | {doc} |")
    return "\n".join(lines) + "\n"


# --- the generated files ------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = Path("workflow/schemas/cohort.schema.yaml")
README_FILE = Path("config/README.md")
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
HEADER = ("# Generated by `python -m qctfea.config --write` from the parameter classes\n"
          "# (src/qctfea/config.py and the dataclasses it names): do not edit by hand.\n")


def schema_text() -> str:
    import yaml

    return HEADER + yaml.safe_dump(cohort_schema(), sort_keys=False, allow_unicode=True,
                                   width=100)


def readme_text(current: str) -> str:
    """``current`` (config/README.md) with the table between the markers replaced."""
    if current.count(BEGIN) != 1 or current.count(END) != 1:
        raise QctfeaError(f"{README_FILE}: needs one {BEGIN} and one {END} line")
    head, rest = current.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{options_table()}{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m qctfea.config",
        description="Derive the cohort schema and config/README.md's option table from the "
                    "parameter classes.")
    p.add_argument("--write", action="store_true",
                   help=f"write {SCHEMA_FILE} and the table of {README_FILE}")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when either file differs from what the classes give")
    p.add_argument("--root", type=Path, default=REPO, help="repository root (default: %(default)s)")
    args = p.parse_args(argv)
    schema_path, readme_path = args.root / SCHEMA_FILE, args.root / README_FILE
    want = {schema_path: schema_text(),
            readme_path: readme_text(readme_path.read_text(encoding="utf-8"))}
    stale = [path for path, text in want.items()
             if not path.is_file() or path.read_text(encoding="utf-8") != text]
    if args.write:
        for path in stale:
            path.write_text(want[path], encoding="utf-8")
            print(f"wrote {path}")
        return 0
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python -m qctfea.config --write", file=sys.stderr)
        return 1 if stale else 0
    sys.stdout.write(want[schema_path])
    return 0


if __name__ == "__main__":
    # the module the parameter classes import, not a second copy of it as __main__
    from qctfea.config import main as _main

    sys.exit(_main())
