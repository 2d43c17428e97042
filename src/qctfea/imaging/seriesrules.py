"""Choosing one series among several in a folder (``ingest.series_rule``): a summary per
series, its description for messages, and the rules (:mod:`qctfea.imaging.dicomio`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qctfea.errors import QctfeaError
from qctfea.imaging.dicomslices import DUPLICATE_TOL_MM, Slice, opt_float, opt_str

if TYPE_CHECKING:  # dicomio imports this module
    from qctfea.imaging.dicomio import IngestParams


#: Series whose slice spacings differ by at most this (mm) are equally thin.
SPACING_TIE_MM = 1e-3


@dataclass
class _SeriesSummary:
    """What the series rule and the 'choose a series' listing need of one series."""

    uid: str
    slices: list[Slice]
    description: str | None
    kernel: str | None
    thickness: float | None
    orientation: str  # axial, sagittal, coronal, oblique or unknown
    tilt_deg: float | None  # angle between the slice normal and the patient z axis
    spacing: float | None  # mm
    spacing_from: str  # "positions", "SliceThickness" or "unknown"
    n_positions: int

    @property
    def axial(self) -> bool:
        return self.orientation == "axial"


def _summarize(uid: str, slices: list[Slice], axial_tolerance_deg: float) -> _SeriesSummary:
    """Orientation, slice spacing and kernel of a series, from its headers only."""
    ds0 = slices[0].ds
    thickness = opt_float(ds0, "SliceThickness")
    normal = np.cross(slices[0].orientation[:3], slices[0].orientation[3:])
    norm = float(np.linalg.norm(normal))
    orientation, tilt, spacing, spacing_from, n_positions = "unknown", None, None, "unknown", 0
    if norm > 0.5:  # else the orientation header is garbage: described as unknown
        normal = normal / norm
        angles = np.degrees(np.arccos(np.clip(np.abs(normal), 0.0, 1.0)))  # to x, y, z
        tilt = float(angles[2])
        if tilt <= axial_tolerance_deg:
            orientation = "axial"
        elif angles[0] <= axial_tolerance_deg:
            orientation = "sagittal"
        elif angles[1] <= axial_tolerance_deg:
            orientation = "coronal"
        else:
            orientation = "oblique"
        proj = np.sort([float(sl.position @ normal) for sl in slices])
        distinct = proj[np.concatenate([[True], np.diff(proj) > DUPLICATE_TOL_MM])]
        n_positions = len(distinct)
        if n_positions > 1:
            spacing, spacing_from = float(np.median(np.diff(distinct))), "positions"
    if spacing is None and thickness is not None and thickness > 0:
        spacing, spacing_from = thickness, "SliceThickness"
    return _SeriesSummary(uid, slices, opt_str(ds0, "SeriesDescription"),
                          opt_str(ds0, "ConvolutionKernel"), thickness, orientation, tilt,
                          spacing, spacing_from, n_positions)


def _mm(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.4g} mm"


def _describe_series(summary: _SeriesSummary) -> str:
    """One line per candidate series for the 'choose a series' errors: no patient data."""
    orient = summary.orientation
    if summary.tilt_deg is not None and orient != "axial":
        orient += f" ({summary.tilt_deg:.0f} deg from z)"
    spacing = _mm(summary.spacing)
    if summary.spacing_from == "SliceThickness":
        spacing += " (from SliceThickness)"
    return (
        f"  series_uid={summary.uid or '(missing)'}"
        f"  description={summary.description or '(no description)'!r}"
        f"  orientation={orient}  slice_spacing={spacing}"
        f"  kernel={summary.kernel or '(none)'!r}"
        f"  slice_thickness={_mm(summary.thickness)}  slices={len(summary.slices)}"
    )


def _kernel_rank(kernel: str | None, preference: list[str]) -> tuple[int, str | None]:
    """Index of the earliest preference entry the kernel matches (len when none), and it."""
    if kernel:
        words = [w for w in re.split(r"[\\\s,/;_]+", kernel.lower()) if w]
        for i, entry in enumerate(preference):
            if any(w.startswith(entry.lower()) for w in words):
                return i, entry
    return len(preference), None


def _thinnest_axial(
    summaries: list[_SeriesSummary], params: IngestParams, where: str
) -> tuple[_SeriesSummary, str]:
    """Apply ``series_rule: thinnest_axial``; the chosen series and why, or refuse."""
    n_all = len(summaries)
    axial = [s for s in summaries if s.axial]
    if not axial:
        listing = "\n".join(_describe_series(s) for s in summaries)
        raise _listing_error(
            f"{where}: series_rule thinnest_axial: none of the {n_all} image series is axial "
            f"(slice normal within {params.axial_tolerance_deg:g} deg of the patient z axis)",
            listing, "set the series_uid column of the sample sheet to the one to analyse, or "
            "raise ingest.axial_tolerance_deg")
    def spacing(s: _SeriesSummary) -> float:
        return s.spacing if s.spacing is not None else math.inf

    thin = min(spacing(s) for s in axial)
    keep = [s for s in axial if spacing(s) == thin or spacing(s) - thin <= SPACING_TIE_MM]
    ranks = {id(s): _kernel_rank(s.kernel, params.kernel_preference) for s in keep}
    best_rank = min(r for r, _ in ranks.values())
    keep = [s for s in keep if ranks[id(s)][0] == best_rank]
    most = max(s.n_positions for s in keep)
    keep = [s for s in keep if s.n_positions == most]
    if len(keep) > 1:
        listing = "\n".join(_describe_series(s) for s in keep)
        others = n_all - len(keep)
        raise _listing_error(
            f"{where}: series_rule thinnest_axial cannot choose between {len(keep)} series "
            f"that are axial with the same slice spacing ({_mm(None if thin == math.inf else thin)}"
            f", within {SPACING_TIE_MM:g} mm), equally preferred kernels and the same number "
            f"of slices ({most})" + (f"; {others} other series ranked lower" if others else ""),
            listing, "set the series_uid column of the sample sheet to the one to analyse (or "
            "move the other series out of the folder)")
    chosen = keep[0]
    _, entry = ranks[id(chosen)]
    kernel = chosen.kernel or "(none)"
    why = (f"kernel preference {entry!r}" if entry is not None
           else "kernel matches no kernel_preference entry")
    text = _mm(chosen.spacing)
    if chosen.spacing_from == "SliceThickness":
        text += " (SliceThickness)"
    return chosen, (
        f"thinnest_axial: {text}, kernel {kernel} ({why}), {chosen.n_positions} slices; "
        f"chosen from {n_all} series, {len(axial)} axial"
    )


def _listing_error(what: str, listing: str, todo: str) -> QctfeaError:
    """An error whose message lists the series (UID, description, geometry, kernel: what the
    user needs to choose), and whose record for the workflow's outputs (scan.json, the
    exclusions table, the report) says where that listing is instead: UIDs and free-text
    descriptions stay in the user's log."""
    return QctfeaError(f"{what}: {todo}. The series found:\n{listing}",
                       record=f"{what}: {todo}. The series found are listed in this step's "
                              "log (ingest_scan.log)")


