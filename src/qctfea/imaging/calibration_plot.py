"""The calibration's QC picture: the fitted line with its rods or tissues, the
effective-energy fit, and where the rods or tissues were found.
"""

from __future__ import annotations


import numpy as np

from qctfea.imaging.calibration import Calibration


#: Colours of the tissues in the QC picture.
TISSUE_COLOURS = {"air": "tab:blue", "fat": "gold", "muscle": "tab:red", "blood": "tab:purple",
                  "cortical_bone": "tab:green"}


def plot_calibration(cal: Calibration, path, title: str = "", hu_zyx: np.ndarray | None = None,
                     masks: dict | None = None, axis: int = 0,
                     index: int | None = None) -> None:
    """Picture of the fit (one png).

    First panel: the phantom rods' mean HU (phantom) or the reference tissues' median HU
    (phantomless, named on the line) against their density, with the fitted line; tissues
    measured in a phantom scan are drawn (not fitted) at their phantom-calibrated density.
    Effective-energy calibrations add two panels: each tissue's median HU against its
    theoretical HU at the effective energy with the fitted line (tissues left out, e.g.
    contrast-enhanced blood, as open symbols), and the RMS fit error against energy.
    Last panel, when ``hu_zyx`` and ``masks`` (tissue -> voxel mask) are given: the CT slice
    ``index`` along numpy ``axis`` (the axial one, see :func:`axial_axis`; middle when None)
    in grey (-200..1500 HU) with the tissue voxels overlaid in colour, and the phantom's
    rods circled."""
    from matplotlib.figure import Figure

    panel = hu_zyx is not None and bool(masks)
    ee = cal.effective_energy
    n = 1 + (2 if ee else 0) + (1 if panel else 0)
    if n <= 2:
        fig = Figure(figsize=(4.75 * n, 4.0))
        axes = fig.subplots(1, n)
        axes = np.atleast_1d(axes)
    else:
        fig = Figure(figsize=(9.5, 8.0))
        axes = fig.subplots(2, 2)
        axes = axes.ravel()
    _line_panel(axes[0], cal, title)
    if ee:
        _tissue_hu_panel(axes[1], cal)
        _energy_panel(axes[2], ee)
    if panel:
        _voxel_panel(axes[-1], hu_zyx, masks, axis, index, cal.rods if axis == 0 else [])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_refusal(message: str, path, title: str, hu_zyx: np.ndarray, masks: dict,
                 axis: int = 0, index: int | None = None) -> None:
    """Picture of a refused calibration: the CT slice with whatever tissue voxels were found
    (:func:`_voxel_panel`) and the refusal's message, wrapped, beside it."""
    import textwrap

    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.5))
    ax_text, ax_img = fig.subplots(1, 2)
    ax_text.axis("off")
    ax_text.set_title(title, fontsize=9)
    ax_text.text(0.0, 1.0, "REFUSED\n\n" + "\n".join(textwrap.wrap(message, 62)),
                 va="top", ha="left", fontsize=7.5, color="firebrick",
                 transform=ax_text.transAxes)
    _voxel_panel(ax_img, hu_zyx, masks, axis, index)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def _line_panel(ax, cal: Calibration, title: str) -> None:
    """The calibration line with the rods and / or tissues it was fitted to or checked on."""
    ee = cal.effective_energy
    found = [t for t in cal.tissues if t.get("used", t.get("found"))]
    pts = []
    if cal.rods:
        hu, label = _rod_hu(cal)
        rho = np.array([r["density_mg_cm3"] for r in cal.rods])
        ax.plot(hu, rho, "o", label=label)
        pts.append(hu)
    if found:
        fitted = cal.method == "phantomless"
        for t in found:
            y = (t["reference_mg_cm3"] if fitted and not ee else t["calibrated_mg_cm3"])
            ax.plot(t["median_hu"], y, "s" if fitted else "D",
                    mfc=TISSUE_COLOURS[t["name"]] if fitted else "none",
                    mec=TISSUE_COLOURS[t["name"]], ms=7)
            ax.annotate(t["name"], (t["median_hu"], y), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
        pts.append(np.array([t["median_hu"] for t in found]))
        ax.plot([], [], "s" if fitted else "D", mfc="grey" if fitted else "none", mec="grey",
                label=("reference tissues (on the K2HPO4 line)" if ee else
                       "reference tissues" if fitted else "tissues (not fitted)"))
    if pts:
        allhu = np.concatenate(pts)
        pad = 0.05 * (allhu.max() - allhu.min()) + 20
        xs = np.linspace(allhu.min() - pad, allhu.max() + pad, 10)
    else:
        xs = np.linspace(-100, 400, 10)
    ax.plot(xs, cal.intercept + cal.slope * xs, "-", color="k", lw=1,
            label=f"ρ = {cal.intercept:.2f} + {cal.slope:.4f}·HU\nR² = {cal.r2:.5f}"
            + (f"\nE_eff = {ee['energy_kev']:g} keV" if ee else ""))
    ax.set_xlabel("mean HU (rods) / median HU (tissues)" if found and cal.rods
                  else "median HU" if found else "mean HU")
    ax.set_ylabel("K2HPO4 density (mg/cm³)")
    ax.set_title(title or f"calibration ({cal.method})", fontsize=9)
    ax.legend(fontsize=7)


def _rod_hu(cal: Calibration) -> tuple[np.ndarray, str]:
    """The rods' HU as drawn against the line, and their legend. A K2HPO4-in-water phantom's
    rods hold more or less water than the tissue the line is for (their water equivalents),
    so their measured HU lie off it; drawn at the HU their K2HPO4 would have in that tissue,
    HU - ρ_water + (β_CT - β_ref) - (σ_ref - σ_CT) ρ_K2HPO4 (the QCT PRO equations,
    :func:`qctfea.imaging.calibration.k2hpo4_water_fit`), they lie on the line."""
    hu = np.array([r["mean_hu"] for r in cal.rods])
    c = cal.coefficients or {}
    if not all("water_mg_cm3" in r for r in cal.rods) or "sigma_ct" not in c:
        return hu, "phantom rods"
    k = np.array([r["density_mg_cm3"] for r in cal.rods])
    w = np.array([r["water_mg_cm3"] for r in cal.rods])
    x = hu - w + (c["beta_ct"] - c["beta_ref"]) - (c["sigma_ref"] - c["sigma_ct"]) * k
    return x, "phantom rods (HU less their water content)"


def _tissue_hu_panel(ax, cal: Calibration) -> None:
    """Effective energy: each tissue's measured against its theoretical HU, with the line."""
    ee = cal.effective_energy
    f = ee["fit"]
    for t in cal.tissues:
        if t.get("theoretical_hu") is None or not t.get("found"):
            continue
        c = TISSUE_COLOURS[t["name"]]
        ax.plot(t["theoretical_hu"], t["median_hu"], "s", mec=c,
                mfc=c if t["used"] else "none", ms=7)
        ax.annotate(t["name"] + ("" if t["used"] else " (left out)"),
                    (t["theoretical_hu"], t["median_hu"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=7)
    xt = np.array([t["theoretical_hu"] for t in cal.tissues
                   if t.get("theoretical_hu") is not None and t.get("found")])
    xx = np.linspace(min(xt.min(), 0) - 50, max(xt.max(), 0) + 50, 10)
    ax.plot(xx, f["a"] + f["b"] * xx, "-", color="k", lw=1,
            label=f"HU = {f['a']:.1f} + {f['b']:.4f}·HU_t\nR² = {f['r2']:.5f}")
    ax.set_xlabel(f"theoretical HU at {ee['energy_kev']:g} keV (ICRU-44, xraydb)")
    ax.set_ylabel("measured median HU")
    ax.set_title("tissues: measured vs theoretical HU", fontsize=9)
    ax.legend(fontsize=7)


def _energy_panel(ax, ee: dict) -> None:
    """Effective energy: the RMS fit error against energy."""
    f = ee["fit"]
    ax.plot(ee["energies_kev"], ee["rms_residual_hu"], "-", color="k", lw=1)
    source = ee.get("energy_from", "this scan")
    ax.axvline(ee["energy_kev"], color="tab:red", lw=1,
               label=f"effective energy {ee['energy_kev']:g} keV"
               + ("" if source == "this scan" else f"\n(from {source})"))
    own = ee.get("own_energy_kev", ee["energy_kev"])
    if own != ee["energy_kev"]:
        ax.axvline(own, color="0.5", lw=1, ls="--", label=f"this scan alone: {own:g} keV")
    ax.set_yscale("log")
    ax.set_xlabel("energy (keV)")
    ax.set_ylabel("RMS fit error (HU)")
    ax.set_title(f"fit error against energy ({f['n_tissues']} tissues)", fontsize=9)
    ax.legend(fontsize=7)


def _voxel_panel(ax2, hu_zyx: np.ndarray, masks: dict, axis: int, index: int | None,
                 rods: list[dict] = ()) -> None:
    """The CT slice in grey with the tissue voxels in colour and the phantom rods' cores
    (measured on every slice) as circles."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Circle, Patch

    k = hu_zyx.shape[axis] // 2 if index is None else int(index)
    ax2.imshow(np.take(hu_zyx, k, axis=axis), cmap="gray", vmin=-200, vmax=1500,
               interpolation="nearest")
    handles = []
    for name, m in masks.items():
        sl = np.take(m, k, axis=axis)
        colour = TISSUE_COLOURS[name]
        ax2.imshow(np.ma.masked_where(~sl, sl), cmap=ListedColormap([colour]), alpha=0.55,
                   interpolation="nearest", vmin=0, vmax=1)
        handles.append(Patch(color=colour, alpha=0.7,
                             label=f"{name} ({int(m.sum())} voxels in 3-D)"))
    for r in rods:
        ax2.add_patch(Circle(r["center_px"], np.sqrt(r["area_px"] / np.pi), fill=False,
                             edgecolor="cyan", lw=1.0))
    if rods:
        handles.append(Patch(facecolor="none", edgecolor="cyan",
                             label=f"phantom rods ({len(rods)}, cores measured)"))
    # below the slice: a phantom lies at the bottom of it
    ax2.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.01),
               ncol=2, frameon=False)
    ax2.set_title(f"tissue voxels, slice {k} of axis {axis} (grey -200..1500 HU)",
                  fontsize=8)
    ax2.set_xticks([])
    ax2.set_yticks([])
