"""Phantomless (internal) calibration: reference tissues found in the scan, then the
effective-energy model or the tissue regression (:mod:`qctfea.imaging.calibration`
describes both).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from qctfea.errors import GateRefusal, QctfeaError
from qctfea.imaging import morphology
from qctfea.imaging.calibration import (
    Calibration, REFERENCE_HU, TissueSpec, fit_line, line_covariance, uncertainty_keys,
)
from qctfea.imaging.attenuation import (
    AIR, TISSUE_SOURCES, TISSUES, k2hpo4_hu_per_mg, mass_attenuation, theoretical_hu,
)


def axial_axis(direction) -> int:
    """Numpy axis (of a z, y, x array) of the image axis nearest the patient's z axis.

    ``direction`` is SimpleITK's row-major 3x3 direction matrix; its column c is the
    direction of image axis c (x, y, z), i.e. numpy axis 2 - c."""
    d = np.asarray(direction, float).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(d[2])))


#: Smallest paraspinal muscle sample (cm³) used instead of the whole body's: less is the rim
#: between labelled structures (the real L1's back muscles, labelled by TotalSegmentator but
#: not declared muscle, leave 2 cm³), not the muscle itself.
PARASPINAL_MIN_CM3 = 5.0

#: Voxels (6-connected steps) around padding left out of the air sample (see
#: :func:`find_tissues`): one for the interpolation blend at the fill's edge, one for its
#: staircase on a turned grid.
PAD_MARGIN_VOXELS = 2
#: An air sample more than this fraction of which is one exact value is padding there.
PAD_FRACTION = 0.5


def posterior_axis(direction) -> tuple[int, int]:
    """(numpy axis, sign) of the image axis nearest the patient's posterior (+y of DICOM's
    LPS): index increases towards the back when the sign is +1."""
    d = np.asarray(direction, float).reshape(3, 3)
    c = int(np.argmax(np.abs(d[1])))
    return 2 - c, 1 if d[1, c] > 0 else -1


def paraspinal_region(target: np.ndarray, sampling_zyx, direction, distance_mm: float
                      ) -> np.ndarray | None:
    """Voxels behind the target vertebra: within ``distance_mm`` of it, posterior of its
    centroid and within its extent along the superior axis (the erector spinae and
    multifidus, beside and behind the posterior elements; organs lie in front). None when
    the target is absent."""
    if not target.any():
        return None
    sl = ndimage.find_objects(target.astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(
        sl, [int(np.ceil(distance_mm / s)) + 1 for s in sampling_zyx], target.shape,
        strict=True))
    sub = target[box]
    region = morphology.dilate(sub, distance_mm, sampling_zyx)
    centroid = ndimage.center_of_mass(sub)
    axis, sign = posterior_axis(direction)
    shape = [1, 1, 1]
    shape[axis] = sub.shape[axis]
    index = np.arange(sub.shape[axis], dtype=float).reshape(shape)
    region &= sign * (index - centroid[axis]) > 0
    sup = axial_axis(direction)
    extent = sub.any(axis=tuple(a for a in range(3) if a != sup))
    shape = [1, 1, 1]
    shape[sup] = sub.shape[sup]
    region &= extent.reshape(shape)
    out = np.zeros(target.shape, bool)
    out[box] = region
    return out


def _muscle_sample(region: np.ndarray, target: np.ndarray, sampling_zyx, direction,
                   spec: TissueSpec, context: str, has_target: bool) -> tuple[np.ndarray, str]:
    """The muscle voxels used and where they lie: ``region`` (the body's muscle-window voxels
    away from labelled structures) behind the target vertebra (``muscle_region:
    paraspinal``), or all of it ("body": asked for, no target, or too little behind it)."""
    if spec.muscle_region != "paraspinal" or not has_target:
        return region, "body"
    para = paraspinal_region(target, sampling_zyx,
                             np.eye(3) if direction is None else direction, spec.paraspinal_mm)
    n_para = 0 if para is None else int(np.count_nonzero(region & para))
    cm3 = n_para * float(np.prod(sampling_zyx)) / 1000
    if n_para >= spec.min_voxels and cm3 >= PARASPINAL_MIN_CM3:
        return region & para, "paraspinal"
    warnings.warn(
        f"{context}: muscle sampled over the whole body, where organs of similar HU (liver, "
        f"kidney, bowel, contrast-enhanced organs) count too: behind the target vertebra only "
        f"{cm3:.1f} cm³ of muscle-window voxels away from labelled structures (at least "
        f"{PARASPINAL_MIN_CM3:g} cm³ needed); if the label map labels the back muscles, give "
        "their labels as calibration.phantomless.muscle_labels (TotalSegmentator: "
        "mask.convention totalsegmentator does), or leave muscle out of "
        "calibration.phantomless.tissues", stacklevel=3)
    return region, "body"


def _deep(region: np.ndarray, depth_mm: float, sampling_zyx) -> np.ndarray:
    """Voxels of ``region`` farther than ``depth_mm`` from its outside and, when ``depth_mm``
    > 0, at least one voxel deep along every axis (the outside of the array counts as
    region). The voxel rule keeps partial volume out of coarse scans, where ``depth_mm`` is
    less than a voxel: the VerSe L3 resampled to 3 mm voxels sampled fat at -78 HU instead
    of -101 without it, and its slope rose by 12 %."""
    if depth_mm <= 0:
        return region.copy()
    return (morphology.erode(region, depth_mm, sampling_zyx, border_value=1)
            & ndimage.binary_erosion(region, border_value=1))


def _body(smooth: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The patient's body: the connected region above -500 HU holding the vertebra
    (``target``; else the largest such region), holes filled."""
    dense = smooth > -500.0
    comp, n = ndimage.label(dense)
    ids = np.unique(comp[target & dense]) if target.any() else np.array([], int)
    ids = ids[ids > 0]
    if ids.size == 0 and n:  # no vertebra given or found: the largest dense object
        ids = np.array([int(np.argmax(np.bincount(comp.ravel())[1:])) + 1])
    # one comparison per component (usually one): np.isin sorts or indexes with a 64-bit
    # copy of the whole grid
    body = np.zeros(comp.shape, bool)
    for i in ids:
        body |= comp == i
    return ndimage.binary_fill_holes(body)


