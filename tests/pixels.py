"""QC pictures read back as pixels, so that a test checks what a picture shows rather than
that some file was written: where a colour the plotting code uses is drawn (whatever grey it
is blended with), the rows of text in a colour, grey image blocks; and what the pictures
several tests check show (a refused step's message, a refused calibration, a load case
without a curve, a registration left at the identity, a phantomless calibration's panels)."""
from __future__ import annotations

import textwrap

import numpy as np


def rgb(path) -> np.ndarray:
    """The PNG at ``path`` as an array (rows, columns, 3) of floats in 0..1 (alpha left out)."""
    import matplotlib.image as mpimg

    return np.asarray(mpimg.imread(path), float)[..., :3]


def colour(a: np.ndarray, name: str, min_alpha: float = 0.4, tol: float = 0.12) -> np.ndarray:
    """The pixels of ``a`` drawn in the matplotlib colour ``name`` ("C3", "lime", "gold")
    at an opacity of at least ``min_alpha`` over any grey (the white background, a greyscale
    image, antialiasing): such a pixel p = α c + (1 - α) g (1, 1, 1) less its smallest channel
    is α times c less its smallest channel, whatever g (here to ``tol`` times α in each
    channel: gold and orange are told apart; a colour and its shades are not)."""
    from matplotlib.colors import to_rgb

    c = np.array(to_rgb(name))
    t = c - c.min()
    q = a - a.min(axis=-1, keepdims=True)
    alpha = q @ t / (t @ t)
    off = np.abs(q - alpha[..., None] * t).max(axis=-1)
    return (alpha >= min_alpha) & (off <= tol * alpha)


def dark(a: np.ndarray, level: float = 0.35) -> np.ndarray:
    """Black ink: pixels whose every channel is below ``level``."""
    return a.max(axis=-1) < level


def grey(a: np.ndarray) -> np.ndarray:
    """Grey pixels, white left out: a greyscale image's."""
    return (np.ptp(a, axis=-1) < 0.03) & (a.max(axis=-1) < 0.9)


def runs(profile) -> list[tuple[int, int]]:
    """The runs (start, stop) of consecutive true values of a 1-D profile."""
    p = np.concatenate([[0], np.asarray(profile, bool).astype(int), [0]])
    edges = np.flatnonzero(np.diff(p))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def text_rows(mask: np.ndarray) -> list[tuple[int, int]]:
    """The rows of text: runs of picture rows holding any pixel of ``mask``, a run of at most
    3 rows (the underscores below a row's descenders) joined to the one above it."""
    rows: list[tuple[int, int]] = []
    for start, stop in runs(mask.any(axis=1)):
        if rows and stop - start <= 3:
            rows[-1] = (rows[-1][0], stop)
        else:
            rows.append((start, stop))
    return rows


def block(mask: np.ndarray, min_count: int = 50) -> tuple[int, int, int, int]:
    """(first row, end row, first column, end column) of the largest block of ``mask``: the
    longest runs of rows and of columns holding at least ``min_count`` of its pixels."""
    rows, cols = runs(mask.sum(axis=1) >= min_count), runs(mask.sum(axis=0) >= min_count)
    assert rows and cols, f"no block of {min_count} pixels in a row and in a column"
    return (*max(rows, key=lambda r: r[1] - r[0]), *max(cols, key=lambda r: r[1] - r[0]))


