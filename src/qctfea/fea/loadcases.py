"""The study's two load cases, linear: vertebral compression and screw pullout.

**Compression.** The inferior endplate is fixed; the superior endplate is
displaced by ``displacement_mm`` along the body's inferior direction (a rigid,
bonded platen: all components prescribed). Endplates are the exterior facets
of vertebral-body cells that face along the body's superior axis (outward
normal within ``endplate_angle_deg`` of +axis, or of -axis for the inferior
one) and lie in the top (bottom) ``endplate_zone_fraction`` of the body's
height along that axis (from the mask step). Selecting by orientation takes
the whole endplate whatever the tilt of the vertebra in the scanner, so the
same surface is loaded at every timepoint. Nodes of screw cells are never
part of an endplate (``_off_screws``).
Stiffness = reaction / displacement (N/mm).

*Platens* (``platens``). ``fixed`` (default): both platens bonded, every
displacement component prescribed (lateral motion held). ``free``: the end
conditions of the published voxel-FE benchmarks: only the axial component is
prescribed (zero on the inferior platen, ``-displacement`` on the superior
one) and lateral motion is free, apart from the minimum that removes the
rigid-body modes left (two lateral translations and the rotation about the
axis): the inferior platen node nearest its centre is held laterally, and the
inferior platen node farthest from it is held in the one lateral direction
perpendicular to the line joining them. The axial direction is then the scan
axis nearest the body's superior axis (the component the constraint acts on;
its angle to the body axis is recorded as ``load_axis_tilt_deg``). A prism of
layers in series (e.g. bone between end caps) under free platens is in
uniaxial stress, so its stiffness is 1 / sum(L_i / (E_i A)) for any Poisson
ratio when the layers' ratios nu_i / E_i are equal (``tests/test_specimen.py``).

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

**Nonlinear** (``analysis: nonlinear``, the study's method; see
:mod:`qctfea.fea.plasticity`, docs/nonlinear.md): the same boundary conditions,
bone with the regularised damage law (yield at the material's yield stress, plateau,
softening; von Mises plasticity as an option), the displacement raised in
increments to ``compression_max_strain`` x body height (compression) or
``pullout_max_displacement_mm`` (pullout); strength = the peak of the
force-displacement curve; stiffness = the initial (first increment) slope.
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
from qctfea.model.tags import BONE_TAGS, TAG_BODY, TAG_CAP, TAG_SCREW
from qctfea.errors import QctfeaError
from qctfea.model.screw import Screw
from qctfea.config import option
from qctfea.fea.plasticity import NonlinearParams


#: load cases of the workflow (``loads.cases``), in the order they are run
LOAD_CASES = ("compression", "pullout")
#: compression platen conditions (``loads.platens``)
PLATENS = ("fixed", "free")


@dataclass
class LoadParams(NonlinearParams):
    """The ``loads`` section: the load cases' own settings and, inherited, the nonlinear
    solver's (:class:`qctfea.fea.plasticity.NonlinearParams`, declared there once)."""

    displacement_mm: float = option(
        0.1, exclusiveMinimum=0, doc="linear: applied displacement (both load cases)")
    #: endplate facets: normal within this of the axis
    endplate_angle_deg: float = option(
        45.0, exclusiveMinimum=0, exclusiveMaximum=90,
        doc=("endplate facets: outward normal within this angle of the body's superior "
             "(inferior) axis"))
    #: endplate facets: in this top/bottom part of the body
    endplate_zone_fraction: float = option(
        0.25, exclusiveMinimum=0, maximum=1,
        doc="endplate facets: within this fraction of the body height from its top (bottom)")
    head_face_mm: float = option(0.5, exclusiveMinimum=0, doc="screw head face selection depth")
    yield_strain: float = option(
        0.007, exclusiveMinimum=0, doc="strain of the linear strength criterion")
    failed_fraction_compression: float = option(
        0.02, exclusiveMinimum=0, exclusiveMaximum=1, doc="failed volume fraction")
    failed_fraction_pullout: float = option(
        0.02, exclusiveMinimum=0, exclusiveMaximum=1, row="failed_fraction_compression")
    shell_mm: float = option(2.0, minimum=0, doc="pullout criterion region around the screw")
    #: "linear" (stiffness + the strain-criterion estimate) or "nonlinear" (damage law)
    analysis: str = option(
        "nonlinear", enum=["linear", "nonlinear"],
        doc=("`nonlinear` (bone that yields and fails, the study's method) or `linear` "
             "(stiffness + strain-criterion strength estimate, fast screening)"))
    #: nonlinear: max displacement / body height
    compression_max_strain: float = option(
        0.01, exclusiveMinimum=0,
        doc="nonlinear: largest superior endplate displacement / body height")
    #: nonlinear: max screw head displacement
    pullout_max_displacement_mm: float = option(
        0.3, exclusiveMinimum=0,
        doc=("nonlinear: largest screw head displacement (the run stops earlier once the curve "
             "has peaked)"))
    #: nonlinear: "damage" (stress-capped isotropic damage, locking-free on linear
    #: tetrahedra) or "plasticity" (von Mises return mapping)
    constitutive: str = option(
        "damage", enum=["damage", "plasticity"],
        doc=("nonlinear: `damage` = isotropic damage driven by the equivalent strain (von "
             "Mises or, in tension, largest principal trial stress / E): elastic, a plateau at "
             "the yield stress, then a linear fall regularised by a nonlocal average "
             "(`nonlocal_length_mm`) and the crack band "
             "([docs/nonlinear.md](../docs/nonlinear.md)); `plasticity` = von Mises return "
             "mapping (locks on linear tetrahedra: strengths too high)"))
    #: nonlinear: offset = this x body height / screw length
    offset_strain: float = option(
        0.002, exclusiveMinimum=0,
        doc="nonlinear: offset = this x body height (compression) or x screw length (pullout)")
    #: load cases the workflow runs: compression always; without "pullout" no screws are
    #: planned or meshed (a body-only specimen, e.g. a voxel-FE benchmark with end caps)
    cases: list = option(
        factory=lambda: list(LOAD_CASES), minItems=1, uniqueItems=True,
        items={"enum": list(LOAD_CASES)}, contains={"const": "compression"},
        doc=("load cases run. Compression is always run; without `pullout` (`[compression]`) "
             "no screws are planned or meshed (the mesh has no screw subdomains, the sample "
             "sheet needs no landmarks and `screw`/`planning` are unused), there is no "
             "around-screw vBMD and no pullout job, and the tables, statistics, figures and "
             "summary page leave pullout out. For a body-only specimen (e.g. a voxel-FE "
             "benchmark with end caps: [docs/specimens.md](../docs/specimens.md))"))
    #: compression platens: "fixed" (both platens bonded: every displacement component
    #: prescribed) or "free" (only the axial component prescribed; lateral motion free apart
    #: from the minimum that removes rigid-body motion; see the module docstring)
    platens: str = option(
        "fixed", enum=list(PLATENS),
        doc=("compression end conditions. `fixed`: both platens bonded, every displacement "
             "component prescribed (lateral motion held). `free`: the voxel-FE benchmarks' "
             "conditions: the inferior platen's nodes held axially, the superior platen's "
             "displaced axially, lateral motion free except the minimum against rigid-body "
             "motion (the inferior platen node nearest its centre held laterally, the one "
             "farthest from it held in one lateral direction); the axial direction is the scan "
             "axis nearest the body axis (compression.json: `load_axis`, "
             "`load_axis_tilt_deg`). Pullout always holds both endplates. Checked on a capped "
             "box specimen through the workflow: 20,969 N/mm against the closed form of layers "
             "in series 21,018 N/mm (−0.23 %; fixed platens +2.6 %), `.venv/bin/python -m "
             "pytest -s tests/test_specimen.py`, [docs/specimens.md](../docs/specimens.md)"))

    def __post_init__(self) -> None:
        cases = self.cases
        if (not isinstance(cases, (list, tuple)) or "compression" not in cases
                or len(set(cases)) != len(cases) or not set(cases) <= set(LOAD_CASES)):
            raise QctfeaError(f"loads.cases {cases!r}: give a list of {list(LOAD_CASES)} "
                              "without repeats; compression is always run")
        self.cases = [c for c in LOAD_CASES if c in cases]
        if self.platens not in PLATENS:
            raise QctfeaError(f"loads.platens must be one of {list(PLATENS)}, not "
                              f"{self.platens!r}")
        super().__post_init__()  # the solver's own checks (e.g. nonlocal needs imex)

    def nonlinear(self) -> NonlinearParams:
        """The nonlinear solver's parameters alone (the inherited fields)."""
        from dataclasses import fields

        return NonlinearParams(**{f.name: getattr(self, f.name)
                                  for f in fields(NonlinearParams)})


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


