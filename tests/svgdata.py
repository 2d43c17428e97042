"""What a matplotlib SVG figure draws, read back from the file: the markers of each scatter
collection and of each line, in the picture's coordinates, so that a test can check that a
figure shows the table's numbers (the count of points, and where they sit: an affine map of
the data on linear axes) rather than that a file was written."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np

SVG = "{http://www.w3.org/2000/svg}"


def _groups(path, prefix: str):
    """The groups whose id starts with ``prefix``, the legend's left out."""
    root = ET.parse(path).getroot()
    legend = {id(e) for lg in root.iter(f"{SVG}g") if lg.get("id", "").startswith("legend_")
              for e in lg.iter(f"{SVG}g")}
    for g in root.iter(f"{SVG}g"):
        if g.get("id", "").startswith(prefix) and id(g) not in legend:
            yield g


def _uses(g) -> np.ndarray:
    xy = [(float(u.get("x")), float(u.get("y"))) for u in g.iter(f"{SVG}use")]
    return np.array(xy, float).reshape(-1, 2)


def scatter_points(path) -> list[np.ndarray]:
    """The points of each ``ax.scatter`` collection, in drawing order, as (n, 2) arrays of
    (x, y) in SVG units (y grows downwards)."""
    return [p for p in (_uses(g) for g in _groups(path, "PathCollection_")) if len(p)]


def line_markers(path, stroke: str) -> list[np.ndarray]:
    """The markers of each line drawn in the colour ``stroke`` ("#999999"), in drawing
    order, as (n, 2) arrays of (x, y) in SVG units (a line of one point has no path, only
    its marker, which carries the colour too; error bar caps are such marker-only lines)."""
    out = []
    for g in _groups(path, "line2d_"):
        styles = " ".join(e.get("style", "") for e in (*g.findall(f"{SVG}path"),
                                                         *g.iter(f"{SVG}use")))
        if re.search(rf"stroke:\s*{re.escape(stroke)}\b", styles, re.I):
            out.append(_uses(g))
    return out


def affine_residual(data: np.ndarray, drawn: np.ndarray) -> float:
    """Largest residual (SVG units) of the least-squares line ``drawn = a + b data``: near
    zero when the points are drawn where the data put them on a linear axis."""
    data, drawn = np.asarray(data, float), np.asarray(drawn, float)
    assert data.shape == drawn.shape and data.size >= 3 and np.ptp(data) > 0
    b, a = np.polyfit(data, drawn, 1)
    return float(np.abs(a + b * data - drawn).max())
