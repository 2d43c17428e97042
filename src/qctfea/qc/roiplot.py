"""QC picture of a scan's vertebra, BMD regions and screws on orthogonal slices.

The calibrated density and the vertebra parts image are resampled onto an
axis-aligned grid in the patient's LPS frame (0.5 mm, around the vertebra),
whatever the scan's own direction matrix, and shown in radiological
orientation (patient right on the left of axial and coronal views, anterior
up in axial views and on the left in sagittal views, superior up):

1. axial slice at the height of the screws (the mean of their axis midpoints);
2. mid-sagittal slice through the vertebral body's centroid;
3. coronal slice through the body's centroid;
4. sagittal slice through the middle of the left screw.

Outlines: vertebral body (orange), trabecular ROI (green), posterior elements
(purple), screws (blue: left, red: right); the "around the screw" region (bone
inside the screw and its shell over the inserted length) is filled in cyan.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from qctfea.imaging.masks import BODY, POSTERIOR, TRABECULAR

SCREW_COLOURS = {"left": "#2f6bd8", "right": "#d8432f"}


def _lps_grid(parts: sitk.Image, spacing: float = 0.5, margin_mm: float = 6.0) -> sitk.Image:
    arr = sitk.GetArrayViewFromImage(parts)
    idx = np.argwhere(arr > 0)
    lo_i, hi_i = idx.min(0), idx.max(0)
    corners = np.array([parts.TransformContinuousIndexToPhysicalPoint([float(x), float(y),
                                                                       float(z)])
                        for z in (lo_i[0], hi_i[0]) for y in (lo_i[1], hi_i[1])
                        for x in (lo_i[2], hi_i[2])])
    lo = corners.min(0) - margin_mm
    n = np.ceil((corners.max(0) + margin_mm - lo) / spacing).astype(int) + 1
    ref = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    ref.SetOrigin(lo.tolist())
    ref.SetSpacing([spacing] * 3)
    return ref


def _screw_block(sc, radius_mm: float, lo: np.ndarray, h: float, shape) -> tuple:
    """Index slices (z, y, x) of the grid (origin ``lo``, spacing ``h``) holding the screw
    from its head to its tip, padded by ``radius_mm``."""
    ends = np.array([sc.head_end_mm, sc.tip_mm])
    a = np.floor((ends.min(0) - radius_mm - lo) / h).astype(int)  # x, y, z
    b = np.ceil((ends.max(0) + radius_mm - lo) / h).astype(int) + 1
    size = np.array(shape[::-1])
    a, b = np.clip(a, 0, size), np.clip(b, 0, size)
    return tuple(slice(int(a[i]), int(b[i])) for i in (2, 1, 0))


def roi_picture(density: sitk.Image, parts: sitk.Image, screws, shell_mm: float, path,
                title: str = "", values: dict | None = None) -> None:
    """Write the four-slice QC picture (PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    ref = _lps_grid(parts)
    h = ref.GetSpacing()[0]
    lo = np.array(ref.GetOrigin())
    dens = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(density, sitk.sitkFloat32), ref,
                                                sitk.Transform(), sitk.sitkLinear, -100.0))
    lab = sitk.GetArrayFromImage(sitk.Resample(parts, ref, sitk.Transform(),
                                               sitk.sitkNearestNeighbor, 0))
    screw_masks, around = {}, np.zeros(lab.shape, bool)
    for sc in screws:
        # only the block of the grid that can hold the screw and its shell
        blk = _screw_block(sc, sc.spec.diameter_mm / 2 + shell_mm + 1.0, lo, h, lab.shape)
        zz, yy, xx = np.mgrid[blk]
        pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1) * h + lo
        screw_masks[sc.side] = np.zeros(lab.shape, bool)
        screw_masks[sc.side][blk] = sc.contains(pts).reshape(zz.shape)
        around[blk] |= sc.around(pts, shell_mm).reshape(zz.shape)
    around &= np.isin(lab, (BODY, POSTERIOR, TRABECULAR))
    body = np.isin(lab, (BODY, TRABECULAR))
    centroid = np.argwhere(body).mean(0) if body.any() else np.array(lab.shape) / 2  # z, y, x
    by_side = {sc.side: sc for sc in screws}
    if screws:
        mids = np.array([(sc.entry_mm + sc.tip_mm) / 2 for sc in screws])
        z_screw = int(round((mids[:, 2].mean() - lo[2]) / h))
    else:
        z_screw = int(round(centroid[0]))
    left = by_side.get("left") or (screws[0] if screws else None)
    x_left = (int(round(((left.entry_mm + left.tip_mm) / 2 - lo)[0] / h)) if left is not None
              else int(round(centroid[2])))

    panels = [("axial at the screws", "axial", z_screw),
              ("mid-sagittal (body centroid)", "sagittal", centroid[2]),
              ("coronal (body centroid)", "coronal", centroid[1]),
              ("sagittal through the left screw", "sagittal", x_left)]
    fig = Figure(figsize=(17, 4.8))
    axes = fig.subplots(1, 4)
    for ax, (name, view, k) in zip(axes, panels, strict=True):
        _draw_panel(ax, name, view, k, dens, around, lab, screw_masks)
    handles = [Line2D([], [], color=c, label=lab_) for c, lab_ in
               (("orange", "vertebral body"), ("lime", "trabecular ROI"),
                ("violet", "posterior elements"), (SCREW_COLOURS["left"], "left screw"),
                (SCREW_COLOURS["right"], "right screw"))]
    handles.append(Line2D([], [], color="cyan", lw=6, alpha=0.5,
                          label=f"around the screw (+{shell_mm:g} mm shell)"))
    axes[-1].legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.8)
    fig.suptitle(_caption(title, values), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _cut(vol: np.ndarray, view: str, k) -> np.ndarray:
    """Slice ``k`` of the (z, y, x) volume in the ``view`` (clipped to the volume)."""
    nz, ny, nx = vol.shape
    k = int(np.clip(k, 0, {"axial": nz, "sagittal": nx, "coronal": ny}[view] - 1))
    if view == "axial":
        return vol[k]  # rows y (anterior up), columns x (patient right on the left)
    if view == "sagittal":
        return vol[:, :, k][::-1]  # rows z (superior up), columns y (anterior left)
    return vol[:, k, :][::-1]  # coronal: rows z, columns x


def _draw_panel(ax, name: str, view: str, k, dens, around, lab, screw_masks: dict) -> None:
    """One panel: the density in grey, the around-screw region, the parts' and screws'
    outlines."""
    from matplotlib.colors import ListedColormap

    ax.imshow(_cut(dens, view, k), cmap="gray", vmin=-50, vmax=600, interpolation="nearest")
    ar = _cut(around, view, k)
    ax.imshow(np.ma.masked_where(~ar, ar), cmap=ListedColormap(["cyan"]), alpha=0.35,
              vmin=0, vmax=1, interpolation="nearest")
    for mask, colour in ((np.isin(lab, (BODY, TRABECULAR)), "orange"),
                         (lab == TRABECULAR, "lime"), (lab == POSTERIOR, "violet")):
        sl = _cut(mask, view, k)
        if sl.any() and not sl.all():
            ax.contour(sl.astype(float), levels=[0.5], colors=colour, linewidths=0.9)
    for side, m in screw_masks.items():
        sl = _cut(m, view, k)
        if sl.any() and not sl.all():
            ax.contour(sl.astype(float), levels=[0.5], colors=SCREW_COLOURS.get(side, "b"),
                       linewidths=1.2)
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _caption(title: str, values: dict | None) -> str:
    """The title, with the BMD values when given."""
    text = title
    if values:
        scr = values.get("around_screw_vbmd_mg_cm3", {})
        text += (f"\ntrabecular vBMD {values['trabecular_vbmd_mg_cm3']:.1f} mg/cm³, integral "
                 f"{values['integral_vbmd_mg_cm3']:.1f}"
                 + (", around the screws " + ", ".join(f"{k} {v:.1f}" for k, v in scr.items())
                    if scr else "")
                 + f"; CT areal BMD {values['areal_bmd_g_cm2']:.3f} g/cm²"
                 + " (density window -50..600 mg/cm³)")
    return text
