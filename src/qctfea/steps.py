"""One function per pipeline step, on paths: what the CLI and the workflow call.

Each step reads its inputs, calls the science modules, and writes its outputs
atomically with a JSON record of what it did (parameters, versions, input
checksums, seconds). Parameters come from the cohort config's sections (see
``config/README.md``); :func:`params_from` turns a section into the step's
dataclass and refuses unknown keys. Every step first checks that its input files
exist (:func:`_need`): a missing one is an error naming the scan, the file and
the step that writes it, never a reader's traceback.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.model import tags as mesh_tags
from qctfea.provenance import atomic_files, atomic_path, provenance, read_json, write_json

log = logging.getLogger(__name__)


def params_from(cls, section: dict | None, where: str = ""):
    """Dataclass ``cls`` from a config section; unknown keys are an error naming them."""
    section = dict(section or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise QctfeaError(f"config section '{where}': unknown key(s) {unknown}; "
                          f"allowed: {sorted(known)}")
    default = cls()
    for f in fields(cls):
        if f.name in section:
            section[f.name] = _typed(section[f.name], getattr(default, f.name), str(f.type),
                                     f"config section '{where}', key {f.name}")
    try:
        return cls(**section)
    except QctfeaError as exc:
        raise QctfeaError(f"config section '{where}': {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise QctfeaError(f"config section '{where}': {exc}; see config/README.md") from exc


def _typed(value, default, annotation: str, where: str):
    """``value`` as the type of the parameter's default (annotation when the default is
    None); None only where the annotation allows it. Numbers must be finite."""
    if value is None:
        if "None" in annotation or default is None:
            return None
        raise QctfeaError(f"{where}: must not be empty (null); the default is {default!r}")
    kind = type(default) if default is not None else {
        "float": float, "int": int, "str": str, "bool": bool}.get(annotation.split("|")[0]
                                                                   .strip(), object)
    bad = QctfeaError(f"{where}: {value!r} is not a {getattr(kind, '__name__', kind)} (the "
                      f"default is {default!r}); see config/README.md")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not np.isfinite(value):
            raise QctfeaError(f"{where}: {value!r} is not a finite number")
        if kind is int:
            if float(value) != int(value):
                raise bad
            return int(value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        return kind(value)
    return value


def _write_image(img: sitk.Image, path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return img


#: Input files of the steps: what each is, and what to do when it is missing.
_INPUTS = {
    "ct": ("CT image", "run the ingest step first (rule ingest_scan)"),
    "labels": ("label map", "check the labels column of the sample sheet"),
    "landmarks": ("landmarks file", "check the landmarks column of the sample sheet"),
    "parts": ("vertebra parts image", "run the mask step first (rule extract_vertebra)"),
    "vertebra_json": ("vertebra record", "run the mask step first (rule extract_vertebra)"),
    "density": ("density image", "run the calibrate step first (rule calibrate_density; for "
                "a follow-up on the baseline model, rule register_to_baseline)"),
    "screws": ("screws file", "run the screws step first (rule plan_screws)"),
    "mesh": ("mesh", "run the mesh step first (rule mesh_vertebra)"),
    "materials": ("materials file", "run the materials step first (rule assign_materials)"),
    "calibration": ("calibration record", "run the calibrate step first (rule "
                    "calibrate_density)"),
    "bmd": ("BMD record", "run the BMD step first (rule measure_bmd)"),
    "strength": ("strength record", "run the solves and their gate first (rule "
                 "accept_strength)"),
    "registration": ("registration record", "run the registration first (rule "
                     "register_to_baseline)"),
}


def _need(context: str, **paths) -> None:
    """Every input file of a step must exist: else an error naming the scan, the file (which
    input it is) and what to do. ``None`` paths are not needed; a mesh needs its .h5 too."""
    for key, path in paths.items():
        if path is None:
            continue
        base = key.removeprefix("baseline_")
        what, hint = _INPUTS[base]
        what = f"baseline {what}" if key != base else what
        files = [Path(path)] + ([Path(path).with_suffix(".h5")] if base == "mesh" else [])
        for f in files:
            if not f.is_file():
                raise QctfeaError(f"{context}: {what} {f} not found; {hint}, or correct the path")


def _read_image(path, what: str, context: str, pixel=None) -> sitk.Image:
    """``sitk.ReadImage`` with an error naming the scan and the file when it is unreadable."""
    try:
        return (sitk.ReadImage(str(path)) if pixel is None
                else sitk.ReadImage(str(path), pixel))
    except RuntimeError as exc:
        raise QctfeaError(f"{context}: {what} {path} cannot be read as an image "
                          f"({str(exc).strip()[-160:]}); check that the file is complete and "
                          "of the type its suffix says, or rerun the step that wrote it") from exc


def _nonfinite(path, arr: np.ndarray) -> np.ndarray:
    """Mask (z, y, x) of the NaN or infinite voxels of an image read from ``path``.

    ITK's NIfTI reader (before ITK 6) silently turns NaN and ±inf into 0, so for a float
    NIfTI file they are looked up in the file's own bytes (NIfTI-1 and -2 headers)."""
    bad = ~np.isfinite(arr)
    name = str(path).lower()
    if bad.any() or not name.endswith((".nii", ".nii.gz")):
        return bad
    import gzip

    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as fh:
        head = fh.read(540)
        if len(head) < 348:
            return bad
        for end in "<>":
            size = int(np.frombuffer(head, f"{end}i4", 1)[0])
            if size in (348, 540):
                break
        else:
            return bad
        code, offset = ((np.frombuffer(head, f"{end}i2", 1, 70)[0],
                         np.frombuffer(head, f"{end}f4", 1, 108)[0]) if size == 348 else
                        (np.frombuffer(head, f"{end}i2", 1, 12)[0],
                         np.frombuffer(head, f"{end}i8", 1, 168)[0]))
        dtype = {16: np.dtype(f"{end}f4"), 64: np.dtype(f"{end}f8")}.get(int(code))
        if dtype is None:  # integer data cannot hold NaN
            return bad
        fh.seek(int(offset))
        data = np.frombuffer(fh.read(arr.size * dtype.itemsize), dtype)
    return ~np.isfinite(data).reshape(arr.shape) if data.size == arr.size else bad


