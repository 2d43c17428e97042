"""Per-rule time/memory summary of Snakemake benchmark files (peak memory per rule)."""
import os

import numpy as np
import pytest
from conftest import markdown_rows

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _write(root, scan, rule, s, rss, mtime):
    f = root / scan / f"{rule}.tsv"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(HEADER + f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t90\t{s}\n")
    os.utime(f, (mtime, mtime))


def test_summary_hand_numbers_and_growth(tmp_path):
    from qctfea_bench.benchmarks import read_benchmarks, summarize, write_summary

    # mesh: flat memory; solve (two sides): memory grows 5 MB per job.
    for i in range(6):
        _write(tmp_path, f"P{i:02d}/M00", "mesh_vertebra", 2.0 + i, 300.0, 1000 + 10 * i)
        _write(tmp_path, f"P{i:02d}/M00", "solve_pullout_left", 10.0, 500.0 + 10 * i,
               1001 + 10 * i)
        _write(tmp_path, f"P{i:02d}/M00", "solve_pullout_right", 10.0, 505.0 + 10 * i,
               1002 + 10 * i)
    df = read_benchmarks(tmp_path)
    assert set(df["rule"]) == {"mesh_vertebra", "solve_pullout"}
    t = summarize(df).set_index("rule")
    m, p = t.loc["mesh_vertebra"], t.loc["solve_pullout"]
    assert m.jobs == 6 and m.wall_s_mean == pytest.approx(4.5) and m.wall_s_max == 7.0
    assert m.wall_s_total == pytest.approx(27.0)
    assert m.peak_rss_mb_max == 300.0 and m.rss_slope_mb_per_10_jobs == pytest.approx(0.0)
    assert m.rss_last_vs_first_third == pytest.approx(1.0)
    assert p.jobs == 12 and p.peak_rss_mb_max == 555.0
    # 500, 505, 510, ... in finish order: +5 MB per job = +50 MB per 10 jobs.
    assert p.rss_slope_mb_per_10_jobs == pytest.approx(50.0)
    assert p.rss_last_vs_first_third == pytest.approx(np.median([540, 545, 550, 555])
                                                      / np.median([500, 505, 510, 515]))
    text = write_summary(tmp_path, tmp_path / "t.md", tmp_path / "t.json")
    assert len(text) == 2
    md = (tmp_path / "t.md").read_text()
    assert ("solve_pullout", "12", "10.0", "10.0", "120", "528", "555", "+50.0", "1.08") \
        in markdown_rows(md)


def test_no_benchmarks_is_a_clear_error(tmp_path):
    from qctfea_bench.benchmarks import read_benchmarks
    from qctfea.errors import QctfeaError

    with pytest.raises(QctfeaError, match="no benchmark files"):
        read_benchmarks(tmp_path)
