"""The study's two load cases, linear: vertebral compression and screw pullout.

**Compression.** The inferior endplate is fixed; the superior endplate is
displaced by ``displacement_mm`` along the body's inferior direction (a rigid,
bonded platen: all components prescribed). Endplates are the exterior facets
of vertebral-body cells whose midpoints lie within ``endplate_depth_mm`` of
the body's extreme along its superior axis (from the mask step).
Stiffness = reaction / displacement (N/mm).

**Pullout (per side).** Both endplates are fixed. The screw head's end face
(exterior facets of that screw's cells within ``head_face_mm`` of the head
end) is displaced by ``displacement_mm`` along the screw axis, away from the
bone; the screw is bonded to bone (shared nodes).

**Linear strength estimate** (for screening; documented criterion). Under
linear elasticity every strain scales with the applied displacement. The
effective strain of an element is its largest absolute principal strain. The
estimate is the force at which a volume fraction ``failed_fraction`` of the
bone in the load case's region reaches the yield strain ``yield_strain``
(Pistoia et al., Bone 2002;30:842: 2 % of the bone volume above 0.7 %
strain). Regions: for compression, the vertebral body; for pullout, the bone
within ``shell_mm`` of the screw's surface over its inserted length (the
region of the around-screw vBMD). With F1 the reaction at the applied
displacement and e_q the volume-weighted (1 - fraction) quantile of the
effective strain there, strength = F1 * yield_strain / e_q.
"""

from __future__ import annotations

from dataclasses import dataclass

import dolfinx_solver  # noqa: F401
import dolfinx
import numpy as np
from mpi4py import MPI

from qctfea.fea.elasticity import (
    ElasticModel,
    boundary_facets_of_tags,
    facet_midpoints,
)
from qctfea.meshing import BONE_TAGS, TAG_BODY, TAG_SCREW
from qctfea.provenance import QctfeaError
from qctfea.screw import Screw


@dataclass
class LoadParams:
    displacement_mm: float = 0.1
    endplate_depth_mm: float = 1.0
    head_face_mm: float = 0.5
    yield_strain: float = 0.007
    failed_fraction_compression: float = 0.02
    failed_fraction_pullout: float = 0.02
    shell_mm: float = 2.0


def weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """Smallest value v such that the weight of values <= v is at least q of the total."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cw = np.cumsum(w)
    k = int(np.searchsorted(cw, q * cw[-1]))
    return float(v[min(k, len(v) - 1)])


def effective_strain(strains: np.ndarray) -> np.ndarray:
    """Largest absolute principal strain per element."""
    ev = np.linalg.eigvalsh(strains)
    return np.abs(ev).max(axis=1)


def _endplate_dofs(model: ElasticModel, cell_tags, axis_info: dict):
    mesh = model.mesh
    axis = np.asarray(axis_info["superior_axis"], float)
    c = np.asarray(axis_info["centroid_mm"], float)
    facets = boundary_facets_of_tags(mesh, cell_tags, [TAG_BODY])
    h = (facet_midpoints(mesh, facets) - c) @ axis if len(facets) else np.zeros(0)
    comm = mesh.comm
    hmax = comm.allreduce(h.max() if len(h) else -np.inf, MPI.MAX)
    hmin = comm.allreduce(h.min() if len(h) else np.inf, MPI.MIN)
    return facets, h, hmin, hmax, axis


def _dofs(model, facets):
    return dolfinx.fem.locate_dofs_topological(model.V, model.mesh.topology.dim - 1, facets)


def _count(comm, local_dofs, n_owned) -> int:
    return comm.allreduce(int((local_dofs < n_owned).sum()), MPI.SUM)


def strength_estimate(model: ElasticModel, force: float, region_cells_mask_fn, fraction: float,
                      yield_strain: float) -> dict:
    """Force at which ``fraction`` of the region's volume exceeds ``yield_strain``."""
    strains, vols, orig = model.cell_strains()
    sel = region_cells_mask_fn(orig)
    eff = effective_strain(strains[sel])
    comm = model.mesh.comm
    all_eff = comm.gather(eff, root=0)
    all_vol = comm.gather(vols[sel], root=0)
    result = None
    if comm.rank == 0:
        e = np.concatenate(all_eff)
        w = np.concatenate(all_vol)
        if len(e) == 0:
            result = (np.nan, 0.0, 0)
        else:
            result = (weighted_quantile(e, w, 1.0 - fraction), float(w.sum()), len(e))
    e_q, region_vol, n = comm.bcast(result, root=0)
    if not np.isfinite(e_q) or e_q <= 0:
        raise QctfeaError("strength estimate: the load case's bone region has no strained "
                          "elements; check the mesh tags and the screw position")
    return {
        "strength_n": abs(force) * yield_strain / e_q,
        "strain_quantile_at_applied": e_q,
        "region_volume_mm3": region_vol,
        "region_cells": n,
        "criterion": f"{fraction:.3%} of region volume at principal strain {yield_strain:.4f}",
    }


