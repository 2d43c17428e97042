"""Tests of the ingest step (qctfea.imaging.ingest, qctfea.imaging.dicomio) on tiny synthetic DICOM series.

Expected values are computed here from the DICOM definitions (pixel position
= ImagePositionPatient + column * column spacing * row cosine + row * row
spacing * column cosine; HU = stored * slope + intercept), not from the code
under test.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from qctfea.imaging.dicomio import ScanInfo, read_dicom_series
from qctfea.imaging.ingest import ingest
from qctfea.errors import QctfeaError

CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
ROWS, COLS, NZ = 4, 5, 6
ROW_SPACING, COL_SPACING = 0.7, 0.6  # PixelSpacing = [row spacing, column spacing]
CONTEXT = "patient P01, timepoint M12"
SECRETS = ["Doe", "SECRET123", "ACC999", "Secret Hospital", "19600101"]


@dataclass
class Series:
    """What was written, for computing expectations."""

    folder: Path
    series_uid: str
    study_uid: str
    positions: list[np.ndarray] = field(default_factory=list)  # per written slice
    stored: list[np.ndarray] = field(default_factory=list)  # stored int16 per slice
    slopes: list[float] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    sop_uids: list[str] = field(default_factory=list)


def _stored(k: int, offset: int) -> np.ndarray:
    """Distinct stored values per voxel: 1000 + 100 k + 3 * (row * COLS + col) + offset."""
    return (np.arange(ROWS * COLS).reshape(ROWS, COLS) * 3 + 100 * k + 1000 + offset).astype(
        np.int16
    )


def _write_slice(path: Path, series: Series, position, iop, pixels, instance, slope, desc):
    meta = FileMetaDataset()
    sop_uid = generate_uid()
    meta.MediaStorageSOPClassUID = CT_SOP
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CT_SOP
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET123"
    ds.PatientBirthDate = "19600101"
    ds.AccessionNumber = "ACC999"
    ds.InstitutionName = "Secret Hospital"
    ds.StudyInstanceUID = series.study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.KVP = 120
    ds.ConvolutionKernel = "B30f"
    ds.SliceThickness = 1.0
    ds.SeriesDescription = desc
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope = slope
    ds.RescaleIntercept = -1024
    ds.PixelData = pixels.astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    series.sop_uids.append(sop_uid)


def write_series(
    folder: Path,
    seed: int = 0,
    *,
    iop=(1, 0, 0, 0, 1, 0),
    normal=(0, 0, 1),
    origin=(-10.0, 20.0, -50.0),
    step: float = 1.0,
    skip=(),
    offset: int = 0,
    slopes=None,
    desc: str = "Test CT",
    strays: bool = True,
    shear=(0.0, 0.0, 0.0),
) -> Series:
    """Write NZ slices at origin + k*step*normal in shuffled order under random names."""
    rng = np.random.default_rng(seed)
    series = Series(folder, generate_uid(), generate_uid())
    ks = [k for k in range(NZ) if k not in skip]
    instances = rng.permutation(len(ks)) + 1
    for n, idx in enumerate(rng.permutation(len(ks))):
        k = ks[idx]
        pos = np.asarray(origin) + k * step * np.asarray(normal) + k * np.asarray(shear)
        slope = 1.0 if slopes is None else slopes[k]
        path = folder / f"{rng.integers(16**8):08x}"
        _write_slice(path, series, pos, iop, _stored(k, offset), instances[n], slope, desc)
        series.positions.append(pos)
        series.stored.append(_stored(k, offset))
        series.slopes.append(slope)
        series.files.append(path)
    if strays:
        (folder / "notes.txt").write_text("not an image\n")
        sr = Dataset()
        sr.PatientName = "Doe^Jane"
        sr.PatientID = "SECRET123"
        sr.Modality = "SR"
        sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixel data
        sr.SOPInstanceUID = generate_uid()
        sr.file_meta = FileMetaDataset()
        sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
        sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        (folder / "sub").mkdir(exist_ok=True)
        sr.save_as(folder / "sub" / "report.dcm", enforce_file_format=True)
    return series


def _sorted_by(series: Series, normal) -> list[int]:
    return sorted(range(len(series.positions)), key=lambda n: series.positions[n] @ normal)


@pytest.fixture
def series(tmp_path: Path) -> Series:
    return write_series(tmp_path / "dicom")


def test_hu_spacing_origin_and_counts(series: Series) -> None:
    image, info = read_dicom_series(series.folder, context=CONTEXT)
    order = _sorted_by(series, np.array([0, 0, 1]))
    expected = np.stack([series.stored[n].astype(np.float64) - 1024 for n in order])
    arr = sitk.GetArrayFromImage(image)
    assert arr.dtype == np.float32
    assert arr.shape == (NZ, ROWS, COLS)
    np.testing.assert_array_equal(arr, expected)
    # a known voxel by hand: slice at z = -50 + 2, row 1, column 3
    assert arr[2, 1, 3] == 1000 + 100 * 2 + 3 * (1 * COLS + 3) - 1024
    assert image.GetSize() == (COLS, ROWS, NZ)
    np.testing.assert_allclose(image.GetSpacing(), (0.6, 0.7, 1.0), rtol=1e-9)
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, 20.0, -50.0))
    assert info.size == (COLS, ROWS, NZ) and info.n_slices == NZ
    assert info.n_files_read == NZ and info.n_files_skipped == 2
    assert (info.modality, info.manufacturer, info.kvp) == ("CT", "ACME", 120.0)
    assert info.convolution_kernel == "B30f" and info.slice_thickness_mm == 1.0
    assert (info.rescale_slope, info.rescale_intercept) == (1.0, -1024.0)
    assert not info.rescale_varies_per_slice
    np.testing.assert_allclose(info.direction, np.eye(3).ravel())


def test_index_to_physical_point_matches_dicom(series: Series) -> None:
    image, _ = read_dicom_series(series.folder, context=CONTEXT)
    order = _sorted_by(series, np.array([0, 0, 1]))
    i, j, k = 3, 2, 4  # column, row, slice
    n = order[k]
    expected = series.positions[n] + np.array([i * COL_SPACING, j * ROW_SPACING, 0.0])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((i, j, k)), expected)
    assert image[i, j, k] == series.stored[n][j, i] - 1024


def test_rotated_orientation_physical_points(tmp_path: Path) -> None:
    # rows run along +y, columns along -x; slice normal = row x col = +z
    s = write_series(tmp_path / "rot", seed=1, iop=(0, 1, 0, -1, 0, 0), normal=(0, 0, 1))
    image, _ = read_dicom_series(s.folder, context=CONTEXT)
    order = _sorted_by(s, np.array([0, 0, 1]))
    for i, j, k in [(0, 0, 0), (4, 3, 5), (2, 1, 3)]:
        n = order[k]
        expected = s.positions[n] + i * COL_SPACING * np.array([0, 1, 0]) + j * ROW_SPACING * (
            np.array([-1, 0, 0])
        )
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((i, j, k)), expected)
        assert image[i, j, k] == s.stored[n][j, i] - 1024
        assert image.TransformPhysicalPointToIndex(tuple(expected)) == (i, j, k)


def test_coronal_stack_sorted_along_normal(tmp_path: Path) -> None:
    # coronal: rows along +x, columns along -z, normal = +y; slices written at y = 30 - k,
    # so the first slice along the normal is the one at y = 30 - (NZ - 1)
    s = write_series(
        tmp_path / "cor", seed=2, iop=(1, 0, 0, 0, 0, -1), normal=(0, -1, 0), origin=(5, 30, 7)
    )
    image, _ = read_dicom_series(s.folder, context=CONTEXT)
    np.testing.assert_allclose(image.GetOrigin(), (5, 30 - (NZ - 1), 7))
    np.testing.assert_allclose(image.GetSpacing(), (0.6, 0.7, 1.0))
    order = _sorted_by(s, np.array([0, 1, 0]))
    i, j, k = 1, 3, 2
    n = order[k]
    expected = s.positions[n] + np.array([i * COL_SPACING, 0, -j * ROW_SPACING])
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((i, j, k)), expected)
    assert image[i, j, k] == s.stored[n][j, i] - 1024


def test_two_series_need_series_uid(tmp_path: Path) -> None:
    a = write_series(tmp_path / "d", seed=3)
    b = write_series(tmp_path / "d" / "second", seed=4, offset=500, desc="Other", strays=False)
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(tmp_path / "d", context=CONTEXT)
    msg = str(err.value)
    assert a.series_uid in msg and b.series_uid in msg
    assert "series_uid" in msg and CONTEXT in msg and str(tmp_path / "d") in msg
    image, info = read_dicom_series(tmp_path / "d", series_uid=b.series_uid, context=CONTEXT)
    order = _sorted_by(b, np.array([0, 0, 1]))
    expected = np.stack([b.stored[n].astype(float) - 1024 for n in order])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert "Other" not in json.dumps(asdict(info))  # the free-text description: not kept
    assert info.n_files_read == NZ and info.n_files_skipped == NZ + 2


def test_missing_slice_is_an_error_naming_context(tmp_path: Path) -> None:
    s = write_series(tmp_path / "gap", seed=5, skip=(3,))
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(s.folder, context=CONTEXT)
    msg = str(err.value)
    assert CONTEXT in msg and str(s.folder) in msg
    assert "2 mm" in msg and "not uniform" in msg


def test_duplicate_slice_dropped_with_warning(series: Series) -> None:
    shutil.copy(series.files[0], series.folder / "copy_of_a_slice")
    with pytest.warns(UserWarning, match="duplicate"):
        image, info = read_dicom_series(series.folder, context=CONTEXT)
    assert image.GetSize() == (COLS, ROWS, NZ) and info.n_slices == NZ
    assert info.n_files_read == NZ + 1 and info.n_files_skipped == 2


def test_per_slice_rescale(tmp_path: Path) -> None:
    slopes = [1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    s = write_series(tmp_path / "resc", seed=6, slopes=slopes)
    image, info = read_dicom_series(s.folder, context=CONTEXT)
    arr = sitk.GetArrayFromImage(image)
    assert arr[2, 0, 0] == (1000 + 200) * 2.0 - 1024
    assert arr[1, 0, 0] == (1000 + 100) * 1.0 - 1024
    assert info.rescale_varies_per_slice and info.rescale_slope == 1.0


def test_gantry_tilt_is_rejected(tmp_path: Path) -> None:
    s = write_series(tmp_path / "tilt", seed=7, shear=(0.0, 0.3, 0.0))
    with pytest.raises(QctfeaError, match="sideways") as err:
        read_dicom_series(s.folder, context=CONTEXT)
    assert CONTEXT in str(err.value)


def test_gantry_tilt_is_corrected_when_asked_exactly_for_a_linear_field(tmp_path: Path) -> None:
    """A stack acquired with a 12 degree gantry tilt: the image planes are tilted about the
    x axis and the table moves along z, so the slice positions drift sideways. With
    ``gantry_tilt: resample`` every slice is shifted in its plane onto the first slice's
    grid; stored values linear in the physical position must then read back, at every
    voxel whose source lies inside its slice, as that linear function of the voxel's own
    physical position (linear interpolation is exact for it)."""
    from qctfea.imaging.dicomio import IngestParams

    t = np.radians(12.0)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(t), -np.sin(t))
    row, col = np.array(iop[:3]), np.array(iop[3:])
    rows, cols, nz, step = ROWS, COLS, 5, 1.0

    def field(p):  # stored value at physical point(s) p (mm)
        return 1000.0 + 7.0 * p[..., 0] - 5.0 * p[..., 1] + 3.0 * p[..., 2]

    series = Series(tmp_path / "tilt", generate_uid(), generate_uid())
    jj, ii = np.mgrid[0:rows, 0:cols]
    for k in range(nz):
        pos = np.array([-10.0, 20.0, -50.0 + k * step])  # the table moves along z
        pts = (pos + ii[..., None] * COL_SPACING * row + jj[..., None] * ROW_SPACING * col)
        stored = np.rint(field(pts)).astype(np.int16)
        _write_slice(series.folder / f"s{k}", series, pos, iop, stored, k + 1, 1.0, "tilt")
    with pytest.raises(QctfeaError, match="gantry tilt of 12.0 degrees") as err:
        read_dicom_series(series.folder, context=CONTEXT)
    assert "ingest.gantry_tilt: resample" in str(err.value)
    with pytest.warns(UserWarning, match="gantry tilt 12.0 degrees"):
        image, info = read_dicom_series(series.folder, context=CONTEXT,
                                        params=IngestParams(gantry_tilt="resample"))
    assert info.resampled and "gantry tilt 12.0 degrees" in info.resample_note
    arr = sitk.GetArrayFromImage(image)
    normal = np.cross(row, col)
    checked = 0
    for k, j, i in np.ndindex(*arr.shape):
        p = np.array(image.TransformIndexToPhysicalPoint((i, j, k)))
        # the source point in slice k (in-plane shift of that slice), inside its pixels?
        shift = (np.array([0.0, 0.0, k * step]) - k * step * normal[2] * normal)
        si, sj = i - (shift @ row) / COL_SPACING, j - (shift @ col) / ROW_SPACING
        if 0 <= si <= cols - 1 and 0 <= sj <= rows - 1:
            assert arr[k, j, i] == pytest.approx(field(p) - 1024.0, abs=0.6), (k, j, i)
            checked += 1
    assert checked > arr.size // 2
    np.testing.assert_allclose(image.GetSpacing()[2], step * np.cos(t), rtol=1e-6)


@pytest.mark.parametrize("keyword, value", [("RescaleIntercept", "inf"),
                                            ("RescaleSlope", "nan")])
def test_an_unreadable_rescale_value_is_an_error_not_the_default(tmp_path: Path, keyword,
                                                                 value) -> None:
    """A RescaleIntercept or RescaleSlope that is present but not a finite number is not
    read as absent (intercept 0, slope 1: every CT number shifted by 1024): the slices are
    refused with the reason, and a series of only such slices is an error."""
    import pydicom

    s = write_series(tmp_path / "bad", seed=7, strays=False)
    for f in s.files:
        ds = pydicom.dcmread(f)
        ds[keyword].value = value
        ds.save_as(f)
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(s.folder, context=CONTEXT)
    assert CONTEXT in str(err.value)
    assert f"{len(s.files)} invalid {keyword}" in str(err.value), str(err.value)


def test_no_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("nothing here")
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(tmp_path / "empty", context=CONTEXT)
    assert CONTEXT in str(err.value) and "1 not DICOM" in str(err.value)


def test_ingest_outputs_hold_no_identifiers(series: Series, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qctfea")
    out_img, out_json = tmp_path / "out" / "ct.nii.gz", tmp_path / "out" / "ct.json"
    info = ingest(series.folder, out_img, out_json, context=CONTEXT)
    assert isinstance(info, ScanInfo)
    assert sorted(p.name for p in out_img.parent.iterdir()) == ["ct.json", "ct.nii.gz"]
    json_text = out_json.read_text()
    raw = out_img.read_bytes()
    blobs = [json_text.encode(), raw, gzip.decompress(raw), caplog.text.encode()]
    # the series description too: free text typed at the scanner, which may hold a name
    forbidden = SECRETS + [series.series_uid, series.study_uid, *series.sop_uids, "Test CT"]
    for blob in blobs:
        for secret in forbidden:
            assert secret.encode() not in blob, secret
    record = json.loads(json_text)
    # the source's revision: the repository's HEAD when qctfea runs from this checkout
    import qctfea
    repo = Path(qctfea.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True,
                          capture_output=True).stdout.strip()
    if (repo / ".git").exists():
        assert record["provenance"]["versions"]["qctfea_source"].split("+")[0] == head
    assert record["scan"]["size"] == [COLS, ROWS, NZ]
    assert record["scan"]["n_files_skipped"] == 2
    assert record["provenance"]["step"] == "ingest"
    assert record["provenance"]["parameters"]["n_source_files"] == NZ + 2
    written = sitk.ReadImage(str(out_img))
    assert written.GetPixelID() == sitk.sitkFloat32
    direct, _ = read_dicom_series(series.folder, context=CONTEXT)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(direct))
    np.testing.assert_allclose(written.GetOrigin(), (-10.0, 20.0, -50.0), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), (0.6, 0.7, 1.0), atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_image_file_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(8)
    arr = rng.normal(200, 300, size=(3, 4, 5)).astype(np.float32)
    src = sitk.GetImageFromArray(arr)
    src.SetSpacing((0.5, 0.6, 0.8))
    src.SetOrigin((1.0, -2.0, 3.0))
    c, s_ = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s_, 0], [s_, c, 0], [0, 0, 1]])
    src.SetDirection(tuple(rot.ravel()))
    src_path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(src, str(src_path))
    info = ingest(src_path, tmp_path / "o.nii.gz", tmp_path / "o.json", context=CONTEXT)
    out = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), arr, rtol=0, atol=0)
    np.testing.assert_allclose(out.GetSpacing(), (0.5, 0.6, 0.8), atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), (1.0, -2.0, 3.0), atol=1e-5)
    np.testing.assert_allclose(out.GetDirection(), rot.ravel(), atol=1e-5)
    assert info.size == (5, 4, 3) and info.n_slices == 3
    # NIfTI stores spacing as float32, hence approx
    spacing = json.loads((tmp_path / "o.json").read_text())["scan"]["spacing_mm"]
    assert spacing == pytest.approx([0.5, 0.6, 0.8], abs=1e-6)


def test_ingest_stores_any_axis_order_as_lps_with_the_same_voxels(tmp_path: Path) -> None:
    """A scan written sagittally (PIR) is stored with its axes in LPS order: every voxel keeps
    its value at its physical place (checked point by point through the source's own
    geometry), scan.json records the source's order, and its label map, still on the PIR
    grid, is reordered onto the ingested grid without interpolation or warning."""
    import warnings

    from qctfea.imaging.masks import resample_labels_to

    rng = np.random.default_rng(3)
    arr = rng.normal(200, 300, size=(4, 5, 6)).astype(np.float32)
    src = sitk.GetImageFromArray(arr)
    src.SetSpacing((0.5, 0.6, 2.5))
    src.SetOrigin((1.0, -2.0, 3.0))
    # columns: x axis -> posterior, y axis -> inferior, z axis -> right (PIR)
    src.SetDirection((0, 0, -1, 1, 0, 0, 0, -1, 0))
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        src.GetDirection()) == "PIR"
    sitk.WriteImage(src, str(tmp_path / "scan.nii.gz"))
    info = ingest(tmp_path / "scan.nii.gz", tmp_path / "o.nii.gz", tmp_path / "o.json",
                  context=CONTEXT)
    out = sitk.ReadImage(str(tmp_path / "o.nii.gz"))
    np.testing.assert_allclose(out.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    assert info.source_orientation == "PIR"
    assert json.loads((tmp_path / "o.json").read_text())["scan"]["size"] == list(out.GetSize())
    out_arr = sitk.GetArrayFromImage(out)
    for ijk in np.ndindex(*out.GetSize()):
        p = out.TransformIndexToPhysicalPoint([int(v) for v in ijk])
        src_ijk = np.rint(src.TransformPhysicalPointToContinuousIndex(p)).astype(int)
        assert out_arr[ijk[::-1]] == arr[tuple(src_ijk[::-1])]
    labels = sitk.GetImageFromArray((arr > 200).astype(np.uint8))
    labels.CopyInformation(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_ct = resample_labels_to(labels, out, "labels")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_ct), out_arr > 200)


def _enhanced_ct(path: Path, series: Series, order) -> None:
    """An Enhanced CT Image Storage file (one multi-frame object) holding the slices of
    ``series`` in ``order``: position and rescale per frame, orientation, pixel spacing and
    slice thickness shared, kernel and kVp in their CT macros (DICOM PS3.3 C.8.15)."""
    from pydicom.sequence import Sequence

    def item(**kw):
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET123"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.study_uid, series.series_uid
    ds.Modality, ds.Manufacturer, ds.SeriesDescription = "CT", "ACME", "Test CT"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = len(order)
    ds.SharedFunctionalGroupsSequence = Sequence([item(
        PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
        PixelMeasuresSequence=Sequence([item(PixelSpacing=[ROW_SPACING, COL_SPACING],
                                             SliceThickness=1.0)]),
        CTReconstructionSequence=Sequence([item(ConvolutionKernel="B30f")]),
        CTXRayDetailsSequence=Sequence([item(KVP=120)]))])
    ds.PerFrameFunctionalGroupsSequence = Sequence([item(
        PlanePositionSequence=Sequence([item(
            ImagePositionPatient=[float(v) for v in series.positions[i]])]),
        PixelValueTransformationSequence=Sequence([item(
            RescaleSlope=series.slopes[i], RescaleIntercept=-1024, RescaleType="HU")]))
        for i in order])
    ds.PixelData = np.stack([series.stored[i] for i in order]).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_ct_multiframe_file_reads_as_its_single_frame_series(tmp_path: Path) -> None:
    """Modern scanners export one Enhanced CT file per series: each frame is a slice with
    the position and rescale of its own functional groups. The same slices (frames in a
    shuffled order, a different rescale slope per frame) must give the image the
    single-frame series gives, voxel for voxel, with kernel and kVp from the CT macros."""
    slopes = [1.0, 2.0, 1.0, 0.5, 1.0, 1.0][:NZ] + [1.0] * max(0, NZ - 6)
    s = write_series(tmp_path / "single", seed=5, strays=False, slopes=slopes)
    reference, _ = read_dicom_series(s.folder, context=CONTEXT)
    order = np.random.default_rng(2).permutation(len(s.files))
    (tmp_path / "enhanced").mkdir()
    _enhanced_ct(tmp_path / "enhanced" / "ct.dcm", s, order)
    image, info = read_dicom_series(tmp_path / "enhanced", context=CONTEXT)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                  sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-12)
    assert (info.convolution_kernel, info.kvp, info.slice_thickness_mm) == ("B30f", 120.0, 1.0)
    assert info.rescale_varies_per_slice
    assert (info.n_files_read, info.n_files_skipped, info.n_slices) == (1, 0, NZ)


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14SV1", "JPEGLSLossless"])
def test_compressed_series_reads_as_the_uncompressed_one(tmp_path: Path, syntax: str) -> None:
    """Clinical archives send CT series compressed (lossless JPEG, JPEG-LS, JPEG 2000):
    each slice is recompressed here by GDCM's own encoder and the series must read to the
    same HU voxel for voxel as before (pydicom decodes them through the python-gdcm plugin,
    a requirement; GDCM's JPEG 2000 encoder crashes on these slices: JPEG 2000 is made by
    OpenJPEG in the next test)."""
    import gdcm

    s = write_series(tmp_path / "raw", seed=4, strays=False)
    reference, _ = read_dicom_series(s.folder, context=CONTEXT)
    ts = {"JPEGLosslessProcess14SV1": gdcm.TransferSyntax.JPEGLosslessProcess14_1,
          "JPEGLSLossless": gdcm.TransferSyntax.JPEGLSLossless}[syntax]
    (tmp_path / "jpeg").mkdir()
    for f in s.files:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(f))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(ts))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(tmp_path / "jpeg" / f.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    import pydicom

    one = pydicom.dcmread(tmp_path / "jpeg" / s.files[0].name)
    assert one.file_meta.TransferSyntaxUID.is_compressed
    image, _ = read_dicom_series(tmp_path / "jpeg", context=CONTEXT)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                  sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-9)


def test_jpeg2000_series_reads_as_the_uncompressed_one(tmp_path: Path) -> None:
    """JPEG 2000 lossless (transfer syntax 1.2.840.10008.1.2.4.90), the syntax many PACS
    exports use, encoded by an encoder other than the reader's: OpenJPEG through Pillow
    (the reader decodes through python-gdcm). JPEG 2000 codes unsigned 16-bit samples here,
    so each slice's stored values are shifted to start at 0 and its rescale intercept
    carries the shift back: the series must read to the same HU voxel for voxel."""
    import io

    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    s = write_series(tmp_path / "raw", seed=5, strays=False)
    reference, _ = read_dicom_series(s.folder, context=CONTEXT)
    (tmp_path / "j2k").mkdir()
    for f in s.files:
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.astype(np.int32)
        low = int(stored.min())
        buf = io.BytesIO()
        Image.fromarray((stored - low).astype(np.uint16)).save(
            buf, format="JPEG2000", irreversible=False, no_jp2=True)  # lossless codestream
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = float(ds.RescaleIntercept) + float(ds.RescaleSlope) * low
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(tmp_path / "j2k" / f.name, enforce_file_format=True)
    one = pydicom.dcmread(tmp_path / "j2k" / s.files[0].name)
    assert one.file_meta.TransferSyntaxUID == JPEG2000Lossless
    # GDCM decodes it (pydicom's first JPEG 2000 plugin; Pillow is the fallback)
    first = pydicom.dcmread(s.files[0]).pixel_array.astype(np.int32)
    one.pixel_array_options(decoding_plugin="gdcm")
    np.testing.assert_array_equal(one.pixel_array, first - first.min())
    image, _ = read_dicom_series(tmp_path / "j2k", context=CONTEXT)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image),
                               sitk.GetArrayFromImage(reference), atol=1e-3)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-9)


@pytest.mark.parametrize(
    ("iop", "normal"),
    [((0, 1, 0, -1, 0, 0), (0, 0, 1)), ((1, 0, 0, 0, 0, -1), (0, -1, 0))],
)
def test_geometry_agrees_with_simpleitk_gdcm_reader(tmp_path: Path, iop, normal) -> None:
    """Independent check: SimpleITK's own DICOM (GDCM) reader gives the same image."""
    s = write_series(tmp_path / "x", seed=9, iop=iop, normal=normal, strays=False)
    image, _ = read_dicom_series(s.folder, context=CONTEXT)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(s.folder), s.series_uid))
    ref = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
    np.testing.assert_allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(image.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), ref.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ref))


def test_voxels_coarser_than_3_mm_are_warned_about(tmp_path: Path) -> None:
    """5 mm slices: the ingest warns (and ingests); 3 mm slices do not."""
    import warnings

    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    for slice_mm, warned in ((5.0, True), (3.0, False)):
        src = sitk.GetImageFromArray(arr)
        src.SetSpacing((0.7, 0.7, slice_mm))
        path = tmp_path / f"scan{slice_mm:g}.nii.gz"
        sitk.WriteImage(src, str(path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ingest(path, tmp_path / f"o{slice_mm:g}.nii.gz", tmp_path / f"o{slice_mm:g}.json",
                   context=CONTEXT)
        texts = [str(w.message) for w in caught if "coarser than 3 mm" in str(w.message)]
        assert bool(texts) == warned, texts
        if warned:
            assert CONTEXT in texts[0] and "0.7 x 0.7 x 5 mm" in texts[0]
            assert "protocol_change" in texts[0]
