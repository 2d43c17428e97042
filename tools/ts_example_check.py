"""Screw planning and longitudinal registration on TotalSegmentator's own example CT: a real
abdominal CT at 3 mm voxels with whole-vertebra labels, the class of scan where planning
once put a screw through the spinal canal.

The TotalSegmentator source distribution on PyPI (version 2.18.0, Apache-2.0) ships it as
test data: ``tests/reference_files/example_ct.nii.gz`` (122 x 101 x 112 voxels of 3 mm, no
contrast in the aorta, no phantom) with the `total` task's labels of its lumbar spine in
``tests/reference_files/spine_report/test_result/totalseg.nii.gz`` (TotalSegmentator v2
numbering: S1 = 26, L5 = 27, L4 = 28, L3 = 29, L2 = 30, L1 = 31, T12 = 32 cut by the scan's
top). Get it from the package registry (nothing in the project downloads it):

    pip download TotalSegmentator==2.18.0 --no-deps --no-binary :all: -d /tmp/ts
    tar xzf /tmp/ts/totalsegmentator-2.18.0.tar.gz -C /tmp/ts \\
        'totalsegmentator-2.18.0/tests/reference_files'
    .venv/bin/python tools/ts_example_check.py \\
        /tmp/ts/totalsegmentator-2.18.0/tests/reference_files --out-md /tmp/ts_example.md \\
        --cohort          # 2-4 minutes on 2 cores
    .venv/bin/snakemake --cores 2 --config cohort=ts-example   # L4, every option at its default

The same package holds a real DICOM series, ``tests/reference_files/example_ct_dicom`` (20
slices of 512 x 512, JPEG 2000 lossless, Siemens, 120 kV), and TotalSegmentator's labels of
it in ``example_seg_dicom.nii.gz``, written on the grid its own DICOM conversion (dcm2niix)
made: the ingest step reads the series and its grid is compared with that one (every label
voxel must land on a voxel of ours, same physical extent).

Per complete lumbar level: the planning of tools/planning_check.py (ingest, mask and screws
steps, automatic planning) with both trajectories, once with the vertebra labels alone (the
body separated by the opening) and once with TotalSegmentator's ``vertebrae_body`` task output
of the same scan, ``spine_report/test_result/totalseg_vertebrae_body.nii.gz`` (1 = vertebral
bodies, 2 = intervertebral discs), as the sample sheet's ``subregions`` map with
``mask.body_subregion_labels: [1]``; for L4, the registration of
tools/registration_check.py against known motions in four axis orders. ``--cohort`` writes
config/cohorts/ts-example (not in the repository): the L4 with phantomless calibration,
automatic planning and every other option at its default; ts-example-sm: the package's
shorter CT (``example_ct_sm.nii.gz``, 30 slices) with the `total` task's full label map
(``example_seg.nii.gz``: aorta, back muscles, organs), its L1, the same options; and
ts-example-l5: the L5 with the ``vertebrae_body`` map as sub-regions; ts-example-fast: the
short CT's L1 with ``example_seg_fast``, the folder of one mask per structure that
TotalSegmentator's fast mode (its 3 mm model) writes without ``--ml``.

Not part of the library or the tests (the tests run the crops of ../shared/data/real).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import planning_check as pc  # noqa: E402
import registration_check as rc  # noqa: E402
import spine_ct_check as sc  # noqa: E402
from qctfea import logs  # noqa: E402
from qctfea.imaging.masks import resolve_label  # noqa: E402
from qctfea.mdtable import pipe_table  # noqa: E402

CT = "example_ct.nii.gz"
LABELS = "spine_report/test_result/totalseg.nii.gz"
#: TotalSegmentator's ``vertebrae_body`` task on the same CT: 1 = vertebral bodies, 2 = discs
BODIES = "spine_report/test_result/totalseg_vertebrae_body.nii.gz"
LEVELS = ("L5", "L4", "L3", "L2", "L1")
OWN = (3.0, 3.0, 3.0)
TRAJECTORIES = ("traditional", "cortical")


def dicom_check(data: Path) -> list[str]:
    """Ingest the JPEG 2000 series; compare the grid with dcm2niix's (the labels' file)."""
    import numpy as np
    import SimpleITK as sitk
    from qctfea.steps import imaging as steps_imaging

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ct.nii.gz"
        steps_imaging.ingest(source=data / "example_ct_dicom", out_image=out,
                             out_json=Path(tmp) / "scan.json", context="example_ct_dicom")
        ct = sitk.ReadImage(str(out))
    seg = sitk.ReadImage(str(data / "example_seg_dicom.nii.gz"))
    ours = [ct.TransformIndexToPhysicalPoint(i) for i in ((0, 0, 0), tuple(
        v - 1 for v in ct.GetSize()))]
    theirs = [seg.TransformIndexToPhysicalPoint(i) for i in ((0, 0, 0), tuple(
        v - 1 for v in seg.GetSize()))]
    box = lambda pts: (np.min(pts, axis=0), np.max(pts, axis=0))  # noqa: E731
    corner = max(float(np.abs(a - b).max()) for a, b in zip(box(ours), box(theirs)))
    moved = sitk.Resample(seg, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    n_ours = int((sitk.GetArrayViewFromImage(moved) > 0).sum())
    n_theirs = int((sitk.GetArrayViewFromImage(seg) > 0).sum())
    return [f"{ct.GetSize()}", f"{np.round(ct.GetSpacing(), 4).tolist()}", f"{corner:.4f}",
            f"{n_ours} of {n_theirs}"]


#: cohort -> (CT, label map, body map or None, level): the 3 mm CT's L4 with the spine
#: report's vertebra labels, the short CT with the `total` task's full map (aorta, muscles)
#: at its L1, the 3 mm CT's L5 with the `vertebrae_body` task's map as sub-regions, and the
#: short CT's L1 with the folder of per-structure masks of TotalSegmentator's fast mode
COHORTS = {"ts-example": (CT, LABELS, None, "L4"),
           "ts-example-sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz", None, "L1"),
           "ts-example-l5": (CT, LABELS, BODIES, "L5"),
           "ts-example-fast": ("example_ct_sm.nii.gz", "example_seg_fast", None, "L1")}


def write_cohorts(data: Path) -> list[Path]:
    out = []
    for i, (name, (ct, labels, bodies, level)) in enumerate(COHORTS.items()):
        cohort = Path(__file__).resolve().parents[1] / "config" / "cohorts" / name
        cohort.mkdir(parents=True, exist_ok=True)
        row = [f"X0{i + 1}", "M00", "0", str((data / ct).resolve()),
               str((data / labels).resolve())] + ([str((data / bodies).resolve())]
                                                   if bodies else [])
        header = ["patient", "timepoint", "months", "image", "labels"] + (
            ["subregions"] if bodies else [])
        (cohort / "samples.tsv").write_text("\t".join(header) + "\n" + "\t".join(row) + "\n",
                                            encoding="utf-8")
        (cohort / "config.yaml").write_text(
            f"# written by tools/ts_example_check.py --cohort: TotalSegmentator's {ct}, {level}\n"
            "samples: samples.tsv\ncalibration:\n  method: phantomless\nmask:\n"
            f"  convention: totalsegmentator\n  vertebra: {level}\n"
            + ("  body_subregion_labels: [1]\n" if bodies else "")
            + "planning:\n  method: auto\n", encoding="utf-8")
        out.append(cohort)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="TotalSegmentator's tests/reference_files folder")
    ap.add_argument("--out-md", type=Path, required=True)
    ap.add_argument("--levels", nargs="*", default=list(LEVELS))
    ap.add_argument("--cohort", action="store_true",
                    help="also write config/cohorts/" + ", ".join(COHORTS)
                    + " (module docstring)")
    args = ap.parse_args()
    logs.log_to(sys.stderr)
    ct, labels = args.data / CT, args.data / LABELS
    for p in (ct, labels):
        if not p.is_file():
            sys.exit(f"{p} is missing: extract TotalSegmentator's test data (module docstring)")
    if args.cohort:
        for cohort in write_cohorts(args.data):
            print(f"cohort written: {cohort}")
    rows, body_rows, reg_rows = [], [], []
    for level in args.levels:
        case = f"TotalSegmentator example, {level}"
        cfg = {"convention": "totalsegmentator", "vertebra": level}
        pc.CASES[case] = (ct, labels, None, cfg, OWN)
        rows.append([level] + [sc.planning_cell(case, OWN, t) for t in TRAJECTORIES])
        print(" | ".join(rows[-1]), flush=True)
        if (args.data / BODIES).is_file():
            pc.CASES[case + ", body map"] = (ct, labels, args.data / BODIES,
                                             {**cfg, "body_subregion_labels": [1]}, OWN)
            body_rows.append([level] + [sc.planning_cell(case + ", body map", OWN, t)
                                        for t in TRAJECTORIES])
            print("body map: " + " | ".join(body_rows[-1]), flush=True)
        if level != "L4":
            continue
        rc.CASES[case] = (ct, labels, resolve_label("totalsegmentator", level, None)[0], cfg,
                          OWN)
        for motion, density in (("small", 0.0), ("7°/7 mm", 0.0), ("15°/20 mm", 0.1)):
            t0 = time.perf_counter()
            res = rc.check(case, OWN, motion, density_change=density)
            r0 = res[0]
            reg_rows.append([
                level, motion, f"+{density:.0%}" if density else "",
                f"{max(r['max_error_mm'] for r in res):.3f}",
                f"{max(r['rotation_error_deg'] for r in res):.3f}",
                f"{max(r['vs_first_mm'] for r in res):.4f}",
                f"{r0['dice_before']:.3f} -> {r0['dice_after']:.3f}",
                f"{(time.perf_counter() - t0) / len(res):.1f}"])
            print(" | ".join(reg_rows[-1]), flush=True)
    header = ["vertebra", "traditional (side, grade, breach, convergence)",
              "cortical bone trajectory"]
    text = pipe_table(header, rows, "lll")
    if body_rows:
        text += ("\n\nWith the `vertebrae_body` map as sub-regions:\n\n"
                 + pipe_table(header, body_rows, "lll"))
    if reg_rows:
        text += "\n\n" + pipe_table(
            ["vertebra", "motion", "bone density", "max error at box corners, 4 orientations "
             "(mm)", "rotation error (°)", "orientations apart (mm)", "Dice before -> after",
             "s per orientation"], reg_rows, "lllrrrlr")
    text += "\n\n" + pipe_table(
        ["DICOM series ingested: voxels", "spacing (mm)", "grid extent against dcm2niix's (mm)",
         "label voxels on our grid"], [dicom_check(args.data)], "llrl")
    args.out_md.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
