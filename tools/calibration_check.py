"""Phantomless calibration of the real CTs of ../shared/data/real as labs bring them: at their
own resolution, resampled to 3 mm voxels, to 1 x 1 x 3 mm on a grid turned 15 degrees about
z, and to 3 mm on a grid turned 12 degrees about x (the resampled grids hold padding, -1024
HU, where they reach beyond the scan). Each variant runs the pipeline's calibration step
(tissue regression and effective energy) and records the tissues used and the line.

    .venv/bin/python tools/calibration_check.py --out-md /tmp/calibration_table.md

Not part of the library or the tests (the tests run a subset: tests/test_phantomless.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planning_check as pc  # noqa: E402  (the real scans and the regridding)

from qctfea.steps import imaging as steps_imaging  # noqa: E402
from qctfea.mdtable import pipe_table  # noqa: E402
from qctfea.provenance import read_json  # noqa: E402

#: case -> (target label, label convention, phantomless settings)
SETTINGS = {"TotalSegmentator L1": (31, "totalsegmentator", {"blood_label": 52}),
            "VerSe L3": (22, "verse", {})}
VARIANTS = (("own", None, None, 0.0), ("3 x 3 x 3", (3.0, 3.0, 3.0), None, 0.0),
            ("1 x 1 x 3", (1.0, 1.0, 3.0), "z", 15.0), ("3 x 3 x 3", (3.0, 3.0, 3.0), "x", 12.0))


def calibrate(case: str, spacing, axis, deg, model: str, work: Path) -> dict:
    """The calibration record of one variant of a real scan."""
    ct_p, lab_p, _, _, own = pc.CASES[case]
    label, convention, extra = SETTINGS[case]
    if spacing is None:
        ct, lab = ct_p, lab_p
    else:
        rot = pc.rotation(axis, deg)
        ct, lab = work / "ct.nii.gz", work / "labels.nii.gz"
        sitk.WriteImage(pc.regrid(sitk.ReadImage(str(ct_p)), spacing, rot, False), str(ct))
        sitk.WriteImage(pc.regrid(sitk.ReadImage(str(lab_p)), spacing, rot, True), str(lab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps_imaging.calibrate(
            ct_path=ct, labels_path=lab, out_density=work / "density.nii.gz",
            out_json=work / "calibration.json", out_png=work / "calibration.png",
            cfg={"method": "phantomless", "phantomless": {"model": model, **extra}},
            context=f"{case}, {spacing or own} mm", label=label, convention=convention)
    return read_json(work / "calibration.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-md", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for case in SETTINGS:
        own_slope = {}
        for name, spacing, axis, deg in VARIANTS:
            cells = []
            for model in ("tissue_regression", "effective_energy"):
                with tempfile.TemporaryDirectory() as tmp:
                    cal = calibrate(case, spacing, axis, deg, model, Path(tmp))
                own_slope.setdefault(model, cal["slope"])
                cells.append(f"{cal['slope']:.4f} ({cal['slope'] / own_slope[model] - 1:+.1%})")
            used = ", ".join(f"{t['name']} {t['median_hu']:.1f}" for t in cal["tissues"]
                             if t["used"])
            rows.append([case, f"{name} mm" if spacing else f"{pc.CASES[case][-1]} mm (own)",
                         f"{deg:g}° about {axis}" if axis else "none", used, *cells])
            print(rows[-1], flush=True)
    text = pipe_table(["scan", "voxels", "grid rotation", "tissues used (median HU)",
                       "tissue regression slope (vs own)", "effective energy slope (vs own)"],
                      rows, "llllrr")
    args.out_md.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
