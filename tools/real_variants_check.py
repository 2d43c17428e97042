"""The whole workflow on the real CTs of ../shared/data/real as labs bring them: each scan at
its own resolution, resampled to 3 mm voxels, to 1 x 1 x 3 mm on a grid turned 15 degrees
about z, and to 3 mm on a grid turned 12 degrees about x (the anatomy stays in place, the
voxel grid turns; padding at -1024 HU where the grid reaches beyond the scan). Every variant
is a patient of one cohort per scan, run by Snakemake with the scan's cohort config
(config/cohorts/<name>) and, by default, the test suite's coarse mesh and linear analysis;
the table gives each variant's screws, calibration, vBMD and strengths against the scan at its
own resolution.

Image-quality variants (V8-V15; --variants V0 V8 ...) keep the scan's own voxels and label
maps and change the CT only, as clinical protocols do: low-dose noise (white noise smoothed
by a 0.6 mm Gaussian, scaled to an SD of 25 or 50 HU in a uniform region, fixed seed), a soft
reconstruction kernel (Gaussian blur of 0.8 or 1.2 mm), a sharp bone kernel (unsharp masking,
then noise of 40 HU SD, 0.4 mm grain), and an osteoporotic-looking scan (the vertebrae's CT
numbers drawn toward soft tissue, HU' = 30 + 0.6 (HU - 30) or 30 + 0.4 (HU - 30), then the
soft kernel). Padding (the fill outside the reconstruction, below -1024 HU) is left as it
is, as scanners leave it; values inside stay at or above -1024 HU, as scanners write them.

    .venv/bin/python tools/real_variants_check.py --work /tmp/variants \
        --out-md /tmp/variants_table.md [--nonlinear] [--variants V0 V8 V9 ...]

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

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planning_check as pc  # noqa: E402  (the real scans and the regridding)

from qctfea.imaging.masks import CONVENTIONS  # noqa: E402
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
            "V7": ("0.5 x 0.5 x 1 mm, 20° about y", (0.5, 0.5, 1.0), "y", 20.0),
            # image quality at the scan's own voxels (QUALITY; --variants V0 V8 ... V15)
            "V8": ("noise 25 HU", None, None, 0.0),
            "V9": ("noise 50 HU", None, None, 0.0),
            "V10": ("soft kernel 0.8 mm", None, None, 0.0),
            "V11": ("soft kernel 1.2 mm", None, None, 0.0),
            "V12": ("sharp kernel, noise 40 HU", None, None, 0.0),
            "V13": ("low density 0.6, soft kernel 0.8 mm", None, None, 0.0),
            "V14": ("low density 0.6, soft kernel 1.2 mm", None, None, 0.0),
            "V15": ("low density 0.4, soft kernel 1.2 mm", None, None, 0.0)}
#: image-quality variants: patient id -> the changes made to the CT, in order (:func:`degrade`):
#: ("noise", SD HU, grain mm), ("blur", sigma mm), ("sharpen", sigma mm, amount),
#: ("low_density", factor: HU' = 30 + factor (HU - 30) in the vertebrae)
QUALITY = {"V8": (("noise", 25.0, 0.6),), "V9": (("noise", 50.0, 0.6),),
           "V10": (("blur", 0.8),), "V11": (("blur", 1.2),),
           "V12": (("sharpen", 1.0, 1.0), ("noise", 40.0, 0.4)),
           "V13": (("low_density", 0.6), ("blur", 0.8)),
           "V14": (("low_density", 0.6), ("blur", 1.2)),
           "V15": (("low_density", 0.4), ("blur", 1.2))}
#: fixed seed of the added noise (each variant draws its own field from it)
NOISE_SEED = 20261207
#: the lowest CT number a scanner writes inside its reconstruction (HU); below it is padding
CT_FLOOR_HU = -1024.0
#: the soft-tissue value the low-density variants draw the vertebrae toward (HU)
LOW_DENSITY_PIVOT_HU = 30.0
#: the variants run unless --variants says otherwise
DEFAULT_VARIANTS = ("V0", "V1", "V2", "V3")
#: the test suite's settings (tests/test_real_workflow.py): coarse mesh, linear analysis
COARSE = {"mesh": {"voxel_mm": 0.6, "bone_cell_size_mm": 3.5, "screw_cell_size_mm": 2.0,
                   "peri_screw_cell_size_mm": 2.0},
          "loads": {"analysis": "linear"}}


def _smooth(a: np.ndarray, valid: np.ndarray, sigma_mm: float, sampling) -> np.ndarray:
    """Gaussian smoothing of ``a`` over the ``valid`` voxels only (normalised convolution):
    the padding does not bleed into the scan."""
    sig = [sigma_mm / s for s in sampling]
    num = ndimage.gaussian_filter(np.where(valid, a, 0.0), sig)
    den = ndimage.gaussian_filter(valid.astype(np.float64), sig)
    return np.where(valid, num / np.maximum(den, 1e-6), a)


def _noise(shape, sd: float, grain_mm: float, sampling, seed: int) -> np.ndarray:
    """Correlated Gaussian noise: white noise smoothed by a ``grain_mm`` Gaussian, scaled to
    ``sd`` (the SD of the field, which is that of any uniform region)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape),
                                    [grain_mm / s for s in sampling])
    return field * (sd / field.std())


