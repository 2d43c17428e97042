"""Longitudinal registration on the real CTs of ../shared/data/real against known motions.

A follow-up is made from a real scan by a known rigid motion T about the vertebra's
centroid (the original CT and its label map resampled through T, so the right answer is
known and the images are otherwise identical), at the scan's own resolution or resampled
to 3 mm voxels (baseline and follow-up on fresh 3 mm grids), optionally with the bone
density of the vertebra raised by 10 %; both scans are then written in an orientation
(``SimpleITK.DICOMOrient``: LPS, LAS, RAS, RPI, ...), their parts images built by the
pipeline's mask step, and the follow-up registered to the baseline with the library's
``register_rigid`` (CT numbers stand in for density: calibration is linear). The error is
the largest distance, over the 8 corners of the baseline vertebra's bounding box, between
where the registration and the truth (T^-1) put them, and the angle between the rotations.

    .venv/bin/python tools/registration_check.py --out-md docs/registration_table.md

``--slabs``: the same on thick sagittal and coronal slabs (3 mm along left-right or
anterior-posterior), docs/registration.md.

Not part of the library or the tests (the tests run a subset: tests/test_registration_real.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.imaging import registration as reg
from qctfea import logs
from qctfea.mdtable import pipe_table
from qctfea.steps import vertebra as steps_vertebra

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planning_check import slab_spacing  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
#: case -> (CT, labels, vertebra label, mask section, own spacing)
CASES = {
    "TotalSegmentator L1": (REAL / "totalseg_L1/ct.nii.gz", REAL / "totalseg_L1/labels.nii.gz",
                            31, {"convention": "totalsegmentator", "vertebra": "L1"},
                            (0.703, 0.703, 2.5)),
    "VerSe L3": (REAL / "verse_tptbox_L3/ct.nii.gz", REAL / "verse_tptbox_L3/vertebrae.nii.gz",
                 22, {"convention": "verse", "vertebra": "L3"}, (1.5, 1.5, 1.5)),
}
#: motion name -> (Euler angles about x, y, z in degrees; translation in mm)
MOTIONS = {"small": ((0.5, 0.0, 1.0), (1.0, -1.0, 1.5)),
           "7°/7 mm": ((4.0, -4.0, 4.0), (4.0, -4.0, 4.0)),
           "15°/20 mm": ((12.0, -6.0, 6.0), (12.0, -12.0, 10.0))}
ORIENTATIONS = ("LPS", "LAS", "RAS", "RPI")


def motion(name: str, centre) -> sitk.Euler3DTransform:
    deg, t = MOTIONS[name]
    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in centre])
    tx.SetRotation(*np.deg2rad(deg))
    tx.SetTranslation(t)
    return tx


def grid(img: sitk.Image, spacing) -> sitk.Image:
    """A fresh grid of ``spacing`` over the same field of view (same direction)."""
    extent = np.array(img.GetSize()) * np.array(img.GetSpacing())
    d = np.array(img.GetDirection()).reshape(3, 3)
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(
        ((np.array(img.GetSize()) - 1) / 2).tolist()))
    n = np.ceil(extent / np.array(spacing)).astype(int)
    ref = sitk.Image([int(v) for v in n], img.GetPixelID())
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin((centre - d @ ((n - 1) / 2 * np.array(spacing))).tolist())
    return ref


def make_pair(case: str, spacing, motion_name: str, density_change: float = 0.0,
              follow_up_margin=None):
    """(baseline CT, baseline labels, follow-up CT, follow-up labels, truth T^-1).
    ``follow_up_margin`` (voxels, z y x): the follow-up cut to its vertebra's bounding box
    widened by so many voxels (another field of view: a targeted reconstruction)."""
    ct_p, lab_p, label, _, own = CASES[case]
    assert ct_p.is_file(), f"{ct_p} is missing: the real scans of ../shared are needed"
    ct = sitk.ReadImage(str(ct_p), sitk.sitkFloat32)
    lab = sitk.ReadImage(str(lab_p))
    lab = sitk.Resample(lab, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    centre = reg.mask_points(lab == label).mean(axis=0)
    T = motion(motion_name, centre)
    ref = ct if tuple(spacing) == tuple(own) else grid(ct, spacing)
    base = sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1024.0)
    base_lab = sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    src = ct
    if density_change:
        arr = sitk.GetArrayFromImage(ct)
        bone = (sitk.GetArrayFromImage(lab) == label) & (arr > 0)
        arr[bone] *= 1.0 + density_change
        src = sitk.GetImageFromArray(arr)
        src.CopyInformation(ct)
    fu = sitk.Resample(src, ref, T, sitk.sitkLinear, -1024.0)
    fu_lab = sitk.Resample(lab, ref, T, sitk.sitkNearestNeighbor, 0)
    if follow_up_margin is not None:
        idx = np.argwhere(sitk.GetArrayFromImage(fu_lab) == label)
        lo = np.maximum(idx.min(0) - follow_up_margin, 0)
        hi = np.minimum(idx.max(0) + follow_up_margin, np.array(fu.GetSize()[::-1]) - 1)
        size, start = [int(v) for v in (hi - lo + 1)[::-1]], [int(v) for v in lo[::-1]]
        fu = sitk.RegionOfInterest(fu, size, start)
        fu_lab = sitk.RegionOfInterest(fu_lab, size, start)
    return base, base_lab, fu, fu_lab, T.GetInverse()


def check(case: str, spacing, motion_name: str, orientations=ORIENTATIONS,
          density_change: float = 0.0, p: reg.RegistrationParams | None = None,
          follow_up_margin=None) -> list[dict]:
    """One result per orientation: error (mm, degrees), Dice, time, the transform."""
    p = p or reg.RegistrationParams()
    mask_cfg = CASES[case][3]
    pair = make_pair(case, spacing, motion_name, density_change, follow_up_margin)
    out = []
    for o in orientations:
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp)
            imgs = {}
            for tag, ct, lab in (("b", pair[0], pair[1]), ("f", pair[2], pair[3])):
                sitk.WriteImage(sitk.Cast(sitk.DICOMOrient(ct, o), sitk.sitkInt16),
                                str(w / f"{tag}_ct.nii.gz"))
                sitk.WriteImage(sitk.DICOMOrient(lab, o), str(w / f"{tag}_lab.nii.gz"))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    steps_vertebra.mask(ct_path=w / f"{tag}_ct.nii.gz",
                                        labels_path=w / f"{tag}_lab.nii.gz",
                                        out_parts=w / f"{tag}_parts.nii.gz",
                                        out_json=w / f"{tag}_parts.json", cfg=mask_cfg,
                                        context=f"{case} {tag} {o}")
                imgs[tag] = (sitk.ReadImage(str(w / f"{tag}_ct.nii.gz"), sitk.sitkFloat32),
                             sitk.ReadImage(str(w / f"{tag}_parts.nii.gz")))
            t0 = time.perf_counter()
            tx, info = reg.register_rigid(imgs["b"][0], imgs["b"][1], imgs["f"][0],
                                          imgs["f"][1], p)
            seconds = time.perf_counter() - t0
            truth = pair[4]
            corners = reg.box_corners(reg._binary(imgs["b"][1]))
            err = np.linalg.norm(reg.transform_points(tx, corners) -
                                 reg.transform_points(truth, corners), axis=1)
            rr = np.asarray(tx.GetMatrix()).reshape(3, 3)
            rt = np.asarray(truth.GetMatrix()).reshape(3, 3)
            out.append({"case": case, "spacing": tuple(spacing), "motion": motion_name,
                        "density_change": density_change, "orientation": o,
                        "max_error_mm": float(err.max()),
                        "rotation_error_deg": reg._angle_deg(rr.T @ rt),
                        "dice_before": info["dice_before"], "dice_after": info["dice_after"],
                        "spread_mm": info["point_spread_mm"], "starts": len(info["starts"]),
                        "converged": info["converged"], "seconds": seconds, "tx": tx,
                        "corners": corners, "info": info})
    ref = out[0]
    for r in out:
        r["vs_first_mm"] = reg.point_distance(r["tx"], ref["tx"], ref["corners"])
    return out


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        vox = " x ".join(f"{v:g}" for v in r["spacing"])
        dens = f"+{100 * r['density_change']:.0f} %" if r["density_change"] else ""
        spread = "n/a" if r["spread_mm"] is None else f"{r['spread_mm']:.3f}"
        rows.append([r["case"], vox, r["motion"], dens, r["orientation"],
                     f"{r['max_error_mm']:.3f}", f"{r['rotation_error_deg']:.3f}",
                     f"{r['vs_first_mm']:.4f}",
                     f"{r['dice_before']:.3f} -> {r['dice_after']:.3f}", spread,
                     str(r["starts"]), f"{r['seconds']:.1f}"])
    return rows


HEADER = ["case", "voxels (mm)", "motion", "bone density", "orientation",
          "max error at box corners (mm)", "rotation error (°)", "vs first orientation (mm)",
          "Dice before -> after", "spread of starts (mm)", "starts run", "s"]
ALIGN = "lllllrrrlrrr"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-md", type=Path, required=True)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--motions", nargs="+", default=list(MOTIONS))
    ap.add_argument("--slabs", action="store_true",
                    help="thick sagittal and coronal slabs instead (3 mm along left-right or "
                    "anterior-posterior, the scan's finest spacing along the others)")
    args = ap.parse_args()
    logs.log_to(sys.stderr)  # the library's progress messages
    rows = []
    for case in args.cases:
        own = CASES[case][4]
        variants = [(own, m, 0.0) for m in args.motions]
        variants += [((3.0, 3.0, 3.0), m, 0.0) for m in args.motions]
        variants += [(own, "small", 0.1), ((3.0, 3.0, 3.0), "15°/20 mm", 0.1)]
        variants += [((1.0, 1.0, 5.0), "small", 0.0)]
        if args.slabs:
            variants = [(slab_spacing(CASES[case][0], axis, 3.0, min(own)), m, 0.0)
                        for axis in (0, 1) for m in ("small", "15°/20 mm")]
        for spacing, m, dc in variants:
            for row in table_rows(check(case, spacing, m, density_change=dc)):
                print(" | ".join(row), flush=True)
                rows.append(row)
    args.out_md.write_text(pipe_table(HEADER, rows, ALIGN) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
