"""The single-node SLURM test cluster and the README cohort of tests/test_slurm.py.

`_slurm_cluster` starts a single-node SLURM cluster on this machine (Debian's slurm-wlm and
munge; munged, slurmctld and slurmd started here as root, without systemd; the node's CPUs
and memory from `slurmd -C`) and stops the daemons it started afterwards. `slurm_background`
runs `snakemake --profile slurm` through it on a tiny cohort added the README's way (one
scan written by `qctfea synth`), in a copy of this working tree, started
when the session starts: the run mostly waits for the scheduler's status polls, so the other
tests run meanwhile; its daemons, jobs and snakemake run at a lower scheduling priority
(`nice`) so that they use the CPU time the other tests leave idle. `local_background` runs
the same cohort with `snakemake --profile local` the same way, for the comparison. Imported
by tests/conftest.py (session fixtures), which runs tests/test_slurm.py last.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MARK = "# qctfea test cluster (tests/test_slurm.py); removed when the tests end"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "squeue", "srun", "sinfo", "scontrol", "scancel"]
COHORT = "mystudy"
#: the README cohort's patients and visits: one scan keeps the two background runs light
#: beside the other tests (a SLURM job costs mostly the Python starts of its two Snakemake
#: processes, the job's and its step's: with a follow-up, 32 jobs took 460 s of CPU time,
#: a fifth of the suite's); registration runs in the local workflow tests
PATIENTS = ("S001",)
TIMEPOINTS = (("M00", 0),)
SCANS = len(TIMEPOINTS) * len(PATIENTS)
#: the background SLURM run's scheduling priority (the daemons, hence its jobs, and the
#: submitting snakemake): lower than the other tests'
BACKGROUND_NICE = ["nice", "-n", "15"]


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


class _Unavailable(Exception):
    """The test cluster cannot start here (the reason is the message)."""


def _unavailable(reason: str):
    raise _Unavailable(reason)


def _skip_or_fail(reason: str):
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


@contextlib.contextmanager
def _slurm_cluster():
    """A one-node SLURM cluster on localhost; yields its folder, stops its daemons after;
    raises _Unavailable when it cannot start."""
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
            "PropagatePrioProcess=0",  # jobs keep slurmd's (nice) priority
            "ReturnToService=2",
            f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        created_conf = True
        for daemon, args in (("slurmctld", ["-i"]), ("slurmd", [])):
            # nice: the jobs inherit slurmd's scheduling priority (PropagatePrioProcess=0,
            # SLURM's default), so the background run takes the CPU time that the
            # session's other tests leave idle instead of slowing them down
            p = subprocess.run([*BACKGROUND_NICE, tools[daemon], *args], capture_output=True,
                               text=True)
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


@pytest.fixture(scope="session")
def slurm_study_data(tmp_path_factory):
    """A user's scans outside the checkout: PATIENTS x TIMEPOINTS written by `qctfea synth`
    (DICOM series with a phantom, VerSe-style label map, screw landmarks); the scans are
    written at once (one process each)."""
    root = tmp_path_factory.mktemp("data") / "mystudy"
    qctfea = str(Path(sys.executable).parent / "qctfea")
    procs = [subprocess.Popen([qctfea, "synth", "--patient", patient, "--timepoint", tp,
                               "--months", str(months), "--seed", str(11 + i),
                               "--out", str(root / patient / tp)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env())
             for i, patient in enumerate(PATIENTS)
             for tp, months in TIMEPOINTS]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
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
        for tp, months in TIMEPOINTS:
            s = pdir / tp
            rows.append(f"{pdir.name}\t{tp}\t{months}\t{s}/dicom\t{s}/labels.nii.gz\t"
                        f"{s}/landmarks.json\t0.81")
    (d / "samples.tsv").write_text("\n".join(rows) + "\n")


SLURM_ARGS = ["--profile", "slurm", "--config", f"cohort={COHORT}",
              # the test cluster has no accounting database: no account, status from squeue
              "--slurm-no-account", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "2",
              # a one-node test cluster: poll every 2 s (default 10 s, which made
              # this test wait about 10 s per dependency level)
              "--seconds-between-status-checks", "2",
              "--slurm-keep-successful-logs"]


@pytest.fixture(scope="session")
def slurm_background(tmp_path_factory, slurm_study_data):
    """`snakemake --profile slurm` on the test cluster, started in the background when the
    session starts (`_start_slurm_early`) so that the other tests run meanwhile (the SLURM run
    mostly waits for the scheduler's status polls); yields its process and folders, or the
    reason the cluster could not start."""
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(_slurm_cluster())
        except _Unavailable as e:
            yield {"unavailable": str(e)}
            return
        repo = _checkout_copy(tmp_path_factory.mktemp("slurm-checkout"))
        _add_cohort_as_readme_says(repo, COHORT, slurm_study_data)
        log = repo.parent / "snakemake-slurm.log"
        out = open(log.with_suffix(".out"), "w")
        stack.callback(out.close)
        cmd = [str(Path(sys.executable).parent / "snakemake"), *SLURM_ARGS]
        proc = subprocess.Popen([*BACKGROUND_NICE, *cmd], cwd=repo, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        stack.callback(lambda: proc.poll() is None and os.killpg(proc.pid, signal.SIGTERM))
        yield {"cluster": cluster, "proc": proc, "repo": repo, "log": log, "cmd": cmd,
               "t0": time.time(), "out": log.with_suffix(".out")}


def finish_background(bg: dict, limit_s: float) -> str:
    """Wait for a background run (`slurm_background`, `local_background`) up to ``limit_s``
    after its start (at least 60 s more; then it is stopped), write its log with the command
    and exit code, and return its output."""
    proc = bg["proc"]
    try:
        proc.wait(timeout=max(60.0, limit_s - (time.time() - bg["t0"])))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    text = bg["out"].read_text()
    bg["log"].write_text(f"$ cd {bg['repo']} && {' '.join(bg['cmd'])}\n# exit "
                         f"{proc.returncode} after {time.time() - bg['t0']:.0f} s\n{text}")
    return text


@pytest.fixture(scope="session")
def local_background(tmp_path_factory, slurm_study_data):
    """`snakemake --profile local` on the same cohort, added the same way, in its own copy of
    the working tree: started in the background when the session starts, like the SLURM run
    (and at the same lower priority); yields its process, folder and log."""
    repo = _checkout_copy(tmp_path_factory.mktemp("local-checkout"))
    _add_cohort_as_readme_says(repo, COHORT, slurm_study_data)
    log = repo.parent / "snakemake-local.log"
    out = open(log.with_suffix(".out"), "w")
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--profile", "local", "--config",
           f"cohort={COHORT}"]
    proc = subprocess.Popen([*BACKGROUND_NICE, *cmd], cwd=repo, env=_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    yield {"proc": proc, "repo": repo, "log": log, "cmd": cmd, "t0": time.time(),
           "out": log.with_suffix(".out")}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    out.close()


@pytest.fixture(scope="session", autouse=True)
def _start_slurm_early(request):
    """Starts the SLURM run and the local run it is compared with at the beginning of a
    session that holds the SLURM tests (which tests/conftest.py puts last)."""
    for name in ("slurm_background", "local_background"):
        if any(name in getattr(item, "fixturenames", ()) for item in request.session.items):
            request.getfixturevalue(name)
    yield
