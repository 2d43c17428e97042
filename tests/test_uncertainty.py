"""Uncertainty of a scan's outcomes (qctfea.uncertainty, docs/uncertainty.md): the
calibration line's covariance against statsmodels, the interval's coverage of the demo
generator's true calibration, the yield-weighted strength scheme against its closed form,
and the least significant change."""
from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm

from qctfea.imaging import calibration as cm
from qctfea.imaging import attenuation
from qctfea.imaging import phantomless
from qctfea.demo import synth
from qctfea import uncertainty as unc
from qctfea.model.screw import Screw, ScrewSpec


def test_line_covariance_matches_statsmodels_ols():
    rng = np.random.default_rng(3)
    x = np.array([-2.0, 48.0, 101.0, 149.0, 203.0])
    y = 0.3 + 0.61 * x + rng.normal(0, 0.8, x.size)
    cov, dof = cm.line_covariance(x, y)
    ref = sm.OLS(y, sm.add_constant(x)).fit()
    assert dof == ref.df_resid == 3
    np.testing.assert_allclose(cov, ref.cov_params(), rtol=1e-10)
    assert cm.line_covariance(x[:2], y[:2]) == (None, 0)


def test_material_cv_default_is_the_published_laws_spread():
    # Two power laws: the SD of two logs is |ln(a1/a2) + (b1 - b2) ln rho| / sqrt(2); its mean
    # over [lo, hi] by adaptive quadrature (split where the laws cross), independent of the
    # library's grid.
    from scipy.integrate import quad
    (a1, b1), (a2, b2) = unc.LUMBAR_STRENGTH_LAWS.values()
    lo, hi = unc.VERTEBRAL_APPARENT_DENSITY
    cross = (a2 / a1) ** (1 / (b1 - b2))
    assert lo < cross < hi  # the two studies' laws cross inside the range (near 0.20 g/cm³)
    f = lambda r: abs(np.log(a1 / a2) + (b1 - b2) * np.log(r)) / np.sqrt(2)  # noqa: E731
    s = (quad(f, lo, cross)[0] + quad(f, cross, hi)[0]) / (hi - lo)
    assert unc.law_spread_cv() == pytest.approx(np.sqrt(np.expm1(s ** 2)), rel=1e-4)
    assert unc.law_spread_cv() == pytest.approx(0.100, abs=0.001)
    assert unc.UncertaintyParams().yield_coefficient_cv == round(unc.law_spread_cv(), 2)


def test_multivariate_t_draws_have_the_t_covariance():
    """Var of a multivariate t with scale S and ν dof is S ν / (ν − 2)."""
    S = np.array([[4.0, 1.2], [1.2, 1.0]])
    d = unc.multivariate_t(S, 5, 200_000, np.random.default_rng(0))
    np.testing.assert_allclose(np.cov(d.T), S * 5 / 3, rtol=0.03)


def test_phantom_interval_covers_the_generators_true_calibration():
    """The demo generator's phantom (its rods, blur and noise model) under 200 noise draws:
    the 95 % interval of the trabecular vBMD from the fitted line covers the vBMD that the
    generator's true line gives for the same HU in 95 % of the draws (binomial SD 1.5 %)."""
    p = synth.SynthParams(fov_z_mm=3.0, noise_hu=0.0)
    anat = synth.patient_anatomy(2021, "P01", p)
    pose = synth.scan_pose(2021, "P01", 0.0, p)
    clean = synth.render_scan(anat, pose, 0.0, p)
    patient = clean["labels"] > 0
    spec = cm.PhantomSpec(preset="demo_k2hpo4")
    hu_trab = anat.trabecular_mg_cm3 / pose.slope  # HU of the true trabecular density
    truth = pose.intercept + pose.slope * hu_trab
    rng = np.random.default_rng(7)
    noise = synth.SynthParams().noise_hu
    hits, widths = [], []
    for _ in range(200):
        hu = clean["hu"] + rng.normal(0.0, noise, clean["hu"].shape)
        cal = cm.phantom_calibration(hu, tuple(clean["spacing"]), patient, spec)
        c = {"intercept": cal.intercept, "slope": cal.slope, "covariance": cal.covariance,
             "dof": cal.dof}
        d = unc.calibration_draws(c, 400, rng)
        s = unc.summary(d[:, 0] + d[:, 1] * hu_trab, cal.intercept + cal.slope * hu_trab, 0.95)
        hits.append(s["ci_low"] <= truth <= s["ci_high"])
        widths.append(s["ci_high"] - s["ci_low"])
    coverage = float(np.mean(hits))
    assert 0.90 <= coverage <= 0.99, coverage
    assert np.median(widths) > 0


