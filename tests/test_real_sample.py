"""The real CT sample (../shared/data/real/verse_tptbox_L3: L3, VerSe labels, no phantom)
through the imaging chain the workflow runs: ingest, phantomless calibration, mask with the
sub-region body, automatic screw planning, BMD with its QC picture.
The workflow run with meshing and solves is documented in docs/real_l3.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qctfea import steps_imaging
from qctfea import steps_model

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
    steps_imaging.mask(ct_path=t / "ct.nii.gz", labels_path=REAL / "vertebrae.nii.gz",
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
    for png in ("calibration.png", "roi.png"):
        assert (t / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
