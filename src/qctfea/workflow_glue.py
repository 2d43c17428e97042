"""Glue for the Snakemake scripts: logging to the rule's log file, context strings.

Kept tiny on purpose: the workflow's scripts only unpack the ``snakemake``
object and call :mod:`qctfea.steps`.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from qctfea.provenance import QctfeaError


def run_step(snakemake, fn: Callable[[], None]) -> None:
    """Run ``fn`` with stderr and warnings going to the rule's log; fail with a clear line."""
    log = Path(snakemake.log[0]) if snakemake.log else None
    stream = open(log, "w") if log else sys.stderr  # noqa: SIM115
    try:
        with contextlib.redirect_stderr(stream), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, c, f, lineno, file=None, line=None: print(
                f"WARNING: {m}", file=stream, flush=True)
            try:
                fn()
            except QctfeaError as exc:
                print(f"ERROR: {exc}", file=stream, flush=True)
                raise SystemExit(f"qctfea: {exc}") from None
            except Exception:
                traceback.print_exc(file=stream)
                raise
    finally:
        if log:
            stream.close()


def context(wildcards) -> str:
    return f"patient {wildcards.patient}, timepoint {wildcards.timepoint}"
