"""Density-modulus laws and element integration against independent values."""
import numpy as np
import pytest
import SimpleITK as sitk

from qctfea.materials import MaterialParams, _subdivide, element_moduli, modulus_mpa


def test_keyak_law_hand_values():
    p = MaterialParams(law="keyak1998", ash_slope=1.0, ash_intercept=0.0, e_floor_mpa=0.0)
    rho_mg = np.array([150.0, 400.0, 800.0])  # fed directly as ash density
    expected = [33900 * 0.15**2.2, 5307 * 0.4 + 469, 10200 * 0.8**2.01]
    assert modulus_mpa(rho_mg, p) == pytest.approx(expected, rel=1e-12)


def test_ash_conversion_and_floor():
    p = MaterialParams()  # rho_ash = 0.0523 + 1.22 rho_QCT
    ash = 0.0523 + 1.22 * 0.1
    assert modulus_mpa(np.array([100.0]), p)[0] == pytest.approx(33900 * ash**2.2)
    assert modulus_mpa(np.array([-500.0]), p)[0] == p.e_floor_mpa


def test_subdivision_equal_volume_centroids():
    pts = _subdivide(2)
    assert pts.shape == (64, 4)
    assert np.allclose(pts.sum(axis=1), 1.0)
    assert np.allclose(pts.mean(axis=0), 0.25)  # exact centroid of the tet


def _image(arr_zyx, spacing=1.0, origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr_zyx.astype(np.float32))
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(origin)
    return img


def test_element_mean_of_linear_field_is_centroid_value():
    z, y, x = np.mgrid[0:20, 0:20, 0:20].astype(float)
    field = 3.0 + 2.0 * x - 0.5 * y + 0.25 * z
    img = _image(field)
    pts = np.array([[2.0, 3.0, 4.0], [9.0, 3.5, 4.0], [4.0, 11.0, 5.0], [5.0, 6.0, 12.0]])
    cells = np.array([[0, 1, 2, 3]])
    c = pts.mean(axis=0)
    expected = 3.0 + 2.0 * c[0] - 0.5 * c[1] + 0.25 * c[2]
    assert element_moduli(pts, cells, field, img)[0] == pytest.approx(expected, rel=1e-9)


def test_element_mean_of_step_field_matches_monte_carlo_volume_fraction():
    # E = 1 for x > 5.5 else 0. The volume fraction of the tet beyond x = 5.5 is
    # estimated independently by Monte Carlo; one centroid sample (x = 5) says 0.
    n = 40
    # Voxel centres at k * 0.25 - 0.125: the interpolated step sits at x = 5.5.
    z, y, x = np.mgrid[0:n, 0:n, 0:n].astype(float) * 0.25 - 0.125
    field = (x > 5.5).astype(float)
    img = _image(field, spacing=0.25, origin=(-0.125,) * 3)
    pts = np.array([[3.0, 2.0, 2.0], [7.0, 2.0, 2.0], [5.0, 6.0, 2.0], [5.0, 4.0, 7.0]])
    cells = np.array([[0, 1, 2, 3]])
    bary = np.random.default_rng(1).dirichlet(np.ones(4), 400000)
    expected = float(((bary @ pts)[:, 0] > 5.5).mean())
    integ = element_moduli(pts, cells, field, img, "integrated", levels=3)[0]
    assert integ == pytest.approx(expected, abs=0.02)
    assert element_moduli(pts, cells, field, img, "centroid")[0] == 0.0
