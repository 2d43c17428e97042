"""Finding the rods of a calibration phantom in a clinical CT (docs/calibration.md, "Finding
the rods").

A QCT phantom lies under the patient, often on a gel pad that joins it to the patient's
back without an air gap, with the table below it. Its rods run along the table axis: in
the scan averaged along z they are disks of the configured diameter, each of nearly one
HU, set in the phantom's body, in a row. The finder looks for exactly that, without
asking the phantom to be a separate object:

1. **Disk contrast.** For every pixel of the z-averaged image, the mean over a core disk
   (``core_fraction`` of the rod radius) minus the mean over the solid part (above -500 HU)
   of a ring just outside the rod (0.65 to 0.9 rod diameters from the centre), so that a
   rod near the edge of a thin phantom body is measured against the body, not the air
   beside it: a rod's centre is a local extremum (either sign) of this contrast of at
   least ``min_contrast_hu``, with a core more uniform than a third of its contrast (a
   core astride an edge is not).
2. **Size.** Around each extremum the image is cut halfway between core and ring; the
   piece holding the centre must have the rod's area (0.5 to 1.6 times) and stay within
   1.2 rod diameters: larger round structures (the aorta, a kidney) and edges fail. Its
   centroid is the rod's centre.
3. **Along z** (:func:`_along_z`). A rod is a disk on at least 3 slices whose core mean
   varies along z no more than its noise allows; anatomy that looks like a disk in the
   average (a vessel, a loop of bowel) varies by tens of HU and is not a rod. A phantom
   shorter than the scan is found on the slices it is on: the scan is averaged again over
   them, so that its low-contrast rods show too.
4. **Row.** Of the rods outside the labelled anatomy (any nonzero label), the phantom's
   are ``n`` (its number of rods) on one straight line (within a quarter of a rod
   diameter), at least one diameter apart, joined by solid material (no air along the
   row: one phantom body) and spanning the same slices. When several rows qualify, the one
   whose rods fit the phantom definition best (largest R² of the calibration line) is
   taken.

Each rod's HU is the mean over its core on the phantom's slices (a 3-D mean). Rods are
matched to the definition by HU order (:func:`assign_rod_densities`).
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from qctfea.errors import GateRefusal, QctfeaError

#: ring around a rod centre whose mean is the rod's surroundings (in rod diameters)
RING_FROM, RING_TO = 0.65, 0.9
#: the piece cut around a candidate must have this fraction of the rod's area
AREA_RANGE = (0.5, 1.6)
#: candidates on one row: within this many rod diameters of the line
ROW_TOLERANCE = 0.25
#: a core less uniform than this fraction of its contrast straddles an edge
CORE_SD_FRACTION = 1.0 / 3.0
#: rod diameters tried when the phantom's is not configured (mm; 1.25x apart)
ROD_SEARCH_MM = (5.0, 6.25, 7.8, 9.8, 12.2, 15.3, 19.1, 23.8, 29.8)
#: mean HU below which a pixel of the z-averaged image is air (not phantom material)
AIR_HU = -500.0
#: a rod is on a slice where its contrast there is at least this fraction of its mean one
PRESENT_FRACTION = 0.5
#: along-z variation of a rod's core mean allowed beyond its noise (HU): the beam
#: hardening of a patient whose width changes along the scan
Z_TOLERANCE_HU = 5.0


def _disk(radius_px_xy: tuple[float, float], inner_px_xy: tuple[float, float] | None = None
          ) -> np.ndarray:
    """Normalised disk (or annulus) kernel on a pixel grid of spacing ratio rx : ry."""
    rx, ry = radius_px_xy
    hx, hy = int(np.ceil(rx)), int(np.ceil(ry))
    yy, xx = np.mgrid[-hy:hy + 1, -hx:hx + 1]
    k = (xx / rx) ** 2 + (yy / ry) ** 2 <= 1.0
    if inner_px_xy is not None:
        k &= (xx / inner_px_xy[0]) ** 2 + (yy / inner_px_xy[1]) ** 2 > 1.0
    return k / k.sum()


def _candidates(mean2d: np.ndarray, sx: float, sy: float, d: float, spec,
                exclude2d: np.ndarray) -> list[dict]:
    """Rod-like disks of the z-averaged image: centre (pixel x, y) and area."""
    r_core = spec.core_fraction * d / 2
    core_k = _disk((r_core / sx, r_core / sy))
    ring_k = _disk((RING_TO * d / sx, RING_TO * d / sy), (RING_FROM * d / sx, RING_FROM * d / sy))
    img = mean2d.astype(np.float64)
    core = fftconvolve(img, core_k, mode="same")
    core_sd = np.sqrt(np.maximum(fftconvolve(img ** 2, core_k, mode="same") - core ** 2, 0.0))
    # the ring's mean over solid material only: a rod near the edge of a thin phantom body
    # keeps its contrast against the body, not against the air beside it (a ring mostly in
    # air, e.g. a tube phantom in air, keeps the plain mean)
    solid = (img > AIR_HU).astype(np.float64)
    ring_all = fftconvolve(img, ring_k, mode="same")
    solid_w = fftconvolve(solid, ring_k, mode="same")
    ring_solid = fftconvolve(img * solid, ring_k, mode="same") / np.maximum(solid_w, 1e-9)
    contrast = core - np.where(solid_w >= 0.25, ring_solid, ring_all)
    size = (max(3, int(round(d / sx))) | 1, max(3, int(round(d / sy))) | 1)
    # maxima of the contrast (rods brighter than their surroundings) and minima (darker),
    # each sign on its own: a dark gap between two bright rods does not hide either; rounded
    # to 1e-3 HU so that a uniform rod's plateau is one level despite the FFT's round-off
    c = np.round(contrast, 3)
    extremum = (((c == ndimage.maximum_filter(c, size=size[::-1])) & (c >= spec.min_contrast_hu))
                | ((c == ndimage.minimum_filter(c, size=size[::-1]))
                   & (c <= -spec.min_contrast_hu)))
    peaks = extremum & (core_sd <= CORE_SD_FRACTION * np.abs(contrast)) & ~exclude2d
    expected = np.pi * (d / 2) ** 2 / (sx * sy)
    hx, hy = int(np.ceil(1.2 * d / sx)), int(np.ceil(1.2 * d / sy))
    found: list[dict] = []
    for y, x in zip(*np.nonzero(peaks), strict=True):
        y0, x0 = max(y - hy, 0), max(x - hx, 0)
        win = img[y0:y + hy + 1, x0:x + hx + 1]
        level = core[y, x] - contrast[y, x] / 2  # halfway between core and ring
        inside = win > level if contrast[y, x] > 0 else win < level
        lab, _ = ndimage.label(inside)
        piece = lab == lab[y - y0, x - x0]
        area = int(piece.sum())
        edge = piece[0].any() or piece[-1].any() or piece[:, 0].any() or piece[:, -1].any()
        if edge or not AREA_RANGE[0] * expected <= area <= AREA_RANGE[1] * expected:
            continue
        cy, cx = ndimage.center_of_mass(piece)
        centre = (float(cx + x0), float(cy + y0))
        if any(np.hypot((centre[0] - f["center_px"][0]) * sx,
                        (centre[1] - f["center_px"][1]) * sy) < d / 2 for f in found):
            continue
        found.append({"center_px": list(centre), "area_px": area,
                      "contrast_hu": float(contrast[y, x])})
    return found


def _distance2(shape_yx, centre_px, sx: float, sy: float) -> np.ndarray:
    """Squared distance (mm²) of every pixel of a slice from a rod centre (pixel x, y)."""
    yy, xx = np.indices(shape_yx)
    return ((xx - centre_px[0]) * sx) ** 2 + ((yy - centre_px[1]) * sy) ** 2


def _masks(shape_yx, centre_px, sx: float, sy: float, d: float, core_fraction: float,
           mean2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rod's core disk and its ring's solid part (the whole ring when mostly air)."""
    r2 = _distance2(shape_yx, centre_px, sx, sy)
    core = r2 <= (core_fraction * d / 2) ** 2
    ring = (r2 > (RING_FROM * d) ** 2) & (r2 <= (RING_TO * d) ** 2)
    solid = ring & (mean2d > AIR_HU)
    return core, (solid if solid.sum() >= 0.25 * ring.sum() else ring)