def _endplate_dofs(model: ElasticModel, cell_tags, axis_info: dict, params: LoadParams):
    """Superior and inferior endplate facets of the body (see the module docstring); with
    end caps in the mesh (TAG_CAP), the caps' outer faces instead (the platens load the
    caps, as in a specimen test)."""
    mesh = model.mesh
    axis = np.asarray(axis_info["superior_axis"], float)
    axis = axis / np.linalg.norm(axis)
    c = np.asarray(axis_info["centroid_mm"], float)
    has_caps = mesh.comm.allreduce(int((np.asarray(cell_tags.values) == TAG_CAP).any()),
                                   MPI.MAX)
    facets = boundary_facets_of_tags(mesh, cell_tags, [TAG_CAP if has_caps else TAG_BODY])
    mid = facet_midpoints(mesh, facets) if len(facets) else np.zeros((0, 3))
    h = (mid - c) @ axis
    comm = mesh.comm
    hmax = comm.allreduce(h.max() if len(h) else -np.inf, MPI.MAX)
    hmin = comm.allreduce(h.min() if len(h) else np.inf, MPI.MIN)
    cosang = np.zeros(len(facets))
    if len(facets):
        x = mesh.geometry.x
        g = dolfinx.mesh.entities_to_geometry(mesh, 2, facets)
        nrm = np.cross(x[g[:, 1]] - x[g[:, 0]], x[g[:, 2]] - x[g[:, 0]])
        nrm /= np.linalg.norm(nrm, axis=1)[:, None]
        f2c = mesh.topology.connectivity(2, 3)
        cells = np.array([f2c.links(f)[0] for f in facets], dtype=np.int32)
        cmid = dolfinx.mesh.compute_midpoints(mesh, 3, cells)
        nrm *= np.sign(np.einsum("ij,ij->i", nrm, mid - cmid))[:, None]  # outward
        cosang = nrm @ axis
    zone = params.endplate_zone_fraction * (hmax - hmin)
    cmin = np.cos(np.radians(params.endplate_angle_deg))
    sup = facets[(h >= hmax - zone) & (cosang >= cmin)]
    inf = facets[(h <= hmin + zone) & (cosang <= -cmin)]
    return sup, inf, axis, float(hmax - hmin)