def select_series(
    groups: dict[str, list[Slice]],
    series_uid: str | None,
    where: str,
    params: IngestParams,
) -> tuple[str, list[Slice], str]:
    """Pick the one series to read and say how, or explain which candidates exist."""
    summaries = [_summarize(uid, s, params.axial_tolerance_deg)
                 for uid, s in sorted(groups.items(), key=lambda kv: kv[0])]
    listing = "\n".join(_describe_series(s) for s in summaries)
    if series_uid is not None:
        if series_uid not in groups:
            raise _listing_error(
                f"{where}: no image series with series_uid={series_uid!r}", listing,
                "set the series_uid column of the sample sheet to one of the series found")
        return series_uid, groups[series_uid], "series_uid"
    if len(groups) == 1:
        uid, slices = next(iter(groups.items()))
        return uid, slices, "only series"
    if params.series_rule == "thinnest_axial":
        chosen, why = _thinnest_axial(summaries, params, where)
        return chosen.uid, chosen.slices, why
    raise _listing_error(
        f"{where}: the folder holds {len(groups)} image series and it is not clear which one "
        "to use", listing, "set the series_uid column of the sample sheet to the one to "
        "analyse, set ingest.series_rule (e.g. thinnest_axial) to choose by rule, or move the "
        "other series out of the folder")