def _along_z(hu_zyx: np.ndarray, cand: dict, sx: float, sy: float, d: float, spec,
             mean2d: np.ndarray) -> None:
    """Where along z a candidate is a rod, and whether it is one: its slices (contrast of
    the same sign and at least ``PRESENT_FRACTION`` of the mean contrast: a phantom shorter
    than the scan), at least 3 of them (all of a shorter scan), over which its core
    mean varies by no more than its noise allows (3 x the within-core SD / sqrt(core
    pixels)) plus ``Z_TOLERANCE_HU``. Anatomy seen as a disk in the average (a vessel, a
    loop of bowel) changes along z by tens of HU. Sets ``slices`` (bool per slice),
    ``z_sd_hu``, ``z_limit_hu`` and ``rod`` (all checks passed) in ``cand``."""
    core, ring = _masks(mean2d.shape, cand["center_px"], sx, sy, d, spec.core_fraction, mean2d)
    c_vals = hu_zyx[:, core].astype(np.float64)
    p = c_vals.mean(axis=1)
    q = hu_zyx[:, ring].mean(axis=1, dtype=np.float64)
    sign = np.sign(cand["contrast_hu"])
    present = sign * (p - q) >= PRESENT_FRACTION * abs(cand["contrast_hu"])
    enough = present.sum() >= min(3, len(p))
    noise = float(np.median(c_vals[present].std(axis=1))) / np.sqrt(core.sum()) if enough else 0
    z_sd = float(p[present].std()) if enough else float("nan")
    limit = 3.0 * noise + Z_TOLERANCE_HU
    cand.update(slices=present, z_sd_hu=z_sd, z_limit_hu=limit,
                rod=bool(enough and z_sd <= limit))