def _dofs(model, facets):
    return dolfinx.fem.locate_dofs_topological(model.V, model.mesh.topology.dim - 1, facets)


def _off_screws(model: ElasticModel, cell_tags, dofs: np.ndarray) -> np.ndarray:
    """The endplate node set without the nodes of screw cells. A screw that runs within a
    cell of the body's surface near the top or bottom of the body (e.g. at the pedicle's
    base, graded A with a clearance below the cell size) shares nodes with exterior body
    facets that face along the axis; held, such a node pins the screw to the platen, and
    the pullout curve then rises without end (the screw is stretched against it). The
    nodes are marked on every rank that sees them (reverse then forward scatter), so all
    ranks drop the same ones."""
    tags = np.asarray(cell_tags.values)
    screw_cells = np.asarray(cell_tags.indices)[np.isin(tags, list(TAG_SCREW.values()))]
    screw_dofs = np.unique(model.V.dofmap.list[screw_cells])  # block (node) dofs
    mark = dolfinx.la.vector(model.V.dofmap.index_map, 1)
    mark.array[:] = 0.0
    mark.array[screw_dofs] = 1.0
    mark.scatter_reverse(dolfinx.la.InsertMode.add)
    mark.scatter_forward()
    return dofs[mark.array[dofs] == 0.0].astype(np.int32)


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