def degrade(ct: sitk.Image, labels: sitk.Image, ops, cohort: str) -> sitk.Image:
    """``ct`` with the image-quality changes ``ops`` (QUALITY) made in order, on the scan's
    own grid. Padding (values below CT_FLOOR_HU: the fill outside the reconstruction, -2048
    on the L1) stays as it is and is not blurred into the scan; no value inside falls below
    CT_FLOOR_HU."""
    a = sitk.GetArrayFromImage(ct).astype(np.float64)
    sampling = np.array(ct.GetSpacing(), float)[::-1]
    valid = a >= CT_FLOOR_HU
    vertebrae = np.isin(sitk.GetArrayFromImage(labels),
                        list(CONVENTIONS[pc.CASES[COHORTS[cohort]][3]["convention"]].values()))
    for k, op in enumerate(ops):
        if op[0] == "noise":
            a = np.where(valid, a + _noise(a.shape, op[1], op[2], sampling, NOISE_SEED + k), a)
        elif op[0] == "blur":
            a = _smooth(a, valid, op[1], sampling)
        elif op[0] == "sharpen":
            a = np.where(valid, a + op[2] * (a - _smooth(a, valid, op[1], sampling)), a)
        elif op[0] == "low_density":
            p = LOW_DENSITY_PIVOT_HU
            a = np.where(vertebrae, p + op[1] * (a - p), a)
        else:
            raise ValueError(op)
    a = np.where(valid, np.maximum(a, CT_FLOOR_HU), a)
    out = sitk.GetImageFromArray(np.round(a).astype(np.int16))
    out.CopyInformation(ct)
    return out


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
            if col == "image" and pid in QUALITY:
                out = d / "image.nii.gz"
                sitk.WriteImage(degrade(sitk.ReadImage(str(src)), sitk.ReadImage(str(lab_p)),
                                        QUALITY[pid], cohort), str(out))
                row[col] = str(out)
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
    ap.add_argument("--out-md", type=Path, required=True, help="the markdown table written")
    ap.add_argument("--nonlinear", action="store_true",
                    help="the cohorts' own mesh and analysis instead of the coarse linear ones")
    ap.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS))
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    choices=list(VARIANTS), help="which variants (V0: the scan's own voxels, "
                    "the reference of the relative changes; V1-V7 other grids, V8-V15 image "
                    "quality: " + "; ".join(f"{k} {v[0]}" for k, v in VARIANTS.items())
                    + ")")
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
