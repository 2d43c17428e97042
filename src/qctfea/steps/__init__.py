"""What the pipeline's steps share: the config typing and the input checks and readers.

The steps themselves (one function per step, on paths: what the CLI and the workflow
call) are in :mod:`qctfea.steps.imaging` (with :mod:`qctfea.steps.vertebra`),
:mod:`qctfea.steps.model` and :mod:`qctfea.steps.fea`. Each step reads its inputs, calls the
science modules, and writes its outputs atomically with a JSON record of what it did
(parameters, versions, input checksums, seconds). Parameters come from the cohort config's
sections (see ``config/README.md``); :func:`qctfea.config.params_from` turns a section into
the step's dataclass and refuses unknown keys. Every step first checks that its input files
exist (:func:`need_inputs`): a missing one is an error naming the scan, the file and the step
that writes it, never a reader's traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from qctfea.config import params_from  # noqa: F401  (callers: steps.params_from)
from qctfea.errors import QctfeaError
from qctfea.provenance import atomic_path, provenance, read_json, write_json


def write_image(img: sitk.Image, path) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def image_like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
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


def write_refusal(step: str, message, out_json, params, inputs: dict,
                  write_placeholders=None, picture=None, title: str = "") -> None:
    """A refused step's outputs for its gate: the message in ``out_json`` (key ``refused``),
    the step's QC ``picture`` (a PNG path, or None) showing the message under ``title``,
    and, by ``write_placeholders()``, its other outputs as placeholders that nothing reads
    (every step after the gate waits for it)."""
    logging.getLogger(__name__).error(f"[{step}] refused: {message}")
    if write_placeholders is not None:
        write_placeholders()
    if picture is not None:
        from qctfea.qc.pictures import message_picture

        message_picture(title, str(message), picture)
    write_json(out_json, {"refused": str(message), "provenance": provenance(
        step, params, {k: str(v) for k, v in inputs.items() if v})})


def write_image_refusal(step: str, message: str, out_image, pixel_type: int, out_json,
                        params: dict, inputs: dict) -> None:
    """:func:`write_refusal` of a step whose output is an image (ingest, mask): a one-voxel
    placeholder ``out_image`` of ``pixel_type``."""
    write_refusal(step, message, out_json, params, inputs,
                  lambda: write_image(sitk.Image([1, 1, 1], pixel_type), out_image))


def refusal_text(exc: Exception, step: str, context: str) -> str:
    """What a gated step (a checkpoint: ingest, calibrate, mask, screws, mesh, registration)
    records as its refusal when its work raised ``exc`` in the workflow: a
    :class:`QctfeaError`'s own message (a check that failed, naming what to change); any
    other exception (an input the step does not handle, or a bug) named with its type and
    message, its traceback written to the step's log. Either way the scan's gate then fails
    it, and with ``--keep-going`` the cohort tables are built without it and list it in
    tables/exclusions.csv, instead of one scan's crash leaving the whole cohort without
    tables."""
    if isinstance(exc, QctfeaError):
        if exc.record is None:
            return str(exc)
        logging.getLogger(__name__).error(f"[{step}] {exc}")  # the full text: the log only
        return exc.record
    logging.getLogger(__name__).error(f"[{step}] {context}: unexpected error", exc_info=exc)
    return (f"{context}: the {step} step failed unexpectedly ({type(exc).__name__}: {exc}); "
            "the traceback is in the step's log. What to do: check this scan's inputs (image, "
            "label map, the QC pictures of the steps before), report the log to the qctfea "
            "maintainers, or exclude the scan (exclude: in the cohort config)")


def accept_record(step: str, record_path, input_name: str, keys: tuple[str, ...], out_json
                  ) -> dict:
    """A gate: fail with the record's ``refused`` message, else write the record's ``keys``
    (what the scan passed with) to ``out_json``; returns the record."""
    rec = read_json(record_path)
    if rec.get("refused"):
        raise QctfeaError(rec["refused"])
    write_json(out_json, {**{k: rec.get(k) for k in keys}, "provenance": provenance(
        step, {}, {input_name: str(record_path)})})
    return rec


def need_inputs(context: str, **paths) -> None:
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
            if f.is_dir():
                if base == "labels":
                    from qctfea.imaging.labelfolder import has_vertebrae

                    if has_vertebrae(f):  # TotalSegmentator's folder of structure masks
                        continue
                tseg = (" (a folder is read as TotalSegmentator's output of one mask per "
                        "structure, vertebrae_L4.nii.gz, ..., but this one has no "
                        "vertebrae_<level> file: give that folder, or the multilabel file "
                        "from TotalSegmentator --ml, with mask.convention: totalsegmentator)"
                        if base == "labels" else "")
                raise QctfeaError(f"{context}: {what} {f} is a folder, not a file; {hint}"
                                  f"{tseg}")
            if not f.is_file():
                raise QctfeaError(f"{context}: {what} {f} not found; {hint}, or correct the path")


def _unreadable(path, what: str, context: str, exc: RuntimeError) -> QctfeaError:
    """The error for an image file ITK cannot read, naming the scan and the file."""
    return QctfeaError(f"{context}: {what} {path} cannot be read as an image "
                       f"({str(exc).strip()[-160:]}); check that the file is complete and "
                       "of the type its suffix says, or rerun the step that wrote it")


def read_image(path, what: str, context: str, pixel=None) -> sitk.Image:
    """``sitk.ReadImage`` with an error naming the scan and the file when it is unreadable."""
    try:
        return (sitk.ReadImage(str(path)) if pixel is None
                else sitk.ReadImage(str(path), pixel))
    except RuntimeError as exc:
        raise _unreadable(path, what, context, exc) from exc


def read_grid(path, what: str, context: str) -> sitk.Image:
    """An image's voxel grid only (size, spacing, origin, direction) from its header, as an
    empty UInt8 image: for steps that need the CT's geometry but not its values (1 byte per
    voxel instead of the float image and its checks)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, what, context, exc) from exc
    return grid_only(reader)