def find_tissues(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    labels_zyx: np.ndarray | None,
    spec: TissueSpec | None = None,
    context: str = "",
    target_label: int | None = None,
    masks: dict | None = None,
    exclude_zyx: np.ndarray | None = None,
    direction=None,
) -> list[dict]:
    """Find the reference tissues of ``spec.tissues`` in the scan (see the module docstring).

    ``labels_zyx``: the label map on the CT grid (nonzero = bone, except ``blood_label``),
    or None; ``target_label``: the vertebra used to find the body (any label when None) and
    for cortical bone. Returns one dict per requested tissue: name, found (at least
    ``min_voxels`` voxels), n_voxels, median_hu (None when no voxel), sd_hu and
    reference_mg_cm3. ``masks``, when a dict, receives the voxel mask of each found tissue.
    ``exclude_zyx`` (broadcast to the scan; e.g. the calibration phantom) is never sampled
    as a body tissue (air around it is). ``direction``: the scan's direction matrix
    (SimpleITK, row-major; default identity), which says where posterior and superior are
    for the paraspinal muscle region. The muscle dict says where it was sampled
    (``region``: paraspinal or body).
    Never raises for missing tissues (see :func:`phantomless_calibration`).
    """
    spec = spec or TissueSpec()
    sampling = tuple(float(v) for v in spacing_xyz[::-1])
    hu = np.asarray(hu_zyx, np.float32)
    smooth = (ndimage.gaussian_filter(hu, sigma=[spec.smooth_mm / s for s in sampling])
              if spec.smooth_mm > 0 else hu)
    labels = (np.zeros(hu.shape, np.int32) if labels_zyx is None
              else np.asarray(labels_zyx))
    bone = labels != 0  # every labelled structure but blood and muscle
    for v in [spec.blood_label, *(spec.muscle_labels or [])]:
        if v is not None:
            bone &= labels != v
    target = (labels == target_label) if target_label is not None else bone
    near_bone = morphology.dilate(bone, spec.bone_margin_mm, sampling)

    body = _body(smooth, target)

    def window(name, img):
        lo, hi = getattr(spec, f"{name}_hu")
        return (img >= lo) & (img <= hi)

    out = []
    for name in spec.tissues:
        if name == "air":
            region = _air_region(hu, window("air", smooth) & ~body & ~near_bone, spec,
                                 sampling)
        elif name in ("fat", "muscle"):
            region = _deep(window(name, smooth) & body & ~near_bone, spec.erosion_mm, sampling)
            if name == "muscle":
                region, muscle_from = _muscle_sample(region, target, sampling, direction,
                                                     spec, context, target_label is not None)
        elif name == "blood":
            region = (np.zeros(hu.shape, bool) if spec.blood_label is None else
                      _deep(window("blood", smooth) & (labels == spec.blood_label),
                            spec.erosion_mm, sampling))
        else:  # cortical_bone: the densest voxels of the target vertebra, not eroded
            region = window("cortical_bone", hu) & (labels == target_label
                                                     if target_label is not None else bone)
        if exclude_zyx is not None and name != "air":  # a phantom is never air-like
            region &= ~np.broadcast_to(exclude_zyx, region.shape)
        vals = hu[region]
        n_vox = int(vals.size)
        found = n_vox >= spec.min_voxels
        out.append({
            "name": name, "found": found, "n_voxels": n_vox,
            "median_hu": robust_median(vals) if n_vox else None,
            "sd_hu": float(vals.std()) if n_vox else None,
            "reference_mg_cm3": float(spec.reference_mg_cm3[name]),
            **({"region": muscle_from} if name == "muscle" else {}),
        })
        if found and masks is not None:
            masks[name] = region
    return out


