"""The geometry of a stack of DICOM slices: one orientation for all, orthonormal axes, the
gaps of an uneven stack in words, and resampling onto a uniform slice spacing
(:mod:`qctfea.imaging.dicomio`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from qctfea.errors import QctfeaError
from qctfea.imaging.dicomslices import Slice

#: Largest difference between ImageOrientationPatient values within one series.
ORIENTATION_TOL = 1e-4

#: Largest departure of the direction cosines from unit length / orthogonality.
ORTHONORMAL_TOL = 1e-3


def orthonormal_axes(orientation: np.ndarray, where: str) -> tuple[np.ndarray, ...]:
    """Row cosine, column cosine and slice normal, checked and made orthonormal."""
    row, col = orientation[:3].copy(), orientation[3:].copy()
    if (
        abs(np.linalg.norm(row) - 1) > ORTHONORMAL_TOL
        or abs(np.linalg.norm(col) - 1) > ORTHONORMAL_TOL
        or abs(float(row @ col)) > ORTHONORMAL_TOL
    ):
        raise QctfeaError(
            f"{where}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal "
            "unit vectors; the header is corrupt, re-export the series from the scanner/PACS"
        )
    # Gram-Schmidt: keep the row direction, remove rounding from the column one.
    row /= np.linalg.norm(row)
    col -= (col @ row) * row
    col /= np.linalg.norm(col)
    return row, col, np.cross(row, col)


def check_consistent(slices: list[Slice], where: str) -> None:
    """All slices of the series must share orientation, matrix size and pixel spacing."""
    first = slices[0]
    for sl in slices[1:]:
        if np.max(np.abs(sl.orientation - first.orientation)) > ORIENTATION_TOL:
            raise QctfeaError(
                f"{where}: the series mixes slice orientations ({first.orientation.tolist()} "
                f"and {sl.orientation.tolist()}), e.g. a localizer or several stacks; "
                "select a series with one stack (the sample sheet's series_uid column) or "
                "remove the extra images"
            )
        if (sl.rows, sl.columns) != (first.rows, first.columns):
            raise QctfeaError(
                f"{where}: the series mixes matrix sizes ({first.rows}x{first.columns} and "
                f"{sl.rows}x{sl.columns}); select a series with one reconstruction"
            )
        if not np.allclose(sl.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=0):
            raise QctfeaError(
                f"{where}: the series mixes pixel spacings ({list(first.pixel_spacing)} and "
                f"{list(sl.pixel_spacing)}); select a series with one reconstruction"
            )


def format_gaps(gaps: np.ndarray, proj: np.ndarray, bad: np.ndarray) -> str:
    """Human-readable summary of slice gaps, with where the irregular ones are."""
    counts = Counter(np.round(gaps, 4).tolist())
    summary = ", ".join(f"{g:g} mm x{n}" for g, n in sorted(counts.items()))
    where_bad = "; ".join(
        f"{gaps[i]:g} mm between slices {i} and {i + 1} (at {proj[i]:g} and {proj[i + 1]:g} mm)"
        for i in np.flatnonzero(bad)[:5]
    )
    more = " ..." if int(bad.sum()) > 5 else ""
    return f"gaps found: {summary}; irregular: {where_bad}{more}"


def resample_uniform(
    hu_slices: list[np.ndarray], proj: np.ndarray, median: float
) -> tuple[np.ndarray, float]:
    """Slices at positions ``proj`` (ascending, mm) interpolated linearly onto a uniform grid.

    The grid runs from the first to the last slice; its spacing is the median gap,
    adjusted to span / round(span / median) so the grid ends on the last slice.
    A grid position that coincides with an original slice takes that slice.
    """
    span = float(proj[-1] - proj[0])
    n_new = max(int(round(span / median)), 1) + 1
    spacing = span / (n_new - 1)
    targets = proj[0] + np.arange(n_new) * spacing
    targets[-1] = proj[-1]
    volume = np.empty((n_new, *hu_slices[0].shape), dtype=np.float32)
    for k, z in enumerate(targets):
        i = int(np.clip(np.searchsorted(proj, z, side="right") - 1, 0, len(proj) - 2))
        w = float(np.clip((z - proj[i]) / (proj[i + 1] - proj[i]), 0.0, 1.0))
        if w <= 1e-9:
            volume[k] = hu_slices[i]
        elif w >= 1 - 1e-9:
            volume[k] = hu_slices[i + 1]
        else:
            volume[k] = ((1 - w) * hu_slices[i].astype(np.float64)
                         + w * hu_slices[i + 1].astype(np.float64))
    return volume, spacing
