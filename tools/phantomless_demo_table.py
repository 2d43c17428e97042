"""The demo cohort's phantomless calibration against the generator's truth and the phantom
(docs/calibration.md, "Demo scans"): every scan of the demo sheet generated (seed 2021),
ingested, calibrated with its phantom and without it, and its trabecular vBMD measured under
both. About 2 minutes on 2 cores. Prints the markdown table and its summary line.

    python tools/phantomless_demo_table.py /tmp/pl_demo
"""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import pandas as pd

from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.demo.synth import generate_scan
from qctfea.mdtable import pipe_table

SHEET = Path(__file__).resolve().parents[1] / "config" / "cohorts" / "demo" / "samples.tsv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="phantomless_demo",
                    help="output folder (default: phantomless_demo in the current folder)")
    out = Path(ap.parse_args().out).resolve()
    rows = []
    sheet = pd.read_csv(SHEET, sep="\t", dtype={"patient": str, "timepoint": str})
    for _, sample in sheet.iterrows():
        for patient, timepoint, months in ((sample["patient"], sample["timepoint"],
                                            float(sample["months"])),):
            src, r = out / "src" / patient / timepoint, out / "res" / patient / timepoint
            r.mkdir(parents=True, exist_ok=True)
            truth = generate_scan(src, patient, timepoint, months, seed=2021)
            ctx = f"patient {patient}, timepoint {timepoint}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps_imaging.ingest(source=src / "dicom", out_image=r / "ct.nii.gz",
                                     out_json=r / "scan.json", context=ctx)
                cal = {}
                for name, cfg in (("phantom", {"phantom": {"preset": "demo_k2hpo4"}}),
                                  ("phantomless", {"method": "phantomless"})):
                    steps_imaging.calibrate(ct_path=r / "ct.nii.gz",
                                            labels_path=src / "labels.nii.gz",
                                            out_density=r / f"density_{name}.nii.gz",
                                            out_json=r / f"cal_{name}.json",
                                            out_png=r / f"cal_{name}.png", cfg=cfg,
                                            context=ctx, label=23)
                    cal[name] = json.loads((r / f"cal_{name}.json").read_text(encoding="utf-8"))
                steps_vertebra.mask(ct_path=r / "ct.nii.gz", labels_path=src / "labels.nii.gz",
                                    out_parts=r / "vertebra.nii.gz", out_json=r / "vertebra.json",
                                    cfg={}, context=ctx)
            roi = sitk.GetArrayFromImage(sitk.ReadImage(str(r / "vertebra.nii.gz"))) == 3
            vbmd = {n: float(sitk.GetArrayFromImage(sitk.ReadImage(
                str(r / f"density_{n}.nii.gz")))[roi].mean()) for n in cal}
            rows.append((f"{patient} {timepoint}", truth["effective_energy_kev"],
                         cal["phantomless"]["effective_energy"]["energy_kev"],
                         truth["calibration"]["slope"],
                         cal["phantom"]["slope"], cal["phantomless"]["slope"],
                         cal["phantomless"]["intercept"], vbmd["phantom"], vbmd["phantomless"]))

    print(pipe_table(
        ["scan", "true E (keV)", "fitted E (keV)", "true slope", "phantom slope",
         "phantomless slope", "phantomless intercept", "vBMD phantom", "vBMD phantomless",
         "difference (mg/cm³)"],
        [(scan, f"{e_true:.2f}", f"{e_fit:g}", f"{s_true:.4f}", f"{s_ph:.4f}", f"{s_pl:.4f}",
          f"{i_pl:.2f}", f"{v_ph:.2f}", f"{v_pl:.2f}", f"{v_pl - v_ph:.2f}")
         for scan, e_true, e_fit, s_true, s_ph, s_pl, i_pl, v_ph, v_pl in rows], "lrrrrrrrrr"))
    de = np.array([r[2] - r[1] for r in rows])
    dv = np.array([r[8] - r[7] for r in rows])
    print(f"\nOver the {len(rows)} scans: energy error at most {np.abs(de).max():.2f} keV (mean "
          f"{np.abs(de).mean():.2f}, from {de.min():+.2f} to {de.max():+.2f}), vBMD difference at "
          f"most {np.abs(dv).max():.2f} mg/cm³ (mean absolute {np.abs(dv).mean():.2f}).")


if __name__ == "__main__":
    main()
