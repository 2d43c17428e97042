"""Screw placement: distance to the bone surface against closed forms, the spinal canal of
the synthetic vertebra against the generator's geometry, Gertzbein-Robbins grades, and the
refusal of a screw through the canal (docs/screw_planning.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

import pixels
from qctfea.steps import model as steps_model
from qctfea.model.placement import (BoneField, Frame, coarse_map_note, grade_of,
                                    grade_screw)
from qctfea.errors import QctfeaError


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.deg2rad(deg_z), np.deg2rad(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _box_image(spacing=(1.0, 1.2, 2.5), rot=(25.0, 10.0)):
    """A 20 x 24 x 25 mm bone box (voxel faces at known places) in an oblique image."""
    size = (40, 36, 20)
    arr = np.zeros(size[::-1], np.uint8)
    arr[5:15, 8:28, 10:30] = 1  # z, y, x: x 10..29, y 8..27, z 5..14 (voxel indices)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection(_rotation(*rot).ravel().tolist())
    img.SetOrigin((12.0, -30.0, 400.0))
    return img


def test_signed_distance_matches_the_voxel_box_in_an_oblique_anisotropic_image():
    """Distances to the voxelised box's faces, computed in the box's own index frame,
    agree within a quarter of a fine voxel (0.25 mm) outside and inside."""
    img = _box_image()
    field = BoneField(img)
    sp = np.array(img.GetSpacing())
    lo = (np.array([10, 8, 5]) - 0.5) * sp  # box faces in the index frame (mm), x, y, z
    hi = (np.array([29, 27, 14]) + 0.5) * sp
    rng = np.random.default_rng(3)
    local = rng.uniform(lo - 8, hi + 8, size=(400, 3))
    outside = np.linalg.norm(np.maximum(np.maximum(lo - local, local - hi), 0), axis=1)
    inside = np.minimum(local - lo, hi - local).min(axis=1)
    truth = np.where(outside > 0, outside, -inside)
    R = np.array(img.GetDirection()).reshape(3, 3)
    pts = np.array(img.GetOrigin()) + local @ R.T
    d = field.distance(pts)
    assert np.abs(d - truth).max() < 0.3, np.abs(d - truth).max()


@pytest.mark.parametrize("breach, grade", [(0.0, "A"), (0.5, "A"), (0.51, "B"), (1.99, "B"),
                                           (2.0, "C"), (3.99, "C"), (4.0, "D"), (6.0, "E"),
                                           (15.0, "E")])
def test_gertzbein_robbins_grades(breach, grade):
    assert grade_of(breach, 0.5) == grade


def test_a_breach_within_half_a_coarse_voxel_of_the_grade_limit_is_noted():
    """Half the coarsest voxel (1.5 mm at 3 mm) against the limit of the accepted grade."""
    note = coarse_map_note(0.6, 3.0, "B")  # 0.6 + 1.5 >= 2.0
    assert note and "3 mm voxels" in note and "1.5 mm" in note and "grade B's 2 mm" in note
    assert coarse_map_note(0.4, 3.0, "B") is None  # 1.9 < 2.0
    assert coarse_map_note(1.9, 1.0, "B") is None  # voxels of 1 mm: within the tolerance
    assert coarse_map_note(2.5, 2.5, "C") is None  # 3.75 < 4.0 (grade C's limit)
    assert "grade C's 4 mm" in coarse_map_note(2.8, 2.5, "C")  # 4.05 >= 4.0
    assert coarse_map_note(0.2, 1.5, "A", 0.5) is not None  # 0.2 + 0.75 >= 0.5
    assert coarse_map_note(5.0, 3.0, "E") is None  # no limit beyond E


def test_screw_leaving_a_box_laterally_is_graded_by_how_far_and_where():
    """A 6 mm screw along the box's long axis, its axis 1 / 3.5 / 7 mm from the side face
    inside the box: its surface is 2 / -0.5 / -4 mm... outside: grades C, A, A; off the
    face by 2 mm the breach is 5 mm (D) towards that face (lateral for a left screw whose
    frame has 'left' pointing out of that face)."""
    img = sitk.Image([80, 60, 60], sitk.sitkUInt8)
    arr = np.zeros((60, 60, 80), np.uint8)
    arr[10:50, 10:50, 0:80] = 1  # y and z 10..49 mm, x 0..79 mm (1 mm voxels)
    img = sitk.GetImageFromArray(arr)
    field = BoneField(img)
    # Frame: left = -y (out of the face y = 9.5), anterior = +x, superior = +z.
    frame = Frame(np.array([0.0, 30.0, 30.0]), np.array([0.0, -1.0, 0.0]),
                  np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    face = 9.5
    for axis_y, breach, grade in ((face + 1.0, 2.0, "C"), (face + 3.5, 0.0, "A"),
                                  (face - 2.0, 5.0, "D")):
        g = grade_screw(np.array([20.0, axis_y, 30.0]), np.array([1.0, 0, 0]), 6.0, 30.0,
                        "left", field, frame)
        assert g["grade"] == grade, g
        assert g["breach_mm"] == pytest.approx(breach, abs=0.3)
        if grade != "A":
            assert g["direction"] == "lateral"


def test_a_screw_outside_bone_only_where_its_head_is_seated_is_grade_a():
    """Entry 1 mm behind the posterior face, the rest of the screw deep inside: the samples
    outside lie within a diameter of the entry and point posteriorly, where the head is
    seated, so they are not graded (recorded as entry_outside_mm, about 1 mm). Until
    2026-12-06 such a screw was graded B with no breach direction."""
    arr = np.zeros((60, 60, 80), np.uint8)
    arr[10:50, 10:50, 0:80] = 1  # x 0..79 mm: the posterior face at x = -0.5 mm
    field = BoneField(sitk.GetImageFromArray(arr))
    frame = Frame(np.array([40.0, 30.0, 30.0]), np.array([0.0, -1.0, 0.0]),
                  np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]))
    g = grade_screw(np.array([-1.5, 30.0, 30.0]), np.array([1.0, 0, 0]), 6.0, 30.0, "left",
                    field, frame)
    assert g["grade"] == "A" and g["direction"] == "none", g
    assert g["breach_mm"] <= 0.5, g
    assert g["entry_outside_mm"] == pytest.approx(1.0, abs=0.3), g


@pytest.fixture(scope="module")
def canal_landmarks(demo_scan, tmp_path_factory):
    """The demo scan's landmarks with the left screw moved 9 mm medially, through the
    spinal canal between the pedicles (the generator's canal: |x| < 6-8 mm)."""
    lm = json.loads((demo_scan["src"] / "landmarks.json").read_text())
    path = tmp_path_factory.mktemp("canal") / "landmarks.json"
    right = np.array(lm["right"]["entry_mm"]) - np.array(lm["left"]["entry_mm"])
    shift = 9.0 * right / np.linalg.norm(right)
    for key in ("entry_mm", "target_mm"):
        lm["left"][key] = (np.array(lm["left"][key]) + shift).tolist()
    path.write_text(json.dumps(lm))
    return path


def test_screw_through_the_canal_is_refused_naming_scan_side_grade_and_what_to_do(
        demo_scan, canal_landmarks, tmp_path):
    out = tmp_path / "screws.json"
    with pytest.raises(QctfeaError) as err:
        steps_model.plan_screws(landmarks_path=canal_landmarks,
                                parts_path=demo_scan["results"] / "vertebra.nii.gz", out_json=out,
                                cfg={},
                                context=demo_scan["context"], out_png=tmp_path / "screws.png")
    msg = str(err.value)
    # the screws are the user's (landmarks): what to do is to correct them
    for part in (demo_scan["context"], "left screw grade", "medial", "spinal canal",
                 "planning.max_grade = B", "Correct this scan's landmarks",
                 "planning.method: auto", "screw.diameter_mm", "exclude"):
        assert part in msg, (part, msg)
    assert "right screw" not in msg
    assert not out.exists()
    # The picture, axial cuts on top (left screw, right screw): the left screw drawn in red
    # across the spinal canal (light blue, within the screw's outline), the right in green
    # clear of it.
    a = pixels.rgb(tmp_path / "screws_refused.png")
    h, w = a.shape[0] // 2, a.shape[1] // 2
    for cut, refused in ((a[:h, :w], True), (a[:h, w:], False)):
        red, green = pixels.colour(cut, "tab:red"), pixels.colour(cut, "tab:green")
        screw, other = (red, green) if refused else (green, red)
        assert screw.sum() > 300 and not other.any()
        r0, r1, c0, c1 = pixels.blobs(screw)[0]  # the screw's outline and head
        canal = pixels.colour(cut[r0:r1, c0:c1], "#9ecae1").sum()
        assert canal > 500 if refused else canal == 0, canal


def test_demo_landmark_screws_grade_a_and_planned_screws_converge(demo_scan, tmp_path):
    """The generator's own landmarks run along its pedicle axes: grade A. Planned from the
    mask, both screws are A or B, converge like the generator's pedicles (8-13 degrees,
    within 6 degrees) and find the canal on the generator's midline (x = 0, within 1 mm).
    The landmark screws are measured against the isthmus that planning finds; neither is
    wider."""
    parts = demo_scan["results"] / "vertebra.nii.gz"
    steps_model.plan_screws(landmarks_path=demo_scan["src"] / "landmarks.json", parts_path=parts,
                            out_json=tmp_path / "lm.json", cfg={}, context=demo_scan["context"])
    landmark = {s["side"]: s for s in json.loads((tmp_path / "lm.json").read_text())["screws"]}
    for s in landmark.values():
        assert s["placement"]["grade"] == "A", s["placement"]
    steps_model.plan_screws(landmarks_path=None, parts_path=parts, out_json=tmp_path / "auto.json",
                            cfg={}, context=demo_scan["context"], planning={"method": "auto"},
                            out_png=tmp_path / "auto.png")
    rec = json.loads((tmp_path / "auto.json").read_text())
    canal = rec["frame"]["canal"]
    assert canal["found"], canal
    # The frame's mid-plane is moved onto the canal (its l_mm is then 0 by construction):
    # that plane against the generator's, halfway between its mirror-image entry landmarks.
    marks = json.loads((demo_scan["src"] / "landmarks.json").read_text())
    e_left, e_right = (np.array(marks[side]["entry_mm"]) for side in ("left", "right"))
    lateral = (e_left - e_right) / np.linalg.norm(e_left - e_right)
    off = (np.array(rec["frame"]["midline_point_mm"]) - (e_left + e_right) / 2) @ lateral
    assert abs(off) < 1.0, (off, canal)
    for s in rec["screws"]:
        assert s["placement"]["grade"] in {"A", "B"}, s["placement"]
        assert 2.0 < s["planning"]["convergence_deg"] < 19.0, s["planning"]
        # the landmark screws are measured against the isthmus the planning found
        lm = landmark[s["side"]]["planning"]
        assert lm["method"] == "landmarks" and lm["screw_exceeds_isthmus"] is False, lm
        assert lm["isthmus_min_width_mm"] == pytest.approx(
            s["planning"]["isthmus_min_width_mm"]), (lm, s["planning"])
