"""The imaging steps the rules run (imaging.smk, demo.smk): demo scan, ingest, calibrate,
BMD, registration (the vertebra's mask step: :mod:`qctfea.steps.vertebra`). Each reads its
inputs, calls the library and writes its outputs with provenance (:mod:`qctfea.steps` holds
the shared readers and the config typing).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, provenance, read_json, write_json
from qctfea.steps import (
    accept_record, grid_only, image_like, load_screws, need_inputs, params_from, read_ct,
    read_density, read_image, read_labels, refusal_text, write_image, write_image_refusal,
    write_refusal,
)

log = logging.getLogger(__name__)


def synth_scan(*, out_dir, patient: str, timepoint: str, months: float, seed: int,
               synth_cfg: dict | None = None) -> None:
    from qctfea.demo.synth import SynthParams, generate_scan

    p = params_from(SynthParams, synth_cfg, "demo.synth")
    t0 = time.perf_counter()
    generate_scan(out_dir, patient, timepoint, months, seed=seed, params=p)
    log.info(f"[synth] {patient} {timepoint}: wrote {out_dir} in {time.perf_counter() - t0:.1f} s")


def ingest(*, source, out_image, out_json, context: str, series_uid: str | None = None,
           cfg: dict | None = None, labels_path=None, mask_cfg: dict | None = None,
           record_refusal: bool = False) -> None:
    """Scan (DICOM folder or HU image file) -> float32 HU NIfTI + scan.json.

    ``cfg`` is the cohort config's ``ingest`` section (:class:`qctfea.imaging.dicomio.IngestParams`:
    which series to take from a folder holding several, what to do with uneven slices);
    ``series_uid`` names the series explicitly and wins over ``ingest.series_rule``.
    ``labels_path`` (with ``mask_cfg``, the ``mask`` section): the scan's label map, checked
    here to be readable and to hold the target vertebra
    (:func:`qctfea.imaging.masks.require_target`), so that a scan the pipeline cannot read
    is told at its first step.

    An unreadable scan or label map, or one without the vertebra, raises
    :class:`QctfeaError`; with ``record_refusal`` (the workflow, whose gate rule accept_scan
    then fails the scan, and whose cohort tables go on without it under ``--keep-going``)
    the message goes into ``out_json`` (key ``refused``) and ``out_image`` is a one-voxel
    placeholder that nothing reads (every step after the gate waits for it)."""
    from qctfea.imaging import dicomio, ingest as ingest_, masks

    p = params_from(dicomio.IngestParams, cfg, "ingest")
    mp = params_from(masks.MaskParams, mask_cfg, "mask")
    try:
        ingest_.ingest(source, out_image, out_json, context=context, series_uid=series_uid,
                       params=p)
        if labels_path is not None:
            need_inputs(context, labels=labels_path)
            labels, _ = read_labels(labels_path, context, mp.convention)
            masks.require_target(sitk.GetArrayViewFromImage(labels), mp,
                                 f"{context} ({labels_path})")
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise
        write_image_refusal("ingest", refusal_text(exc, "ingest", context), out_image,
                            sitk.sitkFloat32, out_json, asdict(p), {"labels": labels_path})


def accept_scan(*, scan_json, out_json, context: str) -> None:
    """The inputs' gate: fail the scan whose image or label map could not be read, or whose
    label map lacks the vertebra (its record's ``refused`` message, as ingest wrote it);
    else record the acquisition it passed with."""
    rec = accept_record("accept_scan", scan_json, "scan", ("scan",), out_json)
    log.info(f"[accept_scan] {context}: {rec['scan'].get('n_slices')} slices read")


# Long on purpose: the three calibration methods and their shared outputs, in order.
def calibrate(*, ct_path, labels_path, out_density, out_json, out_png, cfg: dict,
              context: str, label: int, convention: str = "custom",
              record_refusal: bool = False, baseline: dict | None = None) -> None:
    """HU image -> density image (mg/cm³), by phantom, phantomless or fixed calibration.

    ``label`` is the target vertebra of the label map, ``convention`` its label convention
    (``mask.convention``: needed when the label map is a folder of structure masks). Phantom
    and phantomless need the label map. A phantom calibration also measures the reference
    tissues of the phantomless method (``calibration.phantomless`` settings) and records
    their median HU and phantom-calibrated density under ``tissues`` in calibration.json,
    from which reference densities for phantomless scans of the same scanner can be
    derived; a failure there never fails the phantom calibration.

    A calibration refused by its gates (no phantom found, too few tissues, a fit below
    ``fail_r2`` or with a slope not > 0) raises :class:`GateRefusal`; with
    ``record_refusal`` (the workflow; also for any other error of the calibration itself,
    :func:`qctfea.steps.refusal_text`, whose gate rule accept_calibration then fails the
    scan) the message goes into ``out_json`` (key ``refused``), the picture shows it
    beside the CT slice, and the density image is zero throughout (NIfTI as ITK writes it
    keeps no NaN; nothing reads it: every step that uses a density waits for the gate).

    ``baseline`` (a follow-up's, phantomless effective energy with ``energy_from:
    baseline``): paths ``calibration`` (the baseline's calibration.json), ``scan`` and
    ``own_scan`` (the two scans' scan.json): the line is drawn at the baseline's effective
    energy when tube voltage and manufacturer agree (:func:`baseline_energy`)."""
    from qctfea.imaging import calibration_plot
    from qctfea.imaging.masks import resample_labels_to

    t0 = time.perf_counter()
    cfg = dict(cfg or {})
    method = cfg.pop("method", "phantom")
    needs_labels = method in ("phantom", "phantomless")
    need_inputs(context, ct=ct_path, labels=labels_path if needs_labels else None)
    ct, hu = read_ct(ct_path, context)
    ct = grid_only(ct)  # the HU are in `hu`: keep only the grid of the CT image
    where = f"{context} ({ct_path})"
    masks: dict = {}
    labels_arr = structures = None
    if needs_labels:
        from qctfea.imaging.labelfolder import OTHER_FROM

        labels, structures = read_labels(labels_path, context, convention)
        labels = resample_labels_to(labels, ct, f"{context} ({labels_path})")
        labels_arr = sitk.GetArrayFromImage(labels)
        blood = (cfg.get("phantomless") or {}).get("blood_label")
        if structures is not None and blood is not None and blood not in structures.values():
            raise QctfeaError(
                f"{context}: calibration.phantomless.blood_label {blood} is not a label of the "
                f"structure masks in {labels_path} (named: "
                f"{', '.join(f'{k} = {v}' for k, v in structures.items() if v < OTHER_FROM)}; "
                "aorta.nii.gz is 52 under mask.convention totalsegmentator); correct "
                "blood_label, or give the multilabel file (TotalSegmentator --ml)")
    try:
        cal = _calibration(method, cfg, ct, hu, labels_arr, structures, masks, context,
                           where, label, convention, baseline)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise
        _record_calibration_refusal(refusal_text(exc, "calibrate", context), ct, hu,
                                    labels_arr, masks, out_density, out_json, out_png,
                                    context, method, cfg, ct_path, label)
        return
    write_image(image_like(cal.apply(hu), ct), out_density)
    with atomic_path(out_png) as tmp:
        calibration_plot.plot_calibration(cal, tmp, title=f"{context}: {cal.method} calibration",
                                          hu_zyx=hu if masks else None, masks=masks,
                                          **_qc_slice(ct, labels_arr, label))
    write_json(out_json, {
        **asdict(cal),
        "model": "density_mg_cm3 = intercept + slope * HU",
        "seconds": time.perf_counter() - t0,
        "provenance": provenance("calibrate", {"method": method, **cfg},
                                 {"ct": ct_path}),
    })
    log.info(f"[calibrate] {context}: slope {cal.slope:.4f}, intercept {cal.intercept:.2f}, "
             f"R² {cal.r2:.5f} ({cal.method})")


def baseline_energy(baseline: dict, context: str) -> dict | None:
    """A follow-up's effective energy from its baseline's calibration (``calibrate``'s
    ``baseline`` paths): ``energy_kev`` and ``from`` for
    :func:`qctfea.imaging.phantomless.effective_energy_calibration`, or None (the scan's own
    energy) when the baseline has none (refused, or another model), or when the two scans'
    tube voltages or manufacturers differ or only one file records them (a warning)."""
    base = read_json(baseline["calibration"])
    energy = (base.get("effective_energy") or {}).get("energy_kev")
    timepoint = Path(baseline["calibration"]).parent.name
    if base.get("refused") or energy is None:
        log.info(f"[calibrate] {context}: the baseline ({timepoint}) has no effective energy "
                 "(refused, or another calibration): this scan's own energy is used")
        return None
    own, base_scan = ((read_json(baseline[k]).get("scan") or {}) for k in ("own_scan", "scan"))
    differ = []
    for key, what in (("kvp", "tube voltage (kVp)"), ("manufacturer", "manufacturer")):
        a, b = own.get(key), base_scan.get(key)
        if (a is None) != (b is None) or (a is not None and (
                abs(a - b) > 0.5 if key == "kvp" else str(a).strip() != str(b).strip())):
            differ.append(f"{what} {a}, the baseline's ({timepoint}) {b}")
    if differ:
        warnings.warn(f"{context}: {'; '.join(differ)}: this scan's own effective energy is "
                      "used, not the baseline's", stacklevel=2)
        return None
    same = (f"{own['kvp']:g} kVp" if own.get("kvp") is not None
            else "kVp recorded in neither file")
    return {"energy_kev": float(energy), "from": f"the baseline {timepoint} ({same})"}


def _calibration(method: str, cfg: dict, ct: sitk.Image, hu: np.ndarray, labels_arr,
                 structures, masks: dict, context: str, where: str, label: int,
                 convention: str, baseline: dict | None = None):
    """The scan's calibration line by ``method`` (the tissue voxels found go into
    ``masks``; ``baseline``: a follow-up's baseline records, :func:`baseline_energy`)."""
    from qctfea.imaging import calibration as cal_mod
    from qctfea.imaging import phantomless, phantomrods
    from qctfea.imaging.phantoms import PhantomSpec

    if method == "phantom":
        spec = params_from(PhantomSpec, cfg.get("phantom"), "calibration.phantom")
        tspec = _tissue_spec(cfg, convention, structures)
        centres = None
        if spec.rod_centres_mm is not None:  # physical (x, y) at the middle slice -> pixels
            z_mid = ct.TransformIndexToPhysicalPoint([0, 0, ct.GetSize()[2] // 2])[2]
            centres = [tuple(ct.TransformPhysicalPointToContinuousIndex(
                [float(x), float(y), z_mid])[:2]) for x, y in spec.rod_centres_mm]
        cal = cal_mod.phantom_calibration(hu, ct.GetSpacing(), labels_arr != 0, spec, where,
                                          centres)
        try:
            band = phantomrods.phantom_band(hu.shape[1:], cal.rods, ct.GetSpacing())
            found = phantomless.find_tissues(hu, ct.GetSpacing(), labels_arr, tspec, where, label,
                                             masks, exclude_zyx=band,
                                             direction=ct.GetDirection())
            cal.tissues = phantomless.tissue_densities(cal, found)
        except Exception as exc:  # information only: never fails the phantom calibration
            masks.clear()
            warnings.warn(f"{where}: reference tissues not measured ({exc})", stacklevel=2)
    elif method == "phantomless":
        tspec = _tissue_spec(cfg, convention, structures)
        log.info(f"[calibrate] {context}: phantomless ({tspec.model}), finding "
                 f"{', '.join(tspec.tissues)} in {' x '.join(map(str, ct.GetSize()))} voxels")
        energy = (baseline_energy(baseline, context)
                  if baseline and tspec.model == "effective_energy"
                  and tspec.energy_from == "baseline" else None)
        cal = phantomless.phantomless_calibration(
            hu, ct.GetSpacing(), labels_arr, tspec, where, label, masks,
            direction=ct.GetDirection(), energy=energy)
    elif method == "fixed":
        if "slope" not in cfg or "intercept" not in cfg:
            raise QctfeaError(f"{context}: calibration method 'fixed' needs calibration.slope "
                              "and calibration.intercept in the cohort config")
        cal = cal_mod.fixed_calibration(cfg["slope"], cfg["intercept"])
    else:
        raise QctfeaError(f"{context}: calibration.method must be 'phantom', 'phantomless' or "
                          f"'fixed', not {method!r}")
    return cal


def _qc_slice(ct: sitk.Image, labels_arr, label: int) -> dict:
    """The calibration picture's CT slice: the axial one through the middle of the target
    vertebra (else the scan's middle), as ``axis`` and ``index`` of the numpy array."""
    from qctfea.imaging import phantomless

    axis = phantomless.axial_axis(ct.GetDirection())
    index = None
    if labels_arr is not None and (labels_arr == label).any():
        where_z = np.nonzero((labels_arr == label).any(axis=tuple(a for a in range(3)
                                                                  if a != axis)))[0]
        index = int(round(where_z.mean()))
    return {"axis": axis, "index": index}


def _record_calibration_refusal(message: str, ct, hu, labels_arr, masks, out_density,
                                out_json, out_png, context, method, cfg, ct_path,
                                label) -> None:
    """A refused calibration's outputs: a density of zeros (never read: the gate), the
    picture with the message, and calibration.json with the message (``refused``) and no
    line."""
    from qctfea.imaging import calibration_plot

    log.error(f"[calibrate] refused: {message}")
    write_image(image_like(np.zeros(hu.shape, dtype=np.float32), ct), out_density)
    with atomic_path(out_png) as tmp:
        calibration_plot.plot_refusal(message, tmp, f"{context}: {method} calibration", hu,
                                      masks, **_qc_slice(ct, labels_arr, label))
    write_json(out_json, {"refused": message, "method": method, "slope": None,
                          "intercept": None, "provenance": provenance(
                              "calibrate", {"method": method, **cfg}, {"ct": ct_path})})


def _tissue_spec(cfg: dict, convention: str, structures: dict | None):
    """The ``calibration.phantomless`` section typed, its muscle and blood labels defaulted
    by the label convention (or the structure folder's muscle and aorta masks)."""
    from qctfea.imaging.calibration import TissueSpec
    from qctfea.imaging.labelfolder import blood_label, muscle_labels

    tspec = params_from(TissueSpec, cfg.get("phantomless"), "calibration.phantomless")
    if tspec.muscle_labels is None:
        tspec.muscle_labels = muscle_labels(convention, structures)
    if tspec.blood_label is None:
        tspec.blood_label = blood_label(convention, structures)
    return tspec


def accept_calibration(*, calibration_json, out_json, context: str) -> None:
    """The calibration's gate: fail the scan whose calibration was refused (its record's
    ``refused`` message); else record the line it passed with."""
    rec = accept_record("accept_calibration", calibration_json, "calibration",
                  ("method", "slope", "intercept", "r2"), out_json)
    log.info(f"[accept_calibration] {context}: {rec.get('method')}, slope "
             f"{rec['slope']:.4f}, R² {rec.get('r2')}")


def accept_registration(*, registration_json, out_json, context: str) -> None:
    """The registration's gate: fail the follow-up whose registration was refused (its
    record's ``refused`` message, naming what was tried and what to do); else record the
    accuracy it passed with."""
    rec = accept_record("accept_registration", registration_json, "registration",
                  ("dice_before", "dice_after", "point_spread_mm", "points", "warning"),
                  out_json)
    log.info(f"[accept_registration] {context}: Dice {rec['dice_after']:.3f}, spread "
             f"{rec.get('point_spread_mm')} mm")


def bmd(*, density_path, parts_path, screws_path, out_json, cfg: dict, context: str,
        out_png=None, record_refusal: bool = False) -> None:
    """Trabecular, integral, around-screw vBMD and CT areal BMD (JSON), and optionally the QC
    picture of the regions and screws on orthogonal slices. ``screws_path`` None: a model
    without screws (no around-screw vBMD).

    A measurement that fails (no bone around a screw, grids that differ, any other error)
    raises; with ``record_refusal`` (the workflow) the message goes into ``out_json`` (key
    ``refused``) and the picture, and the scan's load cases record it as their refusal
    without solving (:func:`qctfea.steps.fea.solve`, ``upstream``), so that the solve gate
    (accept_strength) fails the scan and the cohort tables go on without it."""
    from qctfea.imaging import bmd as bmd_mod

    p = params_from(bmd_mod.BmdParams, cfg, "bmd")
    need_inputs(context, density=density_path, parts=parts_path, screws=screws_path)
    try:
        _bmd(density_path, parts_path, screws_path, out_json, p, context, out_png)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise
        write_refusal("bmd", refusal_text(exc, "bmd", context), out_json, p,
                      {"density": density_path, "parts": parts_path},
                      picture=out_png or None, title=f"{context}: BMD refused")


def _bmd(density_path, parts_path, screws_path, out_json, p, context: str, out_png) -> None:
    """:func:`bmd` without the refusal's record."""
    from qctfea.imaging import bmd as bmd_mod
    from qctfea.imaging import masks

    dens, arr = read_density(density_path, context)
    lab = sitk.GetArrayFromImage(read_image(parts_path, "vertebra parts image", context))
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
            roi_picture(dens, read_image(parts_path, "vertebra parts image", context), screws,
                        p.shell_mm, tmp, f"{context}: BMD regions and screws", res)
    write_json(out_json, {**res, "provenance": provenance(
        "bmd", p, {"density": density_path, "parts": parts_path})})
    log.info(f"[bmd] {context}: trabecular {res['trabecular_vbmd_mg_cm3']:.1f} mg/cm³, "
             "around screw "
             + ", ".join(f"{k} {v:.1f}" for k, v in res["around_screw_vbmd_mg_cm3"].items())
             + f", aBMD {res['areal_bmd_g_cm2']:.3f} g/cm²")


def register(*, fixed_density, fixed_parts, moving_density, moving_parts, out_density, out_json,
             out_tfm, out_png, cfg: dict, context: str, screws_path=None,
             record_refusal: bool = False) -> None:
    """Follow-up (moving) onto baseline (fixed): transform, QC, follow-up density on the
    baseline grid (the density the baseline model is given at this visit).
    ``screws_path``: the baseline's screws.json, whose entry and tip points are where the
    registration's accuracy is reported (default: the vertebra's bounding-box corners).
    A registration outside the gates raises :class:`QctfeaError`; with ``record_refusal``
    (the workflow, whose gate rule accept_registration then fails the scan) every output is
    written and the message goes into ``out_json`` (key ``refused``)."""
    need_inputs(context, baseline_density=fixed_density, baseline_parts=fixed_parts,
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
    # The gates (docs/registration.md): a follow-up that fails them, or whose registration
    # fails outright, keeps its record, picture and density with the refusal, which the gate
    # (accept_registration) and the cohort tables then refuse (listed in exclusions.csv).
    # (and any other error of the registration itself: qctfea.steps.refusal_text)
    refusal = warning = None
    no_result = {"dice_before": float("nan"), "dice_after": float("nan"), "points_mm": []}
    tx, info = sitk.Euler3DTransform(), no_result
    try:
        try:
            tx, info = reg.register_rigid(fixed, fixed_mask, moving, moving_mask, p, points)
        except RuntimeError as exc:  # SimpleITK's own failures: no transform to judge
            raise QctfeaError(f"{context}: registration to baseline failed ({exc}); check "
                              "both scans show the vertebra, or exclude the scan") from exc
        warning = reg.check_dice(info, p, context)
    except Exception as exc:  # noqa: BLE001  (any failure is the scan's refusal: refusal_text)
        if not record_refusal:
            raise
        refusal = refusal_text(exc, "registration", context)
        if info is no_result:  # no transform to judge
            info["failed"] = str(exc.__cause__ or exc)
        log.error(f"[register] refused: {refusal}")
    if warning:
        warnings.warn(warning, stacklevel=1)
    write_image(reg.resample_density(moving, fixed, tx), out_density)
    with atomic_path(out_tfm) as tmp:
        sitk.WriteTransform(tx, str(tmp))
    with atomic_path(out_png) as tmp:
        reg.plot_registration(fixed, fixed_mask, moving_mask, tx, info, tmp, context)
    write_json(out_json, {**info, "seconds": time.perf_counter() - t0, "warning": warning,
                          **({"refused": refusal} if refusal else {}),
                          "provenance": provenance("register", p, {
                              "baseline_density": fixed_density, "baseline_parts": fixed_parts,
                              "density": moving_density, "parts": moving_parts})})
    if "failed" in info:
        return
    log.info(f"[register] {context}: Dice {info['dice_before']:.3f} -> {info['dice_after']:.3f}, "
             f"rotation {np.round(info['rotation_deg'], 2).tolist()} deg, translation "
             f"{np.round(info['translation_mm'], 2).tolist()} mm, {info['iterations']} iterations, "
             f"{len(info['starts'])} start(s), spread {info['point_spread_mm']} mm at the "
             f"{info['points']}")
