"""The vertebra step the rules run (imaging.smk: extract_vertebra and its gate
accept_vertebra): the label map read onto the CT's grid, the target vertebra checked (not cut
by the field of view, sitting on the CT's bone edges, no metal) and split into its parts
(:mod:`qctfea.imaging.masks`), written with its QC record (:mod:`qctfea.steps` holds the
shared readers and the config typing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.provenance import provenance, write_json
from qctfea.steps import (
    accept_record, image_like, integer_labels, need_inputs, params_from, read_grid, read_image,
    read_labels, refusal_text, write_image, write_image_refusal,
)

log = logging.getLogger(__name__)


#: Voxels around the target vertebra's bounding box on which the mask step works: more than
#: the 8 voxels :func:`qctfea.imaging.masks.vertebra_parts` pads for its morphology and the
#: 1 of the contact checks.
MASK_BOX_MARGIN = 10


def mask(*, ct_path, labels_path, out_parts, out_json, cfg: dict, context: str,
         subregions_path=None, record_refusal: bool = False) -> None:
    """Vertebra parts label image (1 body, 2 posterior, 3 trabecular ROI) and its QC record.

    ``cfg``: the ``mask`` section (:class:`qctfea.imaging.masks.MaskParams`: target label, or a
    named convention and level). ``subregions_path``: optional sub-region map (sample-sheet
    column ``subregions``) from which the vertebral body is taken instead of the opening.

    A label map the checks refuse (a vertebra cut by the field of view, a label map off its
    CT, a body that cannot be found) raises :class:`QctfeaError`; with ``record_refusal``
    (the workflow, whose gate rule accept_vertebra then fails the scan, and whose cohort
    tables go on without it under ``--keep-going``) the message goes into ``out_json`` (key
    ``refused``) and ``out_parts`` is a one-voxel placeholder that nothing reads."""
    try:
        _mask(ct_path=ct_path, labels_path=labels_path, out_parts=out_parts,
              out_json=out_json, cfg=cfg, context=context, subregions_path=subregions_path)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise
        write_image_refusal("mask", refusal_text(exc, "mask", context), out_parts,
                            sitk.sitkUInt8, out_json, dict(cfg or {}), {"labels": labels_path})


def accept_vertebra(*, vertebra_json, out_json, context: str) -> None:
    """The label map's gate: fail the scan whose vertebra the mask step refused (its
    record's ``refused`` message); else record the vertebra's volume it passed with."""
    rec = accept_record("accept_vertebra", vertebra_json, "vertebra",
                        ("vertebra_volume_cm3", "body_volume_cm3", "trabecular_roi_volume_cm3"),
                        out_json)
    log.info(f"[accept_vertebra] {context}: vertebra {rec['vertebra_volume_cm3']:.1f} cm³")


def _mask(*, ct_path, labels_path, out_parts, out_json, cfg: dict, context: str,
          subregions_path=None) -> None:
    """:func:`mask` without the refusal's record."""
    from scipy import ndimage

    from qctfea.imaging import masks, morphology

    p = params_from(masks.MaskParams, cfg, "mask")
    need_inputs(context, ct=ct_path, labels=labels_path)
    if subregions_path is not None and not Path(subregions_path).is_file():
        raise QctfeaError(f"{context}: sub-region map {subregions_path} not found; check the "
                          "subregions column of the sample sheet (leave it empty to find the "
                          "body by opening), or correct the path")
    ct = read_grid(ct_path, "CT image", context)  # its grid: the values are not needed
    where = f"{context} ({labels_path})"
    lab, labels_own, structures, file_name = _mask_labels(ct, labels_path, p, context)
    sub, sub_where = None, ""
    if subregions_path is not None:
        sub_where = f"{context} ({subregions_path})"
        sub = sitk.GetArrayFromImage(masks.resample_labels_to(
            integer_labels(read_image(subregions_path, "sub-region map", context),
                            subregions_path, "sub-region map", context), ct, sub_where))
    caps = np.isin(lab, p.cap_labels) if p.cap_labels else np.zeros(lab.shape, bool)
    if p.cap_labels and not caps.any():
        raise QctfeaError(f"{where}: no voxel carries the end-cap label(s) mask.cap_labels "
                          f"{p.cap_labels} (labels present: "
                          f"{sorted(int(v) for v in np.unique(lab) if v)}); correct "
                          "mask.cap_labels or remove it")
    if p.bone_labels:  # several labels (e.g. trabecular + cortical) form the vertebra
        lab = np.where(np.isin(lab, p.bone_labels), p.label,
                       np.where(lab == p.label, 0, lab)).astype(lab.dtype)
    target = lab == p.label
    edges = _extent_checks(target, labels_own, ct, ct_path, labels_path, p, context)
    # The parts and the label QC on the vertebra's box (whole-scan label maps: a fraction of
    # the memory; the same voxels, as every operation reaches at most 8 voxels beyond it)
    box = morphology.box_around(target, MASK_BOX_MARGIN)
    present = masks.labels_present(lab)
    lab_box = lab[box]
    parts = masks.vertebra_parts(lab_box, ct.GetSpacing(), p, where,
                                 None if sub is None else sub[box], sub_where,
                                 direction=ct.GetDirection())
    metal, fit = _ct_checks(ct_path, ct, target, p, context, labels_path)
    qc = {"components_in_label": int(ndimage.label(lab_box == p.label)[1]),
          "contact_with_other_labels_voxels": masks.contact_with_neighbours(
              lab_box, parts["vertebra"], p.label),
          "label_qc": masks.label_qc(lab_box, ct.GetSpacing(), p, where, present=present),
          # a label map on another grid than the CT's: resampled (nearest neighbour) from
          # its own voxels; None when it was on the CT's voxels
          "label_map_resampled": None if labels_own is None else {
              "own_spacing_mm": [float(v) for v in labels_own.GetSpacing()],
              "method": "nearest neighbour"},
          # edges of the CT (and of the label map's own grid) the vertebra touches, with
          # sections too small to be a cut (a tight crop, a clipped process): [] when none
          "field_of_view_edges_touched": edges,
          # a folder of structure masks (TotalSegmentator without --ml): each one's label
          "label_structures": structures,
          # the target label's name in the label map file's own label table (None: no table)
          "label_name_in_file": file_name,
          # does the label sit on the CT's bone edges? (qctfea.imaging.labelfit)
          "label_fit": fit,
          # CT numbers above mask.metal_hu in or beside the vertebra (none, or refused)
          "metal": metal}
    for name in ("vertebra", "body", "posterior", "trabecular"):
        m = parts[name]
        full = np.zeros(lab.shape, bool)
        full[box] = m
        parts[name] = full
    out = np.zeros(lab.shape, np.uint8)
    out[caps] = masks.CAP
    out[parts["body"]] = masks.BODY
    out[parts["posterior"]] = masks.POSTERIOR
    out[parts["trabecular"]] = masks.TRABECULAR
    write_image(image_like(out, ct), out_parts)
    inputs = {"labels": labels_path}
    if subregions_path is not None:
        inputs["subregions"] = subregions_path
    _write_mask_record(out_json, ct, parts, out, qc, p, sub is not None, inputs, context)


