"""DICOM series reading for the ingest step (:mod:`qctfea.imaging.ingest`).

The finite-element pipeline starts from a single 3-D image in Hounsfield units
(HU) whose physical coordinates are the scanner's patient coordinates (DICOM
LPS, millimetres), because screw trajectories, landmarks and the calibration
phantom are all located in that frame.  This module

* reads a folder of DICOM files (searched recursively) with pydicom, keeps the
  greyscale image objects with pixel data and geometry (single-frame slices, and
  Enhanced CT multi-frame files, each frame a slice with the position, orientation,
  spacing and rescale of its functional groups), groups
  them by series and, when the folder holds more than one series, takes the
  one named by ``series_uid`` or picked by the rule of :class:`IngestParams`
  (``series_rule: thinnest_axial``); otherwise it refuses to guess, listing
  every candidate series (UID, description, orientation, slice spacing,
  kernel, slice thickness, slice count) so the user can choose;
* orders the slices by their position along the slice normal (never by file
  name or InstanceNumber), drops exact duplicate slices, refuses a gantry tilt
  (shear) or (``gantry_tilt: resample``) shifts each slice in its plane onto the
  first slice's grid, and refuses stacks with missing or irregularly spaced slices, or
  (``uneven_spacing: resample``) interpolates them linearly along the slice
  normal onto a uniform grid, with a warning;
* applies RescaleSlope/RescaleIntercept slice by slice to obtain HU as float32
  and builds a SimpleITK image whose index-to-physical mapping reproduces the
  DICOM position of every pixel;
* returns the image and a :class:`ScanInfo` of its technical metadata (the ingest step
  writes both).

Bad files in the folder: a file that is not a usable image slice (not DICOM,
e.g. a stray ``notes.txt``; a DICOM object without pixel data, e.g. a report;
a colour image; a multi-frame image without per-frame geometry; no usable
geometry) is skipped with one warning
that names the skipped files and why; the folder caches and markers of
``dicomslices.IGNORED_FILE_NAMES`` (``.snakemake_timestamp``, ``.DS_Store``, ...)
are left out without one.  A *damaged* DICOM file (the Part 10
``DICM`` marker or an image SOP class, but the header or the pixel data cut
short, as left by an interrupted copy) is refused with an error naming it:
skipping it would silently drop a slice, so the file must be replaced or
removed.

Privacy: nothing identifying is ever written or logged.  :class:`ScanInfo`
holds technical fields only; the written image is rebuilt from the voxel array
so no header metadata is carried over; no UID (series, study, instance), file
name or source path reaches the outputs or the progress messages.  Only the
errors raised when the series to read cannot be chosen list SeriesInstanceUIDs
(with description, kernel and spacing), because the user needs them to choose, and only in
the message the step logs: the record the workflow keeps (scan.json's ``refused``, copied
to the exclusions table and the report) says the listing is in the log;
errors and warnings about one file name that file, because the user must find
it.  How the series was chosen is recorded (``ScanInfo.selected_by``) with
spacing and kernel only, never the UID.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.config import option
from qctfea.imaging.dicomslices import (
    DAMAGED, DUPLICATE_TOL_MM, Slice, list_files, named_files, opt_float, opt_str, read_header,
    rescale, slice_hu, where_text,
)
from qctfea.imaging.seriesrules import select_series
from qctfea.imaging.slicegeometry import (
    check_consistent, format_gaps, orthonormal_axes, resample_uniform,
)

log = logging.getLogger(__name__)


#: Allowed deviation of any slice gap from the median gap, relative to the median.
SPACING_RTOL = 1e-3

#: Largest in-plane offset between slices (gantry tilt), as a fraction of a pixel.
INPLANE_TOL_FRACTION = 0.05

#: Values of :attr:`IngestParams.series_rule`.
SERIES_RULES = ("none", "thinnest_axial")

#: Values of :attr:`IngestParams.uneven_spacing`.
UNEVEN_SPACING_ACTIONS = ("refuse", "resample")
#: What :attr:`IngestParams.gantry_tilt` may say about a tilted (sheared) stack.
GANTRY_TILT_ACTIONS = ("refuse", "resample")

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
    ``gantry_tilt``
        ``"refuse"``: a stack whose slice positions drift sideways (a tilted
        gantry) is an error.  ``"resample"``: every slice is shifted in its own
        plane onto the first slice's pixel grid (linear interpolation), which
        makes the stack orthogonal, with a warning.
    ``uneven_spacing``
        ``"refuse"``: missing or irregularly spaced slices are an error naming
        the gaps.  ``"resample"``: the slices are interpolated linearly along
        the slice normal onto a uniform grid from the first to the last slice
        with the median gap as spacing (adjusted so the grid ends exactly on
        the last slice), with a warning naming the scan, the gaps found and the
        new spacing.
    """

    series_rule: str = option(
        "none", enum=list(SERIES_RULES),
        doc=("how to choose when a scan's DICOM folder holds several image series: `none` "
             "refuses, listing each series (UID, description, orientation, slice spacing, "
             "kernel, slice thickness, slices), so the sample sheet's `series_uid` column must "
             "name one; "
             "`thinnest_axial` keeps the axial series, then the smallest slice spacing (from "
             "the slice positions, else SliceThickness), then among those within 0.001 mm the "
             "kernel earliest in `kernel_preference`, then the most slices; a remaining tie is "
             "refused with the listing. An explicit `series_uid` always wins; a folder with "
             "one series is read as is. scan.json `selected_by` records the choice"))
    axial_tolerance_deg: float = option(
        10.0, minimum=0, exclusiveMaximum=90,
        doc=("`thinnest_axial`: a series is axial when its slice normal is within this angle "
             "of the patient z axis"))
    kernel_preference: list[str] = option(
        factory=lambda: list(DEFAULT_KERNEL_PREFERENCE), items={"type": "string", "minLength": 1},
        doc=("`thinnest_axial`: reconstruction kernels, most preferred first. Bone (sharp) "
             "kernels first because QCT FE studies reconstruct with them (trabecular and "
             "cortical detail; soft kernels blur it). An entry matches when a word of the "
             "ConvolutionKernel (split at `\\`, space, `,`, `/`, `;`, `_`) starts with it, "
             "ignoring case (`b60` matches `B60f`; `d` matches Philips `D` but not `STANDARD` "
             "or `Br40d`); series matching no entry rank last"))
    uneven_spacing: str = option(
        "refuse", enum=list(UNEVEN_SPACING_ACTIONS),
        doc=("missing or irregularly spaced slices: `refuse` (error naming the gaps) or "
             "`resample`: linear interpolation along the slice normal onto a uniform grid from "
             "the first to the last slice, spacing = median gap (adjusted to end on the last "
             "slice), with a warning; scan.json `resampled`/`resample_note` record it"))

    gantry_tilt: str = option(
        "refuse", enum=list(GANTRY_TILT_ACTIONS),
        doc=("a stack whose slice positions drift sideways (acquired with a tilted gantry): "
             "`refuse` (error naming the drift) or `resample`: each slice shifted in its own "
             "plane (linear interpolation) onto the first slice's grid, so the stack becomes "
             "orthogonal (as dcm2niix's tilt correction), with a warning; voxels moved in "
             "from outside a slice get the scan's minimum; scan.json `resampled`/"
             "`resample_note` record the tilt"))

    def __post_init__(self) -> None:
        if self.gantry_tilt not in GANTRY_TILT_ACTIONS:
            raise ValueError(f"gantry_tilt {self.gantry_tilt!r} is not one of "
                             f"{list(GANTRY_TILT_ACTIONS)}")
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
    n_files_read: int
    n_files_skipped: int
    rescale_varies_per_slice: bool = False
    selected_by: str | None = None
    resampled: bool = False
    resample_note: str | None = None
    #: orientation code of the source's voxel axes (ITK/DICOM convention, the direction each
    #: axis points to: LPS, LAS, RAS, PIR, ...); the ingested image is stored in
    #: :data:`CANONICAL_ORIENTATION` (see :func:`canonical_orientation`)
    source_orientation: str | None = None


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
    where = where_text(context, folder)
    if not folder.is_dir():
        raise QctfeaError(f"{where}: not a folder; give the folder holding the DICOM series")
    files, groups, skipped = _read_headers(folder, where)
    _, candidates, selected_by = select_series(groups, series_uid, where, params)
    if skipped:
        _warn_skipped(skipped, folder, where)
    n_read = len({sl.path for sl in candidates})  # files (an Enhanced CT file: one)
    check_consistent(candidates, where)
    row, col, normal = orthonormal_axes(candidates[0].orientation, where)
    slices, hu_slices = _stack_slices(candidates, normal, where)
    hu_slices, tilt_note = _untilt(slices, hu_slices, row, col, normal, params, where)
    proj, gaps, median, bad = _check_spacing(slices, normal, params, where)
    volume, slice_spacing, resample_note = _volume(hu_slices, proj, gaps, median, bad, where)
    notes = [n for n in (tilt_note, resample_note) if n]
    resample_note = "; ".join(notes) if notes else None

    row_spacing, col_spacing = slices[0].pixel_spacing
    image = sitk.GetImageFromArray(volume, isVector=False)
    image.SetSpacing((col_spacing, row_spacing, slice_spacing))
    image.SetOrigin(tuple(float(v) for v in slices[0].position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    info = _scan_info(image, slices, where, n_read=n_read, n_files=len(files),
                      selected_by=selected_by, resample_note=resample_note)
    return image, info


def _read_headers(folder: Path, where: str
                  ) -> tuple[list[Path], dict[str, list[Slice]], dict[str, list[Path]]]:
    """Every file's header: the files, the slices by SeriesInstanceUID, the skipped files by
    reason. Damaged files and a folder without image slices are errors."""
    files = list_files(folder)
    groups: dict[str, list[Slice]] = {}
    reasons: Counter[str] = Counter()
    skipped: dict[str, list[Path]] = {}
    for path in files:
        found, reason = read_header(path)
        if not found:
            reasons[reason] += 1
            skipped.setdefault(reason, []).append(path)
            continue
        for sl in found:  # one slice, or every frame of an Enhanced CT file
            groups.setdefault(str(sl.ds.get("SeriesInstanceUID", "") or ""), []).append(sl)
    if DAMAGED in skipped:
        raise QctfeaError(
            f"{where}: {len(skipped[DAMAGED])} damaged or truncated DICOM file(s): "
            f"{named_files(skipped[DAMAGED], folder)} (the DICOM header is cut short); replace "
            "them with complete copies (copy or export the series again), or remove them if they "
            "are not part of the series"
        )
    if not groups:
        found = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
        raise QctfeaError(
            f"{where}: no DICOM image slices found ({len(files)} files: {found}); point to "
            "the folder that holds the CT series (greyscale slices or Enhanced CT frames)"
        )
    return files, groups, skipped


def _warn_skipped(skipped: dict[str, list[Path]], folder: Path, where: str) -> None:
    listing = "; ".join(
        f"{len(p)} {r}: {named_files(p, folder)}" for r, p in sorted(skipped.items()))
    warnings.warn(
        f"{where}: skipped {sum(map(len, skipped.values()))} file(s) that are not CT image "
        f"slices ({listing}); remove them from the folder to silence this warning",
        stacklevel=3,
    )


def _stack_slices(candidates: list[Slice], normal: np.ndarray, where: str
                  ) -> tuple[list[Slice], list[np.ndarray]]:
    """The slices ordered along the normal with their HU pixels; duplicates (same position,
    same pixels) dropped with a warning; at least two slices."""
    # Order by position along the normal; InstanceNumber and name only break ties.
    candidates.sort(
        key=lambda s: (
            float(s.position @ normal),
            s.instance if s.instance is not None else sys.maxsize,
            str(s.path),
        )
    )
    slices: list[Slice] = []
    hu_slices: list[np.ndarray] = []
    n_duplicates = 0
    for sl in candidates:
        hu = slice_hu(sl, where)
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
            stacklevel=3,
        )
    if len(slices) < 2:
        raise QctfeaError(
            f"{where}: the series has {len(slices)} distinct slice position(s); a 3-D CT "
            "with at least two slices is needed, select another series (the sample sheet's "
            "series_uid column)"
        )
    return slices, hu_slices


def _check_spacing(slices: list[Slice], normal: np.ndarray, params: IngestParams, where: str):
    """Positions along the normal, their gaps, the median gap and the uneven gaps; uneven
    spacing (unless ``uneven_spacing: resample``) is an error."""
    proj = np.array([float(s.position @ normal) for s in slices])
    gaps = np.diff(proj)
    median = float(np.median(gaps))
    bad = np.abs(gaps - median) > SPACING_RTOL * median
    if bad.any() and params.uneven_spacing == "refuse":
        raise QctfeaError(
            f"{where}: slice spacing is not uniform (median {median:g} mm, tolerance "
            f"{SPACING_RTOL:g} relative) - {format_gaps(gaps, proj, bad)}; a slice is "
            "probably missing or the series mixes reconstructions: re-export the complete "
            "series, select another one (the sample sheet's series_uid column), or set "
            "ingest.uneven_spacing: resample to interpolate onto a uniform grid"
        )
    return proj, gaps, median, bad


def _untilt(slices: list[Slice], hu_slices: list[np.ndarray], row: np.ndarray,
            col: np.ndarray, normal: np.ndarray, params: IngestParams, where: str
            ) -> tuple[list[np.ndarray], str | None]:
    """A stack whose slices drift sideways (gantry tilt): refused, or (``gantry_tilt:
    resample``) every slice shifted in its plane onto the first slice's pixel grid.

    Slice k's pixel (i, j) lies at P_k + i c row + j r col (c, r: column and row spacing);
    with P_k = P_0 + s_k normal + a_k row + b_k col, the orthogonal grid's point
    P_0 + i c row + j r col + s_k normal is slice k's pixel (i - a_k / c, j - b_k / r),
    interpolated linearly. Returns the slices and the note for scan.json (None: no tilt)."""
    offsets = np.array([s.position - slices[0].position for s in slices])
    inplane = offsets - np.outer(offsets @ normal, normal)
    max_shift = float(np.max(np.linalg.norm(inplane, axis=1)))
    if max_shift <= INPLANE_TOL_FRACTION * min(slices[0].pixel_spacing):
        return hu_slices, None
    span = offsets[-1]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(span @ normal) / np.linalg.norm(span)))))
    if params.gantry_tilt == "refuse":
        raise QctfeaError(
            f"{where}: slice positions drift sideways by up to {max_shift:.3g} mm across the "
            f"stack (gantry tilt of {tilt:.1f} degrees, or a sheared stack), which a regular "
            "image grid cannot represent; set ingest.gantry_tilt: resample to shift each "
            "slice onto the first one's grid, or use a tilt-corrected reconstruction"
        )
    from scipy import ndimage

    row_mm, col_mm = slices[0].pixel_spacing  # between rows, between columns
    fill = float(min(float(h.min()) for h in hu_slices))
    out = [ndimage.shift(h, ((off @ col) / row_mm, (off @ row) / col_mm), order=1,
                         mode="constant", cval=fill).astype(np.float32)
           for h, off in zip(hu_slices, inplane, strict=True)]
    note = (f"gantry tilt {tilt:.1f} degrees: slices shifted in their planes by up to "
            f"{max_shift:.3g} mm onto the first slice's grid (linear)")
    warnings.warn(f"{where}: {note}; voxels moved in from outside a slice hold the scan's "
                  f"minimum ({fill:g} HU)", stacklevel=3)
    return out, note


