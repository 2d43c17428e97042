"""The nonlocal average of the damage model (qctfea.fea.nonlocal_average; docs/nonlinear.md,
*Mesh objectivity*):

* against the direct Gaussian-weighted sum over element pairs (its definition), on a
  random cloud of elements;
* a constant field stays constant, the unmasked elements keep their values;
* a bar whose every element can soften, a slightly weaker layer in the middle: with the
  average, the falling branch is the same on meshes of 0.5 and 0.25 mm elements (the band
  is as wide as the averaging length); the 1-vs-2-ranks check is in test_plasticity.
"""

import dolfinx_solver  # noqa: F401  (before dolfinx or petsc4py)
import numpy as np
import pytest
from mpi4py import MPI

from qctfea.errors import QctfeaError
from qctfea.fea.nonlocal_average import NonlocalAverage
from test_plasticity import SY, _half_drop_displacement, _softening_bar


def _cloud(n=3000, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, (n, 3))
    v = rng.uniform(0.01, 0.2, n)
    mask = rng.uniform(size=n) < 0.8
    f = np.sin(x[:, 0]) + 0.3 * x[:, 1] + rng.normal(0, 0.3, n)
    return x, v, mask, f


@pytest.mark.parametrize("length", [1.0, 2.0, 3.0])
def test_average_matches_the_direct_weighted_sum(length):
    x, v, mask, f = _cloud()
    avg = NonlocalAverage(MPI.COMM_SELF, x, v, mask, len(x), length)(f)
    s = length / 2
    d2 = ((x[:, None, :] - x[None, mask, :]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * s * s)) * v[mask]
    ref = (w @ f[mask]) / w.sum(1)
    err = np.abs(avg - ref)[mask]
    change = np.abs(f - ref)[mask].mean()  # what the average does to the field
    assert err.mean() < 0.02 * change
    assert err.max() < 0.15 * change
    np.testing.assert_array_equal(avg[~mask], f[~mask])


def test_constant_stays_constant_and_bad_length_is_refused():
    x, v, mask, _ = _cloud(500)
    avg = NonlocalAverage(MPI.COMM_SELF, x, v, mask, len(x), 1.5)(np.full(len(x), 0.7))
    np.testing.assert_allclose(avg, 0.7, rtol=1e-12)
    with pytest.raises(QctfeaError, match="nonlocal_length_mm"):
        NonlocalAverage(MPI.COMM_SELF, x, v, mask, len(x), 0.0)


def test_nonlocal_bar_falling_branch_is_mesh_objective():
    """Every element softens at SY (the middle layer at 0.95 SY, where the band starts); no
    crack band. The averaged bar falls to half its peak at the same displacement on
    0.5 and 0.25 mm elements (within 2 %), with the same peak (1 %)."""
    d, peak = {}, {}
    for nz in (20, 40):
        r, a, area = _softening_bar(nz=nz, crack_band=None, increments=60, dmax=0.12,
                                    rest_yield=SY / 0.95, integration="imex",
                                    min_increment_fraction=0.25, imex_damage_tolerance=0.001,
                                    nonlocal_length_mm=2.0)
        d[nz] = _half_drop_displacement(r)
        peak[nz] = r.strength_n / area
    assert d[40] == pytest.approx(d[20], rel=0.02)
    assert peak[40] == pytest.approx(peak[20], rel=0.01)


def test_nonlocal_needs_imex():
    from qctfea.fea.plasticity import NonlinearParams

    with pytest.raises(QctfeaError, match="imex"):
        NonlinearParams(nonlocal_length_mm=2.0, integration="newton")
