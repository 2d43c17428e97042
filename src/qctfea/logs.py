"""Where the library's progress messages go: configured once, by an entry point.

The library writes through module loggers (``logging.getLogger(__name__)``) and
configures nothing; :func:`qctfea.workflow_glue.run_step` (the rule's log file) and the
command-line interfaces (stderr) call :func:`log_to`. Messages appear as written;
warnings and errors get a ``WARNING: `` / ``ERROR: `` prefix (the failure summary of
:mod:`qctfea.workflow_glue` finds a rule's ``ERROR:`` line).
"""

from __future__ import annotations

import logging



class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip("\n")
        return text if record.levelno < logging.WARNING else f"{record.levelname}: {text}"


def log_to(stream, packages: tuple[str, ...] = ("qctfea",)) -> logging.Handler:
    """Send log records (``packages``' from INFO, other libraries' from WARNING) to
    ``stream``; the handler, for :func:`remove`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    for name in packages:
        logging.getLogger(name).setLevel(logging.INFO)
    return handler


def remove(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.flush()
