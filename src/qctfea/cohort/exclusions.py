"""The scans a cohort leaves out, and why: those its config's ``exclude:`` names and those a
gate refused (tables/exclusions.csv, the headline's data sentence, summary.json).

Every gate rule (``accept_*``, workflow/rules) reads one JSON record of a per-scan step; a
record with ``refused`` fails the scan. :func:`refusal_entries` reads a scan's records in
the pipeline's order and names the first gate that refused it; :func:`write_exclusions`
writes those entries beside the config's, each with ``excluded_by``: the gate rule or
:data:`BY_CONFIG`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, read_json

#: ``excluded_by`` of the scans the cohort config excludes (else: the refusing gate's rule)
BY_CONFIG = "cohort config"


def planned_scans(df: pd.DataFrame, excluded: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """Patients and scans the cohort planned: the analysed ones and the excluded or refused
    ones (a patient all of whose scans were refused counts), each patient x timepoint."""
    patients = set(df["patient"]) | {e["patient"] for e in excluded}
    timepoints = set(df["timepoint"]) | {e["timepoint"] for e in excluded}
    return len(patients), len(patients) * len(timepoints)


EXCLUSION_COLUMNS = ["patient", "timepoint", "months", "excluded_by", "reason"]


def write_exclusions(entries: Sequence[Mapping[str, Any]],
                     out_csv: str | os.PathLike) -> pd.DataFrame:
    """Write the scans excluded by the cohort config (``exclude:``) or refused by a gate
    (:func:`refusal_entries`) with their reasons; ``excluded_by``
    says which (:data:`BY_CONFIG`, or the gate's rule)."""
    entries = [{"excluded_by": BY_CONFIG, **e} for e in entries]
    for e in entries:
        if not str(e.get("reason") or "").strip():
            raise QctfeaError(f"exclusion of patient {e.get('patient')}, timepoint "
                              f"{e.get('timepoint')} has no reason; say why it is excluded")
    df = pd.DataFrame([{c: e.get(c) for c in EXCLUSION_COLUMNS} for e in entries],
                      columns=EXCLUSION_COLUMNS)
    with atomic_path(Path(out_csv)) as tmp:
        df.to_csv(tmp, index=False)
    return df


def read_exclusions(path: str | os.PathLike | None) -> list[dict]:
    """Entries of an exclusions CSV (none when path is None)."""
    if path is None:
        return []
    df = pd.read_csv(path, dtype={"patient": str, "timepoint": str, "reason": str,
                                  "excluded_by": str})
    if "excluded_by" not in df.columns:  # written before the column existed: not known
        df["excluded_by"] = ""
    df["excluded_by"] = df["excluded_by"].fillna("")
    return [{"patient": r.patient, "timepoint": r.timepoint, "months": float(r.months),
             "excluded_by": r.excluded_by, "reason": r.reason} for r in df.itertuples()]


def refusal_entries(scans: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Exclusion entries (patient, timepoint, months, excluded_by: the refusing gate's rule,
    reason) for the scans a gate refused:
    their inputs or their baseline's (image or label map unreadable, no vertebra), their
    calibration or their baseline's, their label map's checks or their baseline's (the
    vertebra cut by the field of view, a label map off its CT), their model's screws at
    planning, their registration to baseline, or a load case whose curve did not peak (or
    that was not solved: its materials or BMD step refused the scan).
    ``scans``: dicts with patient, timepoint, months and ``gates``, the scan's gate records
    in the pipeline's order, one list per gate (scan.json of the scan and its model;
    calibration.json and vertebra.json of both; the model's screws.json; a follow-up's
    registration.json; the load-case results). The first gate whose records hold a refusal
    names the reason (all its records' refusals, each message once), and the gates after it
    are not read
    (their jobs never ran)."""
    out = []
    for s in scans:
        for gate in s.get("gates", ()):
            refusing = [(p, r) for p, r in ((p, read_json(p).get("refused")) for p in gate)
                        if r]
            if refusing:
                # the scan's own record names the gate before its model's (baseline's)
                first = min(refusing, key=lambda pr: Path(pr[0]).parent.name
                            != str(s["timepoint"]))[0]
                out.append({"patient": s["patient"], "timepoint": s["timepoint"],
                            "months": s["months"],
                            "excluded_by": _gate_name(first, str(s["timepoint"])),
                            "reason": "; ".join(dict.fromkeys(r for _, r in refusing))})
                break
    return out


#: the gate rule that reads each record (workflow/rules), by the record's file name
GATE_OF_RECORD = {"scan": "accept_scan", "calibration": "accept_calibration",
                  "vertebra": "accept_vertebra", "screws": "accept_screws",
                  "mesh": "accept_mesh", "registration": "accept_registration"}


def _gate_name(record, timepoint: str) -> str:
    """The gate that refused a scan, from its record's path (``<patient>/<timepoint>/
    <name>.json``): the load cases' records are the strength gate's; a record of the
    scan's model (its baseline) says so."""
    path = Path(record)
    gate = GATE_OF_RECORD.get(path.stem, "accept_strength")
    return gate if path.parent.name == timepoint else f"{gate} (of {path.parent.name})"