def _air_region(hu: np.ndarray, candidates: np.ndarray, spec: TissueSpec, sampling
                ) -> np.ndarray:
    """Air outside the body: the ``candidates`` (air window, outside the body and away from
    bone) less padding, eroded. Padding (the constant fill outside the reconstructed field
    of view, or around a resampled or rotated grid) is flat: a flat 3x3x3 neighbourhood
    marks it (and clipping). The voxels within PAD_MARGIN_VOXELS of it are left out too: at
    the fill's edge, interpolation blends fill into the image and a voxel can equal the fill
    without a flat neighbourhood (the VerSe L3, which has no air, resampled to 3 mm on a
    turned grid gave 6,000-14,000 such "air" voxels at exactly -1024 HU, which lowered its
    slope by 8 %)."""
    flat = ndimage.maximum_filter(hu, size=3) == ndimage.minimum_filter(hu, size=3)
    flat = ndimage.binary_dilation(flat, iterations=PAD_MARGIN_VOXELS)
    region = _deep(candidates & ~flat, spec.erosion_mm, sampling)
    # A fill too thin for a flat neighbourhood (a wedge at the edge of a turned grid): when
    # one exact value is most of the sample, it is that fill, not air, whose noise spreads
    # it over tens of HU (clipping at -1024 takes a fifth of it at most).
    if region.any():
        values, counts = np.unique(hu[region], return_counts=True)
        if counts.max() > PAD_FRACTION * counts.sum():
            region &= hu != values[counts.argmax()]
    return region


def robust_median(values) -> float:
    """Median; for integer-valued data (HU stored as integers, as in DICOM) the median of the
    grouped data (each integer v standing for [v - 0.5, v + 0.5), interpolated within the
    median's class), which is not stuck on an integer: a plain median of noisy integer HU is
    off by up to 0.5 HU, enough to move an effective energy by about half a keV."""
    v = np.asarray(values, float).ravel()
    if v.size == 0:
        return float("nan")
    m = float(np.median(v))
    if not np.all(v == np.round(v)):
        return m
    below = np.count_nonzero(v < m)
    at = np.count_nonzero(v == m)
    return m - 0.5 + (v.size / 2 - below) / at if at else m


def _tissue_list(tissues: list[dict]) -> str:
    return ", ".join(
        f"{t['name']} ({t['n_voxels']} voxels"
        + (f", median {t['median_hu']:.0f} HU" if t["median_hu"] is not None else "") + ")"
        for t in tissues)


def _too_few(context: str, spec: TissueSpec, tissues: list[dict], used: list[dict]) -> None:
    missing = [t["name"] for t in tissues if not t["found"]]
    left = [f"{t['name']} ({t['note']})" for t in tissues if t["found"] and not t["used"]]
    raise GateRefusal(
        f"{context}: phantomless calibration needs at least 2 reference tissues, found "
        f"{len(used)} with >= calibration.phantomless.min_voxels = {spec.min_voxels} "
        f"voxels; measured: {_tissue_list(tissues)}; missing: {', '.join(missing) or 'none'}"
        + (f"; left out: {', '.join(left)}" if left else "") + ". "
        "Check or widen the tissue HU windows (calibration.phantomless.<tissue>_hu), "
        "lower erosion_mm / bone_margin_mm / min_voxels, add tissues to "
        "calibration.phantomless.tissues, or use calibration.method: fixed with "
        "calibration.slope and calibration.intercept"
    )