def solve_compression(model: ElasticModel, cell_tags, cell_tag_by_orig: np.ndarray,
                      axis_info: dict, params: LoadParams, petsc_options=None) -> dict:
    mesh = model.mesh
    facets, h, hmin, hmax, axis = _endplate_dofs(model, cell_tags, axis_info)
    sup = facets[h >= hmax - params.endplate_depth_mm]
    inf = facets[h <= hmin + params.endplate_depth_mm]
    sup_dofs, inf_dofs = _dofs(model, sup), _dofs(model, inf)
    n_owned = model.V.dofmap.index_map.size_local
    n_sup, n_inf = _count(mesh.comm, sup_dofs, n_owned), _count(mesh.comm, inf_dofs, n_owned)
    if n_sup == 0 or n_inf == 0:
        raise QctfeaError("compression: no endplate nodes found; check the mesh and body axis")
    d = params.displacement_mm
    bcs = [
        dolfinx.fem.dirichletbc(np.zeros(3), inf_dofs, model.V),
        dolfinx.fem.dirichletbc(-d * axis, sup_dofs, model.V),
    ]
    info = model.solve(bcs, petsc_options)
    force = model.reaction(sup_dofs, -axis)  # compressive force on the superior endplate
    st = strength_estimate(
        model, force, lambda orig: cell_tag_by_orig[orig] == TAG_BODY,
        params.failed_fraction_compression, params.yield_strain)
    return {
        "load_case": "compression",
        "displacement_mm": d,
        "reaction_force_n": force,
        "stiffness_n_per_mm": force / d,
        "strength_n": st["strength_n"],
        "strength_criterion": st,
        "superior_nodes": n_sup,
        "inferior_nodes": n_inf,
        "ksp_iterations": info.iterations,
        "converged_reason": info.converged_reason,
        "residual_norm": info.residual_norm,
        "n_dofs": info.n_dofs,
        "n_cells": info.n_cells,
        "mpi_ranks": info.mpi_ranks,
        "seconds": info.seconds,
    }


def solve_pullout(model: ElasticModel, cell_tags, cell_tag_by_orig: np.ndarray,
                  cell_centroid_by_orig: np.ndarray, axis_info: dict, screw: Screw,
                  params: LoadParams, petsc_options=None) -> dict:
    mesh = model.mesh
    facets, h, hmin, hmax, _ = _endplate_dofs(model, cell_tags, axis_info)
    ends = facets[(h >= hmax - params.endplate_depth_mm) | (h <= hmin + params.endplate_depth_mm)]
    tag = TAG_SCREW[screw.side]
    sf = boundary_facets_of_tags(mesh, cell_tags, [tag])
    s, _ = screw.axial_radial(facet_midpoints(mesh, sf)) if len(sf) else (np.zeros(0), None)
    smin = mesh.comm.allreduce(s.min() if len(s) else np.inf, MPI.MIN)
    head = sf[s <= smin + params.head_face_mm]
    end_dofs, head_dofs = _dofs(model, ends), _dofs(model, head)
    n_owned = model.V.dofmap.index_map.size_local
    n_head = _count(mesh.comm, head_dofs, n_owned)
    if n_head == 0:
        raise QctfeaError(f"pullout {screw.side}: no screw head nodes found")
    d = params.displacement_mm
    pull = -screw.axis  # away from the bone
    bcs = [
        dolfinx.fem.dirichletbc(np.zeros(3), end_dofs, model.V),
        dolfinx.fem.dirichletbc(d * pull, head_dofs, model.V),
    ]
    info = model.solve(bcs, petsc_options)
    force = model.reaction(head_dofs, pull)

    def region(orig):
        sd, rad = screw.axial_radial(cell_centroid_by_orig[orig])
        return (np.isin(cell_tag_by_orig[orig], BONE_TAGS)
                & (rad <= screw.spec.diameter_mm / 2 + params.shell_mm)
                & (sd >= 0) & (sd <= screw.spec.length_mm))

    st = strength_estimate(model, force, region, params.failed_fraction_pullout,
                           params.yield_strain)
    return {
        "load_case": "pullout",
        "side": screw.side,
        "displacement_mm": d,
        "reaction_force_n": force,
        "stiffness_n_per_mm": force / d,
        "strength_n": st["strength_n"],
        "strength_criterion": st,
        "head_nodes": n_head,
        "ksp_iterations": info.iterations,
        "converged_reason": info.converged_reason,
        "residual_norm": info.residual_norm,
        "n_dofs": info.n_dofs,
        "n_cells": info.n_cells,
        "mpi_ranks": info.mpi_ranks,
        "seconds": info.seconds,
    }
