"""Memory booked per scan: the voxel count read from the source image's headers (a NIfTI file,
a DICOM folder), and the mem_mb Snakemake books for a large CT's per-scan jobs."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import SimpleITK as sitk

from conftest import REPO, run, venv_bin
from qctfea.workflow_glue import (
    BYTES_PER_VOXEL, MEM_FLOOR_MB, scan_mem_mb, source_voxels,
)


def test_voxels_from_headers_of_a_dicom_folder_and_an_image_file(demo_scan, tmp_path):
    ct = sitk.ReadImage(str(demo_scan["results"] / "ct.nii.gz"))  # the ingested series
    assert source_voxels(demo_scan["src"] / "dicom") == int(np.prod(ct.GetSize()))
    assert source_voxels(demo_scan["results"] / "ct.nii.gz") == int(np.prod(ct.GetSize()))
    assert source_voxels(tmp_path / "not-yet-written.nii.gz") is None


def test_memory_grows_with_the_scan_and_on_retries():
    assert scan_mem_mb(None, "mask") == MEM_FLOOR_MB
    assert scan_mem_mb(10**6, "calibrate") == MEM_FLOOR_MB  # small scans: the floor
    big = 512 * 512 * 420
    mb = scan_mem_mb(big, "calibrate")
    # 25 % above the measured peak of the calibrate step on such a CT (2803 MB) and its model
    assert mb >= 1.25 * 2803 and mb == int(np.ceil(MEM_FLOOR_MB / 2 + big * 26 * 1.25 / 2**20))
    assert scan_mem_mb(big, "calibrate", attempt=2) == 2 * mb
    assert set(BYTES_PER_VOXEL) >= {"ingest", "calibrate", "mask", "screws", "materials", "bmd",
                                    "uncertainty", "registration"}


def test_dry_run_books_memory_for_a_large_ct(tmp_path):
    """A 512 x 512 x 420 CT (a header and zeros): the per-scan jobs book what it needs."""
    size = (512, 512, 420)
    img = sitk.Image(size, sitk.sitkInt16)
    img.SetSpacing((0.7, 0.7, 0.8))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    d = tmp_path / "cohorts" / "big"
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("samples: samples.tsv\ncalibration: {method: fixed, "
                                   "slope: 1, intercept: 0}\nplanning: {method: auto}\n")
    pd.DataFrame([{"patient": "B01", "timepoint": "M00", "months": 0,
                   "image": str(tmp_path / "ct.nii.gz"),
                   "labels": str(tmp_path / "ct.nii.gz")}]).to_csv(
        d / "samples.tsv", sep="\t", index=False)
    p = run([venv_bin("snakemake"), "-n", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml"),
             "--config", "cohort=big", f"cohorts_dir={tmp_path / 'cohorts'}"],
            cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = p.stdout + p.stderr
    booked = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) )", text):
        m = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
        mem = re.search(r"mem_mb=(\d+)", block)
        if m and mem:
            booked[m.group(1)] = int(mem.group(1))
    n = int(np.prod(size))
    for rule, step in (("ingest_scan", "ingest"), ("calibrate_density", "calibrate"),
                       ("extract_vertebra", "mask"), ("measure_bmd", "bmd"),
                       ("assign_materials", "materials")):
        assert booked[rule] == scan_mem_mb(n, step), (rule, booked)
    assert booked["calibrate_density"] > 3500
