"""Reading DICOM files one by one: the header fields a slice needs (position, orientation,
spacing, rescale), its pixels in HU, and why a file is not a CT image slice
(:mod:`qctfea.imaging.dicomio` builds the series from them).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from qctfea.errors import QctfeaError


#: Two slices closer than this (mm) are the same slice position.
DUPLICATE_TOL_MM = 1e-4


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


class _Frames:
    """The pixel data of one multi-frame (Enhanced CT) file, decoded once when the first of
    its frames is needed."""

    def __init__(self, ds: Dataset):
        self.ds = ds
        self._array: np.ndarray | None = None

    def frame(self, index: int) -> np.ndarray:
        if self._array is None:
            _ensure_transfer_syntax(self.ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = self.ds.pixel_array
            self._array = arr.reshape((-1, *arr.shape[-2:]))
        return self._array[index]


@dataclass
class Slice:
    """One usable image slice (a single-frame file, or one frame of an Enhanced CT file)
    and its parsed geometry."""

    path: Path
    ds: Dataset  # the slice's header (of a frame: flattened from the functional groups)
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm
    rows: int
    columns: int
    instance: int | None
    #: a frame of a multi-frame file: its index and the file's pixel data
    frame: int | None = None
    frames: _Frames | None = None


def where_text(context: str, path: str | os.PathLike) -> str:
    """Prefix for error messages: the context (if any) and the input path."""
    return f"{context}: {path}" if context else str(path)


def opt_str(ds: Dataset, keyword: str) -> str | None:
    """A header value as a stripped string; multi-valued joined by backslash."""
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        text = "\\".join(str(v).strip() for v in value)
    else:
        text = str(value).strip()
    return text or None


def opt_float(ds: Dataset, keyword: str) -> float | None:
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


def rescale(ds: Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a slice (defaults 1 and 0)."""
    slope = opt_float(ds, "RescaleSlope")
    intercept = opt_float(ds, "RescaleIntercept")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def _is_part10(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 marker ``DICM`` after its preamble."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path) -> tuple[list[Slice], str]:
    """Read one file; return its usable slices (one, or one per frame of an Enhanced CT
    file) or none and the reason it was skipped."""
    try:
        with warnings.catch_warnings():
            # pydicom's warnings about odd values may quote them (names, IDs).
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, defer_size=_DEFER_SIZE)
    except Exception:  # unreadable: not DICOM, unless it says it is one
        return [], DAMAGED if _is_part10(path) else "not DICOM"
    try:
        if "PixelData" not in ds:
            # force=True "parses" any file; real DICOM objects carry a SOP Class UID.
            # An image object (or a Part 10 file) without it is cut short.
            meta = getattr(ds, "file_meta", None) or {}
            sop = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
            if sop in _IMAGE_SOP_CLASSES or "Rows" in ds or (not sop and _is_part10(path)):
                return [], DAMAGED
            return [], ("no pixel data" if sop else "not DICOM")
        frames = ds.get("NumberOfFrames")
        samples = ds.get("SamplesPerPixel")
        if samples not in (None, "") and int(samples) != 1:
            return [], "colour image (not supported)"
        n_frames = int(frames) if frames not in (None, "") else 1
    except Exception:  # garbled frame or sample count
        return [], "no usable image geometry"
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        if "PerFrameFunctionalGroupsSequence" not in ds:
            return [], "multi-frame image without per-frame geometry (not supported)"
        source = _Frames(ds)
        out = []
        for i in range(n_frames):
            sl, reason = _slice_of(path, _frame_header(ds, i), i + 1)
            if sl is None:
                return [], reason
            sl.frame, sl.frames = i, source
            out.append(sl)
        return out, ""
    sl, reason = _slice_of(path, ds, None)
    return ([sl] if sl is not None else []), reason


