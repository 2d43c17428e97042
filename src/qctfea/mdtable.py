"""Markdown (pipe) tables from already formatted cells: pandas' ``DataFrame.to_markdown``
(tabulate) does the layout; the callers keep the number formats."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

_ALIGN = {"l": "left", "r": "right", "c": "center"}


def pipe_table(header: Sequence[str], rows: Iterable[Sequence], align: str) -> str:
    """The table (no trailing newline); ``align`` one letter per column: l, r or c. Cells are
    written as given (``disable_numparse``: "+50.0" stays "+50.0")."""
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(header)} columns")
    frame = pd.DataFrame([[str(c) for c in r] for r in rows], columns=list(header))
    return frame.to_markdown(index=False, tablefmt="pipe", disable_numparse=True,
                             colalign=[_ALIGN[a] for a in align])