def test_line_covariance_with_a_known_scatter_is_the_closed_form():
    """Known scatter σ of the points: var(slope) = σ² / Σ(x − x̄)², var(intercept) = σ²
    Σx² / (n Σ(x − x̄)²), normal (dof None); with two points too; the residual's variance
    instead when it is larger."""
    x, y = np.array([-100.0, 40.0]), np.array([-77.0, 38.0])
    cov, dof = cm.line_covariance(x, y, known_sd=5.0)
    sxx = ((x - x.mean()) ** 2).sum()
    assert dof is None
    np.testing.assert_allclose([cov[1][1], cov[0][0]],
                               [25.0 / sxx, 25.0 * (x ** 2).sum() / (2 * sxx)], rtol=1e-12)
    x3, y3 = np.array([-1000.0, -100.0, 40.0]), np.array([-775.0, -60.0, 40.0])
    big, _ = cm.line_covariance(x3, y3, known_sd=0.01)
    resid, dof = cm.line_covariance(x3, y3)
    assert dof == 1
    np.testing.assert_allclose(big, resid, rtol=1e-12)


@pytest.mark.parametrize("names", [["air", "fat", "muscle"], ["fat", "muscle"]])
def test_effective_energy_covariance_matches_refits_of_noisy_tissues(names):
    """Three tissues (a, b and E fitted) or two (E only) at 70 keV with 3 HU of noise,
    refitted 200 times: the delta-method variances of intercept and slope for a tissue
    scatter of 3 HU against the variances of the refitted lines. The fit is nonlinear in E;
    asserted within 0.7-1.5x."""
    t = np.array([float(attenuation.theoretical_hu(phantomless._material(n), 70.0)) for n in names])
    energies = np.arange(40.0, 110.001, 0.05)
    rng = np.random.default_rng(1)
    lines, covs = [], []
    for _ in range(200):
        m = t + rng.normal(0, 3.0, len(names))
        res = phantomless.fit_effective_energy(names, m, energies)
        k = float(attenuation.k2hpo4_hu_per_mg(res["energy_kev"], 0.2174))
        lines.append([-res["a"] / (res["b"] * k), 1 / (res["b"] * k)])
        used = [{"name": n, "median_hu": v} for n, v in zip(names, m, strict=True)]
        covs.append(phantomless._effective_energy_covariance(used, res, 0.2174, 3.0))
    emp, delta = np.cov(np.array(lines).T), np.mean(covs, axis=0)
    keep = slice(1, 2) if len(names) == 2 else slice(None)  # a = b - 1 = 0: intercept 0
    ratio = np.diag(delta)[keep] / np.diag(emp)[keep]
    print(names, "delta / refit variance (intercept, slope):", ratio)
    assert np.all((ratio > 0.7) & (ratio < 1.5)), ratio


def _block(rho: float = 150.0):
    """A 40 mm cube of bone on a 1 mm grid with a density gradient, its body the lower half."""
    g = np.arange(-20.0, 20.0) + 0.5
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    dens = rho * (1 + 0.01 * pts[:, 0])
    return pts, dens, pts[:, 2] < 0


