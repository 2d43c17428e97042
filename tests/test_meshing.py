"""CGAL meshing of the labelled vertebra: reproducible for a fixed seed."""
from __future__ import annotations

import io

import numpy as np
import SimpleITK as sitk

from qctfea import steps
from qctfea.meshing import TAG_SCREW, MeshParams, generate_mesh


def test_same_input_and_seed_give_the_same_mesh(demo_scan):
    """Two meshings of the same vertebra and screws are identical to the bit (points, cells,
    tags): CGAL's wall-time-limited perturbation is off by default (mesh.perturb)."""
    r = demo_scan["results"]
    parts = sitk.ReadImage(str(r / "vertebra.nii.gz"))
    screws = steps.load_screws(r / "screws.json")
    params = MeshParams(voxel_mm=0.6, bone_cell_size_mm=3.5, screw_cell_size_mm=2.0)
    a = generate_mesh(parts, screws, params, log=io.StringIO())
    b = generate_mesh(parts, screws, params, log=io.StringIO())
    for x, y in zip(a[:3], b[:3], strict=True):
        assert x.shape == y.shape and np.array_equal(x, y)
    # Both screws are in the mesh as their own subdomains, and the mesh is not trivial.
    assert set(TAG_SCREW.values()) <= set(np.unique(a[2]))
    assert len(a[1]) > 5000
