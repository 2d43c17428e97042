"""Uncertainty of a scan's outcomes and the least significant change between two scans.

For every scan, a Monte Carlo over what a lab does not know exactly (docs/uncertainty.md):

- **calibration**: the line ``density = intercept + slope HU`` drawn from its fit
  (calibration.json ``covariance``, a multivariate Student t with the fit's degrees of
  freedom, so that a 5-rod phantom's interval has the t quantile of 3 degrees of freedom);
  every density of the scan moves with it: ``rho' = alpha + beta rho``;
- **placement**: each screw's entry moved by an isotropic normal offset
  (``screw_position_sd_mm`` per axis) and its axis tilted by a normal angle
  (``screw_angle_sd_deg`` about each of two axes perpendicular to it): the repeatability of
  planning; a follow-up's screw (the baseline's, carried by the registration) moves further
  by ``registration_sd_mm`` (or the registration's own spread, if larger);
- **material law**: the yield stress coefficient of the density-yield law drawn lognormal
  with coefficient of variation ``yield_coefficient_cv``; its default is the spread between
  two published strength-density laws of lumbar trabecular bone (``law_spread_cv``).

Outcomes: trabecular vBMD (calibration), vBMD around each screw (calibration, placement),
compression and pullout strength (all three). Strength is not re-solved per draw: the
nonlinear solve is the expensive step. Its draws follow the **yield-weighted scheme**:
a draw's strength is the solved strength times the ratio of the mean yield stress over the
region that carries the load (the vertebral body for compression; the screw and its shell
for pullout) under the draw to that under the nominal inputs. Bone's yield stress scales the
strength of the damage law (docs/nonlinear.md) exactly when it scales every element alike;
the scheme's error against full nonlinear Monte Carlo is measured by
``tools/uncertainty_check.py`` (docs/uncertainty.md).

The draws are quasi-random: one scrambled Sobol' sequence per run (``scipy.stats.qmc``,
:class:`QuasiRandom`), each source's normal, Student t and lognormal draws taken from its
own coordinates by their inverse distribution functions. On the real L1 its per-scan SDs
(the least significant change) varied by 0.5-1.0 % from seed to seed, where independent
pseudo-random draws of the same number varied by 3.7-4.3 % (docs/uncertainty.md, "Draws").

Each outcome gets its interval from all three sources, and ``sd_scan``, the standard
deviation from the sources that differ between two scans of one patient: the calibration
(each scan has its own) and, for follow-ups, the registration. Planning and the material
law are shared by all scans of a patient (the same planned screw, the same law), so they
cancel in a change. The least significant change between baseline b and follow-up f is
``z (sd_scan_b² + sd_scan_f²)^½`` (z = 1.96 at 95 %), the classic 2.77 x precision SD when
both are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats
from scipy.stats import qmc

from qctfea.errors import QctfeaError
from qctfea.imaging.bmd import BmdParams
from qctfea.model.screw import Screw
from qctfea.config import option


@dataclass
class UncertaintyParams:
    #: false: no uncertainty step, no interval or LSC columns
    enabled: bool = option(
        True,
        doc=("per scan (rule `estimate_uncertainty`, `uncertainty.json`): a 95 % interval of "
             "trabecular vBMD, vBMD around each screw, compression and pullout strength, and "
             "the per-scan SD behind each patient's least significant change "
             "(`tables/least_significant_change.csv`, long-table "
             "`*_ci_low`/`*_ci_high`/`*_sd_scan` columns, the patient pages). `false`: no "
             "step, no columns ([docs/uncertainty.md](../docs/uncertainty.md))"))
    #: Monte Carlo draws per scan
    draws: int = option(
        512, minimum=20,
        doc=("Monte Carlo draws per scan (at least 20; rounded up to a power of 2, the "
             "scrambled Sobol' sequence's balanced size), seed (with patient and timepoint), "
             "level of the intervals and of the least significant change"))
    #: random seed (with the patient and timepoint: reproducible per scan)
    seed: int = option(1, minimum=0, row="draws")
    #: interval level (and of the least significant change)
    level: float = option(0.95, exclusiveMinimum=0.5, exclusiveMaximum=1, row="draws")
    #: planning repeatability: entry offset SD per axis
    screw_position_sd_mm: float = option(
        1.0, minimum=0,
        doc=("planning repeatability: SD of each screw's entry per axis and of its axis tilt "
             "per direction. Assumed values (the planning of one trajectory by hand or by this "
             "pipeline's planner on a re-scan); set your lab's. Shared by a patient's scans "
             "(the follow-ups use the baseline's screws), so they widen each scan's interval "
             "but not the least significant change. Navigated placement strays further from "
             "its plan: about 3.1° per plane RMS (Miller et al. 2016, docs/uncertainty.md)"))
    #: planning repeatability: axis tilt SD per direction
    screw_angle_sd_deg: float = option(2.0, minimum=0, row="screw_position_sd_mm")
    #: follow-ups: screw offset SD per axis from the registration (at least the
    #: registration's own ``point_spread_mm``)
    registration_sd_mm: float = option(
        0.3, minimum=0,
        doc=("follow-ups: SD per axis of where the baseline's screws land, from the "
             "registration (at least registration.json `point_spread_mm`); 0.3 mm is an "
             "assumed value, not a measurement: the bound tests/test_registration.py holds a "
             "known rigid motion of a demo scan to (largest error over the vertebra). Enters "
             "the least significant change"))
    #: CV of the yield law's coefficient
    yield_coefficient_cv: float = option(
        0.10, minimum=0,
        doc=("coefficient of variation of the yield law's coefficient (lognormal). 0.10: the "
             "spread between two published strength-density laws of lumbar trabecular bone "
             "(Hansson et al. 1987, Mosekilde et al. 1987) over vertebral apparent densities "
             "0.09-0.35 g/cm³ ([docs/uncertainty.md](../docs/uncertainty.md)); set your "
             "law's published standard error if it gives one. Shared by a patient's scans"))

    def __post_init__(self) -> None:
        if self.draws < 20:
            raise QctfeaError(f"uncertainty.draws must be at least 20, not {self.draws}")
        if not 0.5 < self.level < 1:
            raise QctfeaError(f"uncertainty.level must lie between 0.5 and 1, not {self.level}")
        for k in ("screw_position_sd_mm", "screw_angle_sd_deg", "registration_sd_mm",
                  "yield_coefficient_cv"):
            if getattr(self, k) < 0:
                raise QctfeaError(f"uncertainty.{k} must be >= 0, not {getattr(self, k)}")


#: Power laws ``strength = a rho^b`` (MPa; apparent density in g/cm³) of human lumbar
#: trabecular bone in compression from two studies, as tabulated by Keaveny, Morgan and Yeh
#: (docs/uncertainty.md): name -> (a, b).
LUMBAR_STRENGTH_LAWS = {"Hansson et al. 1987": (50.3, 2.24), "Mosekilde et al. 1987": (24.9, 1.80)}
#: Wet apparent density of human vertebral trabecular bone, g/cm³ (Öhman-Mägi et al. 2021)
VERTEBRAL_APPARENT_DENSITY = (0.09, 0.35)


def law_spread_cv(laws: dict = LUMBAR_STRENGTH_LAWS,
                  density_range: tuple = VERTEBRAL_APPARENT_DENSITY, n: int = 2001) -> float:
    """How far published strength-density laws disagree, as a lognormal coefficient of
    variation: at each apparent density the sample SD of the laws' log strengths, averaged
    over ``density_range`` (trapezoid rule on ``n`` points), then ``sqrt(exp(s²) - 1)``.

    The default of ``yield_coefficient_cv``: the publications tabulate no standard error of
    their coefficients, so the disagreement between studies of one site stands in for it."""
    rho = np.linspace(*density_range, n)
    logs = np.array([np.log(a) + b * np.log(rho) for a, b in laws.values()])
    s = float(np.trapezoid(np.std(logs, axis=0, ddof=1), rho) / (rho[-1] - rho[0]))
    return float(np.sqrt(np.expm1(s ** 2)))


class QuasiRandom:
    """The draws of one run from one scrambled Sobol' sequence of ``n`` points
    (``scipy.stats.qmc.Sobol``, ``n`` a power of 2): the subset of numpy's
    ``Generator`` that the draws use, each call taking the next unused coordinates of the
    sequence and transforming them by the inverse distribution function. Independent
    coordinates of a low-discrepancy sequence fill the unit cube more evenly than
    pseudo-random ones, so percentiles and SDs of smooth outcomes vary less from seed to
    seed; written here because numpy's generators and scipy's ``qmc`` engines share no
    interface."""

    def __init__(self, n: int, rng: np.random.Generator, dims: int = 32):
        self._u = qmc.Sobol(dims, scramble=True, seed=rng).random(n)
        self._used = 0

    def _uniform(self, size) -> np.ndarray:
        n, *rest = (size,) if np.isscalar(size) else tuple(size)
        k = int(np.prod(rest, dtype=int))
        if n != len(self._u) or self._used + k > self._u.shape[1]:
            raise QctfeaError(f"uncertainty: {k} more coordinates of {n} draws asked of a "
                              f"sequence of {self._u.shape} ({self._used} used)")
        u = self._u[:, self._used:self._used + k]
        self._used += k
        # inverse distribution functions are infinite at 0 and 1
        return np.clip(u, 1e-12, 1 - 1e-12).reshape((n, *rest))

    def standard_normal(self, size) -> np.ndarray:
        return stats.norm.ppf(self._uniform(size))

    def normal(self, loc=0.0, scale=1.0, size=1) -> np.ndarray:
        return loc + scale * self.standard_normal(size)

    def chisquare(self, df, size) -> np.ndarray:
        return stats.chi2.ppf(self._uniform(size), df)

    def multivariate_normal(self, mean, cov, size) -> np.ndarray:
        w, v = np.linalg.eigh(np.asarray(cov, float))
        root = v * np.sqrt(np.clip(w, 0, None))
        return np.asarray(mean, float) + self.standard_normal((size, len(w))) @ root.T


def sobol_size(draws: int) -> int:
    """``draws`` rounded up to a power of 2 (a Sobol' sequence is balanced at those)."""
    return 1 << (int(draws) - 1).bit_length()


def calibration_draws(cal: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of (intercept, slope) from calibration.json's fit (multivariate t; normal
    when its ``dof`` is None, a known scatter); the nominal line repeated when its covariance
    is not estimable (or fixed)."""
    mean = np.array([cal["intercept"], cal["slope"]], float)
    cov = cal.get("covariance")
    if cov is None:
        return np.tile(mean, (n, 1))
    if cal.get("dof") is None:  # a known scatter (phantomless): normal
        return mean + rng.multivariate_normal(np.zeros(2), np.asarray(cov, float), n)
    return mean + multivariate_t(np.asarray(cov, float), int(cal["dof"]), n, rng)


def multivariate_t(cov: np.ndarray, dof: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean multivariate Student t draws with scale ``cov`` and ``dof`` degrees of
    freedom (a normal divided by sqrt(chi²/dof))."""
    w, v = np.linalg.eigh(cov)
    root = v * np.sqrt(np.clip(w, 0, None))
    z = rng.standard_normal((n, len(cov))) @ root.T
    return z / np.sqrt(rng.chisquare(dof, n) / dof)[:, None]


def yield_factors(cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` lognormal factors of mean 1 and coefficient of variation ``cv`` (ones for 0)."""
    if cv <= 0:
        return np.ones(n)
    s_ln = np.sqrt(np.log1p(cv ** 2))
    return np.exp(rng.normal(-s_ln ** 2 / 2, s_ln, n))


def rescale(cal: dict, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each draw as a map of the scan's densities: ``rho' = alpha + beta rho``."""
    beta = draws[:, 1] / cal["slope"]
    alpha = draws[:, 0] - beta * cal["intercept"]
    return alpha, beta


def _perpendicular(axis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = np.cross(axis, [1.0, 0, 0] if abs(axis[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    return u, np.cross(axis, u)


def jittered(screw: Screw, offset_mm: np.ndarray, tilt_rad: np.ndarray) -> Screw:
    """The screw with its entry moved by ``offset_mm`` and its axis tilted by the two small
    angles ``tilt_rad`` about the two directions perpendicular to it."""
    u, v = _perpendicular(screw.axis)
    axis = screw.axis + tilt_rad[0] * u + tilt_rad[1] * v
    return Screw(screw.side, screw.entry_mm + offset_mm, axis / np.linalg.norm(axis),
                 screw.spec)


def jittered_rois(points_mm: np.ndarray, screw: Screw, offsets_mm: np.ndarray,
                  tilts_rad: np.ndarray, shell_mm: float, which: np.ndarray,
                  chunk: int = 64) -> dict[int, np.ndarray]:
    """:func:`screw_roi` of :func:`jittered` (``screw``, ``offsets_mm[i]``, ``tilts_rad[i]``)
    for every draw ``i`` with ``which[i]``, by matrix products over blocks of ``chunk`` draws:
    with p = point - entry and a the unit axis, depth s = p.a and squared distance from the
    axis |p|^2 - s^2 (the same regions as :meth:`Screw.around` up to rounding at the
    boundary; 10x faster than one draw at a time)."""
    u, v = _perpendicular(screw.axis)
    axes = screw.axis + tilts_rad[:, :1] * u + tilts_rad[:, 1:] * v
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    rel = np.asarray(points_mm, float) - screw.entry_mm
    rel2 = np.einsum("ij,ij->i", rel, rel)[:, None]
    r2 = (screw.spec.diameter_mm / 2 + shell_mm) ** 2
    idx = np.flatnonzero(which)
    out = {}
    for start in range(0, len(idx), chunk):
        k = idx[start:start + chunk]
        a, off = axes[k], offsets_mm[k]
        depth = rel @ a.T - np.einsum("ij,ij->i", off, a)
        dist2 = rel2 - 2.0 * (rel @ off.T) + np.einsum("ij,ij->i", off, off) - depth ** 2
        inside = (dist2 <= r2) & (depth >= 0) & (depth <= screw.spec.length_mm)
        out.update({int(i): inside[:, j] for j, i in enumerate(k)})
    return out


def screw_roi(points_mm: np.ndarray, screw: Screw, shell_mm: float) -> np.ndarray:
    """The points in the screw + shell cylinder (the around-screw region of
    :func:`qctfea.imaging.bmd.around_screw_vbmd`), as a boolean mask."""
    return screw.around(points_mm, shell_mm)


def roi_means(sel: np.ndarray, values: list[np.ndarray]) -> list[float]:
    """Mean of each of ``values`` (per point) over the points of ``sel``; NaN if empty."""
    if not sel.any():
        return [float("nan")] * len(values)
    return [float(v[sel].mean()) for v in values]


def screw_roi_means(points_mm: np.ndarray, values: list[np.ndarray], screw: Screw,
                    shell_mm: float) -> list[float]:
    """Mean of each of ``values`` (per point) over the points in the screw + shell cylinder
    (:func:`screw_roi`); NaN if empty."""
    return roi_means(screw_roi(points_mm, screw, shell_mm), values)


def robust_sd(draws) -> float:
    """Half the central 68.27 % range of the finite draws: the SD of a normal, and finite for
    the Student t of a fit with 1 or 2 degrees of freedom (a 3-rod phantom), whose variance is
    infinite, so that a sample SD of its draws is set by a few extreme ones."""
    d = np.asarray(draws, float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan")
    lo, hi = np.quantile(d, [stats.norm.cdf(-1.0), stats.norm.cdf(1.0)])
    return float(hi - lo) / 2


def summary(draws: np.ndarray, nominal: float, level: float) -> dict:
    """Interval (percentiles of the draws) and SD (:func:`robust_sd`) of one outcome."""
    d = np.asarray(draws, float)
    d = d[np.isfinite(d)]
    q = (1 - level) / 2
    return {"value": float(nominal), "sd": robust_sd(d),
            "ci_low": float(np.quantile(d, q)), "ci_high": float(np.quantile(d, 1 - q))}


@dataclass
class ScanInputs:
    """What one scan's uncertainty is computed from (read by
    :func:`qctfea.steps.fea.uncertainty`)."""

    calibration: dict  #: calibration.json of the scan
    bmd: dict  #: bmd.json of the scan (nominal vBMD)
    density: np.ndarray  #: calibrated density (mg/cm³) of the vertebra's voxels
    points_mm: np.ndarray  #: their centres (physical, mm), one row per voxel
    body: np.ndarray  #: bool per voxel: vertebral body (the compression region)
    screws: list  #: the model's screws (Screw)
    strength: dict  #: {"compression": N or None, "left": N, "right": N}
    yield_fn: object  #: density (mg/cm³) -> yield stress (MPa), the configured law
    follow_up: bool = False
    registration_spread_mm: float = 0.0
    shell_mm: float = field(default_factory=lambda: BmdParams().shell_mm)


def _draw_sources(p: UncertaintyParams, inp: ScanInputs, n: int, rng, sources: set) -> dict:
    """Draws of each source (nominal where a source is off)."""
    cal = (calibration_draws(inp.calibration, n, rng) if "calibration" in sources
           else np.tile([inp.calibration["intercept"], inp.calibration["slope"]], (n, 1)))
    alpha, beta = rescale(inp.calibration, cal)
    factor = yield_factors(p.yield_coefficient_cv if "material" in sources else 0.0, n, rng)
    pos = p.screw_position_sd_mm if "planning" in sources else 0.0
    ang = np.radians(p.screw_angle_sd_deg) if "planning" in sources else 0.0
    reg = (max(p.registration_sd_mm, inp.registration_spread_mm)
           if "registration" in sources and inp.follow_up else 0.0)
    # planning: each screw on its own; registration: one rigid motion moves both alike
    common = rng.normal(0, 1, (n, 3)) * reg
    offsets = {sc.side: rng.normal(0, 1, (n, 3)) * pos + common for sc in inp.screws}
    tilts = {sc.side: rng.normal(0, 1, (n, 2)) * ang for sc in inp.screws}
    return {"alpha": alpha, "beta": beta, "factor": factor, "offsets": offsets,
            "tilts": tilts, "draws": cal}


def _outcome_draws(p: UncertaintyParams, inp: ScanInputs, src: dict, n: int) -> dict:
    """Every outcome's value under each draw (the yield-weighted scheme for strength)."""
    hu_trab = ((inp.bmd["trabecular_vbmd_mg_cm3"] - inp.calibration["intercept"])
               / inp.calibration["slope"])
    out = {"trabecular_vbmd_mg_cm3": src["draws"][:, 0] + src["draws"][:, 1] * hu_trab}
    rho_body = inp.density[inp.body]
    body_y0 = float(inp.yield_fn(rho_body).mean())
    comp = np.full(n, np.nan)
    if inp.strength.get("compression") is not None:
        for i in range(n):
            y_i = inp.yield_fn(src["alpha"][i] + src["beta"][i] * rho_body)
            comp[i] = inp.strength["compression"] * src["factor"][i] * float(y_i.mean()) / body_y0
    out["compression_strength_n"] = comp
    for sc in inp.screws:
        # the voxels any draw's screw can reach: within reach of the nominal cylinder
        reach = (np.linalg.norm(src["offsets"][sc.side], axis=1).max()
                 + np.abs(src["tilts"][sc.side]).max() * sc.spec.length_mm * 1.5 + 1.0)
        s, rad = sc.axial_radial(inp.points_mm)
        near = ((rad <= sc.spec.diameter_mm / 2 + inp.shell_mm + reach)
                & (s >= -reach) & (s <= sc.spec.length_mm + reach))
        pts, rho = inp.points_mm[near], inp.density[near]
        roi0 = screw_roi(pts, sc, inp.shell_mm)
        y0 = roi_means(roi0, [inp.yield_fn(rho)])[0]
        vbmd, strength = np.full(n, np.nan), np.full(n, np.nan)
        offsets, tilts = src["offsets"][sc.side], src["tilts"][sc.side]
        # draws without placement or registration jitter keep the nominal region
        moved = offsets.any(axis=1) | tilts.any(axis=1)
        rois = jittered_rois(pts, sc, offsets, tilts, inp.shell_mm, moved)
        for i in range(n):
            roi = rois[i] if moved[i] else roi0
            rho_i = src["alpha"][i] + src["beta"][i] * rho
            vbmd[i], y_i = roi_means(roi, [rho_i, inp.yield_fn(rho_i)])
            if inp.strength.get(sc.side) is not None:
                strength[i] = inp.strength[sc.side] * src["factor"][i] * y_i / y0
        out[f"around_screw_vbmd_{sc.side}_mg_cm3"] = vbmd
        out[f"pullout_strength_{sc.side}_n"] = strength
    return out


#: The sources of each run: all of them (the interval), those that differ between scans of
#: a patient (sd_scan, for the least significant change), and each alone (the breakdown).
RUNS = {"all": {"calibration", "planning", "registration", "material"},
        "scan": {"calibration", "registration"},
        "calibration": {"calibration"}, "planning": {"planning"},
        "registration": {"registration"}, "material": {"material"}}


def scan_uncertainty(p: UncertaintyParams, inp: ScanInputs, seed_key: str = "") -> dict:
    """Intervals, ``sd_scan`` and the SD of each source alone, per outcome (module
    docstring); deterministic for a given seed and ``seed_key`` (e.g. "P01/M00")."""
    nominal = {"trabecular_vbmd_mg_cm3": inp.bmd["trabecular_vbmd_mg_cm3"],
               "compression_strength_n": inp.strength.get("compression")}
    for sc in inp.screws:
        nominal[f"around_screw_vbmd_{sc.side}_mg_cm3"] = \
            inp.bmd["around_screw_vbmd_mg_cm3"][sc.side]
        nominal[f"pullout_strength_{sc.side}_n"] = inp.strength.get(sc.side)
    children = np.random.SeedSequence([p.seed, *seed_key.encode()]).spawn(len(RUNS))
    runs = {}
    for (name, sources), child in zip(RUNS.items(), children, strict=True):
        # the breakdown runs: a quarter, at least 64 (a Sobol' sequence's pairs of
        # coordinates fill the square evenly only from a few dozen points on)
        n = sobol_size(p.draws if name in ("all", "scan") else max(p.draws // 4, 64))
        rng = QuasiRandom(n, np.random.default_rng(child))
        runs[name] = _outcome_draws(p, inp, _draw_sources(p, inp, n, rng, sources), n)
    if {sc.side for sc in inp.screws} == {"left", "right"}:
        # the two sides' mean (the cohort tables' around-screw vBMD and pullout strength)
        for key in ("around_screw_vbmd_{}_mg_cm3", "pullout_strength_{}_n"):
            both = [nominal[key.format(s)] for s in ("left", "right")]
            if all(v is not None for v in both):
                mean_key = key.replace("_{}", "")
                nominal[mean_key] = 0.5 * (both[0] + both[1])
                for r in runs.values():
                    r[mean_key] = 0.5 * (r[key.format("left")] + r[key.format("right")])
    out = {}
    for key, value in nominal.items():
        if value is None or not np.isfinite(runs["all"][key]).any():
            continue
        out[key] = {**summary(runs["all"][key], value, p.level),
                    "sd_scan": robust_sd(runs["scan"][key]),
                    "sd_by_source": {s: robust_sd(runs[s][key])
                                     for s in RUNS if s not in ("all", "scan")}}
    return out


def least_significant_change(sd_base, sd_follow, level: float = 0.95):
    """Least significant change between two scans with per-scan SDs (module docstring);
    scalars or arrays."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    out = z * np.hypot(np.asarray(sd_base, float), np.asarray(sd_follow, float))
    return float(out) if np.ndim(out) == 0 else out
