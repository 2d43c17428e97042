"""The real TotalSegmentator L1 (../shared/data/real) at its own 2.5 mm slices and resampled to
5 mm slices, each run through the workflow with the totalseg-l1 cohort's config (automatic
planning, default mesh, nonlinear solves): what thick slices do to vBMD, screws and strengths
(README, Known limits). About 3 minutes on 2 cores.

    python tools/thick_slices.py /tmp/thick
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

from qctfea.mdtable import pipe_table

REPO = Path(__file__).resolve().parents[1]
SRC = REPO.parent / "shared" / "data" / "real" / "totalseg_L1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="thick_slices",
                    help="output folder (default: thick_slices in the current folder)")
    out = Path(ap.parse_args().out).resolve()

    for name, interp, fill in (("ct.nii.gz", sitk.sitkLinear, -1024),
                               ("labels.nii.gz", sitk.sitkNearestNeighbor, 0)):
        img = sitk.ReadImage(str(SRC / name))
        sp, size = list(img.GetSpacing()), list(img.GetSize())
        ref = sitk.Image([size[0], size[1], int(size[2] * sp[2] / 5.0)], img.GetPixelID())
        ref.SetSpacing([sp[0], sp[1], 5.0])
        ref.SetOrigin(img.GetOrigin())
        ref.SetDirection(img.GetDirection())
        (out / "5mm").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.Resample(img, ref, sitk.Transform(), interp, fill, img.GetPixelID()),
                        str(out / "5mm" / name))

    config = (REPO / "config" / "cohorts" / "totalseg-l1" / "config.yaml").read_text(
        encoding="utf-8")
    rows = []
    for slices, folder in (("2.5 mm", SRC), ("5 mm", out / "5mm")):
        cohort = "l1_" + slices.split()[0].replace(".", "_")
        d = out / "cohorts" / cohort
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(config, encoding="utf-8")
        (d / "samples.tsv").write_text(
            "patient\ttimepoint\tmonths\timage\tlabels\n"
            f"T01\tM00\t0\t{folder / 'ct.nii.gz'}\t{folder / 'labels.nii.gz'}\n", encoding="utf-8")
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile",
                        str(REPO / "Snakefile"), "--directory", str(out), "--configfile",
                        str(REPO / "config" / "config.yaml"), "--config", f"cohort={cohort}",
                        f"cohorts_dir={out / 'cohorts'}", "--quiet"], check=True, cwd=REPO)
        r = out / "results" / cohort / "T01" / "M00"
        bmd = json.loads((r / "bmd.json").read_text(encoding="utf-8"))
        screws = json.loads((r / "screws.json").read_text(encoding="utf-8"))["screws"]
        strength = {c: json.loads((r / f"{c}.json").read_text(encoding="utf-8"))["strength_n"]
                    for c in ("compression", "pullout_left", "pullout_right")}
        rows.append((slices, bmd["trabecular_vbmd_mg_cm3"],
                     "/".join(f"{s['planning']['convergence_deg']:.1f}" for s in screws),
                     strength["compression"], strength["pullout_left"], strength["pullout_right"]))

    print(pipe_table(["slices", "trabecular vBMD (mg/cm³)", "convergence L/R (°)",
                      "compression (N)", "pullout left (N)", "pullout right (N)"],
                     [(s, f"{v:.1f}", conv, f"{c:.0f}", f"{pl:.0f}", f"{pr:.0f}")
                      for s, v, conv, c, pl, pr in rows], "lrrrrr"))


if __name__ == "__main__":
    main()