def compression_dofs(model: ElasticModel, cell_tags, axis_info: dict, params: LoadParams):
    """Superior and inferior endplate node sets, the superior axis and the body height."""
    mesh = model.mesh
    sup, inf, axis, height = _endplate_dofs(model, cell_tags, axis_info, params)
    sup_dofs = _off_screws(model, cell_tags, _dofs(model, sup))
    inf_dofs = _off_screws(model, cell_tags, _dofs(model, inf))
    n_owned = model.V.dofmap.index_map.size_local
    n_sup, n_inf = _count(mesh.comm, sup_dofs, n_owned), _count(mesh.comm, inf_dofs, n_owned)
    if n_sup == 0 or n_inf == 0:
        raise QctfeaError("compression: no endplate nodes found; check the mesh and body axis")
    return sup_dofs, inf_dofs, axis, n_sup, n_inf, height


def free_platen_constraints(model: ElasticModel, sup_dofs, inf_dofs, axis: np.ndarray):
    """Component constraints of free platens (see the module docstring).

    Returns ``(k, e, fixed, loaded, tilt_deg)``: the scan axis index ``k`` nearest the body's
    superior ``axis``, the unit superior direction ``e`` along it, the ``fixed`` list of
    ``(unrolled dofs, component)`` held at zero (inferior platen axially, plus the
    rigid-body pins) and the ``loaded`` ``(unrolled dofs, k)`` of the superior platen."""
    mesh = model.mesh
    comm = mesh.comm
    k = int(np.argmax(np.abs(axis)))
    e = np.zeros(3)
    e[k] = np.sign(axis[k])
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(axis[k]))))))
    lateral = [i for i in range(3) if i != k]
    n_owned = model.V.dofmap.index_map.size_local
    x = model.V.tabulate_dof_coordinates()
    own = inf_dofs[inf_dofs < n_owned]
    total = comm.allreduce(np.asarray(x[own].sum(axis=0), float), MPI.SUM)
    centre = total / max(1, comm.allreduce(len(own), MPI.SUM))

    def pick(score):
        """Coordinates of the owned inferior node with the largest score (all ranks)."""
        best = (score(x[own]).max(), x[own][int(np.argmax(score(x[own])))].tolist()) \
            if len(own) else (-np.inf, None)
        return np.asarray(max(comm.allgather(best), key=lambda t: t[0])[1], float)

    p1 = pick(lambda pts: -np.linalg.norm((pts - centre)[:, lateral], axis=1))
    p2 = pick(lambda pts: np.linalg.norm((pts - p1)[:, lateral], axis=1))
    r = (p2 - p1)[lateral]
    # The rotation about the axis moves p2 perpendicular to p1 -> p2: hold that component.
    c2 = lateral[1] if abs(r[0]) >= abs(r[1]) else lateral[0]

    def at(p):
        """Local block dofs (owned or ghost) of the node at p."""
        return np.flatnonzero(np.linalg.norm(x - p, axis=1) < 1e-9)

    def unrolled(block, comp):
        return (np.asarray(block, np.int32) * 3 + comp).astype(np.int32)

    fixed = [(unrolled(inf_dofs, k), k)]
    fixed += [(unrolled(at(p1), c), c) for c in lateral]
    fixed.append((unrolled(at(p2), c2), c2))
    return k, e, fixed, (unrolled(sup_dofs, k), k), tilt


