"""Per-scan result files of a cohort without running the image/FE steps.

``write_results`` reads a sample sheet and writes, for each of its rows,
``results/<cohort>/<patient>/<timepoint>/`` with the JSON files the cohort
rules read (as the pipeline writes them, plus keys those rules must ignore),
small ``calibration.png`` and ``roi.png`` pictures, and what the per-patient pages add
(curve, mesh and registration pictures, a tiny tetrahedral model and its fields). Values follow a treatment-like trend with
noise, deterministic per (patient, months).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
COHORTS = REPO / "tests" / "cohorts"

#: The cohort rules (run on existing per-scan results with --allowed-rules).
COHORT_RULES = ["aggregate_cohort", "record_exclusions", "cohort_tables", "compute_statistics", "cohort_figures",
                "qc_montage", "summary_page", "patient_page"]


def fake_scan(i: int, months: float, rng: np.random.Generator) -> dict[str, dict]:
    trab = 80.0 + 12.0 * i + 0.45 * months + rng.normal(scale=2.0)
    screw_l = 170.0 + 14.0 * i + 0.40 * months + rng.normal(scale=3.0)
    screw_r = screw_l + rng.normal(scale=4.0)
    f_l = 300.0 + 9.0 * screw_l + rng.normal(scale=60.0)
    f_r = 300.0 + 9.0 * screw_r + rng.normal(scale=60.0)
    comp = 40.0 * trab + rng.normal(scale=150.0)
    prov = {"step": "fake"}
    return {
        "bmd.json": {"trabecular_vbmd_mg_cm3": trab, "integral_vbmd_mg_cm3": 1.7 * trab + 10,
                     "areal_bmd_g_cm2": 0.45 + trab / 600 + rng.normal(scale=0.01),
                     "around_screw_vbmd_mg_cm3": {"left": screw_l, "right": screw_r},
                     "provenance": prov},
        "compression.json": {"stiffness_n_per_mm": 10 * comp, "strength_n": comp,
                             "n_dofs": 3000, "ksp_iterations": 40, "n_cells": 1000,
                             "analysis": "linear", "curve": [{"u": 0.0, "f": 0.0}],
                             "provenance": prov},
        "pullout_left.json": {"stiffness_n_per_mm": 12 * f_l, "strength_n": f_l, "n_dofs": 3000,
                              "ksp_iterations": 30, "strength_rule": "peak", "provenance": prov},
        "pullout_right.json": {"stiffness_n_per_mm": 12 * f_r, "strength_n": f_r,
                               "n_dofs": 3000, "provenance": prov},  # no ksp_iterations
        "mesh.json": {"n_cells": 1000 + i, "n_vertices": 300},
        "calibration.json": {"slope": 0.8, "intercept": -3.0, "r2": 0.9999},
        # the acquisition (ingest step): one protocol for every scan
        "scan.json": {"scan": {"spacing_mm": [0.7, 0.7, 1.0], "kvp": 120.0,
                               "convolution_kernel": "B60f", "manufacturer": "SIEMENS"}},
        # the label map's checks (mask step): the workflow's gate record
        "vertebra.json": {"vertebra_volume_cm3": 60.0 + i, "body_volume_cm3": 40.0 + i},
        # a follow-up's registration QC (read for follow-ups only)
        "registration.json": {"dice_after": 0.97, "point_spread_mm": 0.05},
        # intervals and per-scan SDs (rule estimate_uncertainty): 2 % and 1 % of the value
        "uncertainty.json": {"outcomes": {
            k: {"value": v, "sd": 0.02 * v, "ci_low": 0.96 * v, "ci_high": 1.04 * v,
                "sd_scan": 0.01 * v, "sd_by_source": {}}
            for k, v in (("trabecular_vbmd_mg_cm3", trab), ("compression_strength_n", comp),
                         ("pullout_strength_left_n", f_l), ("pullout_strength_right_n", f_r),
                         ("pullout_strength_n", (f_l + f_r) / 2),
                         ("around_screw_vbmd_left_mg_cm3", screw_l),
                         ("around_screw_vbmd_right_mg_cm3", screw_r),
                         ("around_screw_vbmd_mg_cm3", (screw_l + screw_r) / 2))}},
        # the planning checkpoint's output (read at baseline: the follow-ups' model): 6.5 mm
        # screws, each pedicle's isthmus 5.9 + 1.1 i mm wide (patient P01's narrower than
        # the screw); the right screws of odd i without the isthmus record (no pedicle found)
        "screws.json": {"screws": [
            {"side": side, "diameter_mm": 6.5,
             "placement": {"grade": "A", "breach_mm": 0.0, "direction": "none"},
             **({"planning": {"isthmus_min_width_mm": 5.9 + 1.1 * i,
                              "screw_exceeds_isthmus": 6.5 > 5.9 + 1.1 * i}}
                if side == "left" or i % 2 == 0 else {})}
            for side in ("left", "right")], "provenance": prov},
    }


def _png(path: Path, text: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.4, 1.8), dpi=60)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1, 2], [0, 1, 2], "o-")
    ax.set_title(text, fontsize=8)
    fig.savefig(path, format="png")


def _tiny_model(d: Path, failed: int) -> None:
    """A 2x2x2-cube tetrahedral model (6 tets per cube) as mesh.xdmf/.h5 with bone (tags
    1, 2) and screw (3, 4) cubes, and the three load cases' <case>_fields.h5 on it with
    ``failed`` cells failed at the peak (what the per-patient page reads)."""
    import h5py

    from qctfea.model.meshing import write_mesh

    g = np.stack(np.meshgrid(*[np.arange(3.0) * 10] * 3, indexing="ij"), -1).reshape(-1, 3)
    vid = np.arange(27).reshape(3, 3, 3)
    kuhn = [(0, 1, 3, 7), (0, 1, 5, 7), (0, 2, 3, 7), (0, 2, 6, 7), (0, 4, 5, 7), (0, 4, 6, 7)]
    cells, tags = [], []
    for i, j, k in np.ndindex(2, 2, 2):
        corner = [vid[i + a, j + b, k + c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        tag = {(1, 1, 1): 3, (1, 0, 1): 4}.get((i, j, k), 1 if i == 0 else 2)
        cells += [[corner[n] for n in t] for t in kuhn]
        tags += [tag] * 6
    cells = np.array(cells)
    write_mesh(d / "mesh.xdmf", g, cells, np.array(tags))
    flag = np.zeros(len(cells))
    flag[:failed] = 1.0
    for case in ("compression", "pullout_left", "pullout_right"):
        with h5py.File(d / f"{case}_fields.h5", "w") as f:
            f["Mesh/mesh/geometry"] = g
            f["Mesh/mesh/topology"] = cells
            f["Function/failed_at_peak/0"] = flag.reshape(-1, 1)
            f["Function/yielded_at_peak/0"] = np.minimum(1.0, 2 * flag).reshape(-1, 1)


def write_results(workdir: Path, cohort: str, sheet: pd.DataFrame, seed: int = 3) -> Path:
    """Write the per-scan files of every row of ``sheet`` under ``workdir/results/<cohort>``."""
    res = workdir / "results" / cohort
    patients = sorted(sheet["patient"].unique())
    for _, row in sheet.iterrows():
        i = patients.index(row["patient"])
        rng = np.random.default_rng([seed, i, int(float(row["months"]))])
        d = res / row["patient"] / row["timepoint"]
        d.mkdir(parents=True, exist_ok=True)
        for name, content in fake_scan(i, float(row["months"]), rng).items():
            (d / name).write_text(json.dumps(content))
        # the per-scan QC pictures (screws.png: the planning checkpoint's, with screws.json)
        for picture in ("calibration.png", "roi.png", "screws.png"):
            _png(d / picture, f"{row['patient']} {row['timepoint']}")
        # what the per-patient page (rule patient_page) shows besides: curves, the model's
        # mesh picture, a follow-up's registration picture, a tiny model and its fields
        for picture in ("compression_curve.png", "pullout_left_curve.png",
                        "pullout_right_curve.png", "mesh.png", "registration.png"):
            _png(d / picture, f"{row['patient']} {row['timepoint']} {picture[:-4]}")
        _tiny_model(d, failed=1 + i)
        _slicer_files(d)
    return res


def _slicer_files(d: Path) -> None:
    """A model's vertebra parts image (one voxel) and, after it, its 3D Slicer export (rule
    export_slicer's outputs), so that the default targets are complete."""
    import os

    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image([2, 2, 2], sitk.sitkUInt8), str(d / "vertebra.nii.gz"))
    (d / "slicer").mkdir(exist_ok=True)
    for name in ("screws.mrk.json", "vertebra.stl", "screw_left.stl", "screw_right.stl"):
        (d / "slicer" / name).write_text("fake\n")
    later = (d / "vertebra.nii.gz").stat().st_mtime + 1
    for f in (d / "slicer").iterdir():
        os.utime(f, (later, later))


def setup_cohort(workdir: Path, name: str = "missing-followup") -> tuple[Path, pd.DataFrame]:
    """Copy ``tests/cohorts/<name>`` to ``workdir/cohorts`` and write its per-scan results.

    Returns the cohorts folder (for ``--config cohorts_dir=...``) and the sheet.
    """
    cohorts = workdir / "cohorts"
    shutil.copytree(COHORTS / name, cohorts / name)
    sheet = pd.read_csv(cohorts / name / "samples.tsv", sep="\t", dtype=str).fillna("")
    write_results(workdir, name, sheet)
    return cohorts, sheet


def snakemake_args(workdir: Path, cohorts: Path, name: str) -> list[str]:
    """Common arguments: this repository's Snakefile, run in ``workdir`` on cohort ``name``."""
    return ["--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(REPO / "config" / "config.yaml"),
            "--config", f"cohort={name}", f"cohorts_dir={cohorts}",
            "--allowed-rules", *COHORT_RULES]