def _frame_header(ds: Dataset, index: int) -> Dataset:
    """The header of frame ``index`` of an Enhanced (multi-frame) image, flattened as a
    single-frame file would carry it: the file's own attributes, then those of the first
    item of every functional-group sequence, shared first, this frame's over them
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness,
    RescaleSlope/Intercept, KVP, ConvolutionKernel, ...). DICOM PS3.3 C.7.6.16."""
    skip = {"PixelData", "PerFrameFunctionalGroupsSequence",
            "SharedFunctionalGroupsSequence", "NumberOfFrames"}
    hdr = Dataset()
    for elem in ds:
        if elem.keyword not in skip:
            hdr.add(elem)
    hdr.file_meta = getattr(ds, "file_meta", FileMetaDataset())
    groups = [ds.get("SharedFunctionalGroupsSequence"),
              ds.PerFrameFunctionalGroupsSequence]
    for seq, i in zip(groups, (0, index), strict=True):
        if not seq or len(seq) <= i:
            continue
        for macro in seq[i]:
            if macro.VR != "SQ" or not macro.value:
                continue
            for elem in macro.value[0]:
                if elem.VR != "SQ":
                    hdr.add(elem)
    return hdr


def _slice_of(path: Path, ds: Dataset, instance: int | None) -> tuple[Slice | None, str]:
    """The slice of a (single-frame or flattened frame) header, or None and why not."""
    try:
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
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        # present but not a finite number: absent would mean the default, an unreadable
        # value must not (an intercept read as 0 shifts every CT number)
        if ds.get(keyword) not in (None, "") and opt_float(ds, keyword) is None:
            return None, f"invalid {keyword} ({str(ds.get(keyword))[:20]!r})"
    if instance is None:
        try:
            instance = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") else None
        except (TypeError, ValueError):
            instance = None
    return Slice(path, ds, position, orientation, (spacing[0], spacing[1]), rows, columns,
                  instance), ""


#: Files that tools leave in any folder and that are never image slices, left out without a
#: warning: Snakemake's marker of a ``directory()`` output (the demo's DICOM folders), the
#: macOS Finder's and the Windows Explorer's folder caches
IGNORED_FILE_NAMES = frozenset({".snakemake_timestamp", ".DS_Store", "Thumbs.db",
                                "desktop.ini"})


def list_files(directory: Path) -> list[Path]:
    """Every regular file under ``directory``, recursively, in a stable order, except
    ``IGNORED_FILE_NAMES``."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name not in IGNORED_FILE_NAMES)


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


def slice_hu(sl: Slice, where: str) -> np.ndarray:
    """Decode one slice and return HU (stored * slope + intercept) as float32."""
    try:
        if sl.frames is not None:
            stored = sl.frames.frame(sl.frame)
        else:
            _ensure_transfer_syntax(sl.ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stored = sl.ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(sl.ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        short = _short_pixel_data(sl) if sl.frames is None else None
        if short:
            raise QctfeaError(
                f"{where}: {sl.path} is truncated (its pixel data has {short[0]} of the "
                f"{short[1]} bytes Rows x Columns x BitsAllocated need); replace it with a "
                "complete copy (copy or export the series again)"
            ) from exc
        raise QctfeaError(
            f"{where}: cannot decode the pixel data of {sl.path} (transfer syntax {syntax}: "
            f"{type(exc).__name__}); python-gdcm (a requirement) decodes JPEG, JPEG-LS, "
            "JPEG 2000 and RLE: check that it is installed (`python -c 'import gdcm'`), else "
            "decompress the series (e.g. `gdcmconv --raw`)"
        ) from exc
    if stored.shape != (sl.rows, sl.columns):
        raise QctfeaError(
            f"{where}: pixel data of {sl.path} has shape {stored.shape}, expected "
            f"({sl.rows}, {sl.columns}) from Rows/Columns; re-export this series"
        )
    slope, intercept = rescale(sl.ds)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _short_pixel_data(sl: Slice) -> tuple[int, int] | None:
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


def named_files(paths: list[Path], folder: Path) -> str:
    """At most ``_MAX_NAMED`` file names relative to ``folder``, and how many more."""
    names = [str(p.relative_to(folder)) for p in paths[:_MAX_NAMED]]
    more = len(paths) - len(names)
    return ", ".join(names) + (f" and {more} more" if more else "")