def phantomless_calibration(
    hu_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    labels_zyx: np.ndarray | None,
    spec: TissueSpec | None = None,
    context: str = "",
    target_label: int | None = None,
    masks: dict | None = None,
    direction=None,
    energy: dict | None = None,
) -> Calibration:
    """Fit ``density = intercept + slope * HU`` from the scan's reference tissues, by the
    effective-energy model or the tissue regression (``spec.model``; module docstring).
    ``energy``: the effective energy to draw the line at instead of the scan's own
    (:func:`effective_energy_calibration`).

    Tissues come from :func:`find_tissues` (``masks`` as there). Refused (QctfeaError naming
    ``context``): fewer than 2 tissues found, R² below ``fail_r2``, a slope not > 0.
    Warns below ``warn_r2``. Every requested tissue is recorded in ``Calibration.tissues``
    (``found``: enough voxels; ``used``: fitted; ``note``: why a found tissue was left out;
    fitted ones get ``calibrated_mg_cm3``, and under effective_energy ``theoretical_hu`` and
    ``residual_hu``)."""
    spec = spec or TissueSpec()
    tissues = find_tissues(hu_zyx, spacing_xyz, labels_zyx, spec, context, target_label,
                           masks, direction=direction)
    try:
        if spec.model == "effective_energy":
            cal = effective_energy_calibration(tissues, spec, context, energy)
        else:
            cal = _tissue_regression(tissues, spec, context)
    except QctfeaError as exc:  # the same kind (a gate's refusal or not), with a units hint
        raise type(exc)(f"{exc}{_units_hint(hu_zyx)}") from None
    if masks is not None:  # the picture shows the voxels of the tissues used
        for t in cal.tissues:
            if not t["used"]:
                masks.pop(t["name"], None)
    return cal


#: lowest values of a CT in Hounsfield units that holds air: about -1000; above this, none
NO_AIR_ABOVE_HU = -500.0


def _units_hint(hu_zyx: np.ndarray) -> str:
    """For a refused phantomless calibration: a hint when the scan holds nothing near air's
    -1000 HU, the sign of values that are not Hounsfield units (stored pixel values whose
    rescale intercept, usually -1024, was not applied by the program that wrote the file)."""
    sub = np.asarray(hu_zyx[::2, ::4, ::4])
    # the padding outside the reconstruction circle (one value, the minimum: -2048 or
    # -3024 in HU) is not air
    inside = sub[sub > sub.min()]
    lo = float(np.percentile(inside, 0.1)) if inside.size else float(sub.min())
    if lo <= NO_AIR_ABOVE_HU:
        return ""
    return (f". The scan holds no air: its lowest values (0.1st percentile {lo:.0f}) are far "
            "above air's -1000 HU; if it shows air around the patient, its values are not "
            "Hounsfield units (e.g. stored pixel values without their rescale intercept, "
            "usually -1024): convert it to HU, or give the DICOM series")


def _mark_contrast(t: dict, unenhanced_hu: float, margin: float, basis: str) -> None:
    """Blood above unenhanced blood + margin: contrast-enhanced, left out (``used`` False)."""
    if t["name"] == "blood" and t["found"] and t["median_hu"] > unenhanced_hu + margin:
        t["used"] = False
        t["note"] = (f"contrast-enhanced, left out (median {t['median_hu']:.0f} HU > "
                     f"unenhanced blood {unenhanced_hu:.0f} HU {basis} + "
                     f"calibration.phantomless.contrast_margin_hu {margin:g})")


