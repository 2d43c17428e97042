"""CGAL meshing of the labelled vertebra: reproducible for a fixed seed."""
from __future__ import annotations


import numpy as np
import SimpleITK as sitk

import pixels
from qctfea import steps
from qctfea.model.meshing import MeshParams, generate_mesh
from qctfea.model.tags import TAG_SCREW


def test_same_input_and_seed_give_the_same_mesh(demo_scan):
    """Two meshings of the same vertebra and screws are identical to the bit (points, cells,
    tags): CGAL's wall-time-limited perturbation is off by default (mesh.perturb)."""
    r = demo_scan["results"]
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    screws = steps.load_screws(r / "screws.json")
    params = MeshParams(voxel_mm=0.6, bone_cell_size_mm=3.5, screw_cell_size_mm=2.0,
                        peri_screw_cell_size_mm=2.0)
    a = generate_mesh(parts, screws, params)
    b = generate_mesh(parts, screws, params)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert x.shape == y.shape and np.array_equal(x, y)
    # Both screws are in the mesh as their own subdomains, and the mesh is not trivial.
    assert set(TAG_SCREW.values()) <= set(np.unique(a[2]))
    assert len(a[1]) > 5000


def test_screw_subdomain_volume_matches_the_screw_geometry(demo_scan):
    """Each screw is a conforming subdomain whose volume (sum of its tetrahedra) is the
    cylinder's pi r² (length + head) within 3 %; without the radial volume match
    the faceted screw is inscribed and smaller."""
    r = demo_scan["results"]
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    screws = steps.load_screws(r / "screws.json")
    params = MeshParams(voxel_mm=0.5, bone_cell_size_mm=3.0, screw_cell_size_mm=1.5,
                        peri_screw_cell_size_mm=1.5)
    raw = MeshParams(**{**params.__dict__, "match_screw_volume": False})
    meshes = []
    for p, tol in ((params, 0.03), (raw, None)):
        pts, cells, tags, rep = generate_mesh(parts, screws, p)
        x = pts[cells]
        vol = np.abs(np.einsum("ij,ij->i", x[:, 1] - x[:, 0],
                               np.cross(x[:, 2] - x[:, 0], x[:, 3] - x[:, 0]))) / 6
        meshes.append((pts, cells, tags))
        for sc in screws:
            geometry = np.pi * (sc.spec.diameter_mm / 2) ** 2 * (sc.spec.length_mm
                                                                 + sc.spec.head_length_mm)
            meshed = vol[tags == TAG_SCREW[sc.side]].sum()
            if tol is None:
                assert meshed < geometry  # inscribed polyhedron
            else:
                assert abs(meshed / geometry - 1) < tol, (sc.side, meshed, geometry)
                assert rep["screw_volume"][sc.side]["shift_mm"] <= p.facet_distance_mm
    assert np.all(vol > 0)
    # The match only moves vertices: same cells and tags (still conforming: bone and screw
    # share the moved interface vertices), and only screw-surface vertices moved, radially by
    # at most facet_distance_mm.
    (pa, ca, ta), (pb, cb, tb) = meshes
    assert np.array_equal(ca, cb) and np.array_equal(ta, tb)
    moved = np.linalg.norm(pa - pb, axis=1) > 0
    assert 0 < moved.sum() and np.isin(np.flatnonzero(moved),
                                       ca[np.isin(ta, list(TAG_SCREW.values()))]).all()
    assert np.linalg.norm(pa - pb, axis=1).max() <= params.facet_distance_mm + 1e-12


def test_a_vertebra_that_cannot_be_meshed_is_recorded_and_the_gate_refuses_it(demo_scan,
                                                                              tmp_path):
    """Screws thinner than the meshing voxel (0.2 mm on a 0.8 mm grid) get no cells: the mesh
    step raises, naming the fix; in the workflow (record_refusal) it records the message in
    mesh.json with a placeholder mesh and a picture of the message, and accept_mesh fails the
    scan with it."""
    import json

    import pytest

    from qctfea.steps import model as steps_model
    from qctfea.errors import QctfeaError
    from qctfea.model.meshing import read_mesh

    r, ctx = demo_scan["results"], demo_scan["context"]
    data = json.loads((r / "screws.json").read_text())
    for s in data["screws"]:
        s["diameter_mm"] = s["core_diameter_mm"] = 0.2
    (tmp_path / "screws.json").write_text(json.dumps(data))
    kw = dict(parts_path=r / "vertebra.nii.gz", screws_path=tmp_path / "screws.json",
              out_mesh=tmp_path / "mesh.xdmf", out_json=tmp_path / "mesh.json",
              cfg={"voxel_mm": 0.8, "bone_cell_size_mm": 4.0, "screw_cell_size_mm": 3.0,
                   "peri_screw_cell_size_mm": 3.0},
              context=ctx, out_png=tmp_path / "mesh.png")
    with pytest.raises(QctfeaError, match=r"screw\(s\) \['left', 'right'\] have no cells"):
        steps_model.mesh(**kw)
    steps_model.mesh(**kw, record_refusal=True)
    rec = json.loads((tmp_path / "mesh.json").read_text())
    assert rec["refused"].startswith(f"{ctx}: the vertebra ({r / 'vertebra.nii.gz'}) could not "
                                     "be meshed: screw(s) ['left', 'right'] have no cells")
    pts, cells, tags = read_mesh(tmp_path / "mesh.xdmf")
    assert cells.shape == (1, 4)
    pixels.assert_message_picture(tmp_path / "mesh.png", rec["refused"])
    with pytest.raises(QctfeaError, match="could not be meshed.*exclude the scan"):
        steps_model.accept_mesh(mesh_json=tmp_path / "mesh.json",
                                out_json=tmp_path / "mesh_accepted.json", context=ctx)
    assert not (tmp_path / "mesh_accepted.json").exists()


def test_the_mesh_pictures_screw_plane_cuts_both_screws():
    """The QC picture's screw plane: for screws whose axes meet, the plane of both axes
    (their entries and tips on it); for screws planned at different cranial angles (axes
    passing each other), the plane nearest their entries and tips, which before lay midway
    between the axes and cut neither 6.5 mm screw (the real L1: 0 and 10 degrees)."""
    from qctfea.model.screw import Screw, ScrewSpec
    from qctfea.qc.meshplot import screw_planes

    spec = ScrewSpec(diameter_mm=6.5, length_mm=40.0)

    def screw(side, entry, medial_deg, cranial_deg):
        m, c = np.radians(medial_deg), np.radians(cranial_deg)
        sign = 1.0 if side == "left" else -1.0  # LPS: left is +x, anterior is -y
        axis = np.array([-sign * np.sin(m) * np.cos(c), -np.cos(m) * np.cos(c), np.sin(c)])
        return Screw(side, np.array(entry, float), axis, spec)

    def offsets(screws):
        origin, normal, _ = screw_planes(screws)["screw plane"]
        n = normal / np.linalg.norm(normal)
        return [abs((p - origin) @ n) for s in screws for p in (s.entry_mm, s.tip_mm)]

    meeting = [screw("left", [20.0, 30.0, 0.0], 15, 0), screw("right", [-20.0, 30.0, 0.0], 15, 0)]
    assert max(offsets(meeting)) < 1e-9
    skew = [screw("left", [17.0, 32.0, -1.0], 7.5, 0), screw("right", [-18.0, 28.0, -3.0], 15, 10)]
    assert max(offsets(skew)) < 6.5 / 2, offsets(skew)
