"""The phantom rod finder on a real CT (docs/calibration.md, "Finding the rods"): the real
TotalSegmentator L1 of ../shared/data/real lying on a Mindways-valued five-rod phantom
(rendered by the tests' own renderer, tests/phantom_scene.py: gel pad, the scan's table,
20 HU noise), and the real scans without a phantom.

1. Rod diameters 8, 10, 14 and 20 mm, `rod_diameter_mm` not given: the diameter measured,
   the line against the true one, the time.
2. Both real scans without a phantom, asked for every preset's rods at min_contrast_hu 10,
   15 and 40, with the vertebra alone or every label excluded: each must be refused.

    .venv/bin/python tools/phantom_check.py --out-md /tmp/phantom_table.md

Not part of the library or the tests (the tests run a subset: tests/test_phantom.py).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from phantom_scene import real_l1_on_a_phantom  # noqa: E402  (the tests' renderer)

from qctfea.errors import QctfeaError  # noqa: E402
from qctfea.imaging import ingest  # noqa: E402
from qctfea.imaging.calibration import phantom_calibration  # noqa: E402
from qctfea.imaging.phantoms import PHANTOM_PRESETS, PhantomSpec  # noqa: E402
from qctfea.mdtable import pipe_table  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
NO_PHANTOM = {"TotalSegmentator L1": ("totalseg_L1/ct.nii.gz", "totalseg_L1/labels.nii.gz", 31),
              "VerSe L3": ("verse_tptbox_L3/ct.nii.gz", "verse_tptbox_L3/vertebrae.nii.gz", 22)}


def diameters() -> list[list[str]]:
    rows = []
    for mm in (8.0, 10.0, 14.0, 20.0):
        hu, sp, lab, (slope, intercept), _ = real_l1_on_a_phantom(REAL, body_hu=-120.0,
                                                                  rod_mm=mm)
        t0 = time.perf_counter()
        cal = phantom_calibration(hu, sp, lab != 0, PhantomSpec(preset="mindways_model3"), "")
        s = time.perf_counter() - t0
        d = np.mean([r["diameter_mm"] for r in cal.rods])
        rows.append([f"{mm:g}", f"{d:.2f}", f"{cal.slope:.4f} / {slope:.4f}",
                     f"{100 * (cal.slope / slope - 1):+.3f}",
                     f"{cal.intercept:.2f} / {intercept:.2f}", f"{s:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def no_phantom() -> list[list[str]]:
    rows = []
    for case, (ct_p, lab_p, target) in NO_PHANTOM.items():
        ct = ingest.canonical_orientation(sitk.ReadImage(str(REAL / ct_p)))
        lab = sitk.GetArrayFromImage(ingest.canonical_orientation(
            sitk.ReadImage(str(REAL / lab_p))))
        hu = sitk.GetArrayFromImage(ct).astype(np.float32)
        for preset in (p for p in PHANTOM_PRESETS if p != "demo_k2hpo4"):
            for contrast in (10.0, 15.0, 40.0):
                for which, anatomy in (("vertebra", lab == target), ("every label", lab != 0)):
                    spec = PhantomSpec(preset=preset, min_contrast_hu=contrast)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            cal = phantom_calibration(hu, ct.GetSpacing(), anatomy, spec, "")
                        result = f"CALIBRATED (R² {cal.r2:.3f})"
                    except QctfeaError as exc:
                        result = "refused" + (": no phantom found"
                                              if "no calibration phantom" in str(exc) else "")
                    rows.append([case, preset, f"{contrast:g}", which, result])
                    print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-md", type=Path, required=True)
    args = ap.parse_args()
    a = pipe_table(["rods (mm)", "measured diameter (mm)", "slope found / true",
                    "slope error %", "intercept found / true (mg/cm³)", "s"],
                   diameters(), "rrrrrr")
    b = pipe_table(["scan (no phantom)", "preset", "min_contrast_hu", "excluded",
                    "result"], no_phantom(), "lllll")
    args.out_md.write_text(a + "\n\n" + b + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
