"""Ball morphology from distance maps (qctfea.imaging.morphology) against scipy.ndimage's
binary morphology with the ball as structuring element: the same voxels."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from qctfea.imaging import morphology


def ball(radius_mm, sampling_zyx):
    """The closed ball in mm on the grid, written out independently of the module."""
    half = [int(np.floor(radius_mm / s)) for s in sampling_zyx]
    g = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(half, sampling_zyx)],
                    indexing="ij")
    return sum(c * c for c in g) <= radius_mm * radius_mm


def blobs(shape, seed, fill=0.5):
    """Random smooth blobs that touch the array's faces (border effects are exercised)."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return f > np.quantile(f, 1 - fill)


GRIDS = [(0.5, 0.5, 0.5), (2.5, 0.703125, 0.703125), (1.5, 0.78, 0.9), (3.0, 1.0, 1.0)]


@pytest.fixture(params=["distance map", "scipy", "either"])
def path(request, monkeypatch):
    """Each operation by the distance map, by scipy, or by the module's choice."""
    limit = {"distance map": -1.0, "scipy": np.inf, "either": morphology.SCIPY_BALL_LIMIT}
    monkeypatch.setattr(morphology, "SCIPY_BALL_LIMIT", limit[request.param])
    return request.param


@pytest.mark.parametrize("sampling", GRIDS)
@pytest.mark.parametrize("radius", [1.0, 1.5, 3.0, 5.0])
def test_dilation_erosion_opening_match_scipy(sampling, radius, path):
    m = blobs((30, 40, 36), seed=int(radius * 10) + len(str(sampling)), fill=0.4)
    se = ball(radius, sampling)
    got = morphology.dilate(m, radius, sampling)
    np.testing.assert_array_equal(got, ndimage.binary_dilation(m, structure=se))
    for border in (0, 1):
        np.testing.assert_array_equal(
            morphology.erode(m, radius, sampling, border_value=border),
            ndimage.binary_erosion(m, structure=se, border_value=border))
    np.testing.assert_array_equal(morphology.opening(m, radius, sampling),
                                  ndimage.binary_opening(m, structure=se))
    assert got.sum() > m.sum()  # not a no-op


def test_the_ball_is_the_closed_ball_in_mm():
    for r, s in [(3.0, (2.5, 0.703125, 0.703125)), (1.5, (0.5, 0.5, 0.5))]:
        np.testing.assert_array_equal(morphology.ball(r, s), ball(r, s))
    assert morphology.ball(1.0, (1.0, 1.0, 1.0)).sum() == 7  # centre and 6 face neighbours


def test_empty_and_full_masks(path):
    s = (1.0, 0.5, 0.5)
    empty = np.zeros((8, 9, 10), bool)
    assert not morphology.dilate(empty, 2.0, s).any()
    assert not morphology.erode(empty, 2.0, s).any()
    full = np.ones((8, 9, 10), bool)
    assert morphology.erode(full, 2.0, s, border_value=1).all()
    np.testing.assert_array_equal(morphology.erode(full, 2.0, s, border_value=0),
                                  ndimage.binary_erosion(full, structure=ball(2.0, s)))
