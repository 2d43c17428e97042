"""The workflow on a real SLURM cluster, and a new cohort added the way the README says.

tests/slurm_cluster.py starts a single-node SLURM cluster on this machine (Debian's
slurm-wlm and munge, started here as root without systemd) when the session starts, and runs
the workflow through it exactly as a user types it, `snakemake --profile slurm`, in a copy of
this working tree with a tiny cohort (one scan, solves on 2 MPI ranks each,
launched with `srun --mpi=pmi2`), in the background while the other tests run. Here its
results are compared with those of `snakemake --profile local` on the same cohort.

Without root, or without slurm-wlm/munge installed (`apt-get install slurm-wlm munge`, as
.ci/run does), or on a host that already has its own /etc/slurm/slurm.conf, the SLURM test
is skipped with the reason; with QCTFEA_REQUIRE_SLURM=1 (set by .ci/run) it fails instead.
"""
from __future__ import annotations

import json
import re
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from slurm_cluster import (COHORT, SCANS, TIMEPOINTS, _env, _skip_or_fail, _tail,
                           finish_background)

RTOL = 1e-6


@pytest.fixture(scope="module")
def local_run(local_background, slurm_study_data):
    """The tiny cohort, added per README, run with `snakemake --profile local` from the root:
    started in the background when the session starts (tests/slurm_cluster.py), finished
    here."""
    bg = local_background
    finish_background(bg, 1500)
    return {"repo": bg["repo"], "proc": bg["proc"], "log": bg["log"], "data": slurm_study_data}


def _numbers(obj, prefix=""):
    """Flattened numeric leaves of a JSON result, without timings and provenance."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("seconds", "provenance", "created_unix"):
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300) if a != b else 0.0


def test_new_cohort_from_readme_runs_with_local_profile(local_run):
    """Must-show 2: a cohort added by the README's recipe runs; nothing outside config/ changes."""
    p, repo = local_run["proc"], local_run["repo"]
    assert p.returncode == 0, local_run["log"].read_text()[-5000:]
    res = repo / "results" / COHORT
    assert len(pd.read_csv(res / "tables" / "longitudinal.csv")) == SCANS
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    changed = [line[3:] for line in status]
    assert changed and all(f.startswith(f"config/cohorts/{COHORT}/") for f in changed), changed
    for f in res.rglob("compression.json"):
        assert json.loads(f.read_text())["mpi_ranks"] == 2, f


