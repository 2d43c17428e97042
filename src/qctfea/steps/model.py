"""The model steps the rules run (model.smk and the planning in imaging.smk): screw
planning and its acceptance, mesh, element materials (:mod:`qctfea.steps` holds the shared
readers and the config typing).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np

from qctfea.errors import QctfeaError
from qctfea.model import tags as mesh_tags
from qctfea.provenance import atomic_path, provenance, read_json, write_json
from qctfea.steps import (accept_record, load_screws, need_inputs, params_from, read_density,
                          read_image, refusal_text, write_refusal)

log = logging.getLogger(__name__)


def plan_screws(*, landmarks_path, parts_path, out_json, cfg: dict, context: str,
                planning: dict | None = None, out_png=None, record_refusal: bool = False,
                level: str | None = None) -> None:
    """Screws from the landmarks (``planning.method: landmarks``, the default) or planned from
    the vertebra parts image (``auto``, :mod:`qctfea.model.planning`; ``landmarks_path`` may then be
    None and is not read), each graded on the Gertzbein-Robbins scale against the parts image
    (:mod:`qctfea.model.placement`). A screw graded worse than ``planning.max_grade`` fails the
    step with an error naming the scan, side, grade and breach; its QC picture is then kept
    as ``screws_refused.png`` beside ``out_json``. With ``record_refusal`` (the workflow,
    whose planning checkpoint must finish for the cohort to go on without the scan) the
    refusal is written into ``out_json`` (key ``refused``) and the picture to ``out_png``
    instead: :func:`accept_screws` then fails the scan, and :func:`load_screws` refuses to
    give these screws to any later step. ``level``: the target's level name (``mask.vertebra``,
    e.g. ``L5``) when known; automatic planning searches that level's angle range
    (:func:`qctfea.model.planning.trajectory`)."""
    from qctfea.model import placement
    from qctfea.model import planning as plan_mod
    from qctfea.model import screw as screw_mod

    cfg = dict(cfg or {})
    plan = params_from(plan_mod.PlanParams, planning, "planning")
    traj = plan_mod.TRAJECTORIES[plan.trajectory]
    if plan.method == "auto":  # the trajectory's screw size unless the screw section sets one
        cfg.setdefault("diameter_mm", traj["diameter_mm"])
        cfg.setdefault("length_mm", traj["length_mm"])
    spec = params_from(screw_mod.ScrewSpec, cfg, "screw")
    need_inputs(context, parts=parts_path)
    try:
        parts = read_image(parts_path, "vertebra parts image", context)
        anatomy = plan_mod.vertebra_anatomy(parts, context)
        screws, where, inputs = _screws_from(plan, spec, parts, anatomy, parts_path,
                                             landmarks_path, context, level)
        out = _graded(screws, parts, parts_path, anatomy, plan, where)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        # No screws (no pedicle or canal found, no trajectory with room, landmarks that miss
        # the vertebra, an unexpected error): in the workflow a refusal like a bad grade.
        if not record_refusal:
            raise
        write_refusal("screws", refusal_text(exc, "screws", context), out_json,
                      {**asdict(spec), "planning": asdict(plan)},
                      {"parts": parts_path, "landmarks": landmarks_path},
                      picture=out_png, title=f"{context}: no screws")
        return
    refused = [s for s in out if placement.grade_worse(s["placement"]["grade"], plan.max_grade)]
    png = out_png
    if refused and out_png is not None and not record_refusal:
        png = Path(out_json).with_name("screws_refused.png")
    if png is not None:
        with atomic_path(png) as tmp:
            placement.plot_placement(anatomy.field, anatomy.frame, anatomy.canal, out, tmp,
                                     title=f"{context}: " + (
                                         f"planned screws, {plan.trajectory} trajectory"
                                         if plan.method == "auto" else "screws from landmarks"))
    if refused:
        error = _refusal(refused, plan, where, png)
        if not record_refusal:
            raise QctfeaError(error)
        warnings.warn(f"REFUSED (the scan fails at rule accept_screws): {error}", stacklevel=2)
    Path(out_json).with_name("screws_refused.png").unlink(missing_ok=True)
    write_json(out_json, {"screws": out, "frame": anatomy.record(),
                          **({"refused": error} if refused else {}),
                          "provenance": provenance(
        "screws", {**asdict(spec), "planning": asdict(plan)}, inputs)})
    log.info(f"[screws] {context}: " + ", ".join(
        f"{s['side']} grade {s['placement']['grade']} (breach {s['placement']['breach_mm']:.1f}"
        f" mm {s['placement']['direction']})" for s in out))


def _screws_from(plan, spec, parts, anatomy, parts_path, landmarks_path, context: str,
                 level: str | None = None):
    """The screws planned from the mask (``auto``) or from the landmarks; the text naming
    their source in messages; the provenance inputs."""
    from qctfea.model import planning as plan_mod
    from qctfea.model import screw as screw_mod
    from qctfea.qc import slicer

    if plan.method == "auto":
        where = f"{context} ({parts_path})"
        screws = plan_mod.plan_from_mask(parts, spec, plan, where, anatomy=anatomy,
                                         level=level)
        inputs = {"parts": parts_path}
    else:
        if landmarks_path is None or str(landmarks_path) == "":
            raise QctfeaError(f"{context}: no landmarks file (the landmarks column of the sample "
                              "sheet is empty) and planning.method is 'landmarks'; give this "
                              "scan's landmarks JSON, or set `planning.method: auto` in the "
                              "cohort config to plan the screws from the vertebra mask")
        need_inputs(context, landmarks=landmarks_path)
        lm = (slicer.read_landmarks_markups(landmarks_path, context)
              if str(landmarks_path).lower().endswith(".mrk.json") else read_json(landmarks_path))
        where = f"{context} ({landmarks_path})"
        screws = screw_mod.screws_from_landmarks(lm, spec, where)
        inputs = {"landmarks": landmarks_path}
    return screws, where, inputs


def _graded(screws, parts, parts_path, anatomy, plan, where: str) -> list[dict]:
    """Each screw with its breach report and Gertzbein-Robbins grade (a grade worse than A
    is warned about); a screw that misses the vertebra altogether is an error."""
    from qctfea.model import placement
    from qctfea.model import screw as screw_mod

    inside = screw_mod.bone_lookup(parts)
    voxel_mm = round(float(max(parts.GetSpacing())), 3)  # the grade's resolution
    out = []
    for sc in screws:
        rep = screw_mod.breach_report(sc, inside)
        if rep["axis_outside_bone_mm"] >= sc.spec.length_mm:
            raise QctfeaError(
                f"{where}: the {sc.side} screw (entry {np.round(sc.entry_mm, 1).tolist()} mm) "
                f"does not enter the vertebra of {parts_path} at all; the landmarks must be "
                "this scan's physical (DICOM LPS) coordinates in mm: check them (RAS instead "
                "of LPS flips the x and y signs; landmarks of another scan do not fit)")
        grade = placement.grade_screw(sc.entry_mm, sc.axis, sc.spec.diameter_mm,
                                      sc.spec.length_mm, sc.side, anatomy.field,
                                      anatomy.frame, plan.grade_tolerance_mm, anatomy.canal)
        if grade["grade"] != "A":
            warnings.warn(f"{where}: {sc.side} screw grade {grade['grade']} "
                          f"(Gertzbein-Robbins): {grade['breach_mm']:.1f} mm outside the bone, "
                          f"{grade['direction']}", stacklevel=3)
        grade["label_voxel_mm"] = voxel_mm
        note = placement.coarse_map_note(grade["breach_mm"], voxel_mm, plan.max_grade,
                                         plan.grade_tolerance_mm)
        if note and not placement.grade_worse(grade["grade"], plan.max_grade):
            grade["coarse_map_note"] = note
            warnings.warn(f"{where}: {sc.side} screw grade {grade['grade']}: {note}",
                          stacklevel=3)
        rec = {**sc.to_dict(), "breach": rep, "placement": grade}
        if "planning" not in rec:  # from landmarks: the isthmus check of planned screws too
            rec["planning"] = _landmark_isthmus(sc, anatomy, where)
        out.append(rec)
    return out


def _landmark_isthmus(sc, anatomy, where: str) -> dict:
    """A landmark screw's ``planning`` record: its side's pedicle isthmus and whether the
    screw is wider (:func:`qctfea.model.planning.isthmus_check`), warned about as for
    planned screws; planning.fit_diameter does not change a landmark screw."""
    from qctfea.model import planning as plan_mod

    rec = {"method": "landmarks",
           **plan_mod.isthmus_check(anatomy, sc.side, sc.spec.diameter_mm, where)}
    if rec["screw_exceeds_isthmus"]:
        warnings.warn(
            f"{where}: the {sc.side} pedicle isthmus is {rec['isthmus_min_width_mm']:.1f} mm "
            f"wide (narrowest width of its smallest cross-section), less than the "
            f"{sc.spec.diameter_mm:g} mm screw from the landmarks: the screw may breach the "
            "pedicle wall (see its grade); choose a thinner screw (screw.diameter_mm)",
            stacklevel=4)
    return rec


def _refusal(refused: list[dict], plan, where: str, png) -> str:
    """The message of a refused placement: which screws, and what to do instead."""
    what = "; ".join(
        f"{s['side']} screw grade {s['placement']['grade']} (Gertzbein-Robbins): "
        f"{s['placement']['breach_mm']:.1f} mm outside the bone, "
        f"{s['placement']['direction']}"
        + (" (into the spinal canal)" if s["placement"]["direction"] == "medial" else "")
        + _wider_than_isthmus(s)
        for s in refused)
    other = "cortical" if plan.trajectory == "traditional" else "traditional"
    if plan.method == "landmarks":  # the screws are the user's: their points are to correct
        instead = ("Correct this scan's landmarks (the sample sheet's landmarks column: the "
                   "entry and target points of each screw, in scanner coordinates; the "
                   "picture shows where the screw leaves the bone), let the pipeline plan "
                   "them (planning.method: auto), use a smaller screw (screw.diameter_mm)")
    else:
        instead = ("Give landmarks for this scan (planning.method: landmarks and the sample "
                   f"sheet's landmarks column), try planning.trajectory: {other}, a smaller "
                   "screw (screw.diameter_mm, or planning.fit_diameter: true)")
    error = (
        f"{where}: screw placement refused, worse than planning.max_grade = "
        f"{plan.max_grade}: {what}. No strength is computed for a screw outside bone. "
        f"{instead}, or exclude the scan (exclude: in the cohort config, with the reason)"
        + (f"; picture: {png}" if png is not None else ""))
    return error


def _wider_than_isthmus(screw: dict) -> str:
    """', the <d> mm screw wider than its pedicle's isthmus (<w> mm)' when it is."""
    p = screw.get("planning") or {}
    if not p.get("screw_exceeds_isthmus"):
        return ""
    return (f", the {screw['diameter_mm']:g} mm screw wider than its pedicle's isthmus "
            f"({p['isthmus_min_width_mm']:.1f} mm)")


