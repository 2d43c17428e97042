"""The whole workflow on the real CTs of ../shared/data/real as labs bring them: each scan at
its own resolution, resampled to 3 mm voxels, to 1 x 1 x 3 mm on a grid turned 15 degrees
about z, and to 3 mm on a grid turned 12 degrees about x (the anatomy stays in place, the
voxel grid turns; padding at -1024 HU where the grid reaches beyond the scan). Every variant
is a patient of one cohort per scan, run by Snakemake with the scan's cohort config
(config/cohorts/<name>) and, by default, the test suite's coarse mesh and linear analysis;
the table gives each variant's screws, calibration, vBMD and strengths against the scan at its
own resolution.

    .venv/bin/python tools/real_variants_check.py --work /tmp/variants \
        --out-md /tmp/variants_table.md [--nonlinear]

Not part of the library or the tests (tests/test_real_workflow.py runs the scans at their own
resolution; tests/test_real_planning.py and tests/test_phantomless.py run variants of the
planning and calibration steps).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import SimpleITK as sitk
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planning_check as pc  # noqa: E402  (the real scans and the regridding)

from qctfea.mdtable import pipe_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COHORTS = {"totalseg-l1": "TotalSegmentator L1", "verse-l3": "VerSe L3"}
#: patient id -> (label, spacing or None for the scan's own, rotation axis, degrees)
VARIANTS = {"V0": ("own voxels", None, None, 0.0), "V1": ("3 mm", (3.0, 3.0, 3.0), None, 0.0),
            "V2": ("1 x 1 x 3 mm, 15° about z", (1.0, 1.0, 3.0), "z", 15.0),
            "V3": ("3 mm, 12° about x", (3.0, 3.0, 3.0), "x", 12.0),
            # 5 mm slices: outside the range the pipeline is built for (0.5-3 mm); run with
            # --variants V0 V4 V5
            "V4": ("1 x 1 x 5 mm", (1.0, 1.0, 5.0), None, 0.0),
            "V5": ("1 x 1 x 5 mm, 10° about x", (1.0, 1.0, 5.0), "x", 10.0),
            # fine voxels as spine CT protocols give them (--variants V0 V6 V7)
            "V6": ("0.5 mm", (0.5, 0.5, 0.5), None, 0.0),
            "V7": ("0.5 x 0.5 x 1 mm, 20° about y", (0.5, 0.5, 1.0), "y", 20.0)}
#: the variants run unless --variants says otherwise
DEFAULT_VARIANTS = ("V0", "V1", "V2", "V3")
#: the test suite's settings (tests/test_real_workflow.py): coarse mesh, linear analysis
COARSE = {"mesh": {"voxel_mm": 0.6, "bone_cell_size_mm": 3.5, "screw_cell_size_mm": 2.0,
                   "peri_screw_cell_size_mm": 2.0},
          "loads": {"analysis": "linear"}}


def write_cohort(cohort: str, work: Path, nonlinear: bool, variants) -> None:
    """The variants' images and the cohort folder (config + sample sheet) under ``work``."""
    ct_p, lab_p, sub_p, _, _ = pc.CASES[COHORTS[cohort]]
    rows = []
    for pid in variants:
        _, spacing, axis, deg = VARIANTS[pid]
        d = work / "images" / cohort / pid
        d.mkdir(parents=True, exist_ok=True)
        files = {"image": ct_p, "labels": lab_p, "subregions": sub_p}
        row = {"patient": pid, "timepoint": "M00", "months": 0, "landmarks": "", "dxa": ""}
        for col, src in files.items():
            if src is None:
                row[col] = ""
                continue
            if spacing is None:
                row[col] = str(src)
                continue
            out = d / f"{col}.nii.gz"
            img = pc.regrid(sitk.ReadImage(str(src)), spacing, pc.rotation(axis, deg),
                            col != "image")
            sitk.WriteImage(img, str(out))
            row[col] = str(out)
        rows.append(row)
    src_dir = REPO / "config" / "cohorts" / cohort
    cfg = yaml.safe_load((src_dir / "config.yaml").read_text())
    if not nonlinear:
        cfg = {**cfg, **COARSE}
    d = work / "cohorts" / cohort
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    pd.DataFrame(rows)[["patient", "timepoint", "months", "image", "labels", "subregions",
                        "landmarks", "dxa"]].to_csv(d / "samples.tsv", sep="\t", index=False)


def run_cohort(cohort: str, work: Path) -> float:
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).with_name("snakemake")), "--cores", "2", "--snakefile",
           str(REPO / "Snakefile"), "--directory", str(work), "--configfile",
           str(REPO / "config" / "config.yaml"), "--config", f"cohort={cohort}",
           f"cohorts_dir={work / 'cohorts'}", "--keep-going"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=False)
    return time.perf_counter() - t0


def rows_of(cohort: str, work: Path, variants) -> list[list]:
    res = work / "results" / cohort
    long = pd.read_csv(res / "tables" / "longitudinal.csv").set_index("patient")
    ex = res / "tables" / "exclusions.csv"
    refused = (pd.read_csv(ex, dtype=str).set_index("patient")["reason"].to_dict()
               if ex.is_file() else {})
    own = long.loc["V0"] if "V0" in long.index else None
    out = []
    for pid in variants:
        label = VARIANTS[pid][0]
        if pid not in long.index:
            out.append([COHORTS[cohort], label, "refused: " + refused.get(pid, "no result")]
                       + [""] * 6)
            continue
        r = long.loc[pid]
        screws = json.loads((res / pid / "M00" / "screws.json").read_text())["screws"]
        cal = json.loads((res / pid / "M00" / "calibration.json").read_text())

        def rel(col: str) -> str:
            v = r[col]
            return f"{v:.0f}" + ("" if own is None or pid == "V0"
                                 else f" ({v / own[col] - 1:+.0%})")

        out.append([
            COHORTS[cohort], label,
            ", ".join(f"{s['placement']['grade']} {s['planning']['convergence_deg']:.1f}°"
                      for s in screws),
            f"{cal['slope']:.3f}", f"{r['trabecular_vbmd_mg_cm3']:.1f}",
            rel("compression_stiffness_n_per_mm"), rel("compression_strength_n"),
            rel("pullout_strength_left_n"), rel("pullout_strength_right_n")])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="working folder (images, results)")
    ap.add_argument("--out-md", type=Path, required=True)
    ap.add_argument("--nonlinear", action="store_true",
                    help="the cohorts' own mesh and analysis instead of the coarse linear ones")
    ap.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS))
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    choices=list(VARIANTS), help="which variants (V0: the scan's own voxels, "
                    "the reference of the relative changes)")
    args = ap.parse_args()
    work = args.work.resolve()
    rows, seconds = [], {}
    for cohort in args.cohorts:
        write_cohort(cohort, work, args.nonlinear, args.variants)
        seconds[cohort] = run_cohort(cohort, work)
        rows += rows_of(cohort, work, args.variants)
    text = pipe_table(["scan", "variant", "screws: grade, convergence (left, right)",
                       "calibration slope", "trabecular vBMD mg/cm³",
                       "compression stiffness N/mm", "compression strength N",
                       "pullout left N", "pullout right N"], rows, "lllrrrrrr")
    text += "\n\nWorkflow seconds: " + ", ".join(f"{c} {s:.0f}" for c, s in seconds.items())
    args.out_md.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
