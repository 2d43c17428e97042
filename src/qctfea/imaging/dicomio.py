"""Ingest step: turn a CT scan into one Hounsfield-unit image with exact geometry.

The finite-element pipeline starts from a single 3-D image in Hounsfield units
(HU) whose physical coordinates are the scanner's patient coordinates (DICOM
LPS, millimetres), because screw trajectories, landmarks and the calibration
phantom are all located in that frame.  This module

* reads a folder of DICOM files (searched recursively) with pydicom, keeps the
  single-frame greyscale image objects with pixel data and geometry, groups
  them by series and, when the folder holds more than one series, takes the
  one named by ``series_uid`` or picked by the rule of :class:`IngestParams`
  (``series_rule: thinnest_axial``); otherwise it refuses to guess, listing
  every candidate series (UID, description, orientation, slice spacing,
  kernel, slice thickness, slice count) so the user can choose;
* orders the slices by their position along the slice normal (never by file
  name or InstanceNumber), drops exact duplicate slices, refuses a gantry tilt
  (shear), and refuses stacks with missing or irregularly spaced slices, or
  (``uneven_spacing: resample``) interpolates them linearly along the slice
  normal onto a uniform grid, with a warning;
* applies RescaleSlope/RescaleIntercept slice by slice to obtain HU as float32
  and builds a SimpleITK image whose index-to-physical mapping reproduces the
  DICOM position of every pixel;
* alternatively accepts an image file (.nii, .nii.gz, .nrrd, .mha, .mhd) that
  already holds HU;
* writes the image as NIfTI and a JSON record of the technical metadata plus
  provenance.

Bad files in the folder: a file that is not a usable image slice (not DICOM,
e.g. a stray ``notes.txt``; a DICOM object without pixel data, e.g. a report;
a multi-frame or colour image; no usable geometry) is skipped with one warning
that names the skipped files and why.  A *damaged* DICOM file (the Part 10
``DICM`` marker or an image SOP class, but the header or the pixel data cut
short, as left by an interrupted copy) is refused with an error naming it:
skipping it would silently drop a slice, so the file must be replaced or
removed.

Privacy: nothing identifying is ever written or logged.  :class:`ScanInfo`
holds technical fields only; the written image is rebuilt from the voxel array
so no header metadata is carried over; no UID (series, study, instance), file
name or source path reaches the outputs or the progress messages.  Only the
errors raised when the series to read cannot be chosen list SeriesInstanceUIDs
(with description, kernel and spacing), because the user needs them to choose;
errors and warnings about one file name that file, because the user must find
it.  How the series was chosen is recorded (``ScanInfo.selected_by``) with
spacing and kernel only, never the UID.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, provenance, write_json

log = logging.getLogger(__name__)

#: File suffixes read with SimpleITK as an image that already holds HU.
IMAGE_FILE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
#: Allowed deviation of any slice gap from the median gap, relative to the median.
SPACING_RTOL = 1e-3
#: Two slices closer than this (mm) are the same slice position.
DUPLICATE_TOL_MM = 1e-4
#: Largest difference between ImageOrientationPatient values within one series.
ORIENTATION_TOL = 1e-4
#: Largest departure of the direction cosines from unit length / orthogonality.
ORTHONORMAL_TOL = 1e-3
#: Largest in-plane offset between slices (gantry tilt), as a fraction of a pixel.
INPLANE_TOL_FRACTION = 0.05
# Elements larger than this are read only when used, so pixel data of series
# that are not selected are never loaded.
_DEFER_SIZE = 1024
#: SOP classes of single-frame images (CT, MR, secondary capture): such a file
#: without pixel data was cut short.
_IMAGE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
                      "1.2.840.10008.5.1.4.1.1.7")
#: Skip reason of a DICOM file whose header or pixel data is cut short: refused.
DAMAGED = "damaged or truncated DICOM"
#: Files named at most in the skipped-files warning and the damaged-files error.
_MAX_NAMED = 5
#: Values of :attr:`IngestParams.series_rule`.
SERIES_RULES = ("none", "thinnest_axial")
#: Values of :attr:`IngestParams.uneven_spacing`.
UNEVEN_SPACING_ACTIONS = ("refuse", "resample")
#: Series whose slice spacings differ by at most this (mm) are equally thin.
SPACING_TIE_MM = 1e-3
#: Default :attr:`IngestParams.kernel_preference`: bone / sharp reconstruction kernels
#: (GE BONE/BONEPLUS, Siemens B60/B70 and Br60, Philips D and YB, Canon/Toshiba FC30,
#: generic "sharp"), most preferred first.
DEFAULT_KERNEL_PREFERENCE = ("bone", "b60", "b70", "br60", "d", "yb", "fc30", "sharp")


@dataclass
class IngestParams:
    """Cohort config section ``ingest``: choosing the series and handling uneven slices.

    ``series_rule``
        ``"none"``: a folder with several image series is refused, listing them
        (give ``series_uid``).  ``"thinnest_axial"``: among the series, keep the
        axial ones (slice normal within ``axial_tolerance_deg`` of the patient z
        axis), then the smallest slice spacing (from the ImagePositionPatient
        projections on the normal; SliceThickness when the series has one
        position), then - among those within ``SPACING_TIE_MM`` - the kernel
        earliest in ``kernel_preference``, then the most slices; a tie after all
        that is refused, listing the tied series.  An explicit ``series_uid``
        always wins over the rule; a folder with one series is read as is.
    ``kernel_preference``
        Reconstruction kernels, most preferred first.  A bone (sharp) kernel is
        preferred because QCT finite-element studies reconstruct with one: it
        keeps the trabecular and cortical detail the density-to-modulus laws
        were calibrated on, where soft-tissue kernels blur it.  An entry matches
        a series when one word of its ConvolutionKernel (split at backslashes,
        spaces, commas, slashes, semicolons and underscores) starts with the
        entry, ignoring case: ``"b60"`` matches ``B60f``, ``"bone"`` matches
        ``BONEPLUS``, ``"d"`` matches Philips ``D`` but neither GE ``STANDARD``
        nor Siemens ``Br40d`` (a plain substring test would).  Series whose
        kernel matches no entry (or have none) rank last.
    ``uneven_spacing``
        ``"refuse"``: missing or irregularly spaced slices are an error naming
        the gaps.  ``"resample"``: the slices are interpolated linearly along
        the slice normal onto a uniform grid from the first to the last slice
        with the median gap as spacing (adjusted so the grid ends exactly on
        the last slice), with a warning naming the scan, the gaps found and the
        new spacing.
    """

    series_rule: str = "none"
    axial_tolerance_deg: float = 10.0
    kernel_preference: list[str] = field(
        default_factory=lambda: list(DEFAULT_KERNEL_PREFERENCE))
    uneven_spacing: str = "refuse"

    def __post_init__(self) -> None:
        if self.series_rule not in SERIES_RULES:
            raise ValueError(f"series_rule {self.series_rule!r} is not one of "
                             f"{list(SERIES_RULES)}")
        if self.uneven_spacing not in UNEVEN_SPACING_ACTIONS:
            raise ValueError(f"uneven_spacing {self.uneven_spacing!r} is not one of "
                             f"{list(UNEVEN_SPACING_ACTIONS)}")
        if not 0 <= self.axial_tolerance_deg < 90:
            raise ValueError(f"axial_tolerance_deg {self.axial_tolerance_deg!r} must be at "
                             "least 0 and below 90")
        if not all(isinstance(k, str) and k.strip() for k in self.kernel_preference):
            raise ValueError(f"kernel_preference {self.kernel_preference!r} must be a list of "
                             "non-empty strings")
        self.kernel_preference = [k.strip() for k in self.kernel_preference]


@dataclass
class ScanInfo:
    """Technical metadata of an ingested scan; never any patient identifier.

    ``n_files_read`` is the number of files that belong to the selected series
    (exact duplicates included); ``n_files_skipped`` every other file under the
    folder (not DICOM, no pixel data, unusable geometry, other series), so the
    two add up to the number of files found.  ``rescale_varies_per_slice`` is
    True when slope or intercept differ between slices; ``rescale_slope`` and
    ``rescale_intercept`` are then those of the first slice (each slice was
    still rescaled with its own values).  ``selected_by`` says how the series
    was chosen (``"only series"``, ``"series_uid"``, or the rule with the
    spacing and kernel that decided, e.g. ``"thinnest_axial: 1 mm, kernel
    B60f ..."``; ``"image file"`` for an image-file source).  ``resampled`` is
    True when uneven slices were interpolated onto a uniform grid;
    ``resample_note`` then says from which gaps to which spacing.
    """

    size: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    n_slices: int
    modality: str
    manufacturer: str | None
    kvp: float | None
    convolution_kernel: str | None
    slice_thickness_mm: float | None
    rescale_slope: float
    rescale_intercept: float
    series_description: str | None
    n_files_read: int
    n_files_skipped: int
    rescale_varies_per_slice: bool = False
    selected_by: str | None = None
    resampled: bool = False
    resample_note: str | None = None


@dataclass
class _Slice:
    """One usable single-frame image file and its parsed geometry."""

    path: Path
    ds: Dataset
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    rows: int
    columns: int
    instance: int | None


def _where(context: str, path: str | os.PathLike) -> str:
    """Prefix for error messages: the context (if any) and the input path."""
    return f"{context}: {path}" if context else str(path)


def _opt_str(ds: Dataset, keyword: str) -> str | None:
    """A header value as a stripped string; multi-valued joined by backslash."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(v).strip() for v in value)
    else:
        text = str(value).strip()
    return text or None


def _opt_float(ds: Dataset, keyword: str) -> float | None:
    """A numeric header value as float, None when absent, empty or invalid."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _rescale(ds: Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a slice (defaults 1 and 0)."""
    slope = _opt_float(ds, "RescaleSlope")
    intercept = _opt_float(ds, "RescaleIntercept")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _is_part10(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 marker ``DICM`` after its preamble."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _read_header(path: Path) -> tuple[_Slice | None, str]:
    """Read one file; return the usable slice or None and the reason it was skipped."""
    try:
        with warnings.catch_warnings():
            # pydicom's warnings about odd values may quote them (names, IDs).
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
    except Exception:  # unreadable: not DICOM, unless it says it is one
        return None, DAMAGED if _is_part10(path) else "not DICOM"
    try:
        if "PixelData" not in ds:
            # force=True "parses" any file; real DICOM objects carry a SOP Class UID.
            # An image object (or a Part 10 file) without it is cut short.
            meta = getattr(ds, "file_meta", None) or {}
            sop = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
            if sop in _IMAGE_SOP_CLASSES or "Rows" in ds or (not sop and _is_part10(path)):
                return None, DAMAGED
            return None, ("no pixel data" if sop else "not DICOM")
        frames = ds.get("NumberOfFrames")
        samples = ds.get("SamplesPerPixel")
        if (frames not in (None, "") and int(frames) > 1) or (
            samples not in (None, "") and int(samples) != 1
        ):
            return None, "multi-frame or colour image (not supported)"
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        spacing = [float(v) for v in ds.PixelSpacing]
        rows, columns = int(ds.Rows), int(ds.Columns)
    except Exception:  # missing or garbled geometry
        return None, "no usable image geometry"
    if (
        position.shape != (3,)
        or orientation.shape != (6,)
        or len(spacing) != 2
        or not (np.all(np.isfinite(position)) and np.all(np.isfinite(orientation)))
        or not all(np.isfinite(s) and s > 0 for s in spacing)
        or rows < 1
        or columns < 1
    ):
        return None, "no usable image geometry"
    try:
        instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") else None
    except (TypeError, ValueError):
        instance = None
    return (
        _Slice(path, ds, position, orientation, (spacing[0], spacing[1]), rows, columns, instance),
        "",
    )


def _list_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory``, recursively, in a stable order."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset read without file meta the transfer syntax it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


def _slice_hu(sl: _Slice, where: str) -> np.ndarray:
    """Decode one slice and return HU (stored * slope + intercept) as float32."""
    try:
        _ensure_transfer_syntax(sl.ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stored = sl.ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(sl.ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        short = _short_pixel_data(sl)
        if short:
            raise QctfeaError(
                f"{where}: {sl.path} is truncated (its pixel data has {short[0]} of the "
                f"{short[1]} bytes Rows x Columns x BitsAllocated need); replace it with a "
                "complete copy (copy or export the series again)"
            ) from exc
        raise QctfeaError(
            f"{where}: cannot decode the pixel data of {sl.path} (transfer syntax {syntax}: "
            f"{type(exc).__name__}); install a pydicom decoder plugin (pylibjpeg, "
            "python-gdcm) or decompress the series (e.g. `gdcmconv --raw`)"
        ) from exc
    if stored.shape != (sl.rows, sl.columns):
        raise QctfeaError(
            f"{where}: pixel data of {sl.path} has shape {stored.shape}, expected "
            f"({sl.rows}, {sl.columns}) from Rows/Columns; re-export this series"
        )
    slope, intercept = _rescale(sl.ds)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _short_pixel_data(sl: _Slice) -> tuple[int, int] | None:
    """(bytes present, bytes needed) when uncompressed pixel data is cut short, else None."""
    try:
        syntax = sl.ds.file_meta.TransferSyntaxUID
        if syntax.is_compressed:
            return None
        need = sl.rows * sl.columns * ((int(sl.ds.BitsAllocated) + 7) // 8)
        have = len(sl.ds.PixelData)
    except Exception:
        return None
    return (have, need) if have < need else None


def _named(paths: list[Path], folder: Path) -> str:
    """At most ``_MAX_NAMED`` file names relative to ``folder``, and how many more."""
    names = [str(p.relative_to(folder)) for p in paths[:_MAX_NAMED]]
    more = len(paths) - len(names)
    return ", ".join(names) + (f" and {more} more" if more else "")


@dataclass
class _SeriesSummary:
    """What the series rule and the 'choose a series' listing need of one series."""

    uid: str
    slices: list[_Slice]
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


def _summarize(uid: str, slices: list[_Slice], axial_tolerance_deg: float) -> _SeriesSummary:
    """Orientation, slice spacing and kernel of a series, from its headers only."""
    ds0 = slices[0].ds
    thickness = _opt_float(ds0, "SliceThickness")
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
    return _SeriesSummary(uid, slices, _opt_str(ds0, "SeriesDescription"),
                          _opt_str(ds0, "ConvolutionKernel"), thickness, orientation, tilt,
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
        raise QctfeaError(
            f"{where}: series_rule thinnest_axial: none of the {n_all} image series is axial "
            f"(slice normal within {params.axial_tolerance_deg:g} deg of the patient z axis):"
            f"\n{listing}\nset series_uid to the one to analyse, or raise "
            "ingest.axial_tolerance_deg"
        )
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
        raise QctfeaError(
            f"{where}: series_rule thinnest_axial cannot choose between {len(keep)} series "
            f"that are axial with the same slice spacing ({_mm(None if thin == math.inf else thin)}"
            f", within {SPACING_TIE_MM:g} mm), equally preferred kernels and the same number "
            f"of slices ({most}):\n{listing}\n"
            + (f"({others} other series ranked lower.) " if others else "")
            + "set series_uid to the one to analyse (or move the other series out of the folder)"
        )
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


def _select_series(
    groups: dict[str, list[_Slice]],
    series_uid: str | None,
    where: str,
    params: IngestParams | None = None,
) -> tuple[str, list[_Slice], str]:
    """Pick the one series to read and say how, or explain which candidates exist."""
    params = params or IngestParams()
    summaries = [_summarize(uid, s, params.axial_tolerance_deg)
                 for uid, s in sorted(groups.items(), key=lambda kv: kv[0])]
    listing = "\n".join(_describe_series(s) for s in summaries)
    if series_uid is not None:
        if series_uid not in groups:
            raise QctfeaError(
                f"{where}: no image series with series_uid={series_uid!r}; the series "
                f"found are:\n{listing}\nset series_uid to one of these"
            )
        return series_uid, groups[series_uid], "series_uid"
    if len(groups) == 1:
        uid, slices = next(iter(groups.items()))
        return uid, slices, "only series"
    if params.series_rule == "thinnest_axial":
        chosen, why = _thinnest_axial(summaries, params, where)
        return chosen.uid, chosen.slices, why
    raise QctfeaError(
        f"{where}: the folder holds {len(groups)} image series and it is not clear "
        f"which one to use:\n{listing}\nset series_uid to the one to analyse, set "
        "ingest.series_rule (e.g. thinnest_axial) to choose by rule, or move the other "
        "series out of the folder"
    )


def _orthonormal_axes(orientation: np.ndarray, where: str) -> tuple[np.ndarray, ...]:
    """Row cosine, column cosine and slice normal, checked and made orthonormal."""
    row, col = orientation[:3].copy(), orientation[3:].copy()
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOL
        or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOL
        or abs(float(row @ col)) > ORTHONORMAL_TOL
    ):
        raise QctfeaError(
            f"{where}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal "
            "unit vectors; the header is corrupt, re-export the series from the scanner/PACS"
        )
    # Gram-Schmidt: keep the row direction, remove rounding from the column one.
    row /= np.linalg.norm(row)
    col -= (col @ row) * row
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


def _check_consistent(slices: list[_Slice], where: str) -> None:
    """All slices of the series must share orientation, matrix size and pixel spacing."""
    first = slices[0]
    for sl in slices[1:]:
        if np.max(np.abs(sl.orientation - first.orientation)) > ORIENTATION_TOL:
            raise QctfeaError(
                f"{where}: the series mixes slice orientations ({first.orientation.tolist()} "
                f"and {sl.orientation.tolist()}), e.g. a localizer or several stacks; "
                "select a series with one stack (series_uid) or remove the extra images"
            )
        if (sl.rows, sl.columns) != (first.rows, first.columns):
            raise QctfeaError(
                f"{where}: the series mixes matrix sizes ({first.rows}x{first.columns} and "
                f"{sl.rows}x{sl.columns}); select a series with one reconstruction"
            )
        if not np.allclose(sl.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=0):
            raise QctfeaError(
                f"{where}: the series mixes pixel spacings ({list(first.pixel_spacing)} and "
                f"{list(sl.pixel_spacing)}); select a series with one reconstruction"
            )


def _format_gaps(gaps: np.ndarray, proj: np.ndarray, bad: np.ndarray) -> str:
    """Human-readable summary of slice gaps, with where the irregular ones are."""
    counts = Counter(np.round(gaps, 4).tolist())
    summary = ", ".join(f"{g:g} mm x{n}" for g, n in sorted(counts.items()))
    where_bad = "; ".join(
        f"{gaps[i]:g} mm between slices {i} and {i + 1} (at {proj[i]:g} and {proj[i + 1]:g} mm)"
        for i in np.flatnonzero(bad)[:5]
    )
    more = " ..." if int(bad.sum()) > 5 else ""
    return f"gaps found: {summary}; irregular: {where_bad}{more}"


def read_dicom_series(
    directory: str | os.PathLike,
    series_uid: str | None = None,
    context: str = "",
    params: IngestParams | None = None,
) -> tuple[sitk.Image, ScanInfo]:
    """Read one CT series from a folder of DICOM files into a float32 HU image.

    Parameters
    ----------
    directory:
        Folder searched recursively; files that are not DICOM, have no pixel
        data or no usable geometry are skipped and counted, with one warning
        naming them.  Damaged DICOM files (header or pixel data cut short) are
        refused, naming them: skipping one would drop a slice.
    series_uid:
        SeriesInstanceUID to read when the folder holds several series; wins over
        ``params.series_rule``.
    context:
        Text such as ``"patient P01, timepoint M12"`` put into every error.
    params:
        :class:`IngestParams` (default: refuse several series and uneven slices).

    Returns
    -------
    image, info:
        Image with array axes (z, y, x) in HU, spacing (column spacing, row
        spacing, slice spacing), origin the ImagePositionPatient of the first
        slice along the normal, direction columns (row cosine, column cosine,
        normal) so that ``TransformIndexToPhysicalPoint((i, j, k))`` is the DICOM
        (LPS, mm) position of column i, row j of slice k.  ``info`` holds
        technical metadata only.

    Raises
    ------
    QctfeaError
        With the context, the folder and what to change, when the folder holds no
        series or several that neither ``series_uid`` nor the series rule decides
        (listing the candidates), slices are missing/irregular (unless
        ``uneven_spacing: resample``), the stack is sheared,
        the headers are inconsistent, a file is damaged or truncated, or the pixel
        data cannot be decoded.
    """
    params = params or IngestParams()
    folder = Path(directory)
    where = _where(context, folder)
    if not folder.is_dir():
        raise QctfeaError(f"{where}: not a folder; give the folder holding the DICOM series")
    files = _list_files(folder)
    groups: dict[str, list[_Slice]] = {}
    reasons: Counter[str] = Counter()
    skipped: dict[str, list[Path]] = {}
    for path in files:
        sl, reason = _read_header(path)
        if sl is None:
            reasons[reason] += 1
            skipped.setdefault(reason, []).append(path)
            continue
        groups.setdefault(str(sl.ds.get("SeriesInstanceUID", "") or ""), []).append(sl)
    if DAMAGED in skipped:
        raise QctfeaError(
            f"{where}: {len(skipped[DAMAGED])} damaged or truncated DICOM file(s): "
            f"{_named(skipped[DAMAGED], folder)} (the DICOM header is cut short); replace them "
            "with complete copies (copy or export the series again), or remove them if they "
            "are not part of the series"
        )
    if not groups:
        found = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
        raise QctfeaError(
            f"{where}: no DICOM image slices found ({len(files)} files: {found}); point to "
            "the folder that holds the CT series (single-frame, uncompressed or decodable)"
        )
    _, candidates, selected_by = _select_series(groups, series_uid, where, params)
    if skipped:
        listing = "; ".join(
            f"{len(p)} {r}: {_named(p, folder)}" for r, p in sorted(skipped.items()))
        warnings.warn(
            f"{where}: skipped {sum(map(len, skipped.values()))} file(s) that are not CT image "
            f"slices ({listing}); remove them from the folder to silence this warning",
            stacklevel=2,
        )
    n_read = len(candidates)
    _check_consistent(candidates, where)
    row, col, normal = _orthonormal_axes(candidates[0].orientation, where)

    # Order by position along the normal; InstanceNumber and name only break ties.
    candidates.sort(
        key=lambda s: (
            float(s.position @ normal),
            s.instance if s.instance is not None else sys.maxsize,
            str(s.path),
        )
    )
    slices: list[_Slice] = []
    hu_slices: list[np.ndarray] = []
    n_duplicates = 0
    for sl in candidates:
        hu = _slice_hu(sl, where)
        if slices and np.linalg.norm(sl.position - slices[-1].position) <= DUPLICATE_TOL_MM:
            if not np.array_equal(hu, hu_slices[-1]):
                raise QctfeaError(
                    f"{where}: two slices share position {sl.position.tolist()} but have "
                    "different pixel values (several acquisitions or reconstructions in one "
                    "series); remove the unwanted images or re-export a single series"
                )
            n_duplicates += 1
            continue
        slices.append(sl)
        hu_slices.append(hu)
    if n_duplicates:
        warnings.warn(
            f"{where}: dropped {n_duplicates} duplicate slice(s) at an already present "
            "position with identical pixel values",
            stacklevel=2,
        )
    if len(slices) < 2:
        raise QctfeaError(
            f"{where}: the series has {len(slices)} distinct slice position(s); a 3-D CT "
            "with at least two slices is needed, select another series (series_uid)"
        )

    proj = np.array([float(s.position @ normal) for s in slices])
    gaps = np.diff(proj)
    median = float(np.median(gaps))
    bad = np.abs(gaps - median) > SPACING_RTOL * median
    if bad.any() and params.uneven_spacing == "refuse":
        raise QctfeaError(
            f"{where}: slice spacing is not uniform (median {median:g} mm, tolerance "
            f"{SPACING_RTOL:g} relative) - {_format_gaps(gaps, proj, bad)}; a slice is "
            "probably missing or the series mixes reconstructions: re-export the complete "
            "series, select another one (series_uid), or set ingest.uneven_spacing: resample "
            "to interpolate onto a uniform grid"
        )
    offsets = np.array([s.position - slices[0].position for s in slices])
    inplane = offsets - np.outer(offsets @ normal, normal)
    max_shift = float(np.max(np.linalg.norm(inplane, axis=1)))
    if max_shift > INPLANE_TOL_FRACTION * min(slices[0].pixel_spacing):
        raise QctfeaError(
            f"{where}: slice positions drift sideways by up to {max_shift:.3g} mm across the "
            "stack (gantry tilt or sheared stack), which a regular image grid cannot "
            "represent; use a tilt-corrected reconstruction or resample the series first"
        )

    row_spacing, col_spacing = slices[0].pixel_spacing
    resample_note = None
    if bad.any():  # uneven_spacing: resample
        volume, slice_spacing = _resample_uniform(hu_slices, proj, median)
        resample_note = (
            f"{len(slices)} slices, {_format_gaps(gaps, proj, bad)} -> {volume.shape[0]} "
            f"slices at {slice_spacing:g} mm (linear along the slice normal)"
        )
        warnings.warn(
            f"{where}: slice spacing is not uniform (median {median:g} mm) - {resample_note}; "
            "resampled because ingest.uneven_spacing is resample: interpolated slices carry "
            "no measured data, check that the gaps are outside the region analysed",
            stacklevel=2,
        )
    else:
        slice_spacing = float((proj[-1] - proj[0]) / (len(slices) - 1))
        volume = np.stack(hu_slices, axis=0)  # (z, y, x)
    image = sitk.GetImageFromArray(volume, isVector=False)
    image.SetSpacing((col_spacing, row_spacing, slice_spacing))
    image.SetOrigin(tuple(float(v) for v in slices[0].position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))

    rescales = [_rescale(s.ds) for s in slices]
    ds0 = slices[0].ds
    modality = _opt_str(ds0, "Modality") or "unknown"
    if modality != "CT":
        warnings.warn(
            f"{where}: modality is {modality!r}, not CT; values are not Hounsfield units "
            "unless the images were calibrated as such",
            stacklevel=2,
        )
    info = ScanInfo(
        size=tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
        spacing_mm=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
        n_slices=int(volume.shape[0]),
        modality=modality,
        manufacturer=_opt_str(ds0, "Manufacturer"),
        kvp=_opt_float(ds0, "KVP"),
        convolution_kernel=_opt_str(ds0, "ConvolutionKernel"),
        slice_thickness_mm=_opt_float(ds0, "SliceThickness"),
        rescale_slope=rescales[0][0],
        rescale_intercept=rescales[0][1],
        series_description=_opt_str(ds0, "SeriesDescription"),
        n_files_read=n_read,
        n_files_skipped=len(files) - n_read,
        rescale_varies_per_slice=len(set(rescales)) > 1,
        selected_by=selected_by,
        resampled=resample_note is not None,
        resample_note=resample_note,
    )
    return image, info


def _resample_uniform(
    hu_slices: list[np.ndarray], proj: np.ndarray, median: float
) -> tuple[np.ndarray, float]:
    """Slices at positions ``proj`` (ascending, mm) interpolated linearly onto a uniform grid.

    The grid runs from the first to the last slice; its spacing is the median gap,
    adjusted to span / round(span / median) so the grid ends on the last slice.
    A grid position that coincides with an original slice takes that slice.
    """
    span = float(proj[-1] - proj[0])
    n_new = max(int(round(span / median)), 1) + 1
    spacing = span / (n_new - 1)
    targets = proj[0] + np.arange(n_new) * spacing
    targets[-1] = proj[-1]
    volume = np.empty((n_new, *hu_slices[0].shape), dtype=np.float32)
    for k, z in enumerate(targets):
        i = int(np.clip(np.searchsorted(proj, z, side="right") - 1, 0, len(proj) - 2))
        w = float(np.clip((z - proj[i]) / (proj[i + 1] - proj[i]), 0.0, 1.0))
        if w <= 1e-9:
            volume[k] = hu_slices[i]
        elif w >= 1 - 1e-9:
            volume[k] = hu_slices[i + 1]
        else:
            volume[k] = ((1 - w) * hu_slices[i].astype(np.float64)
                         + w * hu_slices[i + 1].astype(np.float64))
    return volume, spacing


def _has_image_suffix(path: Path) -> bool:
    """True when ``path`` names an image file that SimpleITK reads as HU."""
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_FILE_SUFFIXES)


def _read_image_file(path: Path, context: str) -> tuple[sitk.Image, ScanInfo]:
    """Read a 3-D scalar image file that already holds HU."""
    where = _where(context, path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise QctfeaError(
            f"{where}: SimpleITK cannot read this image file ({str(exc).strip()[-200:]}); "
            "check that it is complete and of the type its suffix says"
        ) from exc
    dim, comps = reader.GetDimension(), reader.GetNumberOfComponents()
    if dim != 3 or comps != 1:
        raise QctfeaError(
            f"{where}: image has {dim} dimension(s) and {comps} component(s) per voxel; "
            "a 3-D scalar CT image in HU is needed"
        )
    reader.SetOutputPixelType(sitk.sitkFloat32)
    image = reader.Execute()
    info = ScanInfo(
        size=tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
        spacing_mm=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
        n_slices=int(image.GetSize()[2]),
        modality="unknown",
        manufacturer=None,
        kvp=None,
        convolution_kernel=None,
        slice_thickness_mm=None,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        series_description=None,
        n_files_read=1,
        n_files_skipped=0,
        selected_by="image file",
    )
    return image, info


def _clean_float32(image: sitk.Image) -> sitk.Image:
    """A float32 copy with geometry only: no header metadata can leak into the output."""
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    out = sitk.GetImageFromArray(array, isVector=False)
    out.SetOrigin(image.GetOrigin())
    out.SetSpacing(image.GetSpacing())
    out.SetDirection(image.GetDirection())
    return out


def ingest(
    source: str | os.PathLike,
    out_image: str | os.PathLike,
    out_json: str | os.PathLike,
    context: str = "",
    series_uid: str | None = None,
    params: IngestParams | None = None,
) -> ScanInfo:
    """Run the ingest step: read the scan, write a float32 HU NIfTI and a JSON record.

    ``source`` is a folder of DICOM files (see :func:`read_dicom_series`; the
    series by ``series_uid``, else by ``params.series_rule``) or an image file
    (.nii, .nii.gz, .nrrd, .mha, .mhd) that already holds HU.  ``out_image``
    must end in .nii.gz (or .nii).  ``out_json`` receives ``{"scan": ScanInfo,
    "provenance": ...}`` (``scan.selected_by`` and ``scan.resampled`` say how the
    series was chosen and whether slices were interpolated); neither output
    contains patient identifiers, UIDs or the source path.
    """
    src = Path(source)
    target = Path(out_image)
    where = _where(context, src)
    if not target.name.lower().endswith((".nii.gz", ".nii")):
        raise QctfeaError(
            f"{_where(context, target)}: the ingested image is written as NIfTI; give "
            "out_image a .nii.gz name"
        )
    if src.is_dir():
        image, info = read_dicom_series(src, series_uid=series_uid, context=context,
                                        params=params)
        kind = "dicom_directory"
    elif src.is_file() and _has_image_suffix(src):
        if series_uid is not None:
            warnings.warn(f"{where}: series_uid is ignored for an image file", stacklevel=2)
        image, info = _read_image_file(src, context)
        kind = "image_file"
    elif src.is_file():
        raise QctfeaError(
            f"{where}: not a folder and not an image file with suffix "
            f"{', '.join(IMAGE_FILE_SUFFIXES)}; give the folder that holds the DICOM series "
            "or a NIfTI/NRRD/MetaImage file in HU"
        )
    else:
        raise QctfeaError(f"{where}: not found; check the path to the scan (image column "
                          "of the sample sheet)")

    label = context or "scan"
    log.info(f"[ingest] {label}: read {info.n_slices} slices ({kind})")
    with atomic_path(target) as tmp:
        try:
            sitk.WriteImage(_clean_float32(image), str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise QctfeaError(
                f"{_where(context, target)}: cannot write the image ({str(exc).strip()[-200:]});"
                " check that the folder is writable and the disk is not full"
            ) from exc
    params: dict[str, Any] = {
        "context": context,
        "source_kind": kind,
        "n_source_files": info.n_files_read + info.n_files_skipped,
        "series_uid_given": series_uid is not None,
        **asdict(params or IngestParams()),
        "selected_by": info.selected_by,
        "resampled": info.resampled,
        "spacing_rtol": SPACING_RTOL,
        "output_dtype": "float32",
        "output_units": "HU",
    }
    write_json(out_json, {"scan": asdict(info), "provenance": provenance("ingest", params, {})})
    nx, ny, nz = info.size
    sx, sy, sz = info.spacing_mm
    log.info(f"[ingest] {label}: {nx}x{ny}x{nz} voxels, spacing {sx:g}x{sy:g}x{sz:g} mm, "
             f"{info.n_files_read} files used, {info.n_files_skipped} skipped -> {target.name}")
    return info