def _volume(hu_slices: list[np.ndarray], proj: np.ndarray, gaps: np.ndarray, median: float,
            bad: np.ndarray, where: str) -> tuple[np.ndarray, float, str | None]:
    """The (z, y, x) volume and its slice spacing; uneven slices resampled (with the note
    saying how, and a warning)."""
    if not bad.any():
        slice_spacing = float((proj[-1] - proj[0]) / (len(hu_slices) - 1))
        return np.stack(hu_slices, axis=0), slice_spacing, None
    volume, slice_spacing = resample_uniform(hu_slices, proj, median)
    resample_note = (
        f"{len(hu_slices)} slices, {format_gaps(gaps, proj, bad)} -> {volume.shape[0]} "
        f"slices at {slice_spacing:g} mm (linear along the slice normal)"
    )
    warnings.warn(
        f"{where}: slice spacing is not uniform (median {median:g} mm) - {resample_note}; "
        "resampled because ingest.uneven_spacing is resample: interpolated slices carry "
        "no measured data, check that the gaps are outside the region analysed",
        stacklevel=3,
    )
    return volume, slice_spacing, resample_note


def _scan_info(image: sitk.Image, slices: list[Slice], where: str, *, n_read: int,
               n_files: int, selected_by: str, resample_note: str | None) -> ScanInfo:
    """The technical metadata of the image read (no identifiers); a modality other than CT
    is warned about."""
    rescales = [rescale(s.ds) for s in slices]
    ds0 = slices[0].ds
    modality = opt_str(ds0, "Modality") or "unknown"
    if modality != "CT":
        warnings.warn(
            f"{where}: modality is {modality!r}, not CT; values are not Hounsfield units "
            "unless the images were calibrated as such",
            stacklevel=3,
        )
    return ScanInfo(
        size=tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
        spacing_mm=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),
        n_slices=int(image.GetSize()[2]),
        modality=modality,
        manufacturer=opt_str(ds0, "Manufacturer"),
        kvp=opt_float(ds0, "KVP"),
        convolution_kernel=opt_str(ds0, "ConvolutionKernel"),
        slice_thickness_mm=opt_float(ds0, "SliceThickness"),
        rescale_slope=rescales[0][0],
        rescale_intercept=rescales[0][1],
        n_files_read=n_read,
        n_files_skipped=n_files - n_read,
        rescale_varies_per_slice=len(set(rescales)) > 1,
        selected_by=selected_by,
        resampled=resample_note is not None,
        resample_note=resample_note,
    )