def accept_screws(*, screws_path, out_json, context: str) -> None:
    """The planning stage's gate: fail the scan whose screws were refused (the refusal's
    message), else record each side's Gertzbein-Robbins grade and breach."""
    need_inputs(context, screws=screws_path)
    data = read_json(screws_path)
    if data.get("refused"):
        raise QctfeaError(data["refused"])
    grades = {s["side"]: {k: s["placement"][k] for k in ("grade", "breach_mm", "direction")}
              for s in data["screws"]}
    write_json(out_json, {"screws": grades, "provenance": provenance(
        "accept_screws", {}, {"screws": screws_path})})
    log.info(f"[accept_screws] {context}: " + ", ".join(
        f"{k} grade {v['grade']}" for k, v in grades.items()))


def mesh(*, parts_path, screws_path, out_mesh, out_json, cfg: dict, context: str,
         out_png=None, record_refusal: bool = False) -> None:
    """Conforming tetrahedral mesh of bone and screws (XDMF + JSON report), and optionally
    the QC picture of cuts through the screws. ``screws_path`` None: bone (and end caps)
    only, no screw subdomains.

    A vertebra that cannot be meshed (CGAL gives no tetrahedra, a screw without cells, a
    subdomain outside every label) raises :class:`QctfeaError`; with ``record_refusal`` (the
    workflow, whose gate rule accept_mesh then fails the scan, and whose cohort tables go on
    without it under ``--keep-going``) the message goes into ``out_json`` (key ``refused``),
    the picture shows it, and ``out_mesh`` is a one-tetrahedron placeholder that nothing
    reads."""
    from qctfea.model import meshing

    p = params_from(meshing.MeshParams, cfg, "mesh")
    need_inputs(context, parts=parts_path, screws=screws_path)
    try:
        _mesh(parts_path, screws_path, out_mesh, out_json, p, context, out_png)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise
        msg = (f"{context}: the vertebra ({parts_path}) could not be meshed: {exc}. What to "
               "do: look at the label map's QC (vertebra.json) and the mesh sizes (mesh.* in "
               "the cohort config: voxel_mm, bone_cell_size_mm, screw_cell_size_mm), or "
               "exclude the scan (exclude: in the cohort config)"
               if isinstance(exc, QctfeaError) else refusal_text(exc, "mesh", context))

        def placeholder() -> None:  # a one-tetrahedron mesh that nothing reads
            meshing.write_mesh(out_mesh, np.eye(4, 3), np.arange(4)[None],
                               np.zeros(1, np.int32))

        write_refusal("mesh", msg, out_json, p, {"parts": parts_path, "screws": screws_path},
                      placeholder, picture=out_png or None, title=f"{context}: mesh refused")