def _solid_between(mean2d: np.ndarray, a, b) -> bool:
    """No air along the straight segment between two pixel positions (one phantom body)."""
    n = int(np.ceil(2 * np.hypot(b[0] - a[0], b[1] - a[1]))) + 2
    xs, ys = np.linspace(a[0], b[0], n), np.linspace(a[1], b[1], n)
    vals = ndimage.map_coordinates(mean2d, [ys, xs], order=1, mode="nearest")
    return bool((vals > AIR_HU).all())


def _rows(cands: list[dict], n: int, sx: float, sy: float, d: float, mean2d) -> list[list[int]]:
    """Sets of exactly ``n`` candidates on one straight line, a diameter apart, in one body."""
    pts = np.array([[c["center_px"][0] * sx, c["center_px"][1] * sy] for c in cands])
    rows: set[tuple[int, ...]] = set()
    for i, j in combinations(range(len(pts)), 2):
        u = pts[j] - pts[i]
        u /= np.linalg.norm(u)
        off = pts - pts[i]
        dist = np.abs(off[:, 0] * u[1] - off[:, 1] * u[0])
        members = np.nonzero(dist <= ROW_TOLERANCE * d)[0]
        if len(members) != n:
            continue
        along = off[members] @ u
        order = members[np.argsort(along)]
        if np.diff(np.sort(along)).min() < d:
            continue
        if not all(_solid_between(mean2d, cands[a]["center_px"], cands[b]["center_px"])
                   for a, b in zip(order[:-1], order[1:], strict=True)):
            continue
        # one phantom: its rods span the same slices
        common = np.logical_and.reduce([cands[k]["slices"] for k in order])
        if all(common.sum() >= 0.9 * cands[k]["slices"].sum() for k in order):
            rows.add(tuple(int(k) for k in order))
    return [list(r) for r in sorted(rows)]


def measure_rod(hu_zyx: np.ndarray, sx: float, sy: float, centre_px, d: float, spec,
                slices: np.ndarray | None = None) -> dict:
    """Mean and SD of the HU over the core (``core_fraction`` of the radius) of a rod of
    diameter ``d`` (mm) on every slice (or on ``slices``, a bool per slice: the
    phantom's), at ``centre_px`` (pixel x, y)."""
    cx, cy = centre_px
    core = _distance2(hu_zyx.shape[1:], centre_px, sx, sy) <= (spec.core_fraction * d / 2) ** 2
    if not core.any():
        raise QctfeaError(f"a rod centre ({cx:.0f}, {cy:.0f} px) lies outside the image")
    vals = hu_zyx[:, core] if slices is None else hu_zyx[:, core][slices]
    return {"center_px": [float(cx), float(cy)], "area_px": int(core.sum()),
            "mean_hu": float(vals.mean()), "sd_hu": float(vals.std()),
            "n_slices": int(hu_zyx.shape[0] if slices is None else slices.sum()),
            "diameter_mm": float(d)}


