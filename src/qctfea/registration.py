"""Longitudinal registration: each follow-up onto the patient's baseline, on the vertebra.

A patient never lies the same way twice, so "the same screw" at 12 months must
mean the same bone as at baseline. Each follow-up scan is rigidly registered to
the patient's baseline scan (SimpleITK, Euler 3-D transform):

* images: calibrated density (mg/cm³) of both scans, so that differences in
  scanner calibration between visits do not enter the metric;
* metric: Mattes mutual information, restricted to the baseline vertebra mask
  dilated by ``mask_dilation_mm`` (the neighbouring vertebrae and soft tissue
  do not pull the target vertebra away);
* initialisation: the centres of mass (moments) of the two vertebra masks;
* optimiser: regular-step gradient descent, multi-resolution (shrink factors
  ``shrink``, smoothing sigmas ``smoothing_mm``), sampling with a fixed seed.

The follow-up density is then resampled onto the baseline grid (linear
interpolation), and the follow-up's FE model is the **baseline model** (mesh,
screws, endplates) with the follow-up's density: the mesh does not change between
visits, so a change in strength comes from the bone, not from remeshing (the
longitudinal QCT-FE approach of e.g. Keaveny et al., J Bone Miner Res 2010;25:1974).

QC: Dice overlap of the baseline vertebra mask with the follow-up mask carried to
the baseline grid (nearest neighbour), before (scanner coordinates as they are)
and after registration; the metric value; the transform (rotation in degrees,
translation in mm); a picture (``figures.registration_qc``). A Dice below
``min_dice_fail`` is an error, below ``min_dice_warn`` a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from qctfea.provenance import QctfeaError


@dataclass
class RegistrationParams:
    #: register follow-ups to baseline and reuse the baseline model (false: every scan
    #: gets its own mesh and screws from its own landmarks)
    enabled: bool = True
    mask_dilation_mm: float = 3.0
    histogram_bins: int = 32
    sampling_fraction: float = 0.25
    learning_rate: float = 1.0
    min_step: float = 1e-4
    iterations: int = 200
    shrink: list = field(default_factory=lambda: [4, 2, 1])
    smoothing_mm: list = field(default_factory=lambda: [2.0, 1.0, 0.0])
    seed: int = 1
    min_dice_warn: float = 0.90
    min_dice_fail: float = 0.75

    def __post_init__(self):
        if len(self.shrink) != len(self.smoothing_mm):
            raise QctfeaError("registration.shrink and registration.smoothing_mm need the same "
                              f"number of levels ({len(self.shrink)} vs {len(self.smoothing_mm)})")
        if not 0 < self.sampling_fraction <= 1:
            raise QctfeaError(f"registration.sampling_fraction must be in (0, 1], not "
                              f"{self.sampling_fraction}")


def _binary(img: sitk.Image) -> sitk.Image:
    return sitk.Cast(img > 0, sitk.sitkUInt8)


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap of two binary images on the same grid."""
    x = sitk.GetArrayViewFromImage(a) > 0
    y = sitk.GetArrayViewFromImage(b) > 0
    s = int(x.sum()) + int(y.sum())
    return 2.0 * float(np.logical_and(x, y).sum()) / s if s else 0.0


def carry_mask(moving_mask: sitk.Image, fixed: sitk.Image, tx: sitk.Transform) -> sitk.Image:
    """The moving scan's mask on the fixed grid (nearest neighbour)."""
    return sitk.Resample(_binary(moving_mask), fixed, tx, sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)


