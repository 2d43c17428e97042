"""What a matplotlib SVG figure draws, read back from the file: the markers of each scatter
collection and of each line, in the picture's coordinates, so that a test can check that a
figure shows the table's numbers (the count of points, and where they sit: an affine map of
the data on linear axes, the one its tick labels print) rather than that a file was
written."""
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


#: a tick label that is a plain number (matplotlib's minus sign "−" read as "-")
NUMBER = r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"


def axis_ticks(path, axis: str, pattern: str = NUMBER) -> tuple[np.ndarray, np.ndarray]:
    """The ticks of the ``axis`` ("x" or "y") whose label holds a number (``pattern``'s
    group), as (values, positions in SVG units): each tick's mark and the text of its label
    (matplotlib writes a label's lines as comments before their glyphs). An axis scale read
    from what the figure prints, independent of the points' placement."""
    root = ET.parse(path, ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))).getroot()
    values, positions = [], []
    for g in root.iter(f"{SVG}g"):
        if not re.fullmatch(rf"{axis}tick_\d+", g.get("id", "")):
            continue
        marks = [u for line in g if line.get("id", "").startswith("line2d_")
                 for u in line.iter(f"{SVG}use")]
        label = "\n".join((e.text or "").strip() for e in g.iter()
                           if e.tag is ET.Comment or e.tag == f"{SVG}text")  # or fonttype none
        m = re.search(pattern, label.replace("\u2212", "-"), re.M)
        if marks and m:
            values.append(float(m.group(1)))
            positions.append(float(marks[0].get(axis)))
    return np.array(values), np.array(positions)


def affine_residual(data: np.ndarray, drawn: np.ndarray, ticks=None) -> float:
    """Largest residual (SVG units) of the points ``drawn`` against an affine map of
    ``data``: near zero when the points are drawn where the data put them on a linear axis.
    With ``ticks`` (:func:`axis_ticks`) the map is the axis' own, from its tick labels;
    without, the least-squares line ``drawn = a + b data``. Either way the points must
    spread with the data (a figure that draws them all in one place is refused)."""
    data, drawn = np.asarray(data, float), np.asarray(drawn, float)
    assert data.shape == drawn.shape and data.size >= 3 and np.ptp(data) > 0
    b, a = np.polyfit(data, drawn, 1)
    assert abs(b) * np.ptp(data) >= 1.0, f"points drawn within {abs(b) * np.ptp(data):.3g} units"
    if ticks is None:
        return float(np.abs(a + b * data - drawn).max())
    values, positions = ticks
    assert len(values) >= 2 and np.ptp(values) > 0, f"no numeric tick labels: {ticks}"
    bt, at = np.polyfit(values, positions, 1)
    assert np.abs(at + bt * values - positions).max() < 0.01, f"ticks not on a linear axis: {ticks}"
    return float(np.abs(at + bt * data - drawn).max())
