"""Screw planning and grading on the real CTs of ../shared/data/real (fails, not skips, when
they are missing): the TotalSegmentator L1 (whole-vertebra labels, 0.7 x 0.7 x 2.5 mm) and
the VerSe L3 (1.5 mm, oblique grid), at their own resolution, resampled to 3 mm voxels and
on rotated grids. Every screw must be graded A or B (Gertzbein-Robbins), converge 5-25
degrees (traditional trajectory) and the spinal canal must be found; the same scan written
in another axis order plans the same screws. The full table, with
the cortical trajectory: tools/planning_check.py, docs/screw_planning.md."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import planning_check as pc  # noqa: E402

# The last: the L1 enlarged to an L4's size (pc.AS_L4: 1.3 in-plane, 1.1 axially); its
# pedicles survive the 7 mm opening that separates the body, and until 2026-12-06 the body
# kept them and no screw could be planned.
VARIANTS = [("TotalSegmentator L1", None, None, 0.0, None),
            ("VerSe L3", None, None, 0.0, None),
            ("TotalSegmentator L1", (3.0, 3.0, 3.0), "z", 15.0, None),
            ("VerSe L3", (1.0, 1.0, 3.0), "x", 12.0, None),
            ("TotalSegmentator L1", None, None, 0.0, pc.AS_L4)]


@pytest.mark.parametrize("case, spacing, axis, deg, scale", VARIANTS)
def test_real_scan_screws_in_bone_converging(case, spacing, axis, deg, scale, tmp_path):
    ct, *_ , own = pc.CASES[case]
    assert ct.is_file(), f"{ct} is missing: the real scans are needed"
    scale = scale or (1.0, 1.0, 1.0)
    spacing = spacing or tuple(v * f for v, f in zip(own, scale, strict=True))
    r = pc.check(case, spacing, axis, deg, "traditional", tmp_path, scale=scale)
    assert "error" not in r, r.get("error")
    assert r["canal"]["found"], r["canal"]
    assert 100 < r["canal"]["area_mm2"] < 500  # thoracolumbar canals: about 150-300 mm²
    for s in r["screws"]:
        assert s["placement"]["grade"] in {"A", "B"}, (s["side"], s["placement"])
        # at their own resolution both scans have lines fully in bone on both sides, and the
        # planner grades its best lines before choosing (the L1's right screw was B before)
        assert axis is not None or s["placement"]["grade"] == "A", (s["side"],
                                                                    s["placement"])
        assert 5.0 - 1e-6 <= s["planning"]["convergence_deg"] <= 25.0 + 1e-6, s["planning"]
        assert s["length_mm"] >= 25.0
        # the grade's resolution: the label map's coarsest voxel, and the note on a breach
        # within half of it of grade C's 2 mm
        p = s["placement"]
        assert p["label_voxel_mm"] == pytest.approx(max(spacing), abs=1e-3)
        assert ("coarse_map_note" in p) == (max(spacing) > 1.0 and
                                            p["breach_mm"] + max(spacing) / 2 >= 2.0), p


def test_a_custom_binary_mask_plans_the_labelled_vertebra_s_screws(tmp_path):
    """A lab's own segmentation: the real L1 alone as a binary mask (1 = the vertebra,
    `mask.convention: custom`, `mask.label: 1`). The body is found by the same opening, so
    the screws are those of the TotalSegmentator labels (grade A, same convergence)."""
    import SimpleITK as sitk

    ct, labels, *_ = pc.CASES["TotalSegmentator L1"]
    assert ct.is_file(), f"{ct} is missing: the real scans are needed"
    lab = sitk.ReadImage(str(labels))
    binary = sitk.Cast(sitk.BinaryThreshold(lab, 31, 31, 1, 0), sitk.sitkUInt8)
    sitk.WriteImage(binary, str(tmp_path / "binary.nii.gz"))
    own = pc.CASES["TotalSegmentator L1"][-1]
    pc.CASES["custom binary L1"] = (ct, tmp_path / "binary.nii.gz", None,
                                    {"convention": "custom", "label": 1}, own)
    try:
        runs = {}
        for case in ("TotalSegmentator L1", "custom binary L1"):
            (tmp_path / case).mkdir()
            runs[case] = pc.check(case, own, None, 0.0, "traditional", tmp_path / case)
            assert "error" not in runs[case], runs[case].get("error")
    finally:
        del pc.CASES["custom binary L1"]
    for a, b in zip(*(r["screws"] for r in runs.values()), strict=True):
        assert b["placement"]["grade"] == a["placement"]["grade"] == "A"
        assert b["planning"]["convergence_deg"] == pytest.approx(
            a["planning"]["convergence_deg"]), (a["side"], a["planning"], b["planning"])
        assert np.allclose(a["entry_mm"], b["entry_mm"], atol=1e-6), (a["side"],)


def test_real_scan_screws_do_not_depend_on_the_files_axis_order(tmp_path):
    """The real L1 as stored (LAS) and rewritten sagittally (PIR: the same voxels in space,
    axes permuted and flipped): ingest stores both in one axis order, so mask, planning and
    grading see the same array and plan the same screws."""
    ct, *_ = pc.CASES["TotalSegmentator L1"]
    assert ct.is_file(), f"{ct} is missing: the real scans are needed"
    runs = {}
    for code in ("LAS", "PIR"):
        (tmp_path / code).mkdir()
        runs[code] = pc.check("TotalSegmentator L1", pc.CASES["TotalSegmentator L1"][-1],
                              None, 0.0, "traditional", tmp_path / code, orientation=code)
        assert "error" not in runs[code], runs[code].get("error")
    for a, b in zip(runs["LAS"]["screws"], runs["PIR"]["screws"], strict=True):
        for key in ("entry_mm", "tip_mm"):
            assert np.allclose(a[key], b[key], atol=1e-6), (a["side"], key, a[key], b[key])
        assert a["placement"] == b["placement"]
    assert runs["LAS"]["canal"]["area_mm2"] == runs["PIR"]["canal"]["area_mm2"]


def test_real_vertebra_cut_by_the_crop_is_refused(tmp_path):
    """The VerSe crop holds L3 whole and L4 only in part (the crop ends inside it): modelling
    L4 is refused, naming the inferior edge; L3 passes."""
    from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
    from qctfea.errors import QctfeaError

    ct, labels, *_ = pc.CASES["VerSe L3"]
    assert ct.is_file(), f"{ct} is missing: the real scans are needed"
    steps_imaging.ingest(source=ct, out_image=tmp_path / "ct.nii.gz",
                         out_json=tmp_path / "scan.json", context="R01 M00")

    def mask(level):
        steps_vertebra.mask(ct_path=tmp_path / "ct.nii.gz", labels_path=labels,
                            out_parts=tmp_path / "v.nii.gz", out_json=tmp_path / "v.json",
                            cfg={"convention": "verse", "vertebra": level}, context="R01 M00")

    with pytest.raises(QctfeaError, match=r"verse L4\)\) is cut by the edge of the CT .*"
                                          r"\(inferior \(\d+ voxels, 83% of its largest"):
        mask("L4")
    mask("L3")
    # the CT and labels cropped to L3's bounding box: it touches every edge, but only with
    # its extremes (a tight crop, not a cut): accepted with a warning, recorded
    import SimpleITK as sitk

    img = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    lab = sitk.ReadImage(str(labels))
    lab = sitk.Resample(lab, img, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    idx = np.argwhere(sitk.GetArrayViewFromImage(lab) == 22)
    lo, hi = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]
    size = [int(v) for v in hi - lo + 1]
    for name, im in (("ct_tight.nii.gz", img), ("labels_tight.nii.gz", lab)):
        sitk.WriteImage(sitk.RegionOfInterest(im, size, [int(v) for v in lo]),
                        str(tmp_path / name))
    with pytest.warns(UserWarning, match="touches the edge of the CT"):
        steps_vertebra.mask(ct_path=tmp_path / "ct_tight.nii.gz",
                            labels_path=tmp_path / "labels_tight.nii.gz",
                            out_parts=tmp_path / "v.nii.gz", out_json=tmp_path / "v.json",
                            cfg={"convention": "verse", "vertebra": "L3"}, context="R01 M00")
    import json

    touched = json.loads((tmp_path / "v.json").read_text())["field_of_view_edges_touched"]
    assert len(touched["ct"]) == 6, touched


def test_a_patient_turned_in_the_scanner_gets_turned_screws_and_axis(tmp_path):
    """The real L3 with the patient turned about the vertebra (20° about z, then 20° about
    x: rolled and flexed), resampled onto an axial grid: the screws are graded A or B and
    converge 5-25°, and the superior axis found turns with the patient (within 4° of the
    unturned scan's axis turned by the same rotation; 2.8° with the sub-region map and 0.6°
    without it when written: docs/screw_planning.md)."""
    ct, *_ = pc.CASES["VerSe L3"]
    assert ct.is_file(), f"{ct} is missing: the real scans are needed"
    turn = pc.rotation("z", 20.0) @ pc.rotation("x", 20.0)
    axes = {}
    for name, rot in (("as scanned", np.eye(3)), ("turned", turn)):
        (tmp_path / name).mkdir()
        r = pc.check("VerSe L3", (1.5, 1.5, 1.5), None, 0.0, "traditional", tmp_path / name,
                     turn=rot)
        assert "error" not in r, (name, r.get("error"))
        for s in r["screws"]:
            assert s["placement"]["grade"] in {"A", "B"}, (name, s["side"], s["placement"])
            assert 5.0 - 1e-6 <= s["planning"]["convergence_deg"] <= 25.0 + 1e-6, (
                name, s["planning"])
        axes[name] = np.array(r["superior"])
    off = np.degrees(np.arccos(np.clip(axes["turned"] @ (turn @ axes["as scanned"]), -1, 1)))
    assert off < 4.0, off


def test_a_steeply_tilted_body_s_axis_is_found(real_scans):
    """The real L1's body is tilted 18.5° in its scan (thoracolumbar kyphosis); the patient
    extended by 25° in the scanner puts it 43.5° off the slices' normal, as steep as an L5
    in a lordotic spine. Its superior axis is found there: the unturned axis turned with the
    patient within 2° (measured 0.9°; in the turns table of docs/screw_planning.md 12.6° off
    while the search stopped at 30°)."""
    import SimpleITK as sitk

    from qctfea.imaging import masks

    ct_p, lab_p, _, cfg, _ = pc.CASES["TotalSegmentator L1"]
    lab = sitk.ReadImage(str(lab_p))
    label = masks.resolve_label(cfg["convention"], cfg["vertebra"], None)[0]
    rot = pc.rotation("x", -25.0)
    axes = []
    for img in (lab, pc.turned(lab, rot, pc.label_centre(lab, label), (1.0, 1.0, 1.0), True)):
        parts = masks.vertebra_parts(sitk.GetArrayFromImage(img), img.GetSpacing(),
                                     masks.MaskParams(label=label), "real L1",
                                     direction=img.GetDirection())
        axes.append(np.array(masks.body_axis(img, parts["body"])["superior_axis"]))
    assert np.degrees(np.arccos(axes[1][2])) > 40.0, axes  # beyond the former 30° search
    assert np.degrees(np.arccos(np.clip(abs((rot @ axes[0]) @ axes[1]), 0, 1))) < 2.0, axes