def _search(hu_zyx: np.ndarray, mean2d: np.ndarray, sx: float, sy: float, d: float, spec,
            exclude2d: np.ndarray) -> tuple[list[dict], list[dict], list[list[int]]]:
    """Disks, rods and rows of rods of diameter ``d`` (steps 1-4 of the module docstring);
    ``mean2d`` is the scan averaged along z."""
    disks = _candidates(mean2d, sx, sy, d, spec, exclude2d)
    for c in disks:
        _along_z(hu_zyx, c, sx, sy, d, spec, mean2d)
    # A phantom shorter than the scan: its rods' contrast is diluted in the average over
    # every slice. Averaged again over the slices where most rods found are, the rods of
    # low contrast show too.
    found = [c["slices"] for c in disks if c["rod"]]
    if found:
        on = np.mean(found, axis=0) >= 0.5
        if 0 < on.sum() < len(on):
            mean2d = np.zeros(mean2d.shape)
            for k in np.nonzero(on)[0]:  # slice by slice: no copy of the scan
                mean2d += hu_zyx[k]
            mean2d /= on.sum()
            disks = _candidates(mean2d, sx, sy, d, spec, exclude2d)
            for c in disks:
                _along_z(hu_zyx, c, sx, sy, d, spec, mean2d)
    cands = [c for c in disks if c["rod"]]
    n = len(spec.rod_densities_mg_cm3)
    return disks, cands, (_rows(cands, n, sx, sy, d, mean2d) if len(cands) >= n else [])


def _disk_text(disks: list[dict], sx: float, sy: float) -> str:
    """The disks seen (once each, however many diameters saw them), for an error."""
    shown: list[dict] = []
    for c in disks:
        if len(shown) < 12 and all(np.hypot((c["center_px"][0] - o["center_px"][0]) * sx,
                                            (c["center_px"][1] - o["center_px"][1]) * sy) > 2
                                   for o in shown):
            shown.append(c)
    return "; ".join(
        f"({c['center_px'][0] * sx:.0f}, {c['center_px'][1] * sy:.0f}) mm from the image "
        f"corner, {c['contrast_hu']:+.0f} HU"
        + ("" if c["rod"] else f", not a rod along z (core mean varies by "
                               f"{c['z_sd_hu']:.0f} HU over {int(c['slices'].sum())} slices)")
        for c in shown) or "none"