def _read_ct(path, context: str) -> tuple[sitk.Image, np.ndarray]:
    """The ingested CT and its HU array; refused when it holds no image (every voxel the
    same value) or NaN/infinite values, since every later number would be meaningless."""
    ct = _read_image(path, "CT image", context, sitk.sitkFloat32)
    hu = sitk.GetArrayFromImage(ct)
    bad = int(_nonfinite(path, hu).sum())
    if bad:
        raise QctfeaError(f"{context}: CT image {path} has {bad} NaN or infinite voxel(s); "
                          "check the scan given in the image column of the sample sheet")
    if hu.size == 0 or float(hu.min()) == float(hu.max()):
        value = f"{float(hu.flat[0]):g} HU" if hu.size else "none"
        raise QctfeaError(f"{context}: CT image {path} is empty: all {hu.size} voxel(s) have "
                          f"the same value ({value}); check the scan given in the image column "
                          "of the sample sheet (a blank or wrong series?) and rerun ingest")
    return ct, hu


def _read_density(path, context: str) -> tuple[sitk.Image, np.ndarray]:
    """A density image (mg/cm³) and its array; NaN or infinite voxels are refused, as they
    would become NaN moduli and BMD silently."""
    dens = _read_image(path, "density image", context, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(dens)
    bad = _nonfinite(path, arr)
    if bad.any():
        z, y, x = (int(v) for v in np.argwhere(bad)[0])
        raise QctfeaError(f"{context}: density image {path} has {int(bad.sum())} NaN or "
                          f"infinite voxel(s) (first at voxel x={x}, y={y}, z={z}); rerun the "
                          "calibrate step (rule calibrate_density), or repair the image if it "
                          "was made outside the pipeline")
    return dens, arr


# --- synth --------------------------------------------------------------------------------


def synth_scan(*, out_dir, patient: str, timepoint: str, months: float, seed: int,
               synth_cfg: dict | None = None) -> None:
    from qctfea.demo.synth import SynthParams, generate_scan

    p = params_from(SynthParams, synth_cfg, "demo.synth")
    t0 = time.perf_counter()
    generate_scan(out_dir, patient, timepoint, months, seed=seed, params=p)
    log.info(f"[synth] {patient} {timepoint}: wrote {out_dir} in {time.perf_counter() - t0:.1f} s")


# --- ingest -------------------------------------------------------------------------------


def ingest(*, source, out_image, out_json, context: str, series_uid: str | None = None,
           cfg: dict | None = None) -> None:
    """Scan (DICOM folder or HU image file) -> float32 HU NIfTI + scan.json.

    ``cfg`` is the cohort config's ``ingest`` section (:class:`qctfea.imaging.dicomio.IngestParams`:
    which series to take from a folder holding several, what to do with uneven slices);
    ``series_uid`` names the series explicitly and wins over ``ingest.series_rule``.
    """
    from qctfea.imaging import dicomio

    p = params_from(dicomio.IngestParams, cfg, "ingest")
    dicomio.ingest(source, out_image, out_json, context=context, series_uid=series_uid,
                   params=p)


# --- calibrate ----------------------------------------------------------------------------


def calibrate(*, ct_path, labels_path, out_density, out_json, out_png, cfg: dict,
              context: str, label: int) -> None:
    """HU image -> density image (mg/cm³), by phantom, phantomless or fixed calibration.

    ``label`` is the target vertebra of the label map. Phantom and phantomless need the
    label map. A phantom calibration also measures the reference tissues of the
    phantomless method (``calibration.phantomless`` settings) and records their median HU
    and phantom-calibrated density under ``tissues`` in calibration.json, from which
    reference densities for phantomless scans of the same scanner can be derived; a failure
    there never fails the phantom calibration."""
    from qctfea.imaging import calibration as cal_mod
    from qctfea.imaging import calibration_plot
    from qctfea.imaging import phantomless
    from qctfea.imaging.masks import resample_labels_to

    t0 = time.perf_counter()
    cfg = dict(cfg or {})
    method = cfg.pop("method", "phantom")
    needs_labels = method in ("phantom", "phantomless")
    _need(context, ct=ct_path, labels=labels_path if needs_labels else None)
    ct, hu = _read_ct(ct_path, context)
    where = f"{context} ({ct_path})"
    masks: dict = {}
    labels_arr = None
    if needs_labels:
        labels = resample_labels_to(_read_image(labels_path, "label map", context), ct,
                                    f"{context} ({labels_path})")
        labels_arr = sitk.GetArrayFromImage(labels)
    if method == "phantom":
        patient_mask = labels_arr == label
        spec = params_from(cal_mod.PhantomSpec, cfg.get("phantom"), "calibration.phantom")
        tspec = params_from(cal_mod.TissueSpec, cfg.get("phantomless"),
                            "calibration.phantomless")
        centres = None
        if spec.rod_centres_mm is not None:  # physical (x, y) at the middle slice -> pixels
            z_mid = ct.TransformIndexToPhysicalPoint([0, 0, ct.GetSize()[2] // 2])[2]
            centres = [tuple(ct.TransformPhysicalPointToContinuousIndex(
                [float(x), float(y), z_mid])[:2]) for x, y in spec.rod_centres_mm]
        cal = cal_mod.phantom_calibration(hu, ct.GetSpacing(), patient_mask, spec, where,
                                          centres)
        try:
            found = phantomless.find_tissues(hu, ct.GetSpacing(), labels_arr, tspec, where, label,
                                             masks)
            cal.tissues = phantomless.tissue_densities(cal, found)
        except Exception as exc:  # information only: never fails the phantom calibration
            masks = {}
            warnings.warn(f"{where}: reference tissues not measured ({exc})", stacklevel=2)
    elif method == "phantomless":
        tspec = params_from(cal_mod.TissueSpec, cfg.get("phantomless"),
                            "calibration.phantomless")
        cal = phantomless.phantomless_calibration(hu, ct.GetSpacing(), labels_arr, tspec, where,
                                                  label, masks)
    elif method == "fixed":
        if "slope" not in cfg or "intercept" not in cfg:
            raise QctfeaError(f"{context}: calibration method 'fixed' needs calibration.slope "
                              "and calibration.intercept in the cohort config")
        cal = cal_mod.fixed_calibration(cfg["slope"], cfg["intercept"])
    else:
        raise QctfeaError(f"{context}: calibration.method must be 'phantom', 'phantomless' or "
                          f"'fixed', not {method!r}")
    _write_image(_like(cal.apply(hu), ct), out_density)
    # QC slice: the axial slice through the middle of the target vertebra (else the scan's).
    axis = phantomless.axial_axis(ct.GetDirection())
    index = None
    if labels_arr is not None and (labels_arr == label).any():
        where_z = np.nonzero((labels_arr == label).any(axis=tuple(a for a in range(3)
                                                                  if a != axis)))[0]
        index = int(round(where_z.mean()))
    with atomic_path(out_png) as tmp:
        calibration_plot.plot_calibration(cal, tmp, title=f"{context}: {cal.method} calibration",
                                          hu_zyx=hu if masks else None, masks=masks, axis=axis,
                                          index=index)
    write_json(out_json, {
        **asdict(cal),
        "model": "density_mg_cm3 = intercept + slope * HU",
        "seconds": time.perf_counter() - t0,
        "provenance": provenance("calibrate", {"method": method, **cfg},
                                 {"ct": ct_path}),
    })
    log.info(f"[calibrate] {context}: slope {cal.slope:.4f}, intercept {cal.intercept:.2f}, "
             f"R² {cal.r2:.5f} ({cal.method})")


# --- mask ---------------------------------------------------------------------------------


def mask(*, ct_path, labels_path, out_parts, out_json, cfg: dict, context: str,
         subregions_path=None) -> None:
    """Vertebra parts label image (1 body, 2 posterior, 3 trabecular ROI) and its QC record.

    ``cfg``: the ``mask`` section (:class:`qctfea.imaging.masks.MaskParams`: target label, or a
    named convention and level). ``subregions_path``: optional sub-region map (sample-sheet
    column ``subregions``) from which the vertebral body is taken instead of the opening."""
    from scipy import ndimage

    from qctfea.imaging import masks

    p = params_from(masks.MaskParams, cfg, "mask")
    _need(context, ct=ct_path, labels=labels_path)
    if subregions_path is not None and not Path(subregions_path).is_file():
        raise QctfeaError(f"{context}: sub-region map {subregions_path} not found; check the "
                          "subregions column of the sample sheet (leave it empty to find the "
                          "body by opening), or correct the path")
    ct, _ = _read_ct(ct_path, context)
    where = f"{context} ({labels_path})"
    labels = masks.resample_labels_to(_read_image(labels_path, "label map", context), ct, where)
    lab = sitk.GetArrayFromImage(labels)
    sub, sub_where = None, ""
    if subregions_path is not None:
        sub_where = f"{context} ({subregions_path})"
        sub = sitk.GetArrayFromImage(masks.resample_labels_to(
            _read_image(subregions_path, "sub-region map", context), ct, sub_where))
    caps = np.isin(lab, p.cap_labels) if p.cap_labels else np.zeros(lab.shape, bool)
    if p.cap_labels and not caps.any():
        raise QctfeaError(f"{where}: no voxel carries the end-cap label(s) mask.cap_labels "
                          f"{p.cap_labels} (labels present: "
                          f"{sorted(int(v) for v in np.unique(lab) if v)}); correct "
                          "mask.cap_labels or remove it")
    if p.bone_labels:  # several labels (e.g. trabecular + cortical) form the vertebra
        lab = np.where(np.isin(lab, p.bone_labels), p.label,
                       np.where(lab == p.label, 0, lab)).astype(lab.dtype)
    parts = masks.vertebra_parts(lab, ct.GetSpacing(), p, where, sub, sub_where)
    qc = masks.label_qc(lab, ct.GetSpacing(), p, where)
    out = np.zeros(lab.shape, np.uint8)
    out[caps] = masks.CAP
    out[parts["body"]] = masks.BODY
    out[parts["posterior"]] = masks.POSTERIOR
    out[parts["trabecular"]] = masks.TRABECULAR
    _write_image(_like(out, ct), out_parts)
    vox_mm3 = float(np.prod(ct.GetSpacing()))
    inputs = {"labels": labels_path}
    if subregions_path is not None:
        inputs["subregions"] = subregions_path

    write_json(out_json, {
        "label": p.label,
        "convention": p.convention,
        "vertebra": p.vertebra,
        "body_from": "subregions" if sub is not None else "opening",
        "vertebra_volume_cm3": float(parts["vertebra"].sum() * vox_mm3 / 1000),
        "body_volume_cm3": float(parts["body"].sum() * vox_mm3 / 1000),
        "trabecular_roi_volume_cm3": float(parts["trabecular"].sum() * vox_mm3 / 1000),
        "trabecular_roi_voxels": int(parts["trabecular"].sum()),
        "caps_volume_cm3": float((out == masks.CAP).sum() * vox_mm3 / 1000),
        "components_in_label": int(ndimage.label(lab == p.label)[1]),
        "contact_with_other_labels_voxels": masks.contact_with_neighbours(
            lab, parts["vertebra"], p.label),
        "label_qc": qc,
        **masks.body_axis(ct, parts["body"]),
        "provenance": provenance("mask", p, inputs),
    })
    named = f" ({p.convention} {p.vertebra})" if p.vertebra else ""
    log.info(f"[mask] {context}: label {p.label}{named}, vertebra "
             f"{parts['vertebra'].sum() * vox_mm3 / 1000:.1f} cm³, body "
             f"{parts['body'].sum() * vox_mm3 / 1000:.1f} cm³ (from "
             f"{'subregions' if sub is not None else 'opening'})")


# --- screws -------------------------------------------------------------------------------


def plan_screws(*, landmarks_path, parts_path, out_json, cfg: dict, context: str,
                planning: dict | None = None, out_png=None, record_refusal: bool = False
                ) -> None:
    """Screws from the landmarks (``planning.method: landmarks``, the default) or planned from
    the vertebra parts image (``auto``, :mod:`qctfea.model.planning`; ``landmarks_path`` may then be
    None and is not read), each graded on the Gertzbein-Robbins scale against the parts image
    (:mod:`qctfea.model.placement`). A screw graded worse than ``planning.max_grade`` fails the
    step with an error naming the scan, side, grade and breach; its QC picture is then kept
    as ``screws_refused.png`` beside ``out_json``. With ``record_refusal`` (the workflow,
    whose planning checkpoint must finish for the cohort to go on without the scan) the
    refusal is written into ``out_json`` (key ``refused``) and the picture to ``out_png``
    instead: :func:`accept_screws` then fails the scan, and :func:`load_screws` refuses to
    give these screws to any later step."""
    from qctfea.model import placement
    from qctfea.model import planning as plan_mod
    from qctfea.model import screw as screw_mod
    from qctfea.qc import slicer

    cfg = dict(cfg or {})
    plan = params_from(plan_mod.PlanParams, planning, "planning")
    traj = plan_mod.TRAJECTORIES[plan.trajectory]
    if plan.method == "auto":  # the trajectory's screw size unless the screw section sets one
        cfg.setdefault("diameter_mm", traj["diameter_mm"])
        cfg.setdefault("length_mm", traj["length_mm"])
    spec = params_from(screw_mod.ScrewSpec, cfg, "screw")
    _need(context, parts=parts_path)
    parts = _read_image(parts_path, "vertebra parts image", context)
    anatomy = plan_mod.vertebra_anatomy(parts, context)
    if plan.method == "auto":
        where = f"{context} ({parts_path})"
        screws = plan_mod.plan_from_mask(parts, spec, plan, where, anatomy=anatomy)
        inputs = {"parts": parts_path}
    else:
        if landmarks_path is None or str(landmarks_path) == "":
            raise QctfeaError(f"{context}: no landmarks file (the landmarks column of the sample "
                              "sheet is empty) and planning.method is 'landmarks'; give this "
                              "scan's landmarks JSON, or set `planning.method: auto` in the "
                              "cohort config to plan the screws from the vertebra mask")
        _need(context, landmarks=landmarks_path)
        lm = (slicer.read_landmarks_markups(landmarks_path, context)
              if str(landmarks_path).lower().endswith(".mrk.json") else read_json(landmarks_path))
        where = f"{context} ({landmarks_path})"
        screws = screw_mod.screws_from_landmarks(lm, spec, where)
        inputs = {"landmarks": landmarks_path}
    inside = screw_mod.bone_lookup(parts)
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
                          f"{grade['direction']}", stacklevel=2)
        out.append({**sc.to_dict(), "breach": rep, "placement": grade})
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
        what = "; ".join(
            f"{s['side']} screw grade {s['placement']['grade']} (Gertzbein-Robbins): "
            f"{s['placement']['breach_mm']:.1f} mm outside the bone, "
            f"{s['placement']['direction']}"
            + (" (into the spinal canal)" if s["placement"]["direction"] == "medial" else "")
            for s in refused)
        other = "cortical" if plan.trajectory == "traditional" else "traditional"
        error = (
            f"{where}: screw placement refused, worse than planning.max_grade = "
            f"{plan.max_grade}: {what}. No strength is computed for a screw outside bone. "
            "Give landmarks for this scan (planning.method: landmarks and the sample sheet's "
            f"landmarks column), try planning.trajectory: {other}, a smaller screw "
            "(screw.diameter_mm, or planning.fit_diameter: true), or exclude the scan "
            "(exclude: in the cohort config, with the reason)"
            + (f"; picture: {png}" if png is not None else ""))
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


def load_screws(path) -> list:
    """The screws of a screws file; none for ``None`` (a model without screws: ``loads.cases``
    without pullout). Refused screws (a placement worse than planning.max_grade) are an
    error: no number is computed on them."""
    from qctfea.model.screw import Screw

    if path is None:
        return []
    data = read_json(path)
    if data.get("refused"):
        raise QctfeaError(f"{path}: these screws were refused at planning, nothing is computed "
                          f"on them: {data['refused']}")
    return [Screw.from_dict(d) for d in data["screws"]]


def accept_screws(*, screws_path, out_json, context: str) -> None:
    """The planning stage's gate: fail the scan whose screws were refused (the refusal's
    message), else record each side's Gertzbein-Robbins grade and breach."""
    _need(context, screws=screws_path)
    data = read_json(screws_path)
    if data.get("refused"):
        raise QctfeaError(data["refused"])
    grades = {s["side"]: {k: s["placement"][k] for k in ("grade", "breach_mm", "direction")}
              for s in data["screws"]}
    write_json(out_json, {"screws": grades, "provenance": provenance(
        "accept_screws", {}, {"screws": screws_path})})
    log.info(f"[accept_screws] {context}: " + ", ".join(
        f"{k} grade {v['grade']}" for k, v in grades.items()))


def accept_strength(*, result_paths, out_json, context: str) -> None:
    """The solve stage's gate: fail the scan when a load case's curve did not peak (its
    result's ``refused`` message); else record each case's strength and how the run ended."""
    for p in result_paths:
        if not Path(p).exists():
            raise QctfeaError(f"{context}: load-case result {p} is missing; run the solve step "
                              "(rule solve) first")
    results = {Path(p).stem: read_json(p) for p in result_paths}
    refused = [r["refused"] for r in results.values() if r.get("refused")]
    if refused:
        raise QctfeaError("; ".join(refused))
    cases = {k: {"strength_n": r["strength_n"], "peak_reached": r.get("peak_reached", True),
                 "stop_reason": r.get("stop_reason", "linear analysis")}
             for k, r in results.items()}
    write_json(out_json, {"cases": cases, "provenance": provenance(
        "accept_strength", {}, {k: str(p) for k, p in zip(results, result_paths)})})
    log.info(f"[accept_strength] {context}: " + ", ".join(
        f"{k} {v['strength_n']:.0f} N ({v['stop_reason']})" for k, v in cases.items()))


# --- bmd ----------------------------------------------------------------------------------


def bmd(*, density_path, parts_path, screws_path, out_json, cfg: dict, context: str,
        out_png=None) -> None:
    """Trabecular, integral, around-screw vBMD and CT areal BMD (JSON), and optionally the QC
    picture of the regions and screws on orthogonal slices. ``screws_path`` None: a model
    without screws (no around-screw vBMD)."""
    from qctfea.imaging import bmd as bmd_mod
    from qctfea.imaging import masks

    p = params_from(bmd_mod.BmdParams, cfg, "bmd")
    _need(context, density=density_path, parts=parts_path, screws=screws_path)
    dens, arr = _read_density(density_path, context)
    lab = sitk.GetArrayFromImage(_read_image(parts_path, "vertebra parts image", context))
    if lab.shape != arr.shape:
        raise QctfeaError(f"{context}: density image {density_path} ({arr.shape[::-1]} voxels) "
                          f"and vertebra parts image {parts_path} ({lab.shape[::-1]}) are on "
                          "different grids; give both from the same scan")
    parts = {"vertebra": np.isin(lab, masks.BONE_PARTS),
             "body": np.isin(lab, (masks.BODY, masks.TRABECULAR)),
             "trabecular": lab == masks.TRABECULAR}
    if not parts["trabecular"].any():
        raise QctfeaError(f"{context}: vertebra parts image {parts_path} has no trabecular ROI "
                          f"(label {masks.TRABECULAR}); rerun the mask step (rule "
                          "extract_vertebra) on this scan's label map")
    screws = load_screws(screws_path)
    res = bmd_mod.measure_bmd(arr, dens, parts, screws, p, f"{context} ({screws_path})")
    if out_png:
        from qctfea.qc.roiplot import roi_picture

        with atomic_path(out_png) as tmp:
            roi_picture(dens, _read_image(parts_path, "vertebra parts image", context), screws,
                        p.shell_mm, tmp, f"{context}: BMD regions and screws", res)
    write_json(out_json, {**res, "provenance": provenance(
        "bmd", p, {"density": density_path, "parts": parts_path})})
    log.info(f"[bmd] {context}: trabecular {res['trabecular_vbmd_mg_cm3']:.1f} mg/cm³, around screw "
             + ", ".join(f"{k} {v:.1f}" for k, v in res["around_screw_vbmd_mg_cm3"].items())
             + f", aBMD {res['areal_bmd_g_cm2']:.3f} g/cm²")


def uncertainty(*, calibration_json, bmd_json, density_path, parts_path, strength_json,
                screws_path, registration_json, out_json, cfg: dict, materials_cfg: dict,
                bmd_cfg: dict, context: str, seed_key: str) -> None:
    """Intervals and per-scan SDs of the scan's vBMD and strengths (uncertainty.json; see
    :mod:`qctfea.uncertainty`). ``screws_path`` None: a model without screws;
    ``registration_json`` None: a baseline (or registration off)."""
    from qctfea.imaging import bmd as bmd_mod
    from qctfea.imaging import masks
    from qctfea.model import materials as mat
    from qctfea import uncertainty as unc

    p = params_from(unc.UncertaintyParams, cfg, "uncertainty")
    mp = params_from(mat.MaterialParams, materials_cfg, "materials")
    bp = params_from(bmd_mod.BmdParams, bmd_cfg, "bmd")
    _need(context, calibration=calibration_json, bmd=bmd_json, density=density_path,
          parts=parts_path, strength=strength_json, screws=screws_path,
          registration=registration_json)
    t0 = time.perf_counter()
    dens, arr = _read_density(density_path, context)
    lab = sitk.GetArrayFromImage(_read_image(parts_path, "vertebra parts image", context))
    vert = np.isin(lab, masks.BONE_PARTS)
    idx = np.argwhere(vert)
    cases = read_json(strength_json)["cases"]
    reg = read_json(registration_json) if registration_json else {}
    inp = unc.ScanInputs(
        calibration=read_json(calibration_json), bmd=read_json(bmd_json),
        density=arr[vert].astype(float), points_mm=masks.voxel_centres_mm(dens, idx),
        body=np.isin(lab[vert], (masks.BODY, masks.TRABECULAR)),
        screws=load_screws(screws_path),
        strength={"compression": cases.get("compression", {}).get("strength_n"),
                  **{side: cases.get(f"pullout_{side}", {}).get("strength_n")
                     for side in ("left", "right")}},
        yield_fn=lambda rho: mat.yield_mpa(rho, mp),
        follow_up=registration_json is not None,
        registration_spread_mm=float(reg.get("point_spread_mm") or 0.0), shell_mm=bp.shell_mm)
    res = unc.scan_uncertainty(p, inp, seed_key)
    write_json(out_json, {
        "outcomes": res, "level": p.level, "draws": p.draws,
        "calibration_note": inp.calibration.get("uncertainty_note", ""),
        "strength_scheme": "yield-weighted (qctfea.uncertainty; docs/uncertainty.md)",
        "seconds": time.perf_counter() - t0,
        "provenance": provenance("uncertainty", p, {
            "calibration": calibration_json, "bmd": bmd_json, "density": density_path,
            "parts": parts_path, "strength": strength_json})})
    log.info(f"[uncertainty] {context}: " + ", ".join(
        f"{k} {v['value']:.4g} [{v['ci_low']:.4g}, {v['ci_high']:.4g}]" for k, v in res.items()))


# --- registration -------------------------------------------------------------------------


def register(*, fixed_density, fixed_parts, moving_density, moving_parts, out_density, out_json,
             out_tfm, out_png, cfg: dict, context: str, screws_path=None) -> None:
    """Follow-up (moving) onto baseline (fixed): transform, QC, follow-up density on the
    baseline grid (the density the baseline model is given at this visit).
    ``screws_path``: the baseline's screws.json, whose entry and tip points are where the
    registration's accuracy is reported (default: the vertebra's bounding-box corners)."""
    _need(context, baseline_density=fixed_density, baseline_parts=fixed_parts,
          density=moving_density, parts=moving_parts, screws=screws_path)
    from qctfea.imaging import registration as reg

    p = params_from(reg.RegistrationParams, cfg, "registration")
    t0 = time.perf_counter()
    fixed = sitk.ReadImage(str(fixed_density), sitk.sitkFloat32)
    fixed_mask = sitk.ReadImage(str(fixed_parts))
    moving = sitk.ReadImage(str(moving_density), sitk.sitkFloat32)
    moving_mask = sitk.ReadImage(str(moving_parts))
    points = None
    if screws_path is not None:
        points = [q for s in load_screws(screws_path) for q in (s.entry_mm, s.tip_mm)] or None
    try:
        tx, info = reg.register_rigid(fixed, fixed_mask, moving, moving_mask, p, points)
    except RuntimeError as exc:  # SimpleITK's own failures
        raise QctfeaError(f"{context}: registration to baseline failed ({exc}); check both "
                          "scans show the vertebra, or exclude the scan") from exc
    warning = reg.check_dice(info, p, context)
    if warning:
        warnings.warn(warning, stacklevel=1)
    _write_image(reg.resample_density(moving, fixed, tx), out_density)
    with atomic_path(out_tfm) as tmp:
        sitk.WriteTransform(tx, str(tmp))
    with atomic_path(out_png) as tmp:
        reg.plot_registration(fixed, fixed_mask, moving_mask, tx, info, tmp, context)
    write_json(out_json, {**info, "seconds": time.perf_counter() - t0, "warning": warning,
                          "provenance": provenance("register", p, {
                              "baseline_density": fixed_density, "baseline_parts": fixed_parts,
                              "density": moving_density, "parts": moving_parts})})
    log.info(f"[register] {context}: Dice {info['dice_before']:.3f} -> {info['dice_after']:.3f}, "
             f"rotation {np.round(info['rotation_deg'], 2).tolist()} deg, translation "
             f"{np.round(info['translation_mm'], 2).tolist()} mm, {info['iterations']} iterations, "
             f"{len(info['starts'])} start(s), spread {info['point_spread_mm']} mm at the "
             f"{info['points']}")


# --- mesh ---------------------------------------------------------------------------------


def mesh(*, parts_path, screws_path, out_mesh, out_json, cfg: dict, context: str,
         out_png=None) -> None:
    """Conforming tetrahedral mesh of bone and screws (XDMF + JSON report), and optionally
    the QC picture of cuts through the screws. ``screws_path`` None: bone (and end caps)
    only, no screw subdomains."""
    from qctfea.model import meshing

    p = params_from(meshing.MeshParams, cfg, "mesh")
    _need(context, parts=parts_path, screws=screws_path)
    parts = _read_image(parts_path, "vertebra parts image", context)
    screws = load_screws(screws_path)
    pts, cells, tags, rep = meshing.generate_mesh(parts, screws, p)
    if out_png:
        from qctfea.qc.meshplot import mesh_picture

        with atomic_path(out_png) as tmp:
            mesh_picture(pts, cells, tags, screws, rep, tmp, title=f"{context}: mesh")
    meshing.write_mesh(out_mesh, pts, cells, tags)
    write_json(out_json, {**rep, "provenance": provenance("mesh", p, {"parts": parts_path})})
    log.info(f"[mesh] {context}: done")


# --- materials ----------------------------------------------------------------------------


def materials(*, mesh_path, density_path, screws_path, out_npz, out_json, cfg: dict,
              context: str) -> None:
    from qctfea.model import materials as mat
    from qctfea.model import meshing

    p = params_from(mat.MaterialParams, cfg, "materials")
    t0 = time.perf_counter()
    _need(context, mesh=mesh_path, density=density_path, screws=screws_path)
    dens, rho_img = _read_density(density_path, context)
    pts, cells, tags = meshing.read_mesh(mesh_path)
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


# --- solve (MPI) --------------------------------------------------------------------------


def solve(*, case: str, mesh_path, materials_path, mask_json, screws_path, out_json,
          loads_cfg: dict, solver_cfg: dict, context: str, side: str | None = None,
          out_curve=None, out_plot=None, out_fields=None) -> dict:
    """Run one load case; call under ``mpiexec -n N``: every rank runs this.

    Writes the result JSON and, when given, the force-displacement curve (CSV and
    PNG) and the fields for ParaView (XDMF + HDF5: displacement, von Mises stress,
    and for the nonlinear analysis plastic strain and yielded elements).
    """
    _need(context, mesh=mesh_path, materials=materials_path, vertebra_json=mask_json,
          screws=screws_path if case == "pullout" else None)
    from mpi4py import MPI

    from qctfea.fea import elasticity, loadcases, plasticity

    comm = MPI.COMM_WORLD
    t0 = time.perf_counter()
    lp = params_from(loadcases.LoadParams, loads_cfg, "loads")
    mesh, tags = elasticity.read_mesh(mesh_path, comm)
    npz = np.load(materials_path)
    if lp.analysis == "nonlinear":
        if "yield_mpa" not in npz:
            raise QctfeaError(f"{context}: {materials_path} has no yield stresses; rerun the "
                              "materials step (rule assign_materials)")
        model = plasticity.PlasticModel(mesh, npz["youngs_mpa"], npz["poisson"],
                                        npz["yield_mpa"], lp.hardening_ratio, lp.constitutive,
                                        lp.nonlinear())
    else:
        model = elasticity.ElasticModel(mesh, npz["youngs_mpa"], npz["poisson"])
    axis_info = read_json(mask_json)
    opts = dict(solver_cfg or {})
    what = f"{context} {case}{' ' + side if side else ''}"
    progress = (lambda m: log.info(f"[solve] {what}:{m}")) if comm.rank == 0 else None
    if progress:
        progress(f" {lp.analysis} analysis, {model.n_dofs()} dofs, {comm.size} rank(s)")
    if case == "compression":
        res = loadcases.solve_compression(model, tags, npz["tags"], axis_info, lp, opts,
                                          progress=progress)
    elif case == "pullout":
        screws = {s.side: s for s in load_screws(screws_path)}
        if side not in screws:
            raise QctfeaError(f"{context}: no {side!r} screw in {screws_path}")
        res = loadcases.solve_pullout(model, tags, npz["tags"], npz["centroids_mm"], axis_info,
                                      screws[side], lp, opts, progress=progress)
    else:
        raise QctfeaError(f"unknown load case {case!r}; use compression or pullout")
    if out_fields:
        _write_fields(model, out_fields, comm)
    res["seconds"]["total"] = time.perf_counter() - t0
    if lp.analysis == "nonlinear" and not res["peak_reached"]:
        # No strength for a curve that has not peaked (docs/nonlinear.md): recorded in the
        # result, which the gate (accept_strength) and the cohort tables then refuse.
        limit = ("loads.compression_max_strain" if case == "compression"
                 else "loads.pullout_max_displacement_mm")
        res["refused"] = (
            f"{context}, {case}{' ' + side if side else ''} ({out_json}): {res['stop_reason']}. "
            f"No strength is reported. What to do: raise {limit} if the curve still rose at "
            "the end, or smaller increments (loads.increments, loads.min_increment_fraction) "
            "if Newton failed; else exclude the scan (exclude: in the cohort config)")
    res["solver_options"] = {**(plasticity.NONLINEAR_PETSC_OPTIONS if lp.analysis == "nonlinear"
                                else elasticity.DEFAULT_PETSC_OPTIONS), **opts}
    if comm.rank == 0:
        if out_curve:
            write_curve_csv(res["curve"], out_curve)
        if out_plot:
            plot_curve(res, out_plot, what)
        write_json(out_json, {**res, "provenance": provenance(
            f"solve_{case}", lp, {"mesh": mesh_path, "materials": materials_path})})
        extra = (f" ({res['strength_rule']} rule; {res['stop_reason']}), "
                 f"{res['increments']} increments, {res['newton_iterations']} Newton"
                 if lp.analysis == "nonlinear" else "")
        strength = ("none (peak not reached)" if res["strength_n"] is None
                    else f"{res['strength_n']:.0f} N")
        log.info(f"[solve] {what}: stiffness {res['stiffness_n_per_mm']:.0f} N/mm, "
                 f"strength {strength}, {res['ksp_iterations']} Krylov iterations"
                 f"{extra}, {res['n_dofs']} dofs, {comm.size} rank(s), "
                 f"{res['seconds']['total']:.1f} s")
        if res.get("refused"):
            log.info(f"[solve] refused: {res['refused']}")
    comm.barrier()
    return res


def _write_fields(model, out_fields, comm) -> None:
    """XDMF + HDF5 written in a scratch folder (every rank), then both moved into place by
    rank 0 (atomic)."""
    import contextlib

    out = Path(out_fields)
    with (atomic_files(out.with_suffix(".h5"), out) if comm.rank == 0
          else contextlib.nullcontext()) as scratch:
        scratch = comm.bcast(scratch, root=0)
        model.write_fields(Path(scratch) / out.name)
        comm.barrier()
    comm.barrier()


def write_curve_csv(curve: list[dict], path) -> None:
    import csv

    keys = list(curve[0])
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(curve)


def plot_curve(res: dict, path, title: str) -> None:
    """Force-displacement curve with the strength marked."""
    from matplotlib.figure import Figure

    d = [p["displacement_mm"] for p in res["curve"]]
    f = [p["force_n"] for p in res["curve"]]
    fig = Figure(figsize=(5, 3.6), dpi=110)
    ax = fig.subplots()
    ax.plot(d, f, "o-", ms=3, lw=1.5)
    if res["strength_n"] is not None:
        ax.axhline(res["strength_n"], color="C3", ls="--", lw=1,
                   label=f"strength {res['strength_n']:.0f} N")
    else:
        ax.set_title(ax.get_title() + " - peak not reached, no strength", color="C3")
    ax.set_xlabel("displacement (mm)")
    ax.set_ylabel("force (N)")
    ax.set_title(f"{title} ({res.get('analysis', 'linear')})", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
