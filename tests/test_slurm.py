"""The workflow on a real SLURM cluster, and a new cohort added the way the README says.

`slurm_cluster` starts a single-node SLURM cluster on this machine (Debian's slurm-wlm and
munge; munged, slurmctld and slurmd started here as root, without systemd; the node's CPUs
and memory from `slurmd -C`) and stops the daemons it started afterwards. The workflow then
runs through it exactly as a user types it, `snakemake --profile slurm`, in a copy of this
working tree with a tiny cohort (2 patients x 2 timepoints, solves on 2 MPI ranks each,
launched with `srun --mpi=pmi2`), and its results are compared with those of
`snakemake --profile local` on the same cohort.

Without root, or without slurm-wlm/munge installed (`apt-get install slurm-wlm munge`, as
.ci/run does), or on a host that already has its own /etc/slurm/slurm.conf, the SLURM test
is skipped with the reason; with QCTFEA_REQUIRE_SLURM=1 (set by .ci/run) it fails instead.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

MARK = "# qctfea test cluster (tests/test_slurm.py); removed when the tests end"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "squeue", "srun", "sinfo", "scontrol", "scancel"]
COHORT = "mystudy"
RTOL = 1e-6


def _env(extra_path: str = "") -> dict:
    """The environment of `make test`: the venv's bin first (snakemake, qctfea, mpiexec)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), extra_path,
                                              env.get("PATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin",
                                                    "/sbin", "/usr/bin"]))


def _unavailable(reason: str):
    if os.environ.get("QCTFEA_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM test cluster unavailable: {reason} (QCTFEA_REQUIRE_SLURM=1)")
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tail(path: Path, n: int = 15) -> str:
    try:
        return f"--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"--- {path.name}: (none)"