def grid_only(image) -> sitk.Image:
    """An empty UInt8 image on the grid of ``image`` (an image or a reader that has read the
    header): geometry for resampling and for writing results, at 1 byte per voxel."""
    grid = sitk.Image([int(v) for v in image.GetSize()], sitk.sitkUInt8)
    grid.SetSpacing(image.GetSpacing())
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def read_labels(path, context: str, convention: str = "custom"
                 ) -> tuple[sitk.Image, dict[str, int] | None]:
    """The label map of a scan and, when ``path`` is a folder of structure masks
    (TotalSegmentator without ``--ml``), the label each structure was given in the map
    (:mod:`qctfea.imaging.labelfolder`); None for a label-map file."""
    if Path(path).is_dir():
        from qctfea.imaging import labelfolder

        return labelfolder.compose(path, convention, context)
    _refuse_dicom_labels(path, context)
    image = read_image(path, "label map", context)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise QctfeaError(
            f"{context}: label map {path} has {image.GetDimension()} dimensions and "
            f"{image.GetNumberOfComponentsPerPixel()} value(s) per voxel, not one 3D label "
            "image (a segmentation with overlapping segments, such as a 3D Slicer .seg.nrrd "
            "with several layers?); export it as one labelmap (Slicer: Segmentations, Export "
            "to labelmap), or give the structures' labels in one 3D image")
    return integer_labels(image, path, "label map", context), None


