"""The vertebral body found by opening against independent body segmentations: the real L3's
VerSe/TPTBox sub-region map (49 + 50; the real crop the planning check and the tests read,
tools/planning_check.py ``CASES``) and, when given the folder, TotalSegmentator's
`vertebrae_body` map (label 1) of its example CT's L1-L5 (3 mm; how to fetch it:
tools/ts_example_check.py). Per vertebra: the ball used, the opened body's solidity and
mirror asymmetry, the volumes and the Dice overlap of the body with its rim given back and of
the opened body dilated by 1 mm (the body before 2026-12-07, still the trabecular ROI's
source). Seconds on one core.

    python tools/body_check.py [--ts /tmp/ts/totalsegmentator-2.18.0/tests/reference_files]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.imaging import body, masks, morphology
from qctfea.mdtable import pipe_table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planning_check import CASES  # noqa: E402
from ts_example_check import BODIES, LABELS  # noqa: E402


def cases(ts: Path | None):
    """(name, label image, vertebra mask, independent body mask)."""
    _, lab_p, sub_p, cfg, _ = CASES["VerSe L3"]
    lab = sitk.ReadImage(str(lab_p))
    label = masks.resolve_label(cfg["convention"], cfg["vertebra"], None)[0]
    sub = sitk.GetArrayFromImage(sitk.ReadImage(str(sub_p)))
    yield "VerSe L3", lab, sitk.GetArrayFromImage(lab) == label, np.isin(sub, (49, 50))
    if ts is not None:
        lab = sitk.ReadImage(str(ts / LABELS))
        arr = sitk.GetArrayFromImage(lab)
        bodies = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / BODIES))) == 1
        for level in ("L1", "L2", "L3", "L4", "L5"):
            label = masks.resolve_label("totalsegmentator", level, None)[0]
            yield f"TotalSegmentator {level}", lab, arr == label, bodies


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ts", type=Path, help="TotalSegmentator's tests/reference_files folder")
    args = ap.parse_args()
    rows = []
    for name, img, vert, truth in cases(args.ts):
        sp = img.GetSpacing()
        vert = morphology.largest_component(vert)
        box = morphology.box_around(vert, 8)
        v, t = vert[box], truth[box] & vert[box]
        found, before, rec = body.from_opening(v, sp, masks.MaskParams(label=1), name,
                                               img.GetDirection())
        cm3 = float(np.prod(sp)) / 1000
        rows.append([name, "x".join(f"{s:g}" for s in sp), f"{rec['radius_mm']:.1f}",
                     f"{rec['solidity']:.2f}", f"{rec['asymmetry']:.2f}",
                     f"{t.sum() * cm3:.1f}", f"{found.sum() * cm3:.1f}",
                     f"{dice(found, t):.3f}", f"{before.sum() * cm3:.1f}",
                     f"{dice(before, t):.3f}"])
    print(pipe_table(["vertebra", "voxels (mm)", "ball (mm)", "solidity", "asymmetry",
                      "map's body (cm³)", "body (cm³)", "Dice", "opened body + 1 mm (cm³)",
                      "its Dice"], rows, "llrrrrrrrr"))


if __name__ == "__main__":
    main()