@pytest.mark.slow
def test_slurm_profile_runs_workflow_like_local(slurm_background, local_run, capsys):
    """`snakemake --profile slurm` on the test cluster: every job an sbatch job (single jobs
    or the profile's group jobs), solves on 2 MPI ranks through srun, results equal to the
    local run's."""
    if "unavailable" in slurm_background:
        _skip_or_fail(slurm_background["unavailable"])
    assert local_run["proc"].returncode == 0, local_run["log"].read_text()[-5000:]
    slurm_cluster, repo, log = (slurm_background[k] for k in ("cluster", "repo", "log"))
    proc = slurm_background["proc"]
    text = finish_background(slurm_background, 2400)
    wall = time.time() - slurm_background["t0"]
    assert proc.returncode == 0, text[-6000:] + "\n" + _tail(slurm_cluster["log"] / "slurmd.log", 30)

    # Every job went through sbatch on its own (no group jobs), except the target rule `all`
    # and the gates, local rules that Snakemake runs itself (each reads one JSON record).
    submitted = dict(re.findall(r"Job (\S+) has been submitted with SLURM jobid (\d+)", text))
    m = re.search(r"Job stats:\n(.*?)\n\n", text, flags=re.S)
    stats = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", m.group(1), flags=re.M)) if m else {}
    single = re.findall(r"^(?:rule|checkpoint) (\w+):$", text, flags=re.M)
    local = re.findall(r"^localrule (\w+):$", text, flags=re.M)
    gates = {"accept_scan", "accept_calibration", "accept_vertebra", "accept_screws",
             "accept_mesh", "accept_strength"}  # and accept_registration for follow-ups
    if len(TIMEPOINTS) > 1:
        gates.add("accept_registration")
    assert set(local) == gates | {"all"}, sorted(set(local))
    assert not re.search(r"Group job", text) and not re.search(r"^    rule ", text, flags=re.M)
    assert len(single) + len(local) == int(stats["total"]) > 0, stats
    assert len(submitted) == len(single) and not gates & set(single), (len(submitted), single)
    run_id = re.search(r"SLURM run ID: (\S+)", text).group(1)
    q = subprocess.run([slurm_cluster["tools"]["squeue"], "--states=all", "--noheader",
                        "--name", run_id, "--format=%i|%T|%D|%C|%k"],
                       capture_output=True, text=True, env=_env())
    jobs = {row.split("|")[0]: row.split("|") for row in q.stdout.split()}
    assert set(jobs) == set(submitted.values()), (q.stdout, q.stderr)
    assert all(j[1] == "COMPLETED" for j in jobs.values()), q.stdout
    solves = [j for j in jobs.values() if j[4].startswith("rule_solve_")]
    assert len(solves) == 3 * SCANS  # compression + pullout left/right per scan
    # MPI jobs: --ntasks=2 with 1 CPU per task (cpus_per_task in the profile) on one node.
    assert all(j[3] == "2" and j[2] == "1" for j in solves), solves
    assert all(j[3] == "1" for j in jobs.values() if j not in solves), q.stdout
    # Each solve job's SLURM log shows the command it ran inside its allocation.
    srun_lines = {}
    for f in (repo / ".snakemake" / "slurm_logs").rglob("*.log"):
        if re.search(r"rule_solve\b", str(f)):  # the solve rule's logs (any case)
            cmds = [ln for ln in f.read_text().splitlines()
                    # (after the rule's one-thread-per-rank variables, in the subshell
                    # whose failure `qctfea solve-failed` records)
                    if re.search(r"(^|Shell command: )\(?(\w+=\S+ )*srun --mpi=pmi2 -n 2 "
                                 r"qctfea solve ", ln)]
            if cmds:
                srun_lines[f] = cmds[0].removeprefix("Shell command: ")
    assert len(srun_lines) == 3 * SCANS, ("solve commands in the SLURM job logs", srun_lines)
    srun_lines = sorted(srun_lines.values())

    # Same numbers as the local run.
    loc = local_run["repo"] / "results" / COHORT
    slu = repo / "results" / COHORT
    worst, n_compared = ("", 0.0), 0
    ranks = {}
    for f in sorted(loc.rglob("*.json")):
        if f.name.startswith(("compression", "pullout_")) or f.name in (
                "bmd.json", "mesh.json", "calibration.json", "materials.json"):
            a, b = json.loads(f.read_text()), json.loads((slu / f.relative_to(loc)).read_text())
            if "mpi_ranks" in b:
                ranks[str(f.relative_to(loc))] = (a["mpi_ranks"], b["mpi_ranks"])
                ins_a, ins_b = a["provenance"]["inputs"], b["provenance"]["inputs"]
                assert ins_a["mesh"]["sha256"] == ins_b["mesh"]["sha256"], f"same mesh: {f}"
            na, nb = _numbers(a), _numbers(b)
            assert na.keys() == nb.keys(), f
            for k in na:
                r = _rel(na[k], nb[k])
                n_compared += 1
                if r > worst[1]:
                    worst = (f"{f.relative_to(loc)}:{k}", r)
                assert r <= RTOL, f"{f.relative_to(loc)} {k}: local {na[k]} slurm {nb[k]}"
    assert len(ranks) == 3 * SCANS and all(v == (2, 2) for v in ranks.values()), ranks
    ta = pd.read_csv(loc / "tables" / "longitudinal.csv")
    tb = pd.read_csv(slu / "tables" / "longitudinal.csv")
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb) == SCANS
    num = ta.select_dtypes("number").columns
    assert ta.drop(columns=num).equals(tb.drop(columns=num))
    np.testing.assert_allclose(tb[num].to_numpy(float), ta[num].to_numpy(float), rtol=RTOL,
                               atol=0, equal_nan=True)

    with capsys.disabled():
        print(f"\n[slurm] {slurm_cluster['node']}")
        print(f"[slurm] `snakemake --profile slurm` finished in {wall:.0f} s; "
              f"{len(submitted)} sbatch jobs, run {run_id}; full log: {log}")
        for jid, row in sorted(jobs.items(), key=lambda kv: int(kv[0])):
            print(f"[slurm]   sbatch job {jid:>4} {row[1]:<9} nodes={row[2]} cpus={row[3]:<2} "
                  f"{row[4]}")
        for name, (a, b) in sorted(ranks.items()):
            print(f"[slurm]   {name}: mpi_ranks local={a} slurm={b}")
        print(f"[slurm] example solve step: {srun_lines[0][:110]} ...")
        print(f"[slurm] {n_compared} JSON numbers + longitudinal.csv equal to the local run "
              f"within rtol {RTOL:g}; largest relative difference {worst[1]:.2e} ({worst[0]})")