def _tissue_regression(tissues: list[dict], spec: TissueSpec, context: str) -> Calibration:
    """The straight line through the tissues' (median HU, reference density) points."""
    for t in tissues:
        t["used"], t["note"] = t["found"], None if t["found"] else "not found"
        _mark_contrast(t, REFERENCE_HU["blood"], spec.contrast_margin_hu, "(textbook)")
    used = [t for t in tissues if t["used"]]
    if len(used) < 2:
        _too_few(context, spec, tissues, used)
    slope, intercept, r2 = fit_line([t["median_hu"] for t in used],
                                    [t["reference_mg_cm3"] for t in used])
    fit = ", ".join(f"{t['name']} {t['median_hu']:.0f} HU -> {t['reference_mg_cm3']:g}"
                    for t in used)
    if not slope > 0:
        raise GateRefusal(
            f"{context}: phantomless calibration slope {slope:.4f} mg/cm³ per HU is not "
            f"positive (tissues, median HU -> mg/cm³: {fit}); a tissue was found in the wrong "
            "place: check the QC picture and the tissue HU windows "
            "(calibration.phantomless.<tissue>_hu), or use calibration.method: fixed"
        )
    if not r2 >= spec.fail_r2:
        raise GateRefusal(
            f"{context}: phantomless calibration R² = {r2:.3f} is below "
            f"calibration.phantomless.fail_r2 = {spec.fail_r2} (tissues, median HU -> "
            f"mg/cm³: {fit}); check the reference densities "
            "(calibration.phantomless.reference_mg_cm3), the tissue HU windows and the QC "
            "picture, drop the outlying tissue from calibration.phantomless.tissues, or use "
            "calibration.method: fixed"
        )
    if r2 < spec.warn_r2:
        warnings.warn(f"{context}: phantomless calibration R² = {r2:.4f} < {spec.warn_r2} "
                      f"({fit})", stacklevel=2)
    for t in used:
        t["calibrated_mg_cm3"] = intercept + slope * t["median_hu"]
    # A tissue's HU scattering by tissue_sd_hu scatters its point along the line by slope x
    # that in density (first order).
    cov, dof = line_covariance([t["median_hu"] for t in used],
                               [t["reference_mg_cm3"] for t in used],
                               known_sd=slope * spec.tissue_sd_hu)
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantomless",
                       tissues=tissues, coefficients={"model": "tissue_regression"},
                       **uncertainty_keys(cov, dof, len(used), "tissues", _scatter_note(spec)))


def _scatter_note(spec: TissueSpec) -> str:
    return (f"a tissue scatter of {spec.tissue_sd_hu:g} HU "
            "(calibration.phantomless.tissue_sd_hu) or the residual's, if larger")


def _material(tissue: str) -> str:
    return AIR if tissue == "air" else tissue


def fit_effective_energy(names: list[str], measured_hu, energies_kev) -> dict:
    """The energy at which the tissues' measured HU fit their theoretical HU best.

    Three or more tissues: for every energy the least-squares line ``measured = a + b HU_t``
    and its residual sum of squares; the energy of the smallest one (largest R², as measured
    HU is the dependent variable its total sum of squares does not depend on E). Two
    tissues: ``a = 0, b = 1`` (the scanner's HU scale taken as exact) and the least-squares
    energy of ``measured = HU_t(E)``. Returns energy_kev, a, b, r2, mode, and per energy
    the RMS residual (HU)."""
    m = np.asarray(measured_hu, float)
    e = np.asarray(energies_kev, float)
    T = np.stack([np.atleast_1d(theoretical_hu(_material(n), e)) for n in names])  # (n, nE)
    if len(names) >= 3:
        tm = T.mean(axis=0)
        dt = T - tm
        b = (dt * (m - m.mean())[:, None]).sum(axis=0) / (dt ** 2).sum(axis=0)
        a = m.mean() - b * tm
        mode = "line HU = a + b HU_t fitted (3 or more tissues)"
    else:
        a, b = np.zeros_like(e), np.ones_like(e)
        mode = "HU scale of the scanner taken as exact: a = 0, b = 1 (2 tissues)"
    ss = ((m[:, None] - (a + b * T)) ** 2).sum(axis=0)
    j = int(np.argmin(ss))
    ss_tot = float(((m - m.mean()) ** 2).sum())
    return {"energy_kev": float(e[j]), "a": float(a[j]), "b": float(b[j]),
            "r2": 1.0 - float(ss[j]) / ss_tot if ss_tot > 0 else float("nan"), "mode": mode,
            "theoretical_hu": T[:, j].tolist(),
            "rms_residual_hu": np.sqrt(ss / len(m)).tolist(), "at_edge": j in (0, len(e) - 1)}