def test_yield_weighted_strength_follows_the_power_law_exactly_under_a_scale():
    """With a calibration that scales every density by λ (intercept 0) and σ_y = a ρ^b,
    the scheme's strength ratio is λ^b exactly, for compression and pullout."""
    pts, dens, body = _block()
    spec = ScrewSpec(diameter_mm=6.5, length_mm=30.0)
    screw = Screw("left", np.array([0.0, -15.0, 5.0]), np.array([0.0, 1.0, 0.0]), spec)
    lam, b = 1.1, 1.6
    p = unc.UncertaintyParams(draws=20, screw_position_sd_mm=0, screw_angle_sd_deg=0,
                              yield_coefficient_cv=0)
    inp = unc.ScanInputs(
        calibration={"intercept": 0.0, "slope": 0.5}, bmd={"trabecular_vbmd_mg_cm3": 100.0,
                                                         "around_screw_vbmd_mg_cm3": {}},
        density=dens, points_mm=pts, body=body, screws=[screw],
        strength={"compression": 3000.0, "left": 800.0}, yield_fn=lambda r: 0.02 * r ** b)
    src = {"alpha": np.zeros(20), "beta": np.full(20, lam), "factor": np.ones(20),
           "offsets": {"left": np.zeros((20, 3))}, "tilts": {"left": np.zeros((20, 2))},
           "draws": np.tile([0.0, 0.5 * lam], (20, 1))}
    out = unc._outcome_draws(p, inp, src, 20)
    np.testing.assert_allclose(out["compression_strength_n"], 3000.0 * lam ** b, rtol=1e-12)
    np.testing.assert_allclose(out["pullout_strength_left_n"], 800.0 * lam ** b, rtol=1e-12)
    np.testing.assert_allclose(out["trabecular_vbmd_mg_cm3"], 100.0 * lam, rtol=1e-12)
    roi = unc.screw_roi_means(pts, [dens], screw, 2.0)[0]
    np.testing.assert_allclose(out["around_screw_vbmd_left_mg_cm3"], roi * lam, rtol=1e-12)


def test_jitter_tilts_the_axis_by_the_drawn_angle():
    spec = ScrewSpec()
    sc = Screw("left", np.zeros(3), np.array([0.0, 0.6, 0.8]), spec)
    j = unc.jittered(sc, np.array([1.0, 2.0, 3.0]), np.radians([3.0, 4.0]))
    assert np.degrees(np.arccos(j.axis @ sc.axis)) == pytest.approx(
        np.degrees(np.arctan(np.radians(5.0))), rel=1e-9)
    np.testing.assert_allclose(j.entry_mm, [1.0, 2.0, 3.0])


def test_jittered_rois_match_each_jittered_screw_cylinder():
    """The batched regions of the jittered screws are the points that Screw.around (the
    vBMD's own around-the-screw test) selects for each jittered screw, point for point."""
    rng = np.random.default_rng(3)
    spec = ScrewSpec(diameter_mm=6.5, length_mm=40.0)
    sc = Screw("left", np.array([2.0, -20.0, 1.0]), np.array([0.1, 0.95, 0.3]) /
               np.linalg.norm([0.1, 0.95, 0.3]), spec)
    pts = rng.uniform(-30, 40, (20000, 3))
    n = 150
    offsets, tilts = rng.normal(0, 1.0, (n, 3)), rng.normal(0, np.radians(3.0), (n, 2))
    which = rng.random(n) < 0.8
    rois = unc.jittered_rois(pts, sc, offsets, tilts, 2.0, which, chunk=32)
    assert set(rois) == set(np.flatnonzero(which).tolist())
    for i, roi in rois.items():
        expect = unc.jittered(sc, offsets[i], tilts[i]).around(pts, 2.0)
        assert expect.sum() > 100
        np.testing.assert_array_equal(roi, expect)


def test_scan_uncertainty_splits_what_cancels_in_a_change():
    """Planning and the material law are shared by a patient's scans: a baseline's sd_scan
    comes from its calibration alone; a follow-up's also from the registration."""
    pts, dens, body = _block()
    screw = Screw("left", np.array([0.0, -15.0, 5.0]), np.array([0.0, 1.0, 0.0]),
                  ScrewSpec(length_mm=30.0))
    roi = unc.screw_roi_means(pts, [dens], screw, 2.0)[0]
    cal = {"intercept": 0.0, "slope": 0.5, "covariance": [[0.04, 0.0], [0.0, 1e-6]],
           "dof": 3}
    inp = unc.ScanInputs(calibration=cal, bmd={"trabecular_vbmd_mg_cm3": 100.0,
                                               "around_screw_vbmd_mg_cm3": {"left": roi}},
                         density=dens, points_mm=pts, body=body, screws=[screw],
                         strength={"compression": 3000.0, "left": 800.0},
                         yield_fn=lambda r: 0.02 * r ** 1.6)
    p = unc.UncertaintyParams(draws=200)
    base = unc.scan_uncertainty(p, inp, "P/0")
    inp.follow_up = True
    follow = unc.scan_uncertainty(p, inp, "P/1")
    for key in ("trabecular_vbmd_mg_cm3", "pullout_strength_left_n"):
        b = base[key]
        assert b["sd_by_source"]["registration"] == 0
        assert b["sd_scan"] == pytest.approx(b["sd_by_source"]["calibration"], rel=0.35)
        assert b["ci_low"] < b["value"] < b["ci_high"]
    # trabecular vBMD: the calibration alone, shared-source-free: both SDs that of the t (3
    # dof) of vBMD = a + b HU with HU = 200 (scale (0.04 + 1e-6 200²)^½), robust_sd's 84th
    # percentile; pullout: planning and law
    from scipy import stats

    t_sd = np.sqrt(0.04 + 1e-6 * 200.0 ** 2) * stats.t.ppf(stats.norm.cdf(1.0), 3)
    for k in ("sd", "sd_scan"):
        assert base["trabecular_vbmd_mg_cm3"][k] == pytest.approx(t_sd, rel=0.25)
    assert base["pullout_strength_left_n"]["sd"] > 5 * base["pullout_strength_left_n"]["sd_scan"]
    assert follow["around_screw_vbmd_left_mg_cm3"]["sd_by_source"]["registration"] > 0
    assert (follow["around_screw_vbmd_left_mg_cm3"]["sd_scan"]
            > base["around_screw_vbmd_left_mg_cm3"]["sd_scan"])
    # the trabecular ROI does not move with the screws: the same calibration SD
    assert follow["trabecular_vbmd_mg_cm3"]["sd_by_source"]["registration"] == 0


