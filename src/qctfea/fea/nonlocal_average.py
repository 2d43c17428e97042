"""Nonlocal average of a per-element field: the damage model's regularisation below the
crack band (docs/nonlinear.md, *Mesh objectivity*).

An integral-type nonlocal model (Pijaudier-Cabot & Bažant, J Eng Mech 1987;113:1512)
drives damage by the weighted average of the equivalent strain over a neighbourhood,

    κ̄(x_i) = Σ_j w(|x_i - x_j|) V_j κ_j / Σ_j w(|x_i - x_j|) V_j,   w(r) = exp(-r² / (2 s²)),

over the bone elements j (V_j their volumes, x_j their centroids), with ``s = length / 2``:
95 % of the weight of a point lies within ``length`` of it. A band of elements finer than
``length`` can then not localise into one element row: the width of a softening band is
set by ``length``, not by the mesh.

Evaluated on a regular grid (normalised convolution): each owned element deposits V κ and
V at its centroid, spread trilinearly over the 8 grid points around it (spacing
``length / 4``), the ranks sum their grids
(one ``Allreduce``), each rank smooths both grids with scipy's separable Gaussian filter
and samples their ratio at its elements' centroids (trilinear). The cost is linear in the
number of elements and grid points, where a table of element pairs within the radius would
hold about a thousand neighbours per peri-screw element of the default mesh. Written here
because no maintained library averages an unstructured mesh's element field (scipy gives
the filter and the interpolation).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI
from scipy import ndimage

from qctfea.errors import QctfeaError

#: grid points per ``length`` (the Gaussian's s is two grid spacings)
POINTS_PER_LENGTH = 4
#: largest grid the average may allocate (float64 points; about 320 MB per grid)
MAX_GRID_POINTS = 40_000_000


class NonlocalAverage:
    """Gaussian-weighted average over ``mask``-ed local elements, sampled at every local
    element (owned and ghost: every rank holds the same value for a shared element)."""

    def __init__(self, comm, centroids: np.ndarray, volumes: np.ndarray, mask: np.ndarray,
                 n_owned: int, length_mm: float):
        if not length_mm > 0:
            raise QctfeaError(f"loads.nonlocal_length_mm must be positive, not {length_mm}")
        self.comm = comm
        self.h = length_mm / POINTS_PER_LENGTH
        # s = length / 2 = 2 grid spacings; the trilinear deposit and sampling each add the
        # variance of a unit triangle (1/6 per axis): the filter makes up the rest
        self.sigma = np.sqrt(4.0 - 2.0 / 6.0)
        pad = 3.0 * self.sigma * self.h + self.h
        # the grid spans the bone elements of all ranks: the same grid on every rank
        own = centroids[:n_owned][mask[:n_owned]]
        lo = own.min(0) if len(own) else np.full(3, np.inf)
        hi = own.max(0) if len(own) else np.full(3, -np.inf)
        comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
        comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
        if not np.all(np.isfinite(lo)):
            raise QctfeaError("nonlocal average: no element to average over")
        lo = lo - pad
        self.lo = lo
        self.shape = tuple(int(n) for n in np.ceil((hi + pad - lo) / self.h).astype(int) + 1)
        if int(np.prod(self.shape)) > MAX_GRID_POINTS:
            raise QctfeaError(
                f"loads.nonlocal_length_mm = {length_mm} mm needs a {self.shape} grid "
                f"(more than {MAX_GRID_POINTS:,} points): use a larger length or null")
        # deposit: trilinear (cloud in cell) onto the 8 grid points around each owned
        # masked element's centroid, the adjoint of the trilinear sampling below
        sel = np.flatnonzero(mask[:n_owned])
        g = (centroids[sel] - lo) / self.h
        i0 = np.floor(g).astype(np.int64)
        t = g - i0
        flat, wts = [], []
        for corner in np.ndindex(2, 2, 2):
            c = np.asarray(corner)
            flat.append(np.ravel_multi_index((i0 + c).T, self.shape))
            wts.append(np.prod(np.where(c, t, 1.0 - t), axis=1))
        self._flat = np.concatenate(flat)
        self._cic = np.stack(wts)  # (8, elements), the order of self._flat
        self._deposit_idx = sel
        self._vol = volumes[sel]
        self._coords = ((centroids - lo) / self.h).T  # every local element, grid units
        self.mask = mask
        self._den = self._smooth_at_elements(self._vol)

    def _smooth_at_elements(self, weights: np.ndarray) -> np.ndarray:
        grid = np.bincount(self._flat, weights=(self._cic * weights).ravel(),
                           minlength=int(np.prod(self.shape)))
        if self.comm.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, grid, op=MPI.SUM)
        grid = ndimage.gaussian_filter(grid.reshape(self.shape), self.sigma, mode="constant",
                                       truncate=3.0)
        return ndimage.map_coordinates(grid, self._coords, order=1, mode="constant")

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """The average of ``values`` (one per local element) at every local element; the
        input unchanged where ``mask`` is false."""
        num = self._smooth_at_elements(self._vol * values[self._deposit_idx])
        with np.errstate(invalid="ignore", divide="ignore"):
            avg = num / self._den
        return np.where(self.mask & (self._den > 0), avg, values)
