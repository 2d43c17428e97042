"""Sample sheets: one row per patient x timepoint of a cohort.

Columns (tab-separated):

==========  ========  ===============================================================
column      required  meaning
==========  ========  ===============================================================
patient     yes       pseudonymous patient id (letters, digits, ``-``, ``_``)
timepoint   yes       timepoint id, e.g. ``M00``, ``M12`` (letters, digits, ``-``, ``_``)
months      yes       months since baseline (number >= 0)
image       yes       DICOM series folder, or a NIfTI/NRRD/MHA file in HU
labels      yes       label map holding the target vertebra (NIfTI/NRRD/MHA), or a
                      folder of one mask per structure (TotalSegmentator without
                      ``--ml``; :mod:`qctfea.imaging.labelfolder`)
subregions  no        vertebra sub-region map (NIfTI/NRRD/MHA; VerSe/TPTBox: 41-48
                      posterior elements, 49 body shell, 50 body interior): the
                      vertebral body is taken from it (``mask.body_subregion_labels``);
                      empty or absent: found by a morphological opening
landmarks   see note  JSON with ``left``/``right`` ``entry_mm`` and ``target_mm``
dxa         no        clinical DXA areal BMD: a number (g/cm²) or a JSON file
                      with key ``areal_bmd_g_cm2``; empty when not measured
sex         no        ``F`` or ``M`` (``female``/``male`` accepted, any case; read as
                      ``F``/``M``): sets the sex-specific vertebral strength thresholds
                      of :mod:`qctfea.cohort.clinical`; empty or absent: the strength category
                      is "unknown (sex not given)"
==========  ========  ===============================================================

The landmarks column may be empty or absent when the cohort config plans the
screws from the vertebra mask (``planning.method: auto``); under the default
``planning.method: landmarks`` every row needs its landmarks file
(:func:`read_sample_sheet` with ``planning_method="landmarks"`` refuses a row
without one, naming its line).

Relative paths are relative to the repository root (where Snakemake runs).
"""

from __future__ import annotations

import csv

import math
import re
from pathlib import Path

import pandas as pd

from qctfea.cohort.clinical import sex_code
from qctfea.errors import QctfeaError
from qctfea.provenance import read_json

REQUIRED = ["patient", "timepoint", "months", "image", "labels"]
_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def missing_landmarks(where: str) -> str:
    """The error for a scan without landmarks under ``planning.method: landmarks``;
    ``where`` names the sheet and line."""
    return (f"{where}, column landmarks: empty, and planning.method is 'landmarks' (the "
            "default); give this scan's landmarks JSON (left/right entry_mm and target_mm), or "
            "set `planning.method: auto` in the cohort config to plan the screws from the "
            "vertebra mask")


