"""The imaging steps on a thin-slice CT: the real TotalSegmentator L1 of ../shared/data/real
resampled to 0.5 mm voxels (720 x 720 x 225), phantomless calibration and the vertebra mask
timed with the ball morphology of qctfea.imaging.morphology as it chooses (distance map or
scipy) and with scipy only, in one run; the outputs of the two must be equal.

    .venv/bin/python tools/thin_slice_imaging.py [--spacing 0.5]

Results: docs/performance.md ("Imaging steps on a thin-slice CT"). Not part of the library
or the tests (tests/test_morphology.py checks the voxels on small grids).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.imaging import morphology

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "totalseg_L1"


def resample(src: Path, out: Path, spacing: float, labels: bool) -> None:
    img = sitk.ReadImage(str(src))
    sp = (spacing,) * 3
    size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    sitk.WriteImage(sitk.Resample(img, size, sitk.Transform(),
                                  sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                                  img.GetOrigin(), sp, img.GetDirection(),
                                  0 if labels else -2048, img.GetPixelID()), str(out), True)


def run(d: Path, tag: str) -> dict:
    t = {}
    t0 = time.perf_counter()
    steps_imaging.calibrate(ct_path=d / "ct.nii.gz", labels_path=d / "labels.nii.gz",
                            out_density=d / f"{tag}_density.nii.gz",
                            out_json=d / f"{tag}_calibration.json",
                            out_png=d / f"{tag}_calibration.png",
                            cfg={"method": "phantomless",
                                 "phantomless": {"model": "tissue_regression",
                                                 "tissues": ["air", "fat", "muscle"]}},
                            context=f"thin-slice L1 ({tag})", label=31)
    t["calibrate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps_vertebra.mask(ct_path=d / "ct.nii.gz", labels_path=d / "labels.nii.gz",
                        out_parts=d / f"{tag}_parts.nii.gz", out_json=d / f"{tag}_parts.json",
                        cfg={"convention": "totalsegmentator", "vertebra": "L1"},
                        context=f"thin-slice L1 ({tag})")
    t["mask_s"] = time.perf_counter() - t0
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spacing", type=float, default=0.5, help="voxel size (mm)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        resample(REAL / "ct.nii.gz", d / "ct.nii.gz", a.spacing, False)
        resample(REAL / "labels.nii.gz", d / "labels.nii.gz", a.spacing, True)
        size = sitk.ReadImage(str(d / "labels.nii.gz")).GetSize()
        chosen = run(d, "chosen")
        limit = morphology.SCIPY_BALL_LIMIT
        morphology.SCIPY_BALL_LIMIT = np.inf
        try:
            scipy_only = run(d, "scipy")
        finally:
            morphology.SCIPY_BALL_LIMIT = limit
        same = all(
            np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"chosen_{f}"))),
                           sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"scipy_{f}"))))
            for f in ("density.nii.gz", "parts.nii.gz"))
        slope = [json.loads((d / f"{t}_calibration.json").read_text(encoding="utf-8"))["slope"]
                 for t in ("chosen", "scipy")]
    print(f"thin-slice L1, {a.spacing} mm, {' x '.join(map(str, size))} voxels")
    for k in ("calibrate_s", "mask_s"):
        print(f"  {k[:-2]:10s} scipy only {scipy_only[k]:6.1f} s, as chosen {chosen[k]:6.1f} s "
              f"({scipy_only[k] / chosen[k]:.1f}x)")
    print(f"  outputs equal: {same and slope[0] == slope[1]} (slope {slope[0]:.6g})")


if __name__ == "__main__":
    main()
