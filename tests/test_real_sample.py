"""The real CT sample (../shared/data/real/verse_tptbox_L3: L3, VerSe labels, no phantom)
through the imaging chain the workflow runs: ingest, phantomless calibration, mask with the
sub-region body, automatic screw planning, BMD with its QC picture.
The workflow run with meshing and solves is documented in docs/real_l3.md."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import pixels
from qctfea.steps import imaging as steps_imaging, vertebra as steps_vertebra
from qctfea.steps import model as steps_model

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "verse_tptbox_L3"
pytestmark = pytest.mark.usefixtures("real_scans")  # fails when ../shared is missing
CTX = "patient R01, timepoint M00"


def test_real_l3_imaging_chain_gives_plausible_values(tmp_path):
    t = tmp_path
    steps_imaging.ingest(source=REAL / "ct.nii.gz", out_image=t / "ct.nii.gz",
                         out_json=t / "scan.json", context=CTX)
    steps_imaging.calibrate(ct_path=t / "ct.nii.gz", labels_path=REAL / "vertebrae.nii.gz",
                            out_density=t / "density.nii.gz",
                            out_json=t / "calibration.json", out_png=t / "calibration.png",
                            cfg={"method": "phantomless",
                                 "phantomless": {"model": "tissue_regression"}},
                            context=CTX, label=22)  # as config/cohorts/verse-l3
    cal = json.loads((t / "calibration.json").read_text())
    used = {x["name"] for x in cal["tissues"] if x["found"]}
    assert cal["method"] == "phantomless" and used == {"fat", "muscle"}  # no air in the crop
    # Slope near the usual 120 kVp K2HPO4 range, intercept near 0 (water ~ 0 mg/cm³).
    assert 0.6 < cal["slope"] < 1.1 and abs(cal["intercept"]) < 30
    steps_vertebra.mask(ct_path=t / "ct.nii.gz", labels_path=REAL / "vertebrae.nii.gz",
                        out_parts=t / "vertebra.nii.gz", out_json=t / "vertebra.json",
                        cfg={"convention": "verse", "vertebra": "L3"}, context=CTX,
                        subregions_path=REAL / "subregions.nii.gz")
    steps_model.plan_screws(landmarks_path=None, parts_path=t / "vertebra.nii.gz",
                            out_json=t / "screws.json", cfg={}, context=CTX,
                            planning={"method": "auto"})
    screws = json.loads((t / "screws.json").read_text())["screws"]
    assert all(s["breach"]["max_surface_outside_bone_mm"] < 1.0 for s in screws)
    steps_imaging.bmd(density_path=t / "density.nii.gz", parts_path=t / "vertebra.nii.gz",
                      screws_path=t / "screws.json", out_json=t / "bmd.json", cfg={}, context=CTX,
                      out_png=t / "roi.png")
    b = json.loads((t / "bmd.json").read_text())
    # An elderly clinical lumbar vertebra: trabecular vBMD well inside 20-200 mg/cm³ (run:
    # 50.3), the integral body denser than its trabecular core (cortex), bone around the
    # screws (pedicle cortex included) denser than the trabecular core.
    assert 20 < b["trabecular_vbmd_mg_cm3"] < 200
    assert b["integral_vbmd_mg_cm3"] > b["trabecular_vbmd_mg_cm3"]
    assert all(v > b["trabecular_vbmd_mg_cm3"] for v in b["around_screw_vbmd_mg_cm3"].values())
    assert 0.2 < b["areal_bmd_g_cm2"] < 1.5
    # The pictures. Calibration: fat's and muscle's markers on the line, no air's, and their
    # voxels on the slice. BMD regions (axial, mid-sagittal, coronal, sagittal through the
    # left screw): both screws (left blue, right red) in the axial and coronal cuts, the
    # patient's right on the picture's left; the left one alone in its sagittal cut (the
    # right's colour only in the legend); the region around the screws (cyan) in these three.
    line, energy, voxels = pixels.calibration_panels(t / "calibration.png", effective=False)
    assert set(line) == voxels == {"fat", "muscle"} and not energy
    a = pixels.rgb(t / "roi.png")
    q = a.shape[1] // 4
    axial, _, coronal, left_cut = (a[:, i * q:(i + 1) * q] for i in range(4))
    for cut in (axial, coronal):
        left, right = (np.nonzero(pixels.colour(cut, c))[1] for c in ("#2f6bd8", "#d8432f"))
        assert left.size > 100 and right.size > 100 and right.mean() < left.mean()
    left, right = (pixels.colour(left_cut, c).sum() for c in ("#2f6bd8", "#d8432f"))
    assert left > 300 and right < 100
    for cut in (axial, coronal, left_cut):
        assert pixels.colour(cut, "cyan", min_alpha=0.25).sum() > 1000


def _as_dicom_series(nifti: Path, folder: Path) -> None:
    """The NIfTI CT written as an axial DICOM CT series (one file per slice, the scanner's
    LPS geometry in ImagePositionPatient / ImageOrientationPatient, HU = stored - 1024), by
    SimpleITK's GDCM writer: what a lab has before converting anything."""
    import locale

    import SimpleITK as sitk

    # GDCM's writer sets the C library's locale to "C" when it writes the rescale tags:
    # restored afterwards, or every later text file opened by this process is read as ASCII
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_series(sitk, nifti, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(sitk, nifti: Path, folder: Path) -> None:
    img = sitk.DICOMOrient(sitk.ReadImage(str(nifti)), "LPS")  # axial slices, z ascending
    # HU given; GDCM stores (HU - intercept) / slope with the rescale tags below
    img = sitk.Cast(sitk.Clamp(img, lowerBound=-1024), sitk.sitkInt16)
    folder.mkdir()
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000e", series),
                           ("0020|0013", str(k + 1)),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6],
                                                                        d[1], d[4], d[7]))),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in
                                                   img.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0018|0050", f"{img.GetSpacing()[2]:g}"),
                           ("0028|1052", "-1024"), ("0028|1053", "1")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:04d}.dcm"))
        writer.Execute(sl)