def register_rigid(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image,
                   moving_mask: sitk.Image, p: RegistrationParams) -> tuple[sitk.Transform, dict]:
    """Rigid transform mapping fixed (baseline) points to moving (follow-up) points."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    fm, mm = _binary(fixed_mask), _binary(moving_mask)
    if not sitk.GetArrayViewFromImage(fm).any():
        raise QctfeaError("the baseline vertebra mask is empty")
    if not sitk.GetArrayViewFromImage(mm).any():
        raise QctfeaError("the follow-up vertebra mask is empty")
    init = sitk.CenteredTransformInitializer(
        sitk.Cast(fm, sitk.sitkFloat32), sitk.Cast(mm, sitk.sitkFloat32), sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    radius = [max(1, int(round(p.mask_dilation_mm / s))) for s in fixed.GetSpacing()]
    metric_mask = sitk.BinaryDilate(fm, radius)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=p.histogram_bins)
    reg.SetMetricFixedMask(metric_mask)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(p.sampling_fraction, p.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=p.learning_rate, minStep=p.min_step, numberOfIterations=p.iterations,
        gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(p.shrink))
    reg.SetSmoothingSigmasPerLevel(list(p.smoothing_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    tx = reg.Execute(fixed, moving)
    euler = _as_euler(tx)
    before = dice(fm, carry_mask(mm, fixed, sitk.Euler3DTransform()))
    after = dice(fm, carry_mask(mm, fixed, tx))
    info = {
        "metric": "mattes_mutual_information",
        "metric_value": float(reg.GetMetricValue()),
        "iterations": int(reg.GetOptimizerIteration()),
        "stop_condition": reg.GetOptimizerStopConditionDescription(),
        "rotation_deg": [float(np.rad2deg(a)) for a in euler.GetParameters()[:3]],
        "translation_mm": [float(t) for t in euler.GetParameters()[3:]],
        "center_mm": [float(c) for c in euler.GetCenter()],
        "dice_before": before,
        "dice_after": after,
    }
    return tx, info


def _as_euler(tx: sitk.Transform) -> sitk.Euler3DTransform:
    t = tx.Downcast()
    while isinstance(t, sitk.CompositeTransform):
        if t.GetNumberOfTransforms() != 1:
            raise QctfeaError(f"unexpected registration result: {t.GetNumberOfTransforms()} "
                              "transforms")
        t = t.GetNthTransform(0).Downcast()
    if not isinstance(t, sitk.Euler3DTransform):
        raise QctfeaError(f"unexpected registration transform {t.GetName()}")
    return t


def resample_density(moving_density: sitk.Image, fixed: sitk.Image,
                     tx: sitk.Transform) -> sitk.Image:
    """The follow-up density on the baseline grid (linear interpolation, 0 outside)."""
    return sitk.Resample(sitk.Cast(moving_density, sitk.sitkFloat32), fixed, tx, sitk.sitkLinear,
                         0.0, sitk.sitkFloat32)


def check_dice(info: dict, p: RegistrationParams, where: str) -> str | None:
    """Error below the fail gate; a warning text below the warn gate; None when fine."""
    d = info["dice_after"]
    if d < p.min_dice_fail:
        raise QctfeaError(
            f"{where}: registration to baseline failed: vertebra Dice {d:.3f} < "
            f"{p.min_dice_fail} (before {info['dice_before']:.3f}); check that both scans "
            "show the same vertebra (mask.label) or exclude the scan in the cohort config")
    if d < p.min_dice_warn:
        return (f"{where}: vertebra Dice after registration {d:.3f} < {p.min_dice_warn}; "
                "look at registration.png")
    return None


def plot_registration(fixed: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
                      tx: sitk.Transform, info: dict, path, title: str = "") -> None:
    """Baseline density through the vertebra's centre (axial and sagittal), with the
    baseline mask outline (green) and the follow-up mask outline before (red) and after
    (yellow) registration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = sitk.GetArrayFromImage(fixed)
    fm = sitk.GetArrayFromImage(_binary(fixed_mask)) > 0
    before = sitk.GetArrayFromImage(carry_mask(moving_mask, fixed, sitk.Euler3DTransform())) > 0
    after = sitk.GetArrayFromImage(carry_mask(moving_mask, fixed, tx)) > 0
    zc, yc, xc = (int(round(c)) for c in np.argwhere(fm).mean(axis=0))
    sx, sy, sz = fixed.GetSpacing()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    views = [("axial", lambda a: a[zc], sy / sx), ("sagittal", lambda a: a[:, :, xc], sz / sy)]
    for ax, (name, cut, aspect) in zip(axes, views):
        ax.imshow(cut(arr), cmap="gray", vmin=-50, vmax=400, aspect=aspect, origin="lower")
        for m, colour in ((fm, "lime"), (before, "red"), (after, "yellow")):
            if cut(m).any():
                ax.contour(cut(m).astype(float), levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle((title + "\n" if title else "") +
                 f"baseline (green), follow-up before (red) / after (yellow); Dice "
                 f"{info['dice_before']:.3f} -> {info['dice_after']:.3f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