def test_least_significant_change_is_2_77_precision_sds():
    assert unc.least_significant_change(1.0, 1.0) == pytest.approx(2.7718, abs=1e-4)
    assert unc.least_significant_change(3.0, 4.0, 0.95) == pytest.approx(1.959964 * 5, 1e-6)


def test_robust_sd_is_the_normal_sd_and_finite_for_heavy_tails():
    """robust_sd: the SD of normal draws (within 2 % for 200,000), and for a Student t with 1
    degree of freedom (a Cauchy: infinite variance) its 84th percentile, 1.8373 (scipy),
    while the sample SD of the same draws is far larger."""
    rng = np.random.default_rng(5)
    assert unc.robust_sd(rng.normal(0.0, 3.0, 200_000)) == pytest.approx(3.0, rel=0.02)
    d = unc.multivariate_t(np.eye(1), 1, 200_000, rng)[:, 0]
    from scipy import stats

    assert unc.robust_sd(d) == pytest.approx(stats.t.ppf(stats.norm.cdf(1.0), 1), rel=0.03)
    assert d.std() > 20 * unc.robust_sd(d)


def test_quasi_random_draws_give_the_exact_sd_with_less_seed_noise_than_random_draws():
    """Trabecular vBMD under a normal calibration line is exactly normal, of SD
    (var a + 2 HU cov ab + HU² var b)^½. Its per-scan SD (robust: half the central 68.27 %
    range) over 16 seeds: the mean within 1 % of that SD, and its seed-to-seed spread below
    a third of what independent pseudo-random draws of the same number give, whose standard
    error follows from the quantiles' asymptotic variance: each quantile's SE is
    (p (1 - p) / n)^½ / φ(1) with p = Φ(1), and their half-difference's about 1/√2 of it
    (4.7 % of the SD at n = 512)."""
    from scipy import stats

    pts, dens, body = _block()
    cov = [[4.0, -0.01], [-0.01, 1e-4]]
    cal = {"intercept": 2.0, "slope": 0.8, "covariance": cov, "dof": None}
    hu = (100.0 - 2.0) / 0.8
    exact = np.sqrt(cov[0][0] + 2 * hu * cov[0][1] + hu ** 2 * cov[1][1])
    inp = unc.ScanInputs(calibration=cal, bmd={"trabecular_vbmd_mg_cm3": 100.0,
                                               "around_screw_vbmd_mg_cm3": {}},
                         density=dens, points_mm=pts, body=body, screws=[],
                         strength={"compression": None}, yield_fn=lambda r: 0.02 * r ** 1.6)
    p = unc.UncertaintyParams(draws=512)
    sds = np.array([unc.scan_uncertainty(p, inp, f"P{k}/M00")["trabecular_vbmd_mg_cm3"]
                    ["sd_scan"] for k in range(16)])
    assert sds.mean() == pytest.approx(exact, rel=0.01)
    q = stats.norm.cdf(1.0)
    random_se = np.sqrt(q * (1 - q) / 512) / stats.norm.pdf(1.0) / np.sqrt(2)
    assert random_se == pytest.approx(0.047, abs=0.001)
    assert sds.std(ddof=1) / exact < random_se / 3, sds
