"""Ingest step: turn a CT scan into one Hounsfield-unit image with exact geometry.

The finite-element pipeline starts from a single 3-D image in Hounsfield units
(HU) whose physical coordinates are the scanner's patient coordinates (DICOM
LPS, millimetres), because screw trajectories, landmarks and the calibration
phantom are all located in that frame.  This module

* reads a folder of DICOM files (searched recursively) with pydicom, keeps the
  single-frame greyscale image objects with pixel data and geometry, groups
  them by series and refuses to guess when the folder holds more than one
  series (the caller names one with ``series_uid``);
* orders the slices by their position along the slice normal (never by file
  name or InstanceNumber), drops exact duplicate slices, and refuses stacks
  with missing or irregularly spaced slices or a gantry tilt (shear);
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
error raised when a folder holds several series lists SeriesInstanceUIDs,
because the user needs them to choose; errors and warnings about one file name
that file, because the user must find it.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from qctfea.provenance import QctfeaError, atomic_path, provenance, write_json

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


@dataclass
class ScanInfo:
    """Technical metadata of an ingested scan; never any patient identifier.

    ``n_files_read`` is the number of files that belong to the selected series
    (exact duplicates included); ``n_files_skipped`` every other file under the
    folder (not DICOM, no pixel data, unusable geometry, other series), so the
    two add up to the number of files found.  ``rescale_varies_per_slice`` is
    True when slope or intercept differ between slices; ``rescale_slope`` and
    ``rescale_intercept`` are then those of the first slice (each slice was
    still rescaled with its own values).
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


def _describe_series(uid: str, slices: list[_Slice]) -> str:
    """One line per candidate series for the 'choose a series' error."""
    desc = _opt_str(slices[0].ds, "SeriesDescription") or "(no description)"
    return f"  series_uid={uid or '(missing)'}  description={desc!r}  slices={len(slices)}"


def _select_series(
    groups: dict[str, list[_Slice]], series_uid: str | None, where: str
) -> tuple[str, list[_Slice]]:
    """Pick the one series to read, or explain which candidates exist."""
    listing = "\n".join(
        _describe_series(uid, s) for uid, s in sorted(groups.items(), key=lambda kv: kv[0])
    )
    if series_uid is not None:
        if series_uid not in groups:
            raise QctfeaError(
                f"{where}: no image series with series_uid={series_uid!r}; the series "
                f"found are:\n{listing}\nset series_uid to one of these"
            )
        return series_uid, groups[series_uid]
    if len(groups) > 1:
        raise QctfeaError(
            f"{where}: the folder holds {len(groups)} image series and it is not clear "
            f"which one to use:\n{listing}\nset series_uid to the one to analyse "
            "(or move the other series out of the folder)"
        )
    return next(iter(groups.items()))


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
    directory: str | os.PathLike, series_uid: str | None = None, context: str = ""
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
        SeriesInstanceUID to read when the folder holds several series.
    context:
        Text such as ``"patient P01, timepoint M12"`` put into every error.

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
        or several series, slices are missing/irregular, the stack is sheared,
        the headers are inconsistent, a file is damaged or truncated, or the pixel
        data cannot be decoded.
    """
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
    _, candidates = _select_series(groups, series_uid, where)
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
    if bad.any():
        raise QctfeaError(
            f"{where}: slice spacing is not uniform (median {median:g} mm, tolerance "
            f"{SPACING_RTOL:g} relative) - {_format_gaps(gaps, proj, bad)}; a slice is "
            "probably missing or the series mixes reconstructions: re-export the complete "
            "series or select another one (series_uid)"
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
        n_slices=len(slices),
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
    )
    return image, info


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
) -> ScanInfo:
    """Run the ingest step: read the scan, write a float32 HU NIfTI and a JSON record.

    ``source`` is a folder of DICOM files (see :func:`read_dicom_series`) or an
    image file (.nii, .nii.gz, .nrrd, .mha, .mhd) that already holds HU.
    ``out_image`` must end in .nii.gz (or .nii).  ``out_json`` receives
    ``{"scan": ScanInfo, "provenance": ...}``; neither output contains patient
    identifiers, UIDs or the source path.
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
        image, info = read_dicom_series(src, series_uid=series_uid, context=context)
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
    print(f"[ingest] {label}: read {info.n_slices} slices ({kind})", file=sys.stderr)
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
        "spacing_rtol": SPACING_RTOL,
        "output_dtype": "float32",
        "output_units": "HU",
    }
    write_json(out_json, {"scan": asdict(info), "provenance": provenance("ingest", params, {})})
    nx, ny, nz = info.size
    sx, sy, sz = info.spacing_mm
    print(
        f"[ingest] {label}: {nx}x{ny}x{nz} voxels, spacing {sx:g}x{sy:g}x{sz:g} mm, "
        f"{info.n_files_read} files used, {info.n_files_skipped} skipped -> {target.name}",
        file=sys.stderr,
    )
    return info
