"""Parametric screw: threads on or off, geometric volume against independent estimates."""
from __future__ import annotations


import numpy as np
import pytest
import SimpleITK as sitk

from qctfea.imaging.masks import BODY
from qctfea.model.meshing import MeshParams, generate_mesh, labelled_grid
from qctfea.model.tags import TAG_SCREW
from qctfea.errors import QctfeaError
from qctfea.model.screw import Screw, ScrewSpec

THREADED = ScrewSpec(diameter_mm=6.5, core_diameter_mm=4.5, thread_pitch_mm=2.75,
                     length_mm=20.0, head_length_mm=4.0, threads=True)


def _screw(spec, axis=(0.3, -0.2, 1.0)):
    a = np.array(axis) / np.linalg.norm(axis)
    return Screw("left", np.array([1.0, 2.0, 3.0]), a, spec)


def test_threaded_volume_closed_form_against_monte_carlo():
    sc = _screw(THREADED)
    rng = np.random.default_rng(5)
    n = 2_000_000
    # Uniform points in the bounding cylinder (radius R, s in [-head, L]) of known volume.
    R, L, h = 3.25, THREADED.length_mm, THREADED.head_length_mm
    r = R * np.sqrt(rng.random(n))
    phi = 2 * np.pi * rng.random(n)
    s = -h + (L + h) * rng.random(n)
    a = sc.axis
    u = np.cross(a, [1.0, 0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(a, u)
    pts = sc.entry_mm + np.outer(s, a) + (r * np.cos(phi))[:, None] * u \
        + (r * np.sin(phi))[:, None] * v
    mc = sc.contains(pts).mean() * np.pi * R**2 * (L + h)
    assert THREADED.volume_mm3() == pytest.approx(mc, rel=0.005)
    # Between the core and the outer cylinder, and the thread is really there.
    c = THREADED.core_diameter_mm / 2
    assert np.pi * c**2 * L < THREADED.volume_mm3() - np.pi * R**2 * h < np.pi * R**2 * L
    plain = ScrewSpec(diameter_mm=6.5, length_mm=20.0, head_length_mm=4.0)
    assert plain.volume_mm3() == pytest.approx(np.pi * R**2 * 24.0, rel=1e-12)


def test_thread_crests_follow_the_helix():
    sc = _screw(THREADED, axis=(0, 0, 1))
    # Along a line on the outer radius, crests (inside) repeat every pitch.
    s = np.linspace(0.0, 11.0, 2201)
    u = np.cross(sc.axis, [1.0, 0, 0])
    u /= np.linalg.norm(u)
    line = sc.entry_mm + np.outer(s, sc.axis) + 3.2 * u
    inside = sc.contains(line)
    starts = s[1:][inside[1:] & ~inside[:-1]]
    assert len(starts) >= 3
    assert np.diff(starts) == pytest.approx(THREADED.thread_pitch_mm, abs=0.02)


def test_spec_is_checked():
    with pytest.raises(QctfeaError, match="core_diameter_mm"):
        ScrewSpec(threads=True, core_diameter_mm=7.0)
    with pytest.raises(QctfeaError, match="thread_pitch_mm"):
        ScrewSpec(threads=True, thread_pitch_mm=0.0)


def test_threaded_screw_meshes_as_a_subdomain_of_about_its_volume():
    img = sitk.Image([60, 60, 70], sitk.sitkUInt8) + BODY  # 15 x 15 x 17.5 mm at 0.25 mm
    img.SetSpacing([0.25, 0.25, 0.25])
    spec = ScrewSpec(diameter_mm=6.5, core_diameter_mm=4.5, thread_pitch_mm=2.75,
                     length_mm=12.0, head_length_mm=2.0, threads=True)
    top = 69 * 0.25
    screw = Screw("left", np.array([7.4, 7.4, top]), np.array([0.0, 0.0, -1.0]), spec)
    params = MeshParams(voxel_mm=0.2, bone_cell_size_mm=2.0, screw_cell_size_mm=0.5,
                        peri_screw_mm=1.5, peri_screw_cell_size_mm=0.5, facet_distance_mm=0.1,
                        margin_mm=0.0, head_clearance_mm=0.0)
    vol, _, h = labelled_grid(img, [screw], params)
    assert (vol == TAG_SCREW["left"]).sum() * h**3 == pytest.approx(spec.volume_mm3(), rel=0.03)
    pts, cells, tags, rep = generate_mesh(img, [screw], params)
    v = rep["screw_volume"]["left"]
    assert v["refused"] == "threads" and v["geometry_mm3"] == spec.volume_mm3()
    assert v["mesh_mm3"] == pytest.approx(spec.volume_mm3(), rel=0.05)