def blobs(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The connected regions of ``mask``, each as (first row, end row, first column, end
    column), largest first."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    boxes = ndimage.find_objects(labels)
    return [(b[0].start, b[0].stop, b[1].start, b[1].stop)
            for _, b in sorted(zip(sizes, boxes), key=lambda sb: -sb[0])]


def assert_text(mask: np.ndarray, lines: list[str], em_px: float, what) -> list:
    """``mask`` (a picture's pixels of one colour) holds ``lines`` of text in a font of
    ``em_px`` pixels: one row of text per line, each as wide as its characters (0.4 to 0.7
    em each, as matplotlib's DejaVu Sans draws them: a line cut short or left out fails).
    Returns the rows (start, stop)."""
    rows = text_rows(mask)
    assert len(rows) == len(lines), (what, rows, lines)
    for (start, stop), line in zip(rows, lines):
        cols = np.flatnonzero(mask[start:stop].any(axis=0))
        per_char = (cols[-1] - cols[0] + 1) / len(line) / em_px
        assert 0.4 < per_char < 0.7, (what, line, per_char)
    return rows


#: Colours of the tissues in the calibration picture (qctfea.imaging.calibration_plot)
TISSUE_COLOURS = {"air": "tab:blue", "fat": "gold", "muscle": "tab:red"}


def calibration_panels(png, effective: bool) -> tuple[dict, bool, set]:
    """The phantomless calibration picture read back as pixels: the centre (column, row) of
    each tissue's marker in the line panel (top left), whether the energy panel (bottom left,
    effective energy only: then 2 x 2 panels, else 1 x 2) has the effective energy's
    vertical line (tab:red, down most of the panel), and the tissues whose colour the slice
    panel (the last) shows."""
    a = rgb(png)
    h, w = a.shape[0] // (2 if effective else 1), a.shape[1] // 2
    line, energy_panel, voxels = a[:h, :w], a[-h:, :w], a[-h:, w:]
    centres = {}
    for name, c in TISSUE_COLOURS.items():
        rows, cols = np.nonzero(colour(line, c))
        if rows.size:
            centres[name] = (cols.mean(), rows.mean())
    energy = colour(energy_panel, "tab:red").sum(axis=0).max() > 0.5 * h
    return centres, energy, {n for n, c in TISSUE_COLOURS.items()
                             if colour(voxels, c).sum() > 500}


def assert_message_picture(path, message: str) -> None:
    """The picture of a refused step (qctfea.qc.pictures.message_picture, 120 dpi): its red
    (C3) title alone in the top rows, and in black below it ``message`` wrapped at 90
    characters in 8 pt (:func:`assert_text`), centred; nothing else (no axes)."""
    a = rgb(path)
    h, w = a.shape[:2]
    title = text_rows(colour(a, "C3"))
    assert len(title) == 1 and title[0][1] < 0.15 * h, (path, title)
    ink = dark(a)
    rows = assert_text(ink, textwrap.wrap(message, 90), 8 * 120 / 72, path)
    assert 0.3 * h < rows[0][0] and rows[-1][1] < 0.7 * h, (path, rows)
    cols = np.flatnonzero(ink.any(axis=0))
    assert abs((cols[0] + cols[-1]) / 2 - w / 2) < 0.05 * w, (path, cols[[0, -1]])


def assert_calibration_refusal(path, message: str, ct_path) -> None:
    """The picture of a refused calibration (calibration_plot.plot_refusal, 110 dpi): in
    the left half "REFUSED" and ``message`` wrapped at 62 characters in firebrick 7.5 pt
    (:func:`assert_text`); in the right half the CT slice (numpy axis 0 of ``ct_path``) in
    grey, a block as wide against its height as the CT has columns against rows."""
    import SimpleITK as sitk

    a = rgb(path)
    half = a.shape[1] // 2
    assert_text(colour(a[:, :half], "firebrick"), ["REFUSED", *textwrap.wrap(message, 62)],
                7.5 * 110 / 72, path)
    r0, r1, c0, c1 = block(grey(a[:, half:]))
    nx, ny = sitk.ReadImage(str(ct_path)).GetSize()[:2]
    assert abs((c1 - c0) / (r1 - r0) / (nx / ny) - 1) < 0.02, (path, (r0, r1, c0, c1), nx, ny)
    assert grey(a[r0:r1, half + c0:half + c1]).mean() > 0.9


def assert_curve_without_result(path, stop_reason: str) -> None:
    """The force-displacement picture of a load case without a curve (qctfea.steps.fea
    plot_curve, 110 dpi): no curve (matplotlib's first colour, C0, nowhere), and in red (C3)
    the heading (one or two lines) in the top rows and, in the middle of the axes,
    ``stop_reason`` wrapped at 60 characters in 7 pt (:func:`assert_text`); the heading within
    the picture's width (a clipped one touches its edge)."""
    a = rgb(path)
    h = a.shape[0]
    assert not colour(a, "C0").any(), path
    red = colour(a, "C3")
    heading = [r for r in text_rows(red) if r[0] < 0.15 * h]
    assert 1 <= len(heading) <= 2 and heading[-1][1] < 0.2 * h, (path, heading)
    cols = np.flatnonzero(red[:heading[-1][1]].any(axis=0))
    assert cols[0] > 2 and cols[-1] < a.shape[1] - 3, (path, cols[[0, -1]])
    red[:heading[-1][1]] = False
    rows = assert_text(red, textwrap.wrap(stop_reason, 60), 7 * 110 / 72, path)
    assert 0.3 * h < rows[0][0] and rows[-1][1] < 0.7 * h, (path, rows)


def registration_outlines(path) -> list[dict[str, np.ndarray]]:
    """The registration picture (qctfea.imaging.registration.plot_registration) per panel
    (axial in the left half, sagittal in the right): the pixels of the baseline outline
    (lime), the follow-up's before (red) and after (yellow) registration, and the points
    (cyan)."""
    a = rgb(path)
    half = a.shape[1] // 2
    return [{c: colour(p, c) for c in ("lime", "red", "yellow", "cyan")}
            for p in (a[:, :half], a[:, half:])]


def assert_registration_at_identity(path) -> None:
    """A registration picture of a follow-up left where it was (the identity), drawn from
    the baseline itself: in both panels the outline after (yellow, drawn last) covers the
    baseline's and the one before (red), and there are no points (cyan)."""
    for panel in registration_outlines(path):
        assert panel["yellow"].sum() > 300, path
        assert panel["red"].sum() < 0.01 * panel["yellow"].sum(), path
        assert not panel["cyan"].any(), path