# Long on purpose: the effective-energy method of the module doc, step by step.
def effective_energy_calibration(tissues: list[dict], spec: TissueSpec,
                                 context: str = "", energy: dict | None = None) -> Calibration:
    """Effective-energy internal calibration (Michalski 2020; module docstring) from the
    tissues measured by :func:`find_tissues`. Blood is fitted only when it is not
    contrast-enhanced at the energy found without it (with fewer than 2 other tissues, at the
    energy found with it).

    ``energy`` (a follow-up's baseline energy, ``TissueSpec.energy_from``): ``energy_kev``
    and ``from`` (what it is, for the record). The line is then drawn at that energy, with
    ``a`` and ``b`` fitted to these tissues (two tissues: ``a = 0``, ``b = 1``); the energy
    these tissues alone give is recorded as ``own_energy_kev``."""
    import xraydb

    lo, hi = spec.energy_range_kev
    energies = np.arange(lo, hi + spec.energy_step_kev / 2, spec.energy_step_kev)
    for t in tissues:
        t["used"], t["note"] = t["found"], None if t["found"] else "not found"
        t.pop("reference_mg_cm3", None)  # tissue_regression only

    def fit(ts):
        names, hu = [t["name"] for t in ts], [t["median_hu"] for t in ts]
        res = fit_effective_energy(names, hu, energies)
        if energy is None:
            return res
        at = fit_effective_energy(names, hu, [float(energy["energy_kev"])])
        # the search's curve and minimum stay in the record (the picture shows both)
        return {**at, "rms_residual_hu": res["rms_residual_hu"], "at_edge": False,
                "own_energy_kev": res["energy_kev"]}

    used = [t for t in tissues if t["used"]]
    others = [t for t in used if t["name"] != "blood"]
    blood = [t for t in used if t["name"] == "blood"]
    if len(used) < 2:
        _too_few(context, spec, tissues, used)
    res = fit(others if len(others) >= 2 else used)
    for t in blood:
        _mark_contrast(t, float(theoretical_hu("blood", res["energy_kev"])),
                       spec.contrast_margin_hu, f"at {res['energy_kev']:g} keV")
    used = [t for t in tissues if t["used"]]
    if len(used) < 2:
        _too_few(context, spec, tissues, used)
    if blood and blood[0]["used"] and len(others) >= 2:
        res = fit(used)
    E, a, b, r2 = res["energy_kev"], res["a"], res["b"], res["r2"]
    fit_txt = ", ".join(f"{t['name']} {t['median_hu']:.0f} HU (theory {ht:.0f})"
                        for t, ht in zip(used, res["theoretical_hu"], strict=True))
    if not b > 0:
        raise GateRefusal(
            f"{context}: effective-energy calibration: measured HU fall as theoretical HU rise "
            f"(b = {b:.3f} at {E:g} keV; {fit_txt}); a tissue was found in the wrong place: "
            "check the QC picture and the tissue HU windows "
            "(calibration.phantomless.<tissue>_hu)")
    if len(used) >= 3 and not r2 >= spec.fail_r2:
        raise GateRefusal(
            f"{context}: effective-energy calibration R² = {r2:.3f} at {E:g} keV is below "
            f"calibration.phantomless.fail_r2 = {spec.fail_r2} ({fit_txt}); check the QC "
            "picture and the tissue HU windows, drop the outlying tissue from "
            "calibration.phantomless.tissues, or use calibration.method: fixed")
    if len(used) >= 3 and r2 < spec.warn_r2:
        warnings.warn(f"{context}: effective-energy calibration R² = {r2:.4f} < "
                      f"{spec.warn_r2} ({fit_txt})", stacklevel=2)
    if res["at_edge"]:
        warnings.warn(f"{context}: effective energy {E:g} keV is at the edge of "
                      f"calibration.phantomless.energy_range_kev {spec.energy_range_kev} "
                      f"({fit_txt}): the fit may want an energy outside it", stacklevel=2)
    if len(used) == 2:
        warnings.warn(f"{context}: effective energy {E:g} keV "
                      + (f"from {energy['from']}, " if energy else "")
                      + f"2 tissues only ({fit_txt}); the scanner's HU scale is taken as exact",
                      stacklevel=2)
    k = float(k2hpo4_hu_per_mg(E, spec.water_displacement))
    slope, intercept = 1.0 / (b * k), -a / (b * k)
    for t, ht in zip(used, res["theoretical_hu"], strict=True):
        t["theoretical_hu"] = ht
        t["residual_hu"] = t["median_hu"] - (a + b * ht)
        t["calibrated_mg_cm3"] = intercept + slope * t["median_hu"]
    for t in tissues:
        if t["found"] and not t["used"] and t["name"] in ("blood", "cortical_bone"):
            t["theoretical_hu"] = float(theoretical_hu(t["name"], E))
    mats = ["water", AIR, "k2hpo4", "triglyceride", *TISSUES]
    info = {
        "energy_kev": E,
        "energy_from": energy["from"] if energy else "this scan",
        "own_energy_kev": res.get("own_energy_kev", E),
        "energy_range_kev": spec.energy_range_kev, "energy_step_kev": spec.energy_step_kev,
        "fit": {"a": a, "b": b, "r2": r2, "mode": res["mode"], "n_tissues": len(used),
                "model": "median HU = a + b * theoretical HU at E"},
        "energies_kev": energies.tolist(), "rms_residual_hu": res["rms_residual_hu"],
        "k2hpo4_hu_per_mg_cm3": k, "water_displacement": spec.water_displacement,
        "k2hpo4_model": "mu = mu_water + rho_K2HPO4 ((mu/rho)_K2HPO4 - d (mu/rho)_water); "
                        "density = (HU - a) / (b k), k = HU per mg/cm³ at E",
        "mass_attenuation_cm2_g": {("air" if m == AIR else m): float(mass_attenuation(m, E))
                                   for m in mats},
        "tissue_composition": TISSUE_SOURCES,
        "attenuation_data": f"xraydb {xraydb.__version__} (Elam tables, total incl. coherent)",
    }
    cov = _effective_energy_covariance(used, res, spec.water_displacement, spec.tissue_sd_hu)
    return Calibration(slope=slope, intercept=intercept, r2=r2, method="phantomless",
                       tissues=tissues, coefficients={"model": "effective_energy"},
                       effective_energy=info,
                       **uncertainty_keys(cov, None, len(used),
                                      f"tissues ({3 if len(used) >= 3 else 1} fitted "
                                      "parameters)", _scatter_note(spec)))


