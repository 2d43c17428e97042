"""A large clinical-size CT from the real TotalSegmentator L1 (../shared/data/real), for the
memory and time measurements of docs/performance.md ("A large scan"): the CT resampled to
0.8 mm slices (512 x 512 x 140) and mirrored above and below to 420 slices (110 million
voxels), the mirrored copies' vertebra labels removed so that L1 stays the only complete
target. Writes ct.nii.gz and labels.nii.gz to the folder given (default: the current one).
``--unlabelled-copies``: the mirrored copies carry no label at all (organs, muscles, vessels
unlabelled there: a long scan labelled around one vertebra; docs/calibration.md).

    python tools/large_scan.py /tmp/big [--unlabelled-copies]
"""
import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=".",
                    help="output folder (default: the current one)")
    ap.add_argument("--unlabelled-copies", action="store_true",
                    help="the mirrored copies carry no label at all")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
              / "totalseg_L1") + "/"
    ct = sitk.ReadImage(src + "ct.nii.gz")
    lab = sitk.ReadImage(src + "labels.nii.gz")
    sp, size = list(ct.GetSpacing()), list(ct.GetSize())
    nz = int(size[2] * sp[2] / 0.8)
    ref = sitk.Image([size[0], size[1], nz], sitk.sitkInt16)
    ref.SetSpacing([sp[0], sp[1], 0.8])
    ref.SetOrigin(ct.GetOrigin())
    ref.SetDirection(ct.GetDirection())
    c = sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024, sitk.sitkInt16)
    lbl = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    a, b = sitk.GetArrayFromImage(c), sitk.GetArrayFromImage(lbl)
    # mirrored copies above and below (3x the range); their vertebra labels (25-50) removed
    top, top_labels = a[::-1], b[::-1].copy()
    top_labels[np.isin(top_labels, range(25, 51))] = 0
    if args.unlabelled_copies:
        top_labels[:] = 0
    big = sitk.GetImageFromArray(np.concatenate([top, a, top]))
    big.SetSpacing(c.GetSpacing())
    big.SetDirection(c.GetDirection())
    d = np.array(c.GetDirection()).reshape(3, 3)
    big.SetOrigin(tuple(np.array(c.GetOrigin()) - d[:, 2] * 0.8 * a.shape[0]))
    labels = sitk.GetImageFromArray(np.concatenate([top_labels, b, top_labels]))
    labels.CopyInformation(big)
    sitk.WriteImage(big, str(out / "ct.nii.gz"))
    sitk.WriteImage(labels, str(out / "labels.nii.gz"))
    print(big.GetSize(), big.GetSpacing())


if __name__ == "__main__":
    main()
