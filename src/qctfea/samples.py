"""Sample sheets: one row per patient x timepoint of a cohort.

Columns (tab-separated):

==========  ========  ===============================================================
column      required  meaning
==========  ========  ===============================================================
patient     yes       pseudonymous patient id (letters, digits, ``-``, ``_``)
timepoint   yes       timepoint id, e.g. ``M00``, ``M12`` (letters, digits, ``-``, ``_``)
months      yes       months since baseline (number >= 0)
image       yes       DICOM series folder, or a NIfTI/NRRD/MHA file in HU
labels      yes       label map holding the target vertebra (NIfTI/NRRD/MHA)
landmarks   yes       JSON with ``left``/``right`` ``entry_mm`` and ``target_mm``
dxa         no        clinical DXA areal BMD: a number (g/cm²) or a JSON file
                      with key ``areal_bmd_g_cm2``; empty when not measured
==========  ========  ===============================================================

Relative paths are relative to the repository root (where Snakemake runs).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from qctfea.provenance import QctfeaError, read_json

REQUIRED = ["patient", "timepoint", "months", "image", "labels", "landmarks"]
_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def read_sample_sheet(path: str | Path) -> pd.DataFrame:
    """Read and check a sample sheet; errors name the row and column."""
    path = Path(path)
    if not path.is_file():
        raise QctfeaError(f"sample sheet {path} not found")
    df = pd.read_csv(path, sep="\t", dtype=str, comment="#").fillna("")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise QctfeaError(f"{path}: missing column(s) {missing}; required: {REQUIRED}")
    if "dxa" not in df.columns:
        df["dxa"] = ""
    for i, row in df.iterrows():
        line = i + 2  # header is line 1
        for col in ("patient", "timepoint"):
            if not _ID.match(row[col]):
                raise QctfeaError(f"{path}, line {line}, column {col}: {row[col]!r} is not a valid "
                                  "id (letters, digits, '-', '_')")
        try:
            m = float(row["months"])
            if not m >= 0:
                raise ValueError
        except ValueError:
            raise QctfeaError(f"{path}, line {line}, column months: {row['months']!r} is not a "
                              "number >= 0") from None
        for col in ("image", "labels", "landmarks"):
            if not row[col]:
                raise QctfeaError(f"{path}, line {line}, column {col}: empty")
    df["months"] = df["months"].astype(float)
    dup = df[df.duplicated(["patient", "timepoint"], keep=False)]
    if len(dup):
        pairs = sorted(set(zip(dup.patient, dup.timepoint, strict=True)))
        raise QctfeaError(f"{path}: duplicated patient x timepoint rows: {pairs}")
    return df


def dxa_value(value: str) -> float | None:
    """The DXA cell as g/cm²: a number, a JSON file path, or empty (None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    return float(read_json(value)["areal_bmd_g_cm2"])


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