def _solver_summary(info) -> dict:
    return {
        "ksp_iterations": info.iterations,
        "converged_reason": info.converged_reason,
        "jacobi_levels": info.jacobi_levels,
        "linear_solver_fallback": info.fallback or None,
        "residual_norm": info.residual_norm,
        "n_dofs": info.n_dofs,
        "n_cells": info.n_cells,
        "mpi_ranks": info.mpi_ranks,
        "seconds": info.seconds,
    }


def _nonlinear_summary(nl) -> dict:
    d = nl.as_dict()
    return {
        "stiffness_n_per_mm": nl.initial_stiffness_n_per_mm,
        "strength_n": nl.strength_n,
        "strength_rule": nl_params_rule(nl),
        "peak_force_n": nl.peak_force_n,
        "offset_yield_n": nl.offset_yield_n,
        "offset_yield_displacement_mm": nl.offset_yield_displacement_mm,
        "displacement_at_peak_mm": nl.displacement_at_peak_mm,
        "peak_reached": nl.peak_reached,
        "stop_reason": nl.stop_reason,
        "increments": nl.increments,
        "step_cuts": nl.step_cuts,
        "newton_iterations": nl.newton_iterations,
        "newton_iterations_per_increment": d["newton_iterations_per_increment"],
        "linear_solve_s": d["linear_solve_s"],
        "cost_in_linear_solves": d["cost_in_linear_solves"],
        "linear_fallbacks": d["linear_fallbacks"],
        "ksp_iterations": nl.ksp_iterations,
        "preconditioner_rebuilds": nl.preconditioner_rebuilds,
        "n_dofs": nl.n_dofs,
        "n_cells": nl.n_cells,
        "mpi_ranks": nl.mpi_ranks,
        "seconds": nl.seconds,
        "peak_rss_mb": nl.peak_rss_mb,
        "rss_after_first_increment_mb": nl.rss_after_first_increment_mb,
        "rss_end_mb": nl.rss_end_mb,
        "curve": d["curve"],
    }


def nl_params_rule(nl) -> str:
    return nl.rule


def _dirichlet(model: ElasticModel, dofs, component, value):
    """Dirichlet condition on whole nodes (component None: ``value`` a vector, or 0) or on
    one displacement component (unrolled dofs; the component of a vector ``value``)."""
    if component is None:
        return dolfinx.fem.dirichletbc(np.broadcast_to(np.asarray(value, float), 3).copy(),
                                       dofs, model.V)
    v = float(np.asarray(value, float)[component]) if np.ndim(value) else float(value)
    return dolfinx.fem.dirichletbc(v, dofs, model.V.sub(component))


def _check_analysis(params: LoadParams) -> None:
    if params.analysis not in ("linear", "nonlinear"):
        raise QctfeaError(f"loads.analysis must be 'linear' or 'nonlinear', not "
                          f"{params.analysis!r}")


