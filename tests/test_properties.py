"""Property-based tests (hypothesis): for any header value, sample sheet or config
section, the library gives a correct result or a QctfeaError that says what is wrong;
never another exception and never a hang."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qctfea.errors import QctfeaError

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, -1.0, 1e-9, 1e9, 0.5, 2.0]))


@SETTINGS
@given(slope=floats, intercept=floats, row_sp=floats, col_sp=floats, step=floats,
       iop_tilt=st.floats(-1.0, 1.0))
def test_dicom_header_values(slope, intercept, row_sp, col_sp, step, iop_tilt):
    """Random RescaleSlope/Intercept, PixelSpacing, slice step and a tilted row cosine: either
    HU = stored x slope + intercept on a grid with positive spacings, or a QctfeaError."""
    import test_dicomio as td
    from qctfea.imaging.dicomio import read_dicom_series

    iop = (1.0, iop_tilt, 0.0, 0.0, 1.0, 0.0)  # not orthonormal unless iop_tilt == 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "s"
        try:
            series = td.write_series(folder, iop=iop, step=step, strays=False)
        except (ValueError, OverflowError, TypeError):
            return  # pydicom cannot encode the value: no file to read
        import pydicom

        for f in series.files:  # the drawn header values
            ds = pydicom.dcmread(f)
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.PixelSpacing = [row_sp, col_sp]
            try:
                ds.save_as(f, enforce_file_format=True)
            except (ValueError, OverflowError, TypeError):
                return
        try:
            img, info = read_dicom_series(folder, context=td.CONTEXT)
        except QctfeaError as exc:
            assert td.CONTEXT in str(exc) or str(folder) in str(exc)
            return
    sp = img.GetSpacing()
    assert all(math.isfinite(s) and s > 0 for s in sp)
    arr = sitk.GetArrayFromImage(img)
    assert np.isfinite(arr).all()
    stored = np.sort(np.concatenate([s.ravel() for s in series.stored]).astype(float))
    rd = pydicom.valuerep.DSfloat  # what pydicom wrote for the drawn values
    s_, i_ = float(rd(slope, auto_format=True)), float(rd(intercept, auto_format=True))
    np.testing.assert_allclose(np.sort(arr.ravel()), np.sort(stored * s_ + i_).astype(np.float32),
                               rtol=1e-5, atol=1e-3)


@SETTINGS
@given(slope=st.floats(1e-3, 1e3), intercept=st.floats(-5e3, 5e3),
       row_sp=st.floats(0.05, 10.0), col_sp=st.floats(0.05, 10.0),
       step=st.floats(0.05, 10.0), reverse=st.booleans(), turn_deg=st.integers(0, 359))
def test_valid_dicom_headers_are_read(slope, intercept, row_sp, col_sp, step, reverse,
                                      turn_deg):
    """Valid headers must be read: HU = stored x slope + intercept, spacings, rows as written."""
    # finite slope and intercept, positive spacings, rows and columns turned in the axial
    # plane, slices in either order: never refused
    import pydicom
    import test_dicomio as td
    from qctfea.imaging.dicomio import read_dicom_series

    t = np.deg2rad(turn_deg)
    row, col = np.round([np.cos(t), np.sin(t), 0.0], 8), np.round([-np.sin(t), np.cos(t), 0.0], 8)
    ds_ = pydicom.valuerep.DSfloat  # what pydicom writes for a drawn value
    slope, intercept, row_sp, col_sp = (float(ds_(v, auto_format=True))
                                        for v in (slope, intercept, row_sp, col_sp))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "s"
        series = td.write_series(folder, iop=(*row, *col), step=-step if reverse else step,
                                 strays=False)
        for f in series.files:
            ds = pydicom.dcmread(f)
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.PixelSpacing = [row_sp, col_sp]
            ds.save_as(f, enforce_file_format=True)
        img, _ = read_dicom_series(folder, context=td.CONTEXT)
    np.testing.assert_allclose(img.GetSpacing(), (col_sp, row_sp, step), rtol=1e-6)
    np.testing.assert_allclose(img.GetDirection()[::3], row, atol=1e-6)  # first column
    stored = np.sort(np.concatenate([s.ravel() for s in series.stored]).astype(float))
    np.testing.assert_allclose(np.sort(sitk.GetArrayFromImage(img).ravel()),
                               (stored * slope + intercept).astype(np.float32),
                               rtol=1e-5, atol=1e-3)


ids = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\t\n\r#"), max_size=6)
cells = st.one_of(ids, st.sampled_from(["0", "12", "-3", "nan", "inf", "1e400", "", "0.9",
                                        "x.json"]))


@SETTINGS
@given(rows=st.lists(st.tuples(ids, ids, cells, cells), min_size=0, max_size=6))
def test_sample_sheets(rows):
    """Random sample sheets: a table whose rows are exactly the sheet's (unique scans,
    finite months), or a QctfeaError naming the sheet."""
    from qctfea.cohort.samples import read_sample_sheet

    with tempfile.TemporaryDirectory() as tmp:
        sheet = Path(tmp) / "samples.tsv"
        lines = ["patient\ttimepoint\tmonths\timage\tlabels\tlandmarks\tdxa"]
        lines += [f"{p}\t{t}\t{m}\timg\tlab\tlm\t{d}" for p, t, m, d in rows]
        sheet.write_text("\n".join(lines) + "\n")
        try:
            df = read_sample_sheet(sheet)
        except QctfeaError as exc:
            assert str(sheet) in str(exc) or "samples" in str(exc)
            return
    assert len(df) == len(rows)
    assert not df.duplicated(["patient", "timepoint"]).any()
    assert all(math.isfinite(float(m)) for m in df["months"])
    assert all(p.strip() for p in df["patient"])


valid_ids = st.text(alphabet="AZaz09_-", min_size=1, max_size=6)
valid_months = st.one_of(st.integers(0, 600).map(str),
                         st.floats(0.0, 1e4, allow_nan=False).map(repr))
valid_dxa = st.one_of(st.just(""), st.just("dxa/P01.JSON"),
                      st.floats(0.1, 3.0).map(lambda v: f"{v:.4f}"))


@SETTINGS
@given(scans=st.lists(st.tuples(valid_ids, valid_ids), max_size=6, unique=True),
       data=st.data())
def test_valid_sample_sheets_are_read(scans, data):
    """Valid sample sheets must be read, never refused: the rows and cells as written."""
    # ids of letters, digits, '-' and '_', each scan once, months >= 0, DXA empty, a .json
    # file or a positive number
    from qctfea.cohort.samples import read_sample_sheet

    rows = [(p, t, data.draw(valid_months), data.draw(valid_dxa)) for p, t in scans]
    with tempfile.TemporaryDirectory() as tmp:
        sheet = Path(tmp) / "samples.tsv"
        lines = ["patient\ttimepoint\tmonths\timage\tlabels\tlandmarks\tdxa"]
        lines += [f"{p}\t{t}\t{m}\timg\tlab\tlm\t{d}" for p, t, m, d in rows]
        sheet.write_text("\n".join(lines) + "\n")
        df = read_sample_sheet(sheet)
    assert df["patient"].tolist() == [r[0] for r in rows]
    assert df["timepoint"].tolist() == [r[1] for r in rows]
    assert df["months"].tolist() == [float(r[2]) for r in rows]
    assert df["dxa"].tolist() == [r[3] for r in rows]
    assert (df["image"] == "img").all() and (df["labels"] == "lab").all()


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), floats,
                          st.text(max_size=5), st.lists(st.integers(0, 5), max_size=3))


@pytest.mark.parametrize("cls_path", ["qctfea.fea.loadcases:LoadParams",
                                      "qctfea.model.meshing:MeshParams",
                                      "qctfea.model.materials:MaterialParams",
                                      "qctfea.imaging.registration:RegistrationParams",
                                      "qctfea.imaging.bmd:BmdParams"])
@SETTINGS
@given(data=st.data())
def test_config_sections(cls_path, data):
    """A config section with random keys and values of random types: the step's parameters
    with exactly those values (of the declared types), or a QctfeaError naming the key."""
    import dataclasses
    import importlib

    from qctfea.steps import params_from

    mod, name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod), name)
    names = [f.name for f in dataclasses.fields(cls)]
    keys = data.draw(st.lists(st.one_of(st.sampled_from(names), st.text(max_size=4)),
                              max_size=3, unique=True))
    section = {k: data.draw(CONFIG_VALUES) for k in keys}
    try:
        p = params_from(cls, section, "sec")
    except QctfeaError as exc:
        assert "sec" in str(exc)
        return
    default = cls()
    for k, v in section.items():
        got = getattr(p, k)
        if isinstance(getattr(default, k), bool) or isinstance(v, bool):
            assert got is v
        elif isinstance(v, (int, float)) and v is not None:
            assert got == v or (math.isnan(v) and math.isnan(got))
        else:
            assert got == v