def _stop(pidfile: Path, timeout: float = 20) -> None:
    """Stop the daemon whose pid we recorded (never anything else)."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node SLURM cluster on localhost; yields its folder, stops its daemons after."""
    if os.geteuid() != 0:
        _unavailable("starting munged, slurmctld and slurmd needs root")
    tools = {name: _which(name) for name in DAEMONS + CLIENTS + ["mungekey"]}
    missing = [n for n, p in tools.items() if p is None and n != "mungekey"]
    if missing:
        _unavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if SLURM_CONF.exists() and MARK not in SLURM_CONF.read_text(errors="replace"):
        _unavailable(f"{SLURM_CONF} exists and is not ours; not starting a test cluster on a "
                     "host with its own SLURM configuration")

    root = Path(tempfile.mkdtemp(prefix="qctfea-slurm-"))
    root.chmod(0o755)  # munged requires a socket path that everyone may traverse
    run, key_dir, log = root / "run", root / "munge", root / "log"
    for d, mode in ((run, 0o755), (key_dir, 0o700), (log, 0o755), (root / "state", 0o755),
                    (root / "spool", 0o755)):
        d.mkdir()
        d.chmod(mode)
    pidfiles = {"slurmd": run / "slurmd.pid", "slurmctld": run / "slurmctld.pid",
                "munged": run / "munged.pid"}
    created_conf = False
    try:
        key = key_dir / "munge.key"
        if tools["mungekey"]:
            subprocess.run([tools["mungekey"], "-c", "-k", str(key)], check=True,
                           capture_output=True)
        else:
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = run / "munge.socket"
        p = subprocess.run([tools["munged"], f"--socket={sock}", f"--key-file={key}",
                            f"--pid-file={pidfiles['munged']}", f"--log-file={log / 'munged.log'}",
                            f"--seed-file={key_dir / 'munged.seed'}"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            _unavailable(f"munged did not start: {p.stderr.strip()} {_tail(log / 'munged.log')}")

        node = subprocess.run([tools["slurmd"], "-C"], capture_output=True, text=True)
        node_line = next((ln for ln in node.stdout.splitlines() if ln.startswith("NodeName=")), "")
        if not node_line:
            _unavailable(f"`slurmd -C` gave no node line: {node.stdout} {node.stderr}")
        nodename = node_line.split()[0].split("=", 1)[1]
        ctld_port, d_port = _free_ports(2)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text("\n".join([
            MARK,
            "ClusterName=qctfeatest",
            f"SlurmctldHost={nodename}(127.0.0.1)",
            "AuthType=auth/munge",
            f"AuthInfo=socket={sock}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={pidfiles['slurmctld']}",
            f"SlurmdPidFile={pidfiles['slurmd']}",
            f"SlurmctldLogFile={log / 'slurmctld.log'}",
            f"SlurmdLogFile={log / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            # No slurmdbd: no accounting, so the executor's status queries use squeue, and
            # finished jobs stay visible to squeue for MinJobAge seconds.
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MinJobAge=3600",  # a contended run takes over 10 minutes
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "MpiDefault=none",
            "ReturnToService=2",
            f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        created_conf = True
        for daemon, args in (("slurmctld", ["-i"]), ("slurmd", [])):
            p = subprocess.run([tools[daemon], *args], capture_output=True, text=True)
            if p.returncode != 0:
                _unavailable(f"{daemon} did not start: {p.stderr.strip()} "
                             f"{_tail(log / f'{daemon}.log')}")
        state = ""
        for _ in range(120):
            p = subprocess.run([tools["sinfo"], "-h", "-o", "%t"], capture_output=True, text=True)
            state = p.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            _unavailable(f"node not idle after 60 s (sinfo: {state!r} {p.stderr.strip()})\n"
                         f"{_tail(log / 'slurmctld.log')}\n{_tail(log / 'slurmd.log')}")
        yield {"root": root, "log": log, "node": node_line, "tools": tools}
    finally:
        if created_conf:
            subprocess.run([tools["scancel"], "--full", "--partition=debug"],
                           capture_output=True)
        for daemon in ("slurmd", "slurmctld", "munged"):
            _stop(pidfiles[daemon])
        if created_conf and SLURM_CONF.exists() and MARK in SLURM_CONF.read_text():
            SLURM_CONF.unlink()
        shutil.rmtree(root, ignore_errors=True)


def _checkout_copy(dst: Path) -> Path:
    """This working tree's files (tracked and untracked, not ignored) as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = REPO / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel, follow_symlinks=False)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + cmd, cwd=dst, check=True, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def study_data(tmp_path_factory):
    """A user's scans outside the checkout: 2 patients x 2 timepoints written by `qctfea synth`
    (DICOM series with a phantom, VerSe-style label map, screw landmarks)."""
    root = tmp_path_factory.mktemp("data") / "mystudy"
    qctfea = str(Path(sys.executable).parent / "qctfea")
    for i, patient in enumerate(("S001", "S002")):
        for tp, months in (("M00", 0), ("M12", 12)):
            p = subprocess.run([qctfea, "synth", "--patient", patient, "--timepoint", tp,
                                "--months", str(months), "--seed", str(11 + i),
                                "--out", str(root / patient / tp)],
                               capture_output=True, text=True, env=_env())
            assert p.returncode == 0, p.stderr
    return root


def _add_cohort_as_readme_says(repo: Path, name: str, data: Path) -> None:
    """README "Adding a cohort", example: config/cohorts/<name>/config.yaml and samples.tsv
    pointing at the scans in `data`, nothing else. Settings as the README's example, with the
    tiny test cohort's coarse mesh and linear screening to keep the test short."""
    d = repo / "config" / "cohorts" / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        "samples: samples.tsv\n"
        "calibration:\n  method: phantom\n  phantom:\n    preset: demo_k2hpo4\n"
        "mask:\n  label: 23\n"
        "mpi:\n  tasks: 2\n"
        "mesh:\n  voxel_mm: 0.6\n  bone_cell_size_mm: 3.5\n  screw_cell_size_mm: 2.0\n"
        "  peri_screw_cell_size_mm: 2.0\n"
        "loads:\n  analysis: linear\n")
    rows = ["patient\ttimepoint\tmonths\timage\tlabels\tlandmarks\tdxa"]
    for pdir in sorted(data.iterdir()):
        for tp, months in (("M00", 0), ("M12", 12)):
            s = pdir / tp
            rows.append(f"{pdir.name}\t{tp}\t{months}\t{s}/dicom\t{s}/labels.nii.gz\t"
                        f"{s}/landmarks.json\t0.81")
    (d / "samples.tsv").write_text("\n".join(rows) + "\n")


def _snakemake(repo: Path, args: list[str], log: Path, timeout: int) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "snakemake"), *args]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=repo, env=_env(), capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ cd {repo} && {' '.join(cmd)}\n# exit {p.returncode} after "
                   f"{time.time() - t0:.0f} s\n{p.stdout}{p.stderr}")
    return p


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, study_data):
    """The tiny cohort, added per README, run with `snakemake --profile local` from the root."""
    repo = _checkout_copy(tmp_path_factory.mktemp("local-checkout"))
    _add_cohort_as_readme_says(repo, COHORT, study_data)
    log = repo.parent / "snakemake-local.log"
    p = _snakemake(repo, ["--profile", "local", "--config", f"cohort={COHORT}"], log, 1500)
    return {"repo": repo, "proc": p, "log": log, "data": study_data}


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
    assert len(pd.read_csv(res / "tables" / "longitudinal.csv")) == 4
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    changed = [line[3:] for line in status]
    assert changed and all(f.startswith(f"config/cohorts/{COHORT}/") for f in changed), changed
    for f in res.rglob("compression.json"):
        assert json.loads(f.read_text())["mpi_ranks"] == 2, f


