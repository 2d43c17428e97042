"""Ingest step: turn a CT scan into one Hounsfield-unit image with exact geometry.

The scan is a folder of DICOM files (read by :func:`qctfea.imaging.dicomio.read_dicom_series`:
series choice, slice order, tilt, spacing, rescale) or an image file (.nii, .nii.gz, .nrrd,
.mha, .mhd) that already holds HU. :func:`ingest` refuses an empty scan, stores the voxels in
one axis order (:data:`CANONICAL_ORIENTATION`, without interpolation, so that every later
step sees the same array whatever order the file was written in), warns about voxels
coarser than :data:`THICK_VOXEL_MM`, and writes the image as NIfTI (rebuilt from the voxel
array: no header metadata is carried over) and a JSON record of the technical metadata plus
provenance. Nothing identifying reaches either (see :mod:`qctfea.imaging.dicomio`).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from qctfea.errors import QctfeaError
from qctfea.imaging.dicomio import SPACING_RTOL, IngestParams, ScanInfo, read_dicom_series
from qctfea.imaging.dicomslices import where_text
from qctfea.provenance import atomic_path, provenance, write_json

log = logging.getLogger(__name__)

#: File suffixes read with SimpleITK as an image that already holds HU.
IMAGE_FILE_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def _has_image_suffix(path: Path) -> bool:
    """True when ``path`` names an image file that SimpleITK reads as HU."""
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_FILE_SUFFIXES)


def _read_image_file(path: Path, context: str) -> tuple[sitk.Image, ScanInfo]:
    """Read a 3-D scalar image file that already holds HU."""
    where = where_text(context, path)
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


#: Voxels coarser than this (mm) along any axis are warned about at ingest (the QCT-FE
#: literature's scans have 0.5-3 mm slices; the registration warns from the same size).
THICK_VOXEL_MM = 3.0


#: Axis order of every ingested image: x towards the patient's left, y posterior, z superior
#: (identity direction for an axial scan; ITK's and DICOM's patient coordinates).
CANONICAL_ORIENTATION = "LPS"


def orientation_code(image: sitk.Image) -> str:
    """The image's orientation code (closest signed axis permutation): LPS, LAS, RAS, PIR..."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def canonical_orientation(image: sitk.Image) -> sitk.Image:
    """The image with its voxel axes permuted and flipped to :data:`CANONICAL_ORIENTATION`.

    The same voxels at the same physical places, only stored in another order (no
    interpolation): everything downstream (masks, calibration slices, the planning grid,
    the mesh) then sees one array whatever axis order the file was written in, so a scan
    stored as LAS, RAS or sagittal PIR gives the same screws and strengths. An oblique grid
    (a tilted gantry, a resampled scan) keeps its tilt, with its axes in the closest order.
    """
    if orientation_code(image) == CANONICAL_ORIENTATION:
        return image
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


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
    where = where_text(context, src)
    if not target.name.lower().endswith((".nii.gz", ".nii")):
        raise QctfeaError(
            f"{where_text(context, target)}: the ingested image is written as NIfTI; give "
            "out_image a .nii.gz name"
        )
    image, info, kind = _read_source(src, context, series_uid, params)
    label = context or "scan"
    log.info(f"[ingest] {label}: read {info.n_slices} slices ({kind})")
    _refuse_empty(image, where)
    image, info = _to_canonical(image, info, label)
    _warn_thick_voxels(info, where)
    _warn_not_hu(image, where)
    _write_image(image, target, context)
    record: dict[str, Any] = {
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
    write_json(out_json, {"scan": asdict(info), "provenance": provenance("ingest", record, {})})
    nx, ny, nz = info.size
    sx, sy, sz = info.spacing_mm
    log.info(f"[ingest] {label}: {nx}x{ny}x{nz} voxels, spacing {sx:g}x{sy:g}x{sz:g} mm, "
             f"{info.n_files_read} files used, {info.n_files_skipped} skipped -> {target.name}")
    return info


def _read_source(src: Path, context: str, series_uid: str | None,
                 params: IngestParams | None) -> tuple[sitk.Image, ScanInfo, str]:
    """The scan's image, its record and its kind (a DICOM folder or an image file)."""
    where = where_text(context, src)
    if src.is_dir():
        image, info = read_dicom_series(src, series_uid=series_uid, context=context,
                                        params=params)
        return image, info, "dicom_directory"
    if src.is_file() and _has_image_suffix(src):
        if series_uid is not None:
            warnings.warn(f"{where}: series_uid is ignored for an image file", stacklevel=3)
        image, info = _read_image_file(src, context)
        return image, info, "image_file"
    if src.is_file():
        raise QctfeaError(
            f"{where}: not a folder and not an image file with suffix "
            f"{', '.join(IMAGE_FILE_SUFFIXES)}; give the folder that holds the DICOM series "
            "or a NIfTI/NRRD/MetaImage file in HU"
        )
    raise QctfeaError(f"{where}: not found; check the path to the scan (image column "
                      "of the sample sheet)")


def _refuse_empty(image: sitk.Image, where: str) -> None:
    extremes = sitk.MinimumMaximumImageFilter()
    extremes.Execute(image)
    if not extremes.GetMinimum() < extremes.GetMaximum():  # also NaN throughout
        raise QctfeaError(
            f"{where}: the scan is empty: all {math.prod(image.GetSize())} voxel(s) have the "
            f"same value ({extremes.GetMinimum():g} HU); check the scan given in the image "
            "column of the sample sheet (a blank or wrong series?)")


def _to_canonical(image: sitk.Image, info: ScanInfo, label: str
                  ) -> tuple[sitk.Image, ScanInfo]:
    """The image in :data:`CANONICAL_ORIENTATION` and its record with the new geometry and
    the source's orientation."""
    source_code = orientation_code(image)
    if source_code != CANONICAL_ORIENTATION:
        image = canonical_orientation(image)
        log.info(f"[ingest] {label}: voxel axes reordered from {source_code} to "
                 f"{CANONICAL_ORIENTATION} (same voxels, no interpolation)")
    return image, replace(info, source_orientation=source_code,
                          size=tuple(int(v) for v in image.GetSize()),
                          spacing_mm=tuple(float(v) for v in image.GetSpacing()),
                          origin_mm=tuple(float(v) for v in image.GetOrigin()),
                          direction=tuple(float(v) for v in image.GetDirection()))


def _warn_thick_voxels(info: ScanInfo, where: str) -> None:
    if max(info.spacing_mm) > THICK_VOXEL_MM:
        warnings.warn(
            f"{where}: voxels {' x '.join(f'{v:.3g}' for v in info.spacing_mm)} mm, coarser "
            f"than {THICK_VOXEL_MM:g} mm along an axis: the vertebra's mask, the screw plan, "
            "vBMD and strengths depend on it (the real L1 at 5 mm instead of 2.5 mm slices: "
            "trabecular vBMD +15 %, pullout strength -10 to -22 %, compression strength the "
            "same; README, Known limits); compare only scans of one protocol "
            "(longitudinal.csv protocol_change)", stacklevel=3)


#: a CT in HU holds air (-1000 HU) or at least fat (about -100 HU): its 1st percentile
#: lies below this (the tightly cropped real VerSe L3: -205 HU)
NOT_HU_PERCENTILE_HU = -100.0


def _warn_not_hu(image: sitk.Image, where: str) -> None:
    """Warn when the scan's values do not look like HU: its 1st percentile (over every
    other voxel along each axis) above :data:`NOT_HU_PERCENTILE_HU`, as in stored values
    written without their rescale (air at 0 or +24 instead of -1000)."""
    low = float(np.percentile(sitk.GetArrayViewFromImage(image)[::2, ::2, ::2], 1))
    if low > NOT_HU_PERCENTILE_HU:
        warnings.warn(
            f"{where}: 1 % of the scan reads below {low:.0f}, and a CT in HU holds air "
            "(-1000 HU) or fat (about -100 HU): are these stored values without their rescale "
            "(DICOM RescaleSlope/Intercept, NIfTI scl_slope/scl_inter)? Calibration and the "
            "metal check (mask.metal_hu) read HU. A density image (mg/cm³, calibration.method: "
            "fixed) or a crop of bone alone can read so", stacklevel=3)


def _write_image(image: sitk.Image, target: Path, context: str) -> None:
    with atomic_path(target) as tmp:
        try:
            sitk.WriteImage(_clean_float32(image), str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise QctfeaError(
                f"{where_text(context, target)}: cannot write the image "
                f"({str(exc).strip()[-200:]});"
                " check that the folder is writable and the disk is not full"
            ) from exc
