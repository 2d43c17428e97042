"""Glue for the Snakemake scripts: logging to the rule's log file, context strings.

Kept tiny on purpose: the workflow's scripts only unpack the ``snakemake``
object and call a step (:mod:`qctfea.steps.imaging`, :mod:`qctfea.steps.vertebra`,
:mod:`qctfea.steps.model`, :mod:`qctfea.steps.fea`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from qctfea import logs
from qctfea.errors import QctfeaError

logger = logging.getLogger(__name__)


def put_environment_on_path() -> None:
    """Put the running interpreter's bin folder (Snakemake's environment: qctfea, mpiexec)
    first on PATH unless it is there, so that the jobs' shell commands find them also when
    Snakemake was started by its path without activating the environment
    (``.venv/bin/snakemake ...``). Called by workflow/rules/common.smk."""
    env_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if env_bin not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([env_bin, path]) if path else env_bin


def run_step(snakemake, fn: Callable[[], None]) -> None:
    """Run ``fn`` with stderr, log records and warnings going to the rule's log; fail with
    a clear line."""
    log = Path(snakemake.log[0]) if snakemake.log else None
    stream = open(log, "w") if log else sys.stderr  # noqa: SIM115
    handler = logs.log_to(stream)
    logging.captureWarnings(True)
    try:
        with contextlib.redirect_stderr(stream), warnings.catch_warnings():
            warnings.simplefilter("always")
            try:
                fn()
            except QctfeaError as exc:
                logger.error(str(exc))
                raise SystemExit(f"qctfea: {exc}") from None
            except Exception:
                traceback.print_exc(file=stream)
                raise
    finally:
        logging.captureWarnings(False)
        logs.remove(handler)
        if log:
            stream.close()


def optional_input(snakemake, name: str) -> str | None:
    """A named input that is one file or none (an empty list): its path, or None."""
    value = snakemake.input.get(name, [])
    return value if isinstance(value, str) else (value[0] if len(value) else None)


def context(wildcards) -> str:
    return f"patient {wildcards.patient}, timepoint {wildcards.timepoint}"


def failed_jobs(main_log: str | Path) -> list[dict]:
    """The failed jobs of a Snakemake run, from its main log: rule, the scan (patient and
    timepoint, read from the rule's log path logs/<cohort>/<patient>/<timepoint>/...) and
    the error the rule's log ends with (the step's ``ERROR:`` line, else its last line)."""
    text = Path(main_log).read_text(errors="replace", encoding="utf-8")
    out = []
    for m in re.finditer(r"^Error in rule (\w+):\n((?:[ \t]+.*\n?)*)", text, flags=re.M):
        rule, block = m.group(1), m.group(2)
        lm = re.search(r"^\s*log: (\S+)", block, flags=re.M)
        log = Path(lm.group(1)) if lm else None
        parts = log.parts if log else ()
        scan = (f"patient {parts[2]}, timepoint {parts[3]}"
                if len(parts) >= 5 and parts[0] == "logs" else "cohort level")
        error = "(no log)"
        if log and log.is_file():
            lines = [ln.strip() for ln in log.read_text(errors="replace",
                encoding="utf-8").splitlines()
                     if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR:")]
            error = (errors[-1] if errors else lines[-1] if lines else "(empty log)")
        out.append({"rule": rule, "scan": scan, "log": str(log) if log else "", "error": error})
    return out


def without_job_rate_limit(workflow) -> bool:
    """Turn off Snakemake's job-rate limiter for a local run (an ``onstart`` handler); True
    when it did. Snakemake 9 (9.27 measured) limits job starts to
    ``--max-jobs-per-timespan`` (default 100 per 1 s) and, to apply it, starts one more
    re-evaluation timer after *every* scheduling round while jobs wait for cores; each timer
    runs a round that starts another. With the demo's 36 two-rank solves queued behind each
    other the timers multiply: 59,767 rounds (up to 185 a second) checked 7.1 million input
    files in a forced demo run, and Snakemake's own process took 120 s of CPU from the jobs
    on two cores (docs/performance.md, "Snakemake's scheduler"). A local run never needs the
    limit (cores bound it); a cluster run keeps it (the executor's submissions are what it
    protects). Only attributes Snakemake sets (``workflow.local_exec``,
    ``workflow.scheduler.job_rate_limiter``, which it also sets to None itself for dry-runs)
    are touched; with a Snakemake without them nothing changes."""
    scheduler = getattr(workflow, "scheduler", None)
    if (getattr(workflow, "local_exec", False) and scheduler is not None
            and getattr(scheduler, "job_rate_limiter", None) is not None):
        scheduler.job_rate_limiter = None
        return True
    return False


def write_failure_summary(main_log, out: str | Path) -> list[dict]:
    """Write (and print) one line per failed job: scan, rule, error, log. The one place a
    user reads after ``snakemake --keep-going``: every other scan's results are complete.
    ``main_log``: Snakemake's log file (the ``log`` of an onerror handler: a path or a list
    of them)."""
    paths = [main_log] if isinstance(main_log, (str, Path)) else list(main_log)
    main_log = next((str(p) for p in paths if Path(p).is_file()), None)
    if main_log is None:
        return []
    jobs = failed_jobs(main_log)
    lines = [f"{len(jobs)} failed job(s); full log: {main_log}"]
    lines += [f"{j['scan']}: rule {j['rule']}: {j['error']} (log: {j['log']})" for j in jobs]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n[qctfea] failures (" + str(out) + "):\n  " + "\n  ".join(lines),
          file=sys.stderr, flush=True)
    return jobs


#: Peak resident memory of the single-core per-scan rules, in bytes per CT voxel, measured
#: (Snakemake's benchmark max_rss, or /usr/bin/time) on a 512 x 512 x 420 CT (110 M voxels,
#: docs/performance.md, "A large scan"): ingest 1.2 (2.0 from a DICOM series), calibrate
#: 2.0-2.8, mask 0.86, screws 1.2, materials 1.8, BMD 1.9, uncertainty 1.8, registration
#: 1.9 GB. Rounded up; the workflow books ``mem_mb`` from them (:func:`scan_mem_mb`), so
#: that a cluster does not kill the job of a large scan. Registration: + 7 bytes per voxel
#: since the follow-up density is resampled by cubic B-spline (its coefficient image; a
#: 512 x 512 x 133 follow-up's peak 762 -> 1008 MB, 2026-12-06).
BYTES_PER_VOXEL = {"ingest": 20, "calibrate": 26, "mask": 10, "screws": 12,
                   "materials": 18, "bmd": 19, "uncertainty": 18, "registration": 27}
#: Memory booked for any per-scan rule, whatever the scan (MB): the interpreter and libraries.
MEM_FLOOR_MB = 1000


def source_voxels(path) -> int | None:
    """The voxel count of a scan's source image, from headers only: an image file's header
    (NIfTI, NRRD, MHA, via SimpleITK), or a DICOM folder's files x rows x columns (x frames)
    of its first readable file (an overestimate when the folder also holds scouts). None
    when the path does not exist (yet: the demo writes its scans in the workflow) or is
    unreadable."""
    return _source_voxels(str(path))


@functools.lru_cache(maxsize=None)
def _source_voxels(path: str) -> int | None:
    p = Path(path)
    try:
        if p.is_file():
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            return int(math.prod(reader.GetSize()))
        if p.is_dir():
            import pydicom

            files = [f for f in sorted(p.rglob("*")) if f.is_file()]
            for f in files:
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                except Exception:  # not DICOM (a README, DICOMDIR parts): next file
                    continue
                if "Rows" in ds and "Columns" in ds:
                    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
                    return int(ds.Rows) * int(ds.Columns) * frames * len(files)
    except Exception:  # noqa: BLE001 - an estimate only: the steps report bad inputs
        return None
    return None


def scan_mem_mb(voxels: int | None, step: str, attempt: int = 1) -> int:
    """``mem_mb`` to book for a per-scan ``step`` of a scan of ``voxels`` CT voxels (None:
    unknown, the floor), 25 % above the measured peak, doubled on each retry."""
    need = 0 if voxels is None else voxels * BYTES_PER_VOXEL[step] * 1.25 / 2**20
    return int(math.ceil(max(MEM_FLOOR_MB, MEM_FLOOR_MB / 2 + need))) * 2 ** (attempt - 1)