def solve_compression(model: ElasticModel, cell_tags, cell_tag_by_orig: np.ndarray,
                      axis_info: dict, params: LoadParams, petsc_options=None,
                      progress=None) -> dict:
    _check_analysis(params)
    sup_dofs, inf_dofs, axis, n_sup, n_inf, height = compression_dofs(
        model, cell_tags, axis_info, params)
    common = {"load_case": "compression", "analysis": params.analysis,
              "superior_nodes": n_sup, "inferior_nodes": n_inf, "body_height_mm": height,
              "platens": params.platens}
    # fixed platens: whole nodes (component None) along the body axis; free: one component
    fixed, loaded = [(inf_dofs, None)], (sup_dofs, None)
    if params.platens == "free":
        k, axis, fixed, loaded, tilt = free_platen_constraints(model, sup_dofs, inf_dofs, axis)
        common |= {"load_axis": "xyz"[k], "load_axis_tilt_deg": tilt}
        if progress and tilt > 5.0:
            progress(f" free platens load along the scan's {'xyz'[k]} axis, {tilt:.1f} deg "
                     "from the body axis")
    common["load_direction"] = (-axis).tolist()
    if params.analysis == "nonlinear":
        dmax = params.compression_max_strain * height
        offset = params.offset_strain * height
        nl = model.run(fixed, loaded, -axis, dmax, params.nonlinear(),
                       offset, petsc_options, progress=progress)
        return {**common, "max_displacement_mm": dmax, "offset_displacement_mm": offset,
                **_nonlinear_summary(nl)}
    d = params.displacement_mm
    bcs = [_dirichlet(model, dofs, comp, 0.0) for dofs, comp in fixed]
    bcs.append(_dirichlet(model, loaded[0], loaded[1], -d * axis))
    info = model.solve(bcs, petsc_options)
    force = model.reaction(sup_dofs, -axis)  # compressive force on the superior endplate
    st = strength_estimate(
        model, force, lambda orig: cell_tag_by_orig[orig] == TAG_BODY,
        params.failed_fraction_compression, params.yield_strain)
    return {
        **common,
        "displacement_mm": d,
        "reaction_force_n": force,
        "stiffness_n_per_mm": force / d,
        "strength_n": st["strength_n"],
        "strength_criterion": st,
        "curve": [{"displacement_mm": 0.0, "force_n": 0.0},
                  {"displacement_mm": d, "force_n": force}],
        **_solver_summary(info),
    }


def pullout_dofs(model: ElasticModel, cell_tags, axis_info: dict, screw: Screw,
                 params: LoadParams):
    """Endplate node set (held), the screw head face node set and the pull direction."""
    mesh = model.mesh
    sup, inf, _, _ = _endplate_dofs(model, cell_tags, axis_info, params)
    ends = np.concatenate([sup, inf])
    tag = TAG_SCREW[screw.side]
    sf = boundary_facets_of_tags(mesh, cell_tags, [tag])
    s, _ = screw.axial_radial(facet_midpoints(mesh, sf)) if len(sf) else (np.zeros(0), None)
    smin = mesh.comm.allreduce(s.min() if len(s) else np.inf, MPI.MIN)
    head = sf[s <= smin + params.head_face_mm]
    end_dofs, head_dofs = _off_screws(model, cell_tags, _dofs(model, ends)), _dofs(model, head)
    n_owned = model.V.dofmap.index_map.size_local
    n_head = _count(mesh.comm, head_dofs, n_owned)
    if n_head == 0:
        raise QctfeaError(f"pullout {screw.side}: no screw head nodes found")
    return end_dofs, head_dofs, -screw.axis, n_head


def solve_pullout(model: ElasticModel, cell_tags, cell_tag_by_orig: np.ndarray,
                  cell_centroid_by_orig: np.ndarray, axis_info: dict, screw: Screw,
                  params: LoadParams, petsc_options=None, progress=None) -> dict:
    _check_analysis(params)
    end_dofs, head_dofs, pull, n_head = pullout_dofs(model, cell_tags, axis_info, screw, params)
    common = {"load_case": "pullout", "side": screw.side, "analysis": params.analysis,
              "head_nodes": n_head}
    if params.analysis == "nonlinear":
        dmax = params.pullout_max_displacement_mm
        offset = params.offset_strain * screw.spec.length_mm
        nl = model.run([(end_dofs, None)], (head_dofs, None), pull, dmax, params.nonlinear(),
                       offset, petsc_options, progress=progress)
        return {**common, "max_displacement_mm": dmax, "offset_displacement_mm": offset,
                **_nonlinear_summary(nl)}
    d = params.displacement_mm
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
        **common,
        "displacement_mm": d,
        "reaction_force_n": force,
        "stiffness_n_per_mm": force / d,
        "strength_n": st["strength_n"],
        "strength_criterion": st,
        "curve": [{"displacement_mm": 0.0, "force_n": 0.0},
                  {"displacement_mm": d, "force_n": force}],
        **_solver_summary(info),
    }