def integer_labels(image: sitk.Image, path, what: str, context: str) -> sitk.Image:
    """``image`` when its values are whole numbers; a label map of floating-point values
    that are not (a label map resampled with linear interpolation: 15.5 between background
    and label 31, 30.5 between labels 30 and 31) is refused: cast to integers it would
    give the target vertebra a frayed surface and invent labels at every boundary."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return image
    arr = sitk.GetArrayViewFromImage(image)
    bad, example = 0, None
    for k in range(arr.shape[0]):  # slice by slice: no whole-image temporaries
        sl = arr[k]
        off = sl != np.round(sl)  # NaN too
        n = int(np.count_nonzero(off))
        if n:
            bad += n
            example = sl[off][0] if example is None else example
    if bad:
        labelled = max(int(np.count_nonzero(arr)), 1)
        raise QctfeaError(
            f"{context}: {what} {path} holds {bad} voxels whose values are not whole numbers "
            f"({100 * bad / labelled:.1f} % of its nonzero voxels; e.g. {float(example):g}): a "
            "label map resampled with linear interpolation? Labels are integers: resample it "
            "by nearest neighbour (SimpleITK sitkNearestNeighbor, 3D Slicer's 'Nearest "
            "Neighbor' interpolation), or give the label map as the segmentation wrote it")
    return image


def _refuse_dicom_labels(path, context: str) -> None:
    """A label map in a DICOM file (a DICOM SEG, e.g. TotalSegmentator --output_type dicom)
    is refused with how to convert it: ITK would read its frames as a plain image stack,
    without the segments' numbers and with a geometry of its own."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] != b"DICM":
        return
    import pydicom

    try:
        modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
    except Exception:  # noqa: BLE001 - unreadable: described by its preamble only
        modality = ""
    kind = "a DICOM segmentation (SEG)" if modality == "SEG" else "a DICOM file"
    raise QctfeaError(
        f"{context}: label map {path} is {kind}, not a label image; convert it to a NIfTI or "
        "NRRD label map (dcmqi's segimage2itkimage; TotalSegmentator: its default NIfTI "
        "output with --ml; 3D Slicer: load it and export the segmentation as a labelmap), "
        "and give that file in the labels column of the sample sheet")


def _nonfinite(path, arr: np.ndarray) -> np.ndarray:
    """Mask (z, y, x) of the NaN or infinite voxels of an image read from ``path``.

    ITK's NIfTI reader (before ITK 6) silently turns NaN and ±inf into 0, so for a float
    NIfTI file they are looked up in the file's own bytes (NIfTI-1 and -2 headers)."""
    bad = ~np.isfinite(arr)
    name = str(path).lower()
    if bad.any() or not name.endswith((".nii", ".nii.gz")):
        return bad
    import gzip

    from qctfea.imaging import niftiheader

    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as fh:
        hdr = niftiheader.parse(fh.read(540))
        dtype = None if hdr is None else {16: np.dtype(f"{hdr.endian}f4"),
                                          64: np.dtype(f"{hdr.endian}f8")}.get(hdr.datatype)
        if dtype is None:  # not NIfTI, or integer data, which cannot hold NaN
            return bad
        offset = hdr.vox_offset
        fh.seek(int(offset))
        # in blocks: one read of the whole data from a gzip stream is several times slower
        # and holds a second copy of the image
        block, done, flat = (1 << 22) * dtype.itemsize, 0, bad.reshape(-1)
        while done < arr.size:
            data = np.frombuffer(fh.read(min(block, (arr.size - done) * dtype.itemsize)),
                                 dtype)
            if data.size == 0:
                return ~np.isfinite(arr)  # shorter than its header says: ITK's values only
            flat[done:done + data.size] = ~np.isfinite(data)
            done += data.size
    return bad


def read_ct(path, context: str) -> tuple[sitk.Image, np.ndarray]:
    """The ingested CT and its HU array; refused when it holds no image (every voxel the
    same value) or NaN/infinite values, since every later number would be meaningless."""
    ct = read_image(path, "CT image", context, sitk.sitkFloat32)
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


def read_density(path, context: str) -> tuple[sitk.Image, np.ndarray]:
    """A density image (mg/cm³) and its array; NaN or infinite voxels are refused, as they
    would become NaN moduli and BMD silently."""
    dens = read_image(path, "density image", context, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(dens)
    bad = _nonfinite(path, arr)
    if bad.any():
        z, y, x = (int(v) for v in np.argwhere(bad)[0])
        raise QctfeaError(f"{context}: density image {path} has {int(bad.sum())} NaN or "
                          f"infinite voxel(s) (first at voxel x={x}, y={y}, z={z}); rerun the "
                          "calibrate step (rule calibrate_density), or repair the image if it "
                          "was made outside the pipeline")
    return dens, arr


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
