"""The model mesh as numpy arrays: ``mesh.h5`` read without DOLFINx, and its boundary.

Used by the patient page's 3D scene (:mod:`qctfea.qc.patient_page`) and the stiffness
bounds (:mod:`qctfea.fea.bounds`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qctfea.errors import QctfeaError


def read_model(mesh_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points, tetrahedra and cell tags of ``mesh.xdmf``/``mesh.h5`` (DOLFINx layout, as
    :func:`qctfea.model.meshing.write_mesh` writes it; read with h5py: meshio reads only the
    first grid of such an XDMF file)."""
    import h5py

    h5 = Path(mesh_path).with_suffix(".h5")
    if not h5.is_file():
        raise QctfeaError(f"model mesh {h5} not found")
    with h5py.File(h5, "r") as f:
        return (f["Mesh/mesh/geometry"][:], f["Mesh/mesh/topology"][:].astype(np.int64),
                f["MeshTags/cell_tags/Values"][:].reshape(-1).astype(np.int64))


def boundary_triangles(points: np.ndarray, cells: np.ndarray,
                       with_owners: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The faces of ``cells`` that belong to exactly one of them, oriented outwards (away
    from the cell's fourth vertex), as an (n, 3) array of point indices; with
    ``with_owners`` also the index (into ``cells``) of each face's cell."""
    cells = np.asarray(cells, np.int64)
    if len(cells) == 0:
        empty = np.zeros((0, 3), np.int64)
        return (empty, np.zeros(0, np.int64)) if with_owners else empty
    opposite = [3, 2, 1, 0]
    local = [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]  # face k lacks vertex 3-k
    faces = np.concatenate([cells[:, f] for f in local])
    other = np.concatenate([cells[:, o] for o in opposite])
    key = np.sort(faces, axis=1)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    once = counts[inv.reshape(-1)] == 1
    tri, opp = faces[once], other[once]
    a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
    normal = np.cross(b - a, c - a)
    inward = np.einsum("ij,ij->i", normal, points[opp] - a) > 0
    tri[inward] = tri[inward][:, [0, 2, 1]]
    if with_owners:
        return tri, np.flatnonzero(once) % len(cells)  # faces are stacked per local face
    return tri
