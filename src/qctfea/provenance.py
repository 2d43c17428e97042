"""Provenance and safe output writing shared by every step.

Every JSON a step writes carries what produced it (library versions, the
parameters, checksums of the inputs) and is written to a temporary name and
renamed when complete, so that a killed job never leaves a file that looks
finished.

One mechanism writes every output: a scratch folder beside the target, renamed into place
on success and removed on failure. :func:`atomic_files` moves a set of files that refer to
each other (a mesh's XDMF and HDF5); :func:`atomic_path` is it for one file;
:func:`atomic_dir` moves a whole folder, which needs its own step because a rename cannot
replace a folder that is already there and not empty (the old one is moved aside first).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qctfea import __version__
from qctfea.errors import QctfeaError


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, or of every file (sorted) under a directory."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


@functools.cache
def source_revision() -> str | None:
    """The git commit of the qctfea source that runs, when it runs from its own checkout (an
    editable install: the repository whose pyproject.toml sits above ``src/qctfea``),
    ``+dirty`` when tracked files of that checkout were changed (code, rules, schemas),
    ``+unknown`` when that could not be read; None for an installed package (or no git).
    The version number alone does not tell two checkouts apart."""
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "pyproject.toml").is_file():
        return None

    def git(*args: str) -> subprocess.CompletedProcess:
        # --no-optional-locks: never take the index lock a user's own git may need
        return subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args],
                              text=True, capture_output=True, timeout=10)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo:
            return None  # not a checkout of qctfea (e.g. a venv inside another repository)
        rev = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    state = ("+unknown" if status.returncode != 0 else "+dirty" if status.stdout.strip()
             else "")
    return rev.stdout.strip() + state


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numbers matter for reproducibility (and the source's
    git revision, :func:`source_revision`, when known)."""
    out = {"qctfea": __version__, "python": platform.python_version()}
    if (rev := source_revision()) is not None:
        out["qctfea_source"] = rev
    for name in ("numpy", "scipy", "pandas", "pydicom", "SimpleITK", "meshio", "pygalmesh"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", getattr(mod, "Version", "?")))
    if "dolfinx" in sys.modules:
        out["dolfinx"] = sys.modules["dolfinx"].__version__
    if "petsc4py" in sys.modules:
        out["petsc4py"] = sys.modules["petsc4py"].__version__
    return out


def provenance(step: str, params: Any = None, inputs: dict[str, Any] | None = None) -> dict:
    """The block every JSON output carries under the key ``provenance``."""
    return {
        "step": step,
        "created_unix": round(time.time(), 3),
        "versions": library_versions(),
        "parameters": _jsonable(params) if params is not None else {},
        "inputs": {
            k: {"path": str(v), "sha256": file_sha256(v)} for k, v in (inputs or {}).items()
        },
    }


@contextlib.contextmanager
def atomic_files(*paths: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder beside the first of ``paths``; write each target there under
    its own name. On success each file is renamed onto its target, in the order given
    (list the file that refers to the others last: an XDMF after its HDF5), so the set
    appears together; on failure nothing is moved. Targets share one filesystem."""
    targets = [Path(p) for p in paths]
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{targets[0].name}.", suffix=".part",
                                    dir=targets[0].parent))
    try:
        yield scratch
        for t in targets:
            os.replace(scratch / t.name, t)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``, under its own name (a writer that chooses its
    format by the suffix, or names the file inside it, sees the real name); renamed onto
    ``path`` only on success: :func:`atomic_files` of one file."""
    target = Path(path)
    with atomic_files(target) as scratch:
        yield scratch / target.name


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty scratch folder beside ``path``; on success it takes the place of
    ``path`` (a folder already there is moved aside and removed), on failure it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part",
                                    dir=target.parent))
    try:
        yield scratch
        if target.exists():
            old = scratch.with_name(scratch.name + ".old")
            target.rename(old)
            scratch.rename(target)
            shutil.rmtree(old)
        else:
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n",
            encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with an error naming the file when it is not valid."""
    p = Path(path)
    if not p.is_file():
        raise QctfeaError(f"{p}: file not found")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QctfeaError(f"{p}: not valid JSON ({exc}); regenerate or fix this file") from exc