def _extent_checks(target: np.ndarray, labels_own, ct: sitk.Image, ct_path, labels_path, p,
                   context: str) -> dict:
    """The target's size and the edges it reaches (records for vertebra.json): a label of
    another structure is refused by its volume (an absent one later, naming the labels
    present; a specimen's may be any size), too large before the edge checks (no vertebra,
    cut or not, holds that much), too small after them (a vertebra cut by the field of view
    may hold little, and is told as cut); a vertebra cut by the scan's field of view, or by
    a cropped label map, is refused."""
    from qctfea.imaging import masks

    where = f"{context} ({labels_path})"
    size_check = target.any() and not p.cap_labels
    if size_check:
        masks.check_vertebra_volume(target, ct.GetSpacing(), p, where, bound="upper")
    edges = {"ct": masks.check_not_cut(target, ct, f"CT {ct_path}", p, context)}
    if labels_own is not None:  # the label map's own edges may cut the vertebra inside the CT
        own = np.isin(sitk.GetArrayViewFromImage(labels_own), p.bone_labels or [p.label])
        edges["label_map"] = masks.check_not_cut(
            own, labels_own, f"label map {labels_path} (on its own grid)", p, context)
    if size_check:
        masks.check_vertebra_volume(target, ct.GetSpacing(), p, where, bound="lower")
    return edges