def _mesh(parts_path, screws_path, out_mesh, out_json, p, context: str, out_png) -> None:
    """:func:`mesh` without the refusal's record."""
    from qctfea.model import meshing

    parts = read_image(parts_path, "vertebra parts image", context)
    screws = load_screws(screws_path)
    pts, cells, tags, rep = meshing.generate_mesh(parts, screws, p)
    if out_png:
        from qctfea.qc.meshplot import mesh_picture

        with atomic_path(out_png) as tmp:
            mesh_picture(pts, cells, tags, screws, rep, tmp, title=f"{context}: mesh")
    meshing.write_mesh(out_mesh, pts, cells, tags)
    write_json(out_json, {**rep, "provenance": provenance("mesh", p, {"parts": parts_path})})
    log.info(f"[mesh] {context}: done")


def accept_mesh(*, mesh_json, out_json, context: str) -> None:
    """The mesh's gate: fail the scan whose vertebra could not be meshed (its record's
    ``refused`` message); else record the mesh's size it passed with."""
    rec = accept_record("accept_mesh", mesh_json, "mesh", ("n_cells", "n_vertices"), out_json)
    log.info(f"[accept_mesh] {context}: {rec['n_cells']} tetrahedra")


def materials(*, mesh_path, density_path, screws_path, out_npz, out_json, cfg: dict,
              context: str, record_refusal: bool = False) -> None:
    """Element moduli, Poisson's ratios and yield stresses from the density (``out_npz``)
    and their summary (``out_json``).

    A bone whose median element density is not positive (a wrong calibration), or any other
    error, raises; with ``record_refusal`` (the workflow) the message goes into ``out_json``
    (key ``refused``) beside an empty ``out_npz``, and the scan's load cases record it as
    their refusal without solving (:func:`qctfea.steps.fea.solve`, ``upstream``)."""
    from qctfea.model import materials as mat

    p = params_from(mat.MaterialParams, cfg, "materials")
    need_inputs(context, mesh=mesh_path, density=density_path, screws=screws_path)
    try:
        _materials(mesh_path, density_path, screws_path, out_npz, out_json, p, context)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise

        def placeholder() -> None:  # an npz that nothing reads (the solves read the refusal)
            with atomic_path(out_npz) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, refused=np.array(True))

        write_refusal("materials", refusal_text(exc, "materials", context), out_json, p,
                      {"mesh": mesh_path, "density": density_path}, placeholder)