def read_sample_sheet(path: str | Path, planning_method: str | None = None) -> pd.DataFrame:
    """Read and check a sample sheet; errors name the row and column.

    ``planning_method`` is the cohort config's ``planning.method``: with ``"landmarks"`` every
    row must name a landmarks file; with ``"auto"`` or None (readers that do not plan screws)
    the landmarks column may be empty or absent (it is then added, empty)."""
    path = Path(path)
    if not path.is_file():
        raise QctfeaError(f"sample sheet {path} not found")
    try:
        # Tab-separated, no quoting: a quote character is part of the cell.
        df = pd.read_csv(path, sep="\t", dtype=str, comment="#", quoting=csv.QUOTE_NONE,
                         keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise QctfeaError(f"sample sheet {path} is not a tab-separated table ({exc}); save it "
                          "as TSV with one header line") from exc
    df = df.fillna("")
    # an unnamed, empty column (a trailing tab on every line, as spreadsheets export it)
    df = df.drop(columns=[c for c in df.columns
                          if str(c).startswith("Unnamed:") and not df[c].astype(str).any()])
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise QctfeaError(f"{path}: missing column(s) {missing}; required: {REQUIRED}")
    for col in ("landmarks", "dxa", "subregions", "sex"):
        if col not in df.columns:
            df[col] = ""
    for i, row in df.iterrows():
        line = i + 2  # header is line 1
        for col in ("patient", "timepoint"):
            if not _ID.match(row[col]):
                raise QctfeaError(f"{path}, line {line}, column {col}: {row[col]!r} is not a valid "
                                  "id (letters, digits, '-', '_')")
        try:
            m = float(row["months"])
            if not 0 <= m < math.inf:
                raise ValueError
        except ValueError:
            raise QctfeaError(f"{path}, line {line}, column months: {row['months']!r} is not a "
                              "number >= 0") from None
        for col in ("image", "labels"):
            if not row[col]:
                raise QctfeaError(f"{path}, line {line}, column {col}: empty")
        if planning_method == "landmarks" and not row["landmarks"]:
            raise QctfeaError(missing_landmarks(f"{path}, line {line}"))
        dxa = row["dxa"]
        if dxa and not dxa.lower().endswith(".json"):
            try:
                ok = 0 < float(dxa) < math.inf
            except ValueError:
                ok = False
            if not ok:
                raise QctfeaError(f"{path}, line {line}, column dxa: {dxa!r} is neither an areal "
                                  "BMD > 0 in g/cm² nor a .json file; correct it or leave it empty")
        try:
            df.at[i, "sex"] = sex_code(row["sex"])
        except ValueError as exc:
            raise QctfeaError(f"{path}, line {line}, column sex: {exc}") from None
    df["months"] = df["months"].astype(float)
    _check_one_sex(df, path)
    dup = df[df.duplicated(["patient", "timepoint"], keep=False)]
    if len(dup):
        where = "; ".join(
            f"{p} {t} on lines {', '.join(str(i + 2) for i in g.index)}"
            for (p, t), g in dup.groupby(["patient", "timepoint"], sort=True))
        raise QctfeaError(f"{path}: duplicated patient x timepoint rows ({where}); keep one row "
                          "per scan: remove the extra row or correct its timepoint")
    return df


def _check_one_sex(df: pd.DataFrame, path: Path) -> None:
    """A patient's rows must not give different sexes (empty cells are not counted)."""
    for patient, g in df[df["sex"] != ""].groupby("patient", sort=True):
        if g["sex"].nunique() > 1:
            where = ", ".join(f"line {i + 2}: {v}" for i, v in g["sex"].items())
            raise QctfeaError(f"{path}: patient {patient} has different sexes ({where}); "
                              "correct the sex column")


def dxa_value(value: str) -> float | None:
    """The DXA cell as g/cm²: a number, a JSON file path, or empty (None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    if not Path(value).is_file():
        raise QctfeaError(f"DXA file {value} (dxa column of the sample sheet) not found; give "
                          "the areal BMD in g/cm², the path of a JSON file with key "
                          "areal_bmd_g_cm2, or leave the cell empty")
    data = read_json(value)
    try:
        return float(data["areal_bmd_g_cm2"])
    except (KeyError, TypeError, ValueError):
        raise QctfeaError(f"{value}: needs a number under the key 'areal_bmd_g_cm2' (the "
                          "DXA areal BMD in g/cm²); correct this file or the dxa column of the "
                          "sample sheet") from None


def demo_sheet(patients: list[str], timepoints: dict[str, float], root: str) -> pd.DataFrame:
    """Sample sheet of a synthetic cohort written by the demo rule under ``root``."""
    rows = []
    for p in patients:
        for tp, months in timepoints.items():
            base = f"{root}/{p}/{tp}"
            rows.append({"patient": p, "timepoint": tp, "months": months,
                         "image": f"{base}/dicom", "labels": f"{base}/labels.nii.gz",
                         "landmarks": f"{base}/landmarks.json", "dxa": f"{base}/dxa.json"})
    return pd.DataFrame(rows)