def _mask_labels(ct: sitk.Image, labels_path, p, context: str):
    """The label map's array on the CT's grid, the label map on its own grid when it had to
    be resampled (else None), its structures (a folder of masks) and the target's name in
    the file's label table (a file that names its labels must name the target as the
    level)."""
    from qctfea.imaging import labeltable, masks

    where = f"{context} ({labels_path})"
    labels_own, structures = read_labels(labels_path, context, p.convention)
    file_name = labeltable.check_target(
        None if structures is not None else labeltable.read_label_table(labels_path),
        p.label, p.vertebra, where)
    labels = masks.same_voxels(labels_own, ct)  # None: on another grid, resampled
    if labels is not None:
        return sitk.GetArrayFromImage(labels), None, structures, file_name
    labels = masks.resample_labels_to(labels_own, ct, where)
    return sitk.GetArrayFromImage(labels), labels_own, structures, file_name


def _write_mask_record(out_json, ct: sitk.Image, parts: dict, out: np.ndarray, qc: dict, p,
                       from_subregions: bool, inputs: dict, context: str) -> None:
    from qctfea.imaging import masks

    vox_mm3 = float(np.prod(ct.GetSpacing()))
    body_from = "subregions" if from_subregions else "opening"
    write_json(out_json, {
        "label": p.label,
        "convention": p.convention,
        "vertebra": p.vertebra,
        "body_from": body_from,
        # without sub-regions: the opening's radius and the body's solidity (radii tried)
        "body_opening": parts["body_opening"],
        "vertebra_volume_cm3": float(parts["vertebra"].sum() * vox_mm3 / 1000),
        "body_volume_cm3": float(parts["body"].sum() * vox_mm3 / 1000),
        "trabecular_roi_volume_cm3": float(parts["trabecular"].sum() * vox_mm3 / 1000),
        "trabecular_roi_voxels": int(parts["trabecular"].sum()),
        "caps_volume_cm3": float((out == masks.CAP).sum() * vox_mm3 / 1000),
        **qc,
        **masks.body_axis(ct, parts["body"]),
        "provenance": provenance("mask", p, inputs),
    })
    named = f" ({p.convention} {p.vertebra})" if p.vertebra else ""
    log.info(f"[mask] {context}: label {p.label}{named}, vertebra "
             f"{parts['vertebra'].sum() * vox_mm3 / 1000:.1f} cm³, body "
             f"{parts['body'].sum() * vox_mm3 / 1000:.1f} cm³ (from {body_from}"
             + (f", ball {parts['body_opening']['radius_mm']:.1f} mm, solidity "
                f"{parts['body_opening']['solidity']:.2f}, asymmetry "
                f"{parts['body_opening']['asymmetry']:.2f}" if parts["body_opening"] else "")
             + ")")


