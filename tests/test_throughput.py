"""Cohort throughput from benchmark files: run span, core-seconds, solve DOFs."""
from __future__ import annotations

import json
import os

import pixels
import pytest
from conftest import markdown_rows

from qctfea_bench import throughput


def _job(root, scan, rule, seconds, end_time):
    d = root / "benchmarks" / "c" / scan
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{rule}.tsv"
    f.write_text(f"s\th:m:s\tmax_rss\n{seconds}\t0:00:01\t100.0\n")
    os.utime(f, (end_time, end_time))


def test_span_core_seconds_and_solves(tmp_path):
    t0 = 1_800_000_000
    # Scan A: mesh 10 s (ends t0+10), compression solve 30 s on 2 ranks (ends t0+40).
    _job(tmp_path, "P1/M00", "mesh_vertebra", 10.0, t0 + 10)
    _job(tmp_path, "P1/M00", "solve_compression", 30.0, t0 + 40)
    _job(tmp_path, "P1/M00", "solve_pullout_left", 20.0, t0 + 70)
    res = tmp_path / "results" / "c" / "P1" / "M00"
    res.mkdir(parents=True)
    (res / "compression.json").write_text(json.dumps({"n_dofs": 1000, "mpi_ranks": 2}))
    (res / "pullout_left.json").write_text(json.dumps({"n_dofs": 1000, "mpi_ranks": 2}))
    c = throughput.cohort_summary("c", tmp_path / "benchmarks" / "c", tmp_path / "results" / "c")
    assert c["span_s"] == pytest.approx(70.0)  # first start t0 + 0, last end t0 + 70
    assert c["job_s"] == pytest.approx(60.0)
    assert c["core_s"] == pytest.approx(10.0 + 2 * 30.0 + 2 * 20.0)
    assert c["solve_share"] == pytest.approx(50.0 / 60.0)
    assert sorted(s["case"] for s in c["solves"]) == ["compression", "pullout"]
    png = tmp_path / "tp.png"
    throughput.picture([c], png)
    a = pixels.rgb(png)
    half = a.shape[1] // 2
    # Left: the two solves and their two legend entries, in the cohort's colour (C0).
    assert len(pixels.blobs(pixels.colour(a[:, :half], "C0"))) == 4
    # Right: the bars of run span (C0) and core-seconds / 2 (C1) on one baseline, their
    # heights as 70 s to 110 s / 2 (the largest region of each colour; the other is its
    # legend entry).
    span, core = (pixels.blobs(pixels.colour(a[:, half:], c))[0] for c in ("C0", "C1"))
    assert span[1] == core[1]
    assert (span[1] - span[0]) / (core[1] - core[0]) == pytest.approx(70.0 / 55.0, rel=0.01)
    md = throughput.markdown([c], "tp.png", "qctfea-bench throughput --cohort c")
    assert ("c", "1", "3", "1000", "1.2", "0.9", "83 %") == markdown_rows(md)[1][:7]


def test_no_solves_is_an_error(tmp_path):
    _job(tmp_path, "P1/M00", "mesh_vertebra", 10.0, 1_800_000_000)
    with pytest.raises(Exception, match="run the workflow"):
        throughput.cohort_summary("c", tmp_path / "benchmarks" / "c", tmp_path / "results" / "c")