def find_rods(hu_zyx: np.ndarray, spacing_xyz, anatomy_zyx: np.ndarray | None, spec,
              context: str, fit_r2: Callable[[list[dict]], float]) -> list[dict]:
    """The phantom's rods (module docstring), each with its centre (pixel x, y), diameter,
    core area, mean and SD HU, slices and, from :func:`assign_rod_densities`, its density.
    No rod lies on ``anatomy_zyx`` (the label map's structures); ``fit_r2`` scores a row
    of rods with their densities assigned (the calibration's R²).

    Without ``spec.rod_diameter_mm`` the rods are searched at every diameter of
    :data:`ROD_SEARCH_MM` (steps 1.25x apart: the size cut's 0.5-1.6x area range overlaps
    them); the row that fits best gives the diameter, measured as the mean diameter of its
    rods' cut pieces (the disk of their area), at which the rods are then measured."""
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    n = len(spec.rod_densities_mg_cm3)
    exclude2d = (np.zeros(hu_zyx.shape[1:], bool) if anatomy_zyx is None
                 else np.asarray(anatomy_zyx).any(axis=0))
    mean2d = hu_zyx.mean(axis=0, dtype=np.float64)  # once for every trial diameter
    given = spec.rod_diameter_mm is not None
    best, seen = None, []
    for d in ([float(spec.rod_diameter_mm)] if given else ROD_SEARCH_MM):
        disks, cands, rows = _search(hu_zyx, mean2d, sx, sy, d, spec, exclude2d)
        seen += disks
        for row in rows:
            common = np.logical_and.reduce([cands[k]["slices"] for k in row])
            dm = d if given else float(np.mean(
                [2 * np.sqrt(cands[k]["area_px"] * sx * sy / np.pi) for k in row]))
            rods = [measure_rod(hu_zyx, sx, sy, cands[k]["center_px"], dm, spec, common)
                    for k in row]
            assign_rod_densities(rods, spec)
            r2 = fit_r2(rods)
            if best is None or r2 > best[0]:
                best = (r2, rods)
    if best is None:
        size = (f"{spec.rod_diameter_mm:g} mm" if given else
                f"any diameter from {ROD_SEARCH_MM[0]:g} to {ROD_SEARCH_MM[-1]:g} mm")
        raise GateRefusal(
            f"{context}: no calibration phantom found: no row of {n} rods of {size} "
            f"(rod-like disks of at least {spec.min_contrast_hu:g} HU contrast: "
            f"{_disk_text(seen, sx, sy)}); "
            "check calibration.phantom (rod_diameter_mm, the number of rods, "
            "min_contrast_hu) or give the rods' positions as calibration.phantom."
            "rod_centres_mm; for a scan without a phantom set calibration.method: "
            "phantomless, or calibration.method: fixed with calibration.slope and "
            "calibration.intercept")
    return best[1]


#: half-width of the band along the rods' row that holds the phantom (in rod diameters)
BAND_HALF_WIDTH = 2.5


def phantom_band(shape_yx: tuple[int, int], rods: list[dict], spacing_xyz) -> np.ndarray:
    """The phantom's place in an axial slice: pixels within ``BAND_HALF_WIDTH`` rod diameters
    of the straight line through the rods' centres (across the whole image: the phantom body
    reaches beyond its outer rods). Never sampled as a reference tissue: a phantom body's
    HU can be a tissue's (polyethylene reads like fat)."""
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    p = np.array([[r["center_px"][0] * sx, r["center_px"][1] * sy] for r in rods])
    c = p.mean(axis=0)
    u = np.linalg.svd(p - c)[2][0]  # the row's direction
    yy, xx = np.indices(shape_yx)
    dist = np.abs((xx * sx - c[0]) * u[1] - (yy * sy - c[1]) * u[0])
    return dist <= BAND_HALF_WIDTH * max(r["diameter_mm"] for r in rods)


def assign_rod_densities(rods: list[dict], spec) -> None:
    """Match found rods to the phantom definition by HU order: K2HPO4 density alone, or for
    a K2HPO4-in-water phantom the expected HU water + 1.5 x K2HPO4 (a typical sigma_ref)."""
    water = spec.water_equivalent_mg_cm3 or [0.0] * len(spec.rod_densities_mg_cm3)
    defs = sorted(zip(spec.rod_densities_mg_cm3, water, strict=True),
                  key=lambda d: d[1] + 1.5 * d[0] if spec.water_equivalent_mg_cm3 else d[0])
    rods.sort(key=lambda r: r["mean_hu"])
    for r, (rho, w) in zip(rods, defs, strict=True):
        r["density_mg_cm3"] = float(rho)
        if spec.water_equivalent_mg_cm3:
            r["water_mg_cm3"] = float(w)


def rods_at(hu_zyx: np.ndarray, spacing_xyz, centres_px, spec) -> list[dict]:
    """Rods measured at given centres (pixel x, y), densities in the definition's order."""
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    rods = []
    for (cx, cy), rho, w in zip(centres_px, spec.rod_densities_mg_cm3,
                                spec.water_equivalent_mg_cm3 or [None] * len(centres_px),
                                strict=True):
        try:
            rod = measure_rod(hu_zyx, sx, sy, (cx, cy), float(spec.rod_diameter_mm), spec)
        except QctfeaError as exc:
            raise QctfeaError(f"calibration.phantom.rod_centres_mm: {exc}") from None
        rod.update({"density_mg_cm3": float(rho), "given": True})
        if w is not None:
            rod["water_mg_cm3"] = float(w)
        rods.append(rod)
    return rods
