"""Choosing one series from a DICOM folder holding several (ingest.series_rule) and uneven
slice spacing (ingest.uneven_spacing), on tiny synthetic series written with the helpers of
test_dicomio.  Expected choices follow from the rule as documented (axial, thinnest,
preferred kernel, most slices); expected resampled values from linear interpolation by hand.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from qctfea.steps import imaging as steps_imaging
from qctfea.imaging.dicomio import IngestParams, read_dicom_series
from qctfea.errors import QctfeaError
from test_dicomio import (
    COL_SPACING,
    COLS,
    CONTEXT,
    NZ,
    ROW_SPACING,
    ROWS,
    SECRETS,
    Series,
    _write_slice,
    write_series,
)

THIN_AXIAL = IngestParams(series_rule="thinnest_axial")


def _set_headers(series: Series, **values) -> Series:
    """Rewrite header elements (e.g. ConvolutionKernel, SliceThickness) in every file."""
    for path in series.files:
        ds = pydicom.dcmread(path)
        for key, value in values.items():
            setattr(ds, key, value)
        ds.save_as(path, enforce_file_format=True)
    return series


def _axial(folder: Path, seed: int, step: float, kernel: str, offset: int = 0,
           desc: str = "Axial", **kw) -> Series:
    s = write_series(folder, seed=seed, step=step, offset=offset, desc=desc, strays=False, **kw)
    return _set_headers(s, ConvolutionKernel=kernel, SliceThickness=step)


def _values(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _expected(series: Series) -> np.ndarray:
    order = sorted(range(len(series.positions)), key=lambda n: series.positions[n][2])
    return np.stack([series.stored[n].astype(np.float64) - 1024 for n in order])


def _read_quiet(folder: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean pick must not warn
        return read_dicom_series(folder, context=CONTEXT, **kw)


# --- series_rule ---------------------------------------------------------------------------


def test_thinnest_axial_prefers_the_1mm_bone_series_over_3mm_soft(tmp_path: Path) -> None:
    soft = _axial(tmp_path / "d" / "soft", 1, 3.0, "B30f", desc="Abdomen 3mm soft")
    bone = _axial(tmp_path / "d" / "bone", 2, 1.0, "B60f", offset=500, desc="Spine 1mm bone")
    image, info = _read_quiet(tmp_path / "d", params=THIN_AXIAL)
    np.testing.assert_array_equal(_values(image), _expected(bone))
    assert image.GetSpacing()[2] == pytest.approx(1.0)
    assert info.convolution_kernel == "B60f"
    assert info.selected_by.startswith("thinnest_axial: 1 mm, kernel B60f")
    assert info.n_files_read == NZ and info.n_files_skipped == NZ
    # the default rule still refuses, listing both with what is needed to choose
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(tmp_path / "d", context=CONTEXT)
    msg = str(err.value)
    assert soft.series_uid in msg and bone.series_uid in msg
    assert "slice_spacing=3 mm" in msg and "slice_spacing=1 mm" in msg
    assert "kernel='B30f'" in msg and "kernel='B60f'" in msg
    assert "orientation=axial" in msg and "slice_thickness=3 mm" in msg


def test_same_spacing_bone_kernel_wins(tmp_path: Path) -> None:
    _axial(tmp_path / "d" / "a", 3, 1.0, "B30f", desc="Recon")
    bone = _axial(tmp_path / "d" / "b", 4, 1.0, "BONE", offset=300, desc="Recon")
    image, info = _read_quiet(tmp_path / "d", params=THIN_AXIAL)
    np.testing.assert_array_equal(_values(image), _expected(bone))
    assert info.convolution_kernel == "BONE"
    assert "kernel BONE (kernel preference 'bone')" in info.selected_by


def test_kernel_preference_order_and_word_prefix(tmp_path: Path) -> None:
    # "d" must not match GE STANDARD (substring) but Philips D; order of the list decides
    _axial(tmp_path / "d" / "a", 5, 1.0, "STANDARD")
    philips = _axial(tmp_path / "d" / "b", 6, 1.0, "D", offset=300)
    _, info = _read_quiet(tmp_path / "d", params=THIN_AXIAL)
    assert info.convolution_kernel == "D"
    _, info = _read_quiet(tmp_path / "d", params=IngestParams(
        series_rule="thinnest_axial", kernel_preference=["standard", "d"]))
    assert info.convolution_kernel == "STANDARD"
    assert philips.series_uid not in info.selected_by


def test_identical_rank_is_refused_listing_both(tmp_path: Path) -> None:
    a = _axial(tmp_path / "d" / "a", 7, 1.0, "B60f", desc="First")
    b = _axial(tmp_path / "d" / "b", 8, 1.0, "B60f", offset=200, desc="Second")
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(tmp_path / "d", context=CONTEXT, params=THIN_AXIAL)
    msg = str(err.value)
    assert "cannot choose between 2 series" in msg
    assert a.series_uid in msg and b.series_uid in msg
    assert "'First'" in msg and "'Second'" in msg and "series_uid" in msg
    assert CONTEXT in msg and str(tmp_path / "d") in msg
    # the explicit series_uid still wins over the rule
    image, info = _read_quiet(tmp_path / "d", series_uid=b.series_uid, params=THIN_AXIAL)
    np.testing.assert_array_equal(_values(image), _expected(b))
    assert info.selected_by == "series_uid"


def test_more_slices_break_a_tie(tmp_path: Path) -> None:
    _axial(tmp_path / "d" / "a", 9, 1.0, "B60f", skip=(0,))  # 5 slices, still regular
    full = _axial(tmp_path / "d" / "b", 10, 1.0, "B60f", offset=200)
    image, info = _read_quiet(tmp_path / "d", params=THIN_AXIAL)
    np.testing.assert_array_equal(_values(image), _expected(full))
    assert f"{NZ} slices" in info.selected_by


def test_axial_wins_over_thinner_sagittal_reformat(tmp_path: Path) -> None:
    sag = write_series(tmp_path / "d" / "sag", seed=11, iop=(0, 1, 0, 0, 0, -1),
                       normal=(1, 0, 0), step=0.5, desc="Sag MPR", strays=False)
    _set_headers(sag, ConvolutionKernel="B60f", SliceThickness=0.5)
    axial = _axial(tmp_path / "d" / "ax", 12, 1.0, "B30f", offset=400)
    image, info = _read_quiet(tmp_path / "d", params=THIN_AXIAL)
    np.testing.assert_array_equal(_values(image), _expected(axial))
    assert "1 axial" in info.selected_by
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(tmp_path / "d", context=CONTEXT)
    assert "orientation=sagittal (90 deg from z)" in str(err.value)
    assert "slice_spacing=0.5 mm" in str(err.value)


def test_no_axial_series_is_refused(tmp_path: Path) -> None:
    sag = write_series(tmp_path / "d" / "sag", seed=14, iop=(0, 1, 0, 0, 0, -1),
                       normal=(1, 0, 0), strays=False)
    cor = write_series(tmp_path / "d" / "cor", seed=15, iop=(1, 0, 0, 0, 0, -1),
                       normal=(0, -1, 0), strays=False)
    with pytest.raises(QctfeaError) as err:
        read_dicom_series(tmp_path / "d", context=CONTEXT, params=THIN_AXIAL)
    msg = str(err.value)
    assert "none of the 2 image series is axial" in msg and "axial_tolerance_deg" in msg
    assert sag.series_uid in msg and cor.series_uid in msg
    assert "orientation=coronal" in msg and "orientation=sagittal" in msg


def test_series_rule_none_refuses_two_series_as_before(tmp_path: Path) -> None:
    a = _axial(tmp_path / "d" / "a", 16, 3.0, "B30f")
    b = _axial(tmp_path / "d" / "b", 17, 1.0, "B60f", offset=500)
    for params in (None, IngestParams(series_rule="none")):
        with pytest.raises(QctfeaError) as err:
            read_dicom_series(tmp_path / "d", context=CONTEXT, params=params)
        msg = str(err.value)
        assert "2 image series" in msg and "not clear which one" in msg
        assert a.series_uid in msg and b.series_uid in msg
        assert "series_uid" in msg and "series_rule" in msg


def test_rule_choice_recorded_without_identifiers(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="qctfea")
    _axial(tmp_path / "d" / "soft", 18, 3.0, "B30f")
    bone = _axial(tmp_path / "d" / "bone", 19, 1.0, "B60f", offset=500)
    out = tmp_path / "out"
    steps_imaging.ingest(source=tmp_path / "d", out_image=out / "ct.nii.gz",
                         out_json=out / "scan.json", context=CONTEXT,
                         cfg={"series_rule": "thinnest_axial"})
    text = (out / "scan.json").read_text()
    record = json.loads(text)
    assert record["scan"]["selected_by"].startswith("thinnest_axial: 1 mm, kernel B60f")
    assert record["scan"]["resampled"] is False
    prm = record["provenance"]["parameters"]
    assert prm["series_rule"] == "thinnest_axial" and prm["uneven_spacing"] == "refuse"
    for secret in SECRETS + [bone.series_uid, bone.study_uid]:
        assert secret not in text and secret not in caplog.text


# --- uneven spacing ------------------------------------------------------------------------


def test_missing_slice_refused_by_default_naming_the_gap(tmp_path: Path) -> None:
    s = _axial(tmp_path / "gap", 20, 1.0, "B60f", skip=(3,))
    for params in (None, IngestParams(uneven_spacing="refuse")):
        with pytest.raises(QctfeaError) as err:
            read_dicom_series(s.folder, context=CONTEXT, params=params)
        msg = str(err.value)
        assert "not uniform" in msg and CONTEXT in msg
        assert "2 mm between slices 2 and 3 (at -48 and -46 mm)" in msg
        assert "uneven_spacing: resample" in msg


def test_missing_slice_resampled_with_a_warning(tmp_path: Path) -> None:
    s = _axial(tmp_path / "gap", 21, 1.0, "B60f", skip=(3,))
    with pytest.warns(UserWarning) as rec:
        image, info = read_dicom_series(s.folder, context=CONTEXT,
                                        params=IngestParams(uneven_spacing="resample"))
    msg = "\n".join(str(w.message) for w in rec)
    assert str(s.folder) in msg and CONTEXT in msg
    assert "2 mm between slices 2 and 3" in msg and "6 slices at 1 mm" in msg
    arr = _values(image)
    assert arr.shape == (NZ, ROWS, COLS) and info.n_slices == NZ and info.resampled
    np.testing.assert_allclose(image.GetSpacing(), (COL_SPACING, ROW_SPACING, 1.0))
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, 20.0, -50.0))
    # the phantom is linear in z (stored = 1000 + 100 k + ...): original slices kept exactly,
    # the missing one (k = 3) is the mean of its neighbours = the value it would have had
    for k in range(NZ):
        expected = (1000 + 100 * k + np.arange(ROWS * COLS).reshape(ROWS, COLS) * 3) - 1024
        np.testing.assert_allclose(arr[k], expected, atol=1e-3)
    assert "2 mm x1" in info.resample_note


def _write_at(folder: Path, zs: list[float]) -> Series:
    """Axial slices at the given z (mm), values linear in z: HU = 100 z + 3 (row*COLS+col)."""
    series = Series(folder, generate_uid(), generate_uid())
    for n, z in enumerate(zs):
        pixels = (np.arange(ROWS * COLS).reshape(ROWS, COLS) * 3 + 1024 + 100 * z)
        assert np.allclose(pixels, np.round(pixels))
        _write_slice(folder / f"s{n:03d}.dcm", series, (0.0, 0.0, z), (1, 0, 0, 0, 1, 0),
                     np.round(pixels).astype(np.int16), n + 1, 1.0, "Irregular")
        series.positions.append(np.array([0.0, 0.0, z]))
        series.stored.append(np.round(pixels).astype(np.int16))
    return series


def test_irregular_spacing_resampled_onto_a_uniform_grid(tmp_path: Path) -> None:
    zs = [0.0, 1.0, 2.0, 3.5, 4.5, 5.5, 6.5]  # gaps 1 1 1.5 1 1 1: median 1, span 6.5
    s = _write_at(tmp_path / "irr", zs)
    with pytest.warns(UserWarning, match="resampled"):
        image, info = read_dicom_series(s.folder, context=CONTEXT,
                                        params=IngestParams(uneven_spacing="resample"))
    arr = _values(image).astype(np.float64)
    # grid from first to last slice, spacing median adjusted to the span: 6.5 / round(6.5) = 6.5/6
    assert arr.shape[0] == 7
    dz = 6.5 / 6
    assert image.GetSpacing()[2] == pytest.approx(dz)
    grid = np.arange(7) * dz
    np.testing.assert_allclose(
        [image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(7)], grid)
    inplane = np.arange(ROWS * COLS).reshape(ROWS, COLS) * 3
    for k, z in enumerate(grid):  # linear phantom: exact at every grid point
        np.testing.assert_allclose(arr[k], 100 * z + inplane, atol=1e-3)
    # linear interpolation of the resampled volume at the original positions gives the
    # original slices back (the phantom is linear in z)
    for z, stored in zip(zs, s.stored, strict=True):
        t = z / dz
        k = min(int(np.floor(t)), 5)
        w = t - k
        at_z = (1 - w) * arr[k] + w * arr[k + 1]
        np.testing.assert_allclose(at_z, stored.astype(np.float64) - 1024, atol=1e-3)
    assert info.resampled and "1.5 mm" in info.resample_note


def test_resample_recorded_in_scan_json(tmp_path: Path) -> None:
    s = _axial(tmp_path / "gap", 22, 1.0, "B60f", skip=(2,))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="not uniform"):
        steps_imaging.ingest(source=s.folder, out_image=out / "ct.nii.gz",
                             out_json=out / "scan.json", context=CONTEXT,
                             cfg={"uneven_spacing": "resample"})
    record = json.loads((out / "scan.json").read_text())
    assert record["scan"]["resampled"] is True and record["scan"]["n_slices"] == NZ
    assert record["scan"]["selected_by"] == "only series"
    assert "2 mm" in record["scan"]["resample_note"]
    assert record["provenance"]["parameters"]["resampled"] is True


# --- config section ------------------------------------------------------------------------


def test_unknown_key_in_ingest_section_is_named(tmp_path: Path) -> None:
    s = _axial(tmp_path / "d", 23, 1.0, "B60f")
    with pytest.raises(QctfeaError) as err:
        steps_imaging.ingest(source=s.folder, out_image=tmp_path / "ct.nii.gz",
                             out_json=tmp_path / "scan.json", context=CONTEXT,
                             cfg={"series_rule": "thinnest_axial", "serie_rule": "x"})
    msg = str(err.value)
    assert "'ingest'" in msg and "serie_rule" in msg and "series_rule" in msg
    assert not (tmp_path / "scan.json").exists()


@pytest.mark.parametrize(("cfg", "needle"), [
    ({"series_rule": "thinnest"}, "series_rule 'thinnest' is not one of"),
    ({"uneven_spacing": "interpolate"}, "uneven_spacing 'interpolate' is not one of"),
    ({"axial_tolerance_deg": 90}, "axial_tolerance_deg"),
    ({"kernel_preference": "bone"}, "kernel_preference"),
    ({"kernel_preference": ["bone", ""]}, "kernel_preference"),
])
def test_bad_ingest_values_are_refused(tmp_path: Path, cfg: dict, needle: str) -> None:
    with pytest.raises(QctfeaError, match="ingest") as err:
        steps_imaging.ingest(source=tmp_path / "nothing", out_image=tmp_path / "ct.nii.gz",
                             out_json=tmp_path / "scan.json", context=CONTEXT, cfg=cfg)
    assert needle in str(err.value)


def test_stored_values_without_their_rescale_are_warned_about(tmp_path: Path,
                                                              real_scans: Path) -> None:
    """The real VerSe crop (fat, no air: 1 % below -205 HU) is ingested without a word; the
    same voxels shifted by +1024, as stored values written without their rescale intercept,
    are warned about, with the shifted 1st percentile in the message."""
    src = real_scans / "verse_tptbox_L3" / "ct.nii.gz"
    kw = dict(out_image=tmp_path / "ct.nii.gz", out_json=tmp_path / "scan.json",
              context="P01 M00")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps_imaging.ingest(source=src, **kw)
    img = sitk.ReadImage(str(src), sitk.sitkFloat32)
    shifted = sitk.Cast(img + 1024.0, sitk.sitkInt16)
    sitk.WriteImage(shifted, str(tmp_path / "stored.nii.gz"))
    low = np.percentile(sitk.GetArrayFromImage(sitk.DICOMOrient(shifted, "LPS"))[::2, ::2, ::2],
                        1)
    assert low > 700  # fat at about +900
    with pytest.warns(UserWarning, match=rf"P01 M00: .*1 % of the scan reads below {low:.0f}, "
                      r"and a CT in HU holds air .*without their rescale"):
        steps_imaging.ingest(source=tmp_path / "stored.nii.gz", **kw)


def _two_series_cohort(tmp_path: Path) -> tuple[Path, Series, Series]:
    """A one-scan cohort folder whose DICOM folder holds two series (the second 500 stored
    units brighter), with a label map on their grid holding label 23; the sample sheet is
    written by :func:`_sheet`."""
    a = write_series(tmp_path / "dicom", seed=3, strays=False)
    b = write_series(tmp_path / "dicom" / "second", seed=4, offset=500, desc="Other",
                     strays=False)
    image, _ = read_dicom_series(tmp_path / "dicom", series_uid=a.series_uid, context=CONTEXT)
    lab = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    lab.CopyInformation(image)
    lab[1:3, 1:3, 1:3] = 23
    sitk.WriteImage(lab, str(tmp_path / "labels.nii.gz"))
    cohorts = tmp_path / "cohorts"
    (cohorts / "two").mkdir(parents=True)
    (cohorts / "two" / "config.yaml").write_text(
        "samples: samples.tsv\nplanning: {method: auto}\n"
        "calibration: {method: fixed, slope: 1.0, intercept: 0.0}\n")
    return cohorts, a, b


def _sheet(tmp_path: Path, cohorts: Path, extra: dict) -> None:
    import pandas as pd

    pd.DataFrame([{"patient": "P1", "timepoint": "M00", "months": 0,
                   "image": str(tmp_path / "dicom"), "labels": str(tmp_path / "labels.nii.gz"),
                   **extra}]).to_csv(cohorts / "two" / "samples.tsv", sep="\t", index=False)


def test_sample_sheet_series_uid_reaches_the_ingest_rule(tmp_path: Path) -> None:
    """The sheet's series_uid column picks the series the workflow's ingest step reads: the
    second series' HU (its stored values - 1024, known from how it was written), not the
    first's; without it the scan is refused naming the column. An unknown column, and a
    file the sheet names that does not exist, are refused at the dry run."""
    from conftest import REPO, run, venv_bin

    def snakemake(*extra: str):
        return run([venv_bin("snakemake"), "--cores", "1", "--snakefile",
                    str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                    str(REPO / "config" / "config.yaml"), "--config", "cohort=two",
                    f"cohorts_dir={cohorts}", *extra], cwd=REPO, timeout=300)

    cohorts, _, b = _two_series_cohort(tmp_path)
    scan = tmp_path / "results" / "two" / "P1" / "M00"
    target = "results/two/P1/M00/scan.json"
    _sheet(tmp_path, cohorts, {"series_uid": ""})
    p = snakemake("--", target)
    assert p.returncode == 0, p.stderr[-3000:]
    refused = json.loads((scan / "scan.json").read_text())["refused"]
    assert "set the series_uid column of the sample sheet" in refused
    # the UIDs and descriptions the user chooses from: in the step's log, not in the record
    # (which the exclusions table and the report copy)
    assert b.series_uid not in refused and "listed in this step's log" in refused
    log = (tmp_path / "logs" / "two" / "P1" / "M00" / "ingest_scan.log").read_text()
    assert b.series_uid in log and "Other" in log
    _sheet(tmp_path, cohorts, {"series_uid": b.series_uid})
    p = snakemake("--forceall", "--", target)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "refused" not in json.loads((scan / "scan.json").read_text())
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(scan / "ct.nii.gz")))
    order = sorted(range(len(b.positions)), key=lambda n: b.positions[n][2])
    np.testing.assert_array_equal(hu, np.stack([b.stored[n].astype(float) - 1024
                                                for n in order]))
    # a trailing tab on every line (a spreadsheet's export): read as the same sheet
    sheet = cohorts / "two" / "samples.tsv"
    sheet.write_text("".join(f"{line}\t\n" for line in sheet.read_text().splitlines()))
    p = snakemake("-n")
    assert p.returncode == 0, p.stderr[-3000:]
    _sheet(tmp_path, cohorts, {"series": b.series_uid})
    p = snakemake("-n")
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "column series: unknown column; allowed:" in out and "series_uid" in out
    # a file the sheet names but that is not there: refused at the dry run, by scan and
    # column, for a scan not yet ingested (P2); P1, ingested above, needs its files no more
    _sheet(tmp_path, cohorts, {"image": str(tmp_path / "dicom.zip")})
    p = snakemake("-n")
    assert p.returncode == 0, p.stderr[-3000:]
    _sheet(tmp_path, cohorts, {"patient": "P2", "image": str(tmp_path / "dicom.zip")})
    p = snakemake("-n")
    assert p.returncode != 0
    assert (f"patient P2, timepoint M00, column image: {tmp_path / 'dicom.zip'} not found"
            in p.stdout + p.stderr)


def test_a_sheet_exported_with_trailing_tabs_is_read(tmp_path: Path) -> None:
    """Spreadsheets export a trailing tab on every line: an unnamed, empty column, which the
    sheet reader and the workflow's schema check leave out (its other cells as written)."""
    from qctfea.cohort.samples import read_sample_sheet

    sheet = tmp_path / "samples.tsv"
    sheet.write_text("patient\ttimepoint\tmonths\timage\tlabels\t\n"
                     "P1\tM00\t0\tct.nii.gz\tlabels.nii.gz\t\n")
    df = read_sample_sheet(sheet, "auto")
    assert list(df.columns[:5]) == ["patient", "timepoint", "months", "image", "labels"]
    assert not any(str(c).startswith("Unnamed") for c in df.columns)
    assert df.iloc[0]["image"] == "ct.nii.gz"