def _ct_checks(ct_path, ct: sitk.Image, target: np.ndarray, p, context: str, labels_path):
    """The checks on the CT's numbers around the target (records for vertebra.json): metal
    in or beside it refuses the scan (:func:`qctfea.imaging.masks.check_no_metal`); the
    label map must sit on the CT's bone edges (:func:`_label_fit`), except for a specimen,
    whose label meets its end caps, whose density may match the bone's (no edge to fit)."""
    from qctfea.imaging import masks

    values, box = _ct_values_around(ct_path, ct, target)
    if values is None:
        return None, None
    metal = masks.check_no_metal(values, target[box], ct.GetSpacing(), p, context, ct_path)
    fit = None if p.cap_labels else _label_fit(values, target[box], ct, context, labels_path)
    return metal, fit


def _ct_values_around(ct_path, ct: sitk.Image, target: np.ndarray):
    """The CT's numbers (float32, z y x) in a box around the target vertebra, read from
    ``ct_path`` alone, and that box; (None, None) without a target (refused by the parts
    step, naming the labels)."""
    from qctfea.imaging import labelfit, masks, morphology

    if not target.any():
        return None, None
    sp = np.asarray(ct.GetSpacing(), float)
    margin = int(np.ceil(max(labelfit.SEARCH_MM, masks.METAL_MARGIN_MM) / sp.min())) + 3
    box = morphology.box_around(target, margin)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct_path))
    reader.SetExtractIndex([int(box[2].start), int(box[1].start), int(box[0].start)])
    reader.SetExtractSize([int(box[2].stop - box[2].start), int(box[1].stop - box[1].start),
                           int(box[0].stop - box[0].start)])
    return sitk.GetArrayFromImage(reader.Execute()).astype(np.float32), box


def _label_fit(values: np.ndarray, target: np.ndarray, ct: sitk.Image, context: str,
               labels_path) -> dict:
    """The target vertebra's edge fit on the CT's ``values`` around it (the same box as
    ``target``; :func:`qctfea.imaging.labelfit.edge_fit`); a label map off its CT is
    refused."""
    from qctfea.imaging import labelfit

    fit = labelfit.edge_fit(values, target, np.asarray(ct.GetSpacing(), float))
    if fit["no_edge"]:  # (a label map moved within reach gets its offset, below)
        raise QctfeaError(
            f"{context}: the label map {labels_path} does not sit on the CT's bone: its target "
            f"vertebra's edge contrast is {fit['edge_contrast']:.0f} (the CT's mean value on "
            "the label's inner boundary layer minus that just outside it; at least "
            f"{labelfit.MIN_EDGE_CONTRAST:g} needed, 92-300 HU measured on label maps lying on "
            "their CT, or, on a faint edge (a soft kernel, low density), "
            f"{labelfit.PEAK_RATIO:g} times its largest with the label moved "
            f"{labelfit.SEARCH_MM:g} mm along an axis: {fit['reach_edge_contrast']:.0f}), and "
            f"no offset within {labelfit.SEARCH_MM:g} mm fits it to the bone's edges (best "
            f"{fit['best_edge_contrast']:.0f}); screws would be graded, and densities "
            "measured, on the wrong voxels. Check that the label map belongs to this CT "
            "(labels column of the sample sheet), that neither image was mirrored, "
            "transposed or cropped without updating its header (origin, spacing, direction), "
            "and that both were written from the same series")
    if not fit["fits"]:
        dx, dy, dz = fit["best_offset_mm"]
        raise QctfeaError(
            f"{context}: the label map {labels_path} does not sit on the CT's bone: moved by "
            f"({dx:+.1f}, {dy:+.1f}, {dz:+.1f}) mm (x, y, z) its target vertebra would fit the "
            f"CT's bone edges {fit['best_edge_contrast'] / max(fit['edge_contrast'], 1e-9):.1f}"
            f" times better (edge contrast {fit['edge_contrast']:.0f} -> "
            f"{fit['best_edge_contrast']:.0f}); screws would be graded against the wrong "
            "surface. Check that the label map belongs to this CT (labels column of the "
            "sample sheet: not another visit's) and that its header (origin, spacing, "
            "direction) is the one it was made on")
    return fit