def _effective_energy_covariance(used: list[dict], res: dict, displacement: float,
                                 tissue_sd_hu: float) -> np.ndarray:
    """Covariance of (intercept, slope) of the effective-energy line. Three or more tissues:
    the fit ``HU_i = a + b HU_t,i(E)`` has three parameters (a, b, E), two tissues one (E;
    a = 0, b = 1); their covariance s² (JᵀJ)⁻¹ (Gauss-Newton) with s² the square of
    ``tissue_sd_hu``, or the residual variance (on n − 3 degrees of freedom) when larger, is
    carried to ``slope = 1 / (b k(E))``, ``intercept = -a / (b k(E))`` to first order."""
    n = len(used)
    names = [t["name"] for t in used]
    m = np.array([t["median_hu"] for t in used])
    E, a, b = res["energy_kev"], res["a"], res["b"]
    h = 0.25

    def T(e):
        return np.array([float(theoretical_hu(_material(nm), e)) for nm in names])

    t0, dT = T(E), (T(E + h) - T(E - h)) / (2 * h)
    s2 = tissue_sd_hu ** 2
    if n >= 4:
        s2 = max(s2, float(((m - (a + b * t0)) ** 2).sum()) / (n - 3))
    free = [0, 1, 2] if n >= 3 else [2]  # fitted among (a, b, E)
    J = np.stack([np.ones(n), t0, b * dT], axis=1)[:, free]
    cov_abe = np.zeros((3, 3))
    cov_abe[np.ix_(free, free)] = s2 * np.linalg.pinv(J.T @ J)

    def line(p):
        k = float(k2hpo4_hu_per_mg(p[2], displacement))
        return np.array([-p[0] / (p[1] * k), 1.0 / (p[1] * k)])

    p0 = np.array([a, b, E])
    steps = np.array([1e-3, 1e-6, h])
    G = np.stack([(line(p0 + dp) - line(p0 - dp)) / (2 * dp[i])
                  for i, dp in enumerate(np.diag(steps))], axis=1)
    return G @ cov_abe @ G.T


def tissue_densities(cal: Calibration, tissues: list[dict]) -> list[dict]:
    """``tissues`` (from :func:`find_tissues`) with each found tissue's density under ``cal``
    (``calibrated_mg_cm3``): from phantom scans, the data to derive reference densities."""
    out = []
    for t in tissues:
        t = dict(t)
        if t["found"]:
            t["calibrated_mg_cm3"] = cal.intercept + cal.slope * t["median_hu"]
        out.append(t)
    return out
