"""Pictures the per-scan steps draw without the cohort's statistics: a matplotlib figure
without pyplot, saved atomically, and the picture of a refused step's message. Kept apart
from :mod:`qctfea.qc.figures` (the cohort figures, which need statsmodels and pandas) so
that the imaging and model environments can draw them."""

from __future__ import annotations

import os
from pathlib import Path

from qctfea.provenance import atomic_path


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), constrained_layout=True)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, paths: dict[str, Path], dpi: int = 120) -> None:
    """Save ``fig`` in each format of ``paths`` ({format: path}), each atomically."""
    for fmt, path in paths.items():
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg"
                        else None)


def message_picture(title: str, message: str, path: str | os.PathLike | dict[str, Path]
                    ) -> None:
    """A picture that says why there is nothing to show (a refused step's output); ``path``
    one PNG, or {format: path}."""
    import textwrap

    fig = new_figure(7.0, 3.0)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, color="C3")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 90)), transform=ax.transAxes,
            ha="center", va="center", fontsize=8)
    save_figure(fig, path if isinstance(path, dict) else {"png": Path(path)})