@pytest.mark.slow
def test_slurm_profile_runs_workflow_like_local(slurm_cluster, local_run, tmp_path, capsys):
    """`snakemake --profile slurm` on the test cluster: every job an sbatch job, solves on
    2 MPI ranks through srun, results equal to the local run's."""
    assert local_run["proc"].returncode == 0, local_run["log"].read_text()[-5000:]
    repo = _checkout_copy(tmp_path / "checkout")
    _add_cohort_as_readme_says(repo, COHORT, local_run["data"])
    log = repo.parent / "snakemake-slurm.log"
    # The test cluster has no accounting database: no account, status from squeue.
    t0 = time.time()
    p = _snakemake(repo, ["--profile", "slurm", "--config", f"cohort={COHORT}",
                          "--slurm-no-account", "--slurm-status-command", "squeue",
                          "--slurm-init-seconds-before-status-checks", "2",
                          # a one-node test cluster: poll every 2 s (default 10 s, which made
                          # this test wait about 10 s per dependency level)
                          "--seconds-between-status-checks", "2",
                          "--slurm-keep-successful-logs"], log, 1500)
    wall = time.time() - t0
    text = log.read_text()
    assert p.returncode == 0, text[-6000:] + "\n" + _tail(slurm_cluster["log"] / "slurmd.log", 30)

    # Every job except the target rule `all` went through sbatch.
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", text))
    m = re.search(r"Job stats:\n(.*?)\n\n", text, flags=re.S)
    stats = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", m.group(1), flags=re.M)) if m else {}
    assert int(stats["total"]) - int(stats.get("all", 0)) == len(submitted) > 0, (stats, submitted)
    run_id = re.search(r"SLURM run ID: (\S+)", text).group(1)
    q = subprocess.run([slurm_cluster["tools"]["squeue"], "--states=all", "--noheader",
                        "--name", run_id, "--format=%i|%T|%D|%C|%k"],
                       capture_output=True, text=True, env=_env())
    jobs = {row.split("|")[0]: row.split("|") for row in q.stdout.split()}
    assert set(jobs) == set(submitted.values()), (q.stdout, q.stderr)
    assert all(j[1] == "COMPLETED" for j in jobs.values()), q.stdout
    solves = [j for j in jobs.values() if j[4].startswith("rule_solve_")]
    assert len(solves) == 12  # 4 scans x (compression + pullout left/right)
    # MPI jobs: --ntasks=2 with 1 CPU per task (cpus_per_task in the profile) on one node.
    assert all(j[3] == "2" and j[2] == "1" for j in solves), solves
    assert all(j[3] == "1" for j in jobs.values() if j not in solves), q.stdout
    # Each solve job's SLURM log shows the command it ran inside its allocation.
    srun_lines = {}
    for f in (repo / ".snakemake" / "slurm_logs").rglob("*.log"):
        if re.search(r"rule_solve\b", str(f)):  # the solve rule's logs (any case)
            cmds = [ln for ln in f.read_text().splitlines()
                    # (after the rule's one-thread-per-rank variables)
                    if re.search(r"(^|Shell command: )(\w+=\S+ )*srun --mpi=pmi2 -n 2 "
                                 r"qctfea solve ", ln)]
            if cmds:
                srun_lines[f] = cmds[0].removeprefix("Shell command: ")
    assert len(srun_lines) == 12, ("solve commands in the SLURM job logs", srun_lines)
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
    assert len(ranks) == 12 and all(v == (2, 2) for v in ranks.values()), ranks
    ta = pd.read_csv(loc / "tables" / "longitudinal.csv")
    tb = pd.read_csv(slu / "tables" / "longitudinal.csv")
    assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb) == 4
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