def _materials(mesh_path, density_path, screws_path, out_npz, out_json, p, context: str
               ) -> None:
    """:func:`materials` without the refusal's record."""
    from qctfea.model import materials as mat
    from qctfea.model import meshing

    t0 = time.perf_counter()
    dens, rho_img = read_density(density_path, context)
    pts, cells, tags = meshing.read_mesh(mesh_path)
    rho_img, dens = mat.crop_to_points(rho_img, dens, pts)  # the mesh's box of the scan
    e_img = mat.modulus_mpa(rho_img, p).astype(np.float32)
    E = mat.element_moduli(pts, cells, e_img, dens, p.sampling, p.subdivision_levels)
    # Yield stress from the element's mean density (the yield laws are not averaged
    # voxel by voxel: Keyak's has no yield, i.e. infinity, below a threshold).
    rho = mat.element_moduli(pts, cells, rho_img.astype(np.float32), dens,
                             p.sampling, p.subdivision_levels)
    # Negative densities in a few elements (marrow, fat, noise) are normal and floored by the
    # law; bone whose typical density is not positive means a wrong calibration.
    bone_rho = rho[np.isin(tags, mesh_tags.BONE_TAGS)]
    if bone_rho.size and not float(np.median(bone_rho)) > 0:
        raise QctfeaError(f"{context}: density image {density_path} gives the bone elements of "
                          f"{mesh_path} a median density of {float(np.median(bone_rho)):.1f} "
                          "mg/cm³ (not > 0): the calibration is wrong (sign, offset or units); "
                          "check this scan's calibration.json / calibration section of the "
                          "cohort config, and that the mesh belongs to this scan")
    sy = mat.yield_mpa(rho, p)
    if p.bins:
        bone_sel = np.isin(tags, mesh_tags.BONE_TAGS)
        E[bone_sel] = mat.bin_moduli(E[bone_sel], p.bins)
    nu = np.full(len(cells), p.poisson_bone)
    screws = {s.side: s for s in load_screws(screws_path)}
    caps = tags == mesh_tags.TAG_CAP
    E[caps], nu[caps], sy[caps] = p.cap_modulus_mpa, p.cap_poisson, np.inf  # caps: elastic
    for side, tag in mesh_tags.TAG_SCREW.items():
        sel = tags == tag
        if side in screws:
            E[sel] = screws[side].spec.youngs_modulus_mpa
            nu[sel] = screws[side].spec.poisson_ratio
            sy[sel] = np.inf  # the screw stays elastic
    centroids = pts[cells].mean(axis=1)
    with atomic_path(out_npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, youngs_mpa=E, poisson=nu, yield_mpa=sy, tags=tags,
                                centroids_mm=centroids)
    bone = np.isin(tags, mesh_tags.BONE_TAGS)
    write_json(out_json, {
        "law": p.law,
        "source": (mat.LAWS[p.law][3] if p.law in mat.LAWS
                   else "user-defined piecewise power law (materials.custom)"),
        "bone_cells": int(bone.sum()),
        "bone_modulus_mpa": {
            "min": float(E[bone].min()), "median": float(np.median(E[bone])),
            "max": float(E[bone].max()),
            "at_floor": int((E[bone] <= p.e_floor_mpa * (1 + 1e-9)).sum()),
        },
        "yield_law": p.yield_law,
        "bone_yield_mpa": {  # null: no yield (infinite yield stress)
            k: (float(v) if np.isfinite(v) else None) for k, v in (
                ("min", sy[bone].min()), ("median", np.median(sy[bone])), ("max", sy[bone].max()))
        } | {
            "no_yield": int((~np.isfinite(sy[bone])).sum()),
        },
        "seconds": time.perf_counter() - t0,
        "provenance": provenance("materials", p, {"mesh": mesh_path, "density": density_path}),
    })
    log.info(f"[materials] {context}: bone E median {np.median(E[bone]):.0f} MPa "
             f"({p.law}, {p.sampling})")