def test_real_l1_as_a_dicom_series_with_its_nifti_labels_gives_the_same_vertebra(
        real_l1_ingested, tmp_path):
    """As labs bring it: the scanner's DICOM series, and TotalSegmentator's labels as NIfTI
    (LAS, written from a converted copy of the same series). The real L1 written as a DICOM
    series ingests to the voxels and geometry of the NIfTI it came from (HU clipped at
    -1024, as stored values are), and the mask step on it gives the same vertebra parts."""
    import numpy as np
    import SimpleITK as sitk

    src, ref = real_l1_ingested["src"], real_l1_ingested["root"]
    _as_dicom_series(src / "ct.nii.gz", tmp_path / "dicom")
    steps_imaging.ingest(source=tmp_path / "dicom", out_image=tmp_path / "ct.nii.gz",
                         out_json=tmp_path / "scan.json", context="T01 M00")
    a, b = (sitk.ReadImage(str(p / "ct.nii.gz")) for p in (tmp_path, ref))
    assert a.GetSize() == b.GetSize() and a.GetDirection() == b.GetDirection()
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(a),
                          np.maximum(sitk.GetArrayFromImage(b), -1024))
    parts = {}
    for name, root in (("dicom", tmp_path), ("nifti", ref)):
        steps_vertebra.mask(ct_path=root / "ct.nii.gz", labels_path=src / "labels.nii.gz",
                            out_parts=tmp_path / f"{name}_v.nii.gz",
                            out_json=tmp_path / f"{name}_v.json",
                            cfg={"convention": "totalsegmentator", "vertebra": "L1"},
                            context="T01 M00")
        parts[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}_v.nii.gz")))
    assert parts["dicom"].any() and np.array_equal(parts["dicom"], parts["nifti"])
