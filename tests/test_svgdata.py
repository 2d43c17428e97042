"""The SVG reading helpers of tests/svgdata.py (used by the report's figure checks) on small
matplotlib figures whose data and tick labels the test sets itself."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

import svgdata

X = np.array([-3.0, 1.0, 2.5, 7.0])
Y = np.array([10.0, 30.0, 20.0, 50.0])


def _scatter_svg(path, x, y, xticks=(-4, -2, 0, 2, 4, 6, 8), yticks=(0, 20, 40, 60)):
    """One scatter collection of (x, y) on axes with the given ticks, written as SVG."""
    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.scatter(x, y)
    ax.set_xticks(xticks)
    ax.set_yticks(yticks)
    ax.grid(alpha=0.3)
    fig.savefig(path, format="svg")
    return path


def test_points_sit_where_the_axis_tick_labels_put_them(tmp_path):
    """Tick labels read back as set (-4 in matplotlib's minus sign); points on their map."""
    svg = _scatter_svg(tmp_path / "s.svg", X, Y)
    (pts,) = svgdata.scatter_points(svg)
    xt, yt = svgdata.axis_ticks(svg, "x"), svgdata.axis_ticks(svg, "y")
    assert xt[0].tolist() == [-4, -2, 0, 2, 4, 6, 8] and yt[0].tolist() == [0, 20, 40, 60]
    assert np.all(np.diff(xt[1]) > 0) and np.all(np.diff(yt[1]) < 0)  # SVG y grows down
    assert svgdata.affine_residual(X, pts[:, 0], xt) < 0.01
    assert svgdata.affine_residual(Y, pts[:, 1], yt) < 0.01
    # a label pattern for labels with text around the number ("M12\n12 mo")
    fig = Figure()
    ax = fig.subplots()
    ax.plot([0, 12, 24], [1, 2, 3], marker="o")
    ax.set_xticks([0, 12, 24], ["M00\n0 mo", "M12\n12 mo", "M24\n24 mo"])
    fig.savefig(tmp_path / "m.svg", format="svg")
    assert svgdata.axis_ticks(tmp_path / "m.svg", "x", r"([\d.]+) mo")[0].tolist() == [0, 12, 24]


def test_a_collapsed_or_rescaled_plot_is_refused(tmp_path):
    """A plot in one place is refused; one at 0.5 x + 2 is off the tick map by |0.5 x + 2 - x|."""
    # All points in one place fit an affine map with slope 0 and no residual; points at
    # 0.5 x + 2 are affine in the data (no least-squares residual) but not where the labels
    # put x.
    svg = _scatter_svg(tmp_path / "flat.svg", np.full(4, 2.0), np.full(4, 20.0))
    (pts,) = svgdata.scatter_points(svg)
    for axis, data in ((0, X), (1, Y)):
        with pytest.raises(AssertionError, match="points drawn within"):
            svgdata.affine_residual(data, pts[:, axis])
        with pytest.raises(AssertionError, match="points drawn within"):
            svgdata.affine_residual(data, pts[:, axis], svgdata.axis_ticks(svg, "xy"[axis]))
    svg = _scatter_svg(tmp_path / "rescaled.svg", 0.5 * X + 2.0, Y, xticks=(-4, 0, 4, 8))
    (pts,) = svgdata.scatter_points(svg)
    assert svgdata.affine_residual(X, pts[:, 0]) < 0.01
    values, positions = svgdata.axis_ticks(svg, "x")
    per_unit = np.ptp(positions) / np.ptp(values)
    off = svgdata.affine_residual(X, pts[:, 0], (values, positions))
    assert off == pytest.approx(per_unit * np.abs(0.5 * X + 2.0 - X).max(), rel=1e-4)
