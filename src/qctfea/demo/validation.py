"""Validation of a synthetic cohort's results against the generator's ground truth.

The workflow never reads ``truth.json``; this module (and the tests) do, after the
run: per scan, the calibration slope against the true slope, the trabecular vBMD
against the true mean density of the trabecular region, and for registered
follow-ups the registration against the true change of patient position between
the visits (mean and maximum point error over the baseline vertebra, rotation
error in degrees). Gates: slope within 1 %, trabecular vBMD within
2 mg/cm³, registration within 0.5 mm and 0.5 degrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.mdtable import pipe_table
from qctfea.provenance import atomic_path, read_json

GATES = {"slope_rel_error": 0.01, "trabecular_vbmd_error_mg_cm3": 2.0,
         "registration_max_error_mm": 0.5, "registration_rotation_error_deg": 0.5}


def _pose(truth: dict) -> tuple[np.ndarray, np.ndarray]:
    from qctfea.demo.synth import CENTRE, rotation_matrix

    p = truth["pose"]
    return rotation_matrix(np.asarray(p["rotation_deg"])), CENTRE + np.asarray(p["translation_mm"])


def registration_error(truth0: dict, truth1: dict, tfm_path, parts0_path,
                       every: int = 200) -> tuple[float, float, float]:
    """(mean mm, max mm, rotation degrees) of a baseline->follow-up transform against the
    generator's poses, over the baseline vertebra's voxels."""
    tx = sitk.ReadTransform(str(tfm_path))
    parts = sitk.ReadImage(str(parts0_path))
    (R0, c0), (R1, c1) = _pose(truth0), _pose(truth1)
    idx = np.argwhere(sitk.GetArrayFromImage(parts) > 0)[::every][:, ::-1]
    err = []
    for i in idx:
        w0 = np.array(parts.TransformIndexToPhysicalPoint([int(v) for v in i]))
        w1 = c1 + R1 @ (R0.T @ (w0 - c0))
        err.append(np.linalg.norm(np.subtract(tx.TransformPoint(tuple(w0)), w1)))
    from qctfea.imaging.registration import as_euler

    Rr = np.asarray(as_euler(tx).GetMatrix()).reshape(3, 3)
    cos = (np.trace(Rr.T @ (R1 @ R0.T)) - 1) / 2
    return float(np.mean(err)), float(np.max(err)), float(np.degrees(np.arccos(np.clip(cos, -1,
                                                                                        1))))


def validate_cohort(results_dir, resources_dir, samples: pd.DataFrame) -> pd.DataFrame:
    """One row per scan of ``samples`` (patient, timepoint, months): errors against truth."""
    res, src = Path(results_dir), Path(resources_dir)
    rows = []
    for patient, g in samples.groupby("patient", sort=True):
        g = g.sort_values("months", kind="mergesort")
        base = str(g["timepoint"].iloc[0])
        truth0 = read_json(src / patient / base / "truth.json")
        for t in g["timepoint"].astype(str):
            truth = read_json(src / patient / t / "truth.json")
            cal = read_json(res / patient / t / "calibration.json")
            bmd = read_json(res / patient / t / "bmd.json")
            row = {"patient": patient, "timepoint": t,
                   "slope_rel_error": cal["slope"] / truth["calibration"]["slope"] - 1,
                   "trabecular_vbmd_error_mg_cm3": bmd["trabecular_vbmd_mg_cm3"]
                   - truth["trabecular_vbmd_mg_cm3"],
                   "registration_mean_error_mm": np.nan, "registration_max_error_mm": np.nan,
                   "registration_rotation_error_deg": np.nan}
            tfm = res / patient / t / "registration.tfm"
            if t != base and tfm.is_file():
                (row["registration_mean_error_mm"], row["registration_max_error_mm"],
                 row["registration_rotation_error_deg"]) = registration_error(
                    truth0, truth, tfm, res / patient / base / "vertebra.nii.gz")
            rows.append(row)
    if not rows:
        raise QctfeaError("validate: no scans")
    return pd.DataFrame(rows)


def summary_markdown(df: pd.DataFrame) -> str:
    rows = []
    for col, gate in GATES.items():
        v = df[col].dropna()
        if v.empty:
            continue
        ok = bool((v.abs() <= gate).all())
        rows.append([col, len(v), f"{v.mean():+.4g}", f"{v.abs().max():.4g}", f"{gate:g}",
                     "yes" if ok else "NO"])
    return pipe_table(["quantity", "scans", "mean", "max abs", "gate", "within gate"], rows,
                      "lrrrrl") + "\n"


def write_validation(results_dir, resources_dir, sheet, out_csv, out_md) -> pd.DataFrame:
    from qctfea.cohort.samples import read_sample_sheet

    df = validate_cohort(results_dir, resources_dir, read_sample_sheet(sheet))
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(summary_markdown(df), encoding="utf-8")
    return df
