"""qctfea.cohort.stats against independent computations and published worked examples."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from qctfea.cohort import stats as st

# --------------------------------------------------------------------------- describe


def test_describe_against_hand_formulas() -> None:
    x = [4.0, 8.0, 15.0, 16.0, 23.0, 42.0, np.nan]
    d = st.describe(x)
    v = np.array(x[:-1])
    n = 6
    mean = sum(v) / n  # 18.0
    sd = math.sqrt(sum((v - mean) ** 2) / (n - 1))
    assert d["n"] == n and d["mean"] == pytest.approx(18.0)
    assert d["sd"] == pytest.approx(sd)
    # Quartiles by linear interpolation at positions (n-1) p:
    # 1.25 -> 8 + 0.25*7, 3.75 -> 16 + 0.75*7.
    assert d["q1"] == pytest.approx(9.75) and d["q3"] == pytest.approx(21.25)
    assert d["median"] == pytest.approx(15.5)
    half = sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n)  # t_{0.975,5} = 2.5706
    assert sps.t.ppf(0.975, 5) == pytest.approx(2.570582, abs=1e-6)
    assert d["ci_low"] == pytest.approx(mean - half) and d["ci_high"] == pytest.approx(mean + half)
    one = st.describe([3.0])
    assert one["n"] == 1 and one["mean"] == 3.0 and math.isnan(one["sd"])
    assert st.describe([np.nan])["n"] == 0


# --------------------------------------------------------------------------- Holm


def test_holm_published_example() -> None:
    # Holm-Bonferroni worked example (Wikipedia, "Holm-Bonferroni method"): H1..H4 with
    # p = 0.01, 0.04, 0.03, 0.005 at alpha 0.05: H4 and H1 rejected, H2 and H3 not.
    # Adjusted by hand: sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.06, 0.04*1).
    adj = st.holm([0.01, 0.04, 0.03, 0.005])
    assert adj == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert list(adj <= 0.05) == [True, False, False, True]


def test_holm_against_statsmodels_and_nan() -> None:
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(4)
    p = rng.uniform(0, 0.2, size=9)
    assert st.holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    with_nan = st.holm([0.02, np.nan, 0.04])
    assert with_nan[0] == pytest.approx(0.04) and math.isnan(with_nan[1])
    assert with_nan[2] == pytest.approx(0.04)
    assert st.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert np.isnan(st.holm([np.nan])).all()


# --------------------------------------------------------------------------- Friedman


def _friedman_hand(a: np.ndarray) -> float:
    """Friedman Q with the tie correction (Conover): 12 SSR / (n k (k+1)) ... / C."""
    n, k = a.shape
    ranks = np.apply_along_axis(sps.rankdata, 1, a)
    rsum = ranks.sum(axis=0)
    q = 12.0 / (n * k * (k + 1)) * np.sum(rsum**2) - 3.0 * n * (k + 1)
    ties = 0.0
    for row in a:
        _, counts = np.unique(row, return_counts=True)
        ties += np.sum(counts**3 - counts)
    return q / (1.0 - ties / (n * k * (k * k - 1)))


def test_friedman_published_example() -> None:
    # Sprent & Smeeton, Applied Nonparametric Statistical Methods (3rd ed.), 6.3.2, as in
    # scipy's documentation: pulse of 7 students before, immediately after and 5 minutes
    # after exercise: chi2 = 10.5714, p = 0.005063. By hand: rank sums 10, 21, 11;
    # 12/(7*3*4) * (100 + 441 + 121) - 3*7*4 = 10.5714.
    before = [72, 96, 88, 92, 74, 76, 82]
    after = [120, 120, 132, 120, 101, 96, 112]
    five = [76, 95, 104, 96, 84, 72, 76]
    res = st.friedman(np.column_stack([before, after, five]))
    assert res["n"] == 7 and res["k"] == 3 and res["df"] == 2
    assert res["chi2"] == pytest.approx(10.571428571, rel=1e-9)
    assert res["p"] == pytest.approx(0.005063414171757498, rel=1e-6)
    assert res["p"] == pytest.approx(math.exp(-10.571428571 / 2), rel=1e-9)  # chi2(2) sf


def test_friedman_ties_and_missing_rows() -> None:
    a = np.array([[1.0, 2.0, 2.0], [3.0, 1.0, 2.0], [1.0, 1.0, 3.0], [2.0, 3.0, 1.0],
                  [1.0, 3.0, 2.0], [np.nan, 1.0, 2.0]])
    res = st.friedman(a)
    assert res["n"] == 5  # the row with NaN dropped
    assert res["chi2"] == pytest.approx(_friedman_hand(a[:5]))
    assert res["p"] == pytest.approx(sps.chi2.sf(_friedman_hand(a[:5]), 2))
    assert math.isnan(st.friedman(a[:, :2])["chi2"])  # k = 2: not defined here
    assert math.isnan(st.friedman(np.ones((4, 3)))["chi2"])  # all tied


# --------------------------------------------------------------------------- correlations


def test_williams_t_published_examples() -> None:
    # Howell, Statistical Methods for Psychology (6th ed., p. 262), as computed by
    # B. Weaver's SPSS syntax: r12 = .80, r13 = .72, r23 = .89, n = 26 -> t = 1.361,
    # df = 23, p = .187.
    w = st.williams_t(0.80, 0.72, 0.89, 26)
    assert w["df"] == 23
    assert w["statistic"] == pytest.approx(1.361, abs=5e-4)
    assert w["p"] == pytest.approx(0.187, abs=5e-4)
    # DEPCOR (Silver, Hittner & May 2006, Appl Psychol Meas 30:152), as in the cocor
    # package's tests: r.jk = .3, r.jh = .4, r.kh = .5, n = 100 -> t = -1.0767, p = .2843.
    w = st.williams_t(0.3, 0.4, 0.5, 100)
    assert w["statistic"] == pytest.approx(-1.0767, abs=5e-5)
    assert w["p"] == pytest.approx(0.2843, abs=5e-5)
    assert w["p_greater"] == pytest.approx(1 - 0.2843 / 2, abs=5e-5)


def test_steiger_z_published_examples() -> None:
    # Steiger (1980), Psychol Bull 87:245, case A (p. 249): r.jk = .4, r.jh = .5,
    # r.kh = .1, n = 103. The paper reports Z = -.8913 with the covariance rounded to
    # .0042; unrounded, cocor gives -0.8887185.
    s = st.steiger_z(0.4, 0.5, 0.1, 103)
    assert s["statistic"] == pytest.approx(-0.8887185, abs=1e-7)
    assert s["statistic"] == pytest.approx(-0.8913, abs=3e-3)
    # DEPCOR example: r.jk = .3, r.jh = .4, r.kh = .5, n = 100 -> z = -1.0718, p = .2838.
    s = st.steiger_z(0.3, 0.4, 0.5, 100)
    assert s["statistic"] == pytest.approx(-1.0718, abs=5e-5)
    assert s["p"] == pytest.approx(0.2838, abs=5e-5)
    assert s["p_greater"] == pytest.approx(sps.norm.sf(-1.0718), abs=5e-5)


def test_dependent_correlation_tests_degenerate() -> None:
    assert math.isnan(st.williams_t(1.0, 0.5, 0.5, 10)["statistic"])
    assert math.isnan(st.steiger_z(0.5, 0.4, 0.3, 3)["statistic"])  # n - 3 = 0
    assert math.isnan(st.steiger_z(np.nan, 0.4, 0.3, 30)["p"])
    same = st.steiger_z(0.5, 0.5, 0.3, 30)
    assert same["statistic"] == 0 and same["p"] == pytest.approx(1.0)


def test_fisher_ci_closed_form() -> None:
    # r = 0.5, n = 50: atanh(.5) = 0.549306, se = 1/sqrt(47); 95 % CI (0.25749, 0.68326).
    rng = np.random.default_rng(0)
    a, e = rng.normal(size=(2, 50))
    x = (a - a.mean()) / a.std()
    e = e - e.mean()
    e = e - (e @ x) / (x @ x) * x
    e /= e.std()
    res = st.pearson_with_ci(x, 0.5 * x + math.sqrt(0.75) * e)
    assert res["r"] == pytest.approx(0.5, abs=1e-12)
    assert res["ci_low"] == pytest.approx(0.25749, abs=1e-5)
    assert res["ci_high"] == pytest.approx(0.68326, abs=1e-5)


# --------------------------------------------------------------------------- mixed model


def _unbalanced(seed: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(9):
        u = rng.normal(scale=10)
        for tp, m in (("M00", 0), ("M12", 12), ("M24", 24)):
            if (i, tp) in ((2, "M12"), (5, "M24"), (7, "M00")):
                continue  # missing scans, not symmetric
            rows.append({"patient": f"P{i}", "tp": tp, "months": float(m),
                         "y": 100 + u + 0.5 * m + rng.normal(scale=4)})
    return pd.DataFrame(rows)


def _design(df: pd.DataFrame) -> np.ndarray:
    return np.column_stack([np.ones(len(df)), df["tp"] == "M12", df["tp"] == "M24"]).astype(float)


def test_lmm_against_statsmodels_mixedlm_with_missing_scans() -> None:
    import statsmodels.formula.api as smf

    df = _unbalanced()
    fit = st.random_intercept_lmm(df["y"], _design(df), df["patient"], ["I", "M12", "M24"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = smf.mixedlm("y ~ C(tp)", df, groups=df["patient"]).fit(reml=True)
    assert fit.n_obs == len(df) == 24 and fit.n_groups == 9 and not fit.boundary
    assert fit.beta == pytest.approx(ref.fe_params.to_numpy(), rel=1e-5)
    assert fit.var_group == pytest.approx(float(ref.cov_re.iloc[0, 0]), rel=1e-3)
    assert fit.var_resid == pytest.approx(float(ref.scale), rel=1e-3)
    assert fit.reml_loglik == pytest.approx(float(ref.llf), abs=1e-5)
    # statsmodels' SEs come from the observed Hessian of all parameters; ours from
    # (X' V^-1 X)^-1: equal to within the optimiser's tolerance.
    assert fit.se == pytest.approx(ref.bse_fe.to_numpy(), rel=3e-3)
    assert fit.t == pytest.approx(ref.tvalues.to_numpy()[:3], rel=3e-3)  # Wald z
    assert fit.p_z[1] == pytest.approx(2 * sps.norm.sf(abs(fit.t[1])))
    # Linear-in-months model, too.
    X = np.column_stack([np.ones(len(df)), df["months"]])
    lin = st.random_intercept_lmm(df["y"], X, df["patient"], ["I", "months"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_lin = smf.mixedlm("y ~ months", df, groups=df["patient"]).fit(reml=True)
    assert lin.beta == pytest.approx(ref_lin.fe_params.to_numpy(), rel=1e-5)
    assert lin.reml_loglik == pytest.approx(float(ref_lin.llf), abs=1e-5)


def test_lmm_balanced_equals_repeated_measures_anova() -> None:
    # Complete, balanced subject x time data: the REML random-intercept model is the
    # two-way (subject, time) ANOVA. By hand: time effect = difference of time means,
    # SE = sqrt(2 MSE / n), df = (n-1)(k-1), var_resid = MSE,
    # var_group = (MS_subject - MSE) / k.
    rng = np.random.default_rng(11)
    n, k = 7, 3
    u = rng.normal(scale=6, size=n)
    y = 50 + u[:, None] + np.array([0.0, 3.0, 5.0]) + rng.normal(scale=2, size=(n, k))
    grand = y.mean()
    ss_subj = k * np.sum((y.mean(axis=1) - grand) ** 2)
    ss_time = n * np.sum((y.mean(axis=0) - grand) ** 2)
    ss_err = np.sum((y - grand) ** 2) - ss_subj - ss_time
    df_err = (n - 1) * (k - 1)
    mse = ss_err / df_err
    ms_subj = ss_subj / (n - 1)
    assert ms_subj > mse  # interior solution
    df = pd.DataFrame({"patient": np.repeat([f"P{i}" for i in range(n)], k),
                       "tp": np.tile(["M00", "M12", "M24"], n), "y": y.ravel()})
    fit = st.random_intercept_lmm(df["y"], _design(df), df["patient"])
    means = y.mean(axis=0)
    assert fit.beta[1:] == pytest.approx(means[1:] - means[0], rel=1e-9)
    assert fit.var_resid == pytest.approx(mse, rel=1e-6)
    assert fit.var_group == pytest.approx((ms_subj - mse) / k, rel=1e-5)
    assert fit.df == df_err
    se = math.sqrt(2 * mse / n)
    assert fit.se[1:] == pytest.approx([se, se], rel=1e-6)
    t = (means[2] - means[0]) / se
    assert fit.p[2] == pytest.approx(2 * sps.t.sf(abs(t), df_err), rel=1e-5)
    lo, hi = fit.ci()
    q = sps.t.ppf(0.975, df_err)
    assert lo[2] == pytest.approx(means[2] - means[0] - q * se, rel=1e-6)
    assert hi[2] == pytest.approx(means[2] - means[0] + q * se, rel=1e-6)
    assert fit.icc == pytest.approx(fit.var_group / (fit.var_group + fit.var_resid))


def test_lmm_boundary_is_ordinary_least_squares() -> None:
    # No patient effect at all (MS_subject < MSE): REML puts var_group at 0 and the
    # fit equals ordinary least squares (numpy lstsq, residual variance RSS/(N-p)).
    rng = np.random.default_rng(2)
    n, k = 6, 3
    y = 10 + np.array([0.0, 1.0, 2.0]) + rng.normal(size=(n, k))
    y -= y.mean(axis=1, keepdims=True) - y.mean()  # identical subject means
    df = pd.DataFrame({"patient": np.repeat([f"P{i}" for i in range(n)], k),
                       "tp": np.tile(["M00", "M12", "M24"], n), "y": y.ravel()})
    X = _design(df)
    fit = st.random_intercept_lmm(df["y"], X, df["patient"])
    beta, rss, *_ = np.linalg.lstsq(X, df["y"].to_numpy(), rcond=None)
    s2 = float(rss[0]) / (len(df) - 3)
    assert fit.boundary and fit.var_group == 0.0
    assert fit.beta == pytest.approx(beta, rel=1e-10)
    assert fit.var_resid == pytest.approx(s2, rel=1e-10)
    assert fit.se == pytest.approx(np.sqrt(np.diag(s2 * np.linalg.inv(X.T @ X))), rel=1e-10)


def test_lmm_errors() -> None:
    with pytest.raises(ValueError, match="rank deficient"):
        st.random_intercept_lmm([1.0, 2.0, 3.0, 4.0], np.ones((4, 2)), ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="too few"):
        st.random_intercept_lmm([1.0, 2.0], np.ones((2, 1)), ["a", "a"])


def test_lmm_non_convergence_is_flagged_and_logged(monkeypatch, caplog) -> None:
    # statsmodels' optimisers stopped after one iteration, or failing with a singular matrix
    # (as they do very near var_group = 0): the fit says so (converged False, a warning in
    # the log) instead of returning numbers as if they were the REML estimates; the
    # boundary solution is still recognised when it is the maximum.
    import logging

    from statsmodels.regression.mixed_linear_model import MixedLM

    df = _unbalanced()
    X = _design(df)
    good = st.random_intercept_lmm(df["y"], X, df["patient"])
    assert good.converged and not good.boundary
    fit_ = MixedLM.fit
    with monkeypatch.context() as m:
        m.setattr(MixedLM, "fit", lambda self, **kw: fit_(self, **{**kw, "maxiter": 1}))
        with caplog.at_level(logging.WARNING, logger="qctfea.cohort.stats"):
            short = st.random_intercept_lmm(df["y"], X, df["patient"])
    assert not short.converged and not short.boundary
    assert "did not converge" in caplog.text and "optimization failed" in caplog.text
    caplog.clear()

    def singular(self, *args, **kw):
        raise np.linalg.LinAlgError("Singular matrix")

    with monkeypatch.context() as m:
        m.setattr(MixedLM, "score", singular)  # statsmodels' gradient, used by its fit
        with caplog.at_level(logging.WARNING, logger="qctfea.cohort.stats"):
            failed = st.random_intercept_lmm(df["y"], X, df["patient"])
        assert failed.boundary and not failed.converged  # var_group = 0 is not the maximum
        assert "did not converge" in caplog.text and "Singular matrix" in caplog.text
        caplog.clear()
        rng = np.random.default_rng(2)  # the data of the boundary test: 0 is the maximum
        y = 10 + np.array([0.0, 1.0, 2.0]) + rng.normal(size=(6, 3))
        y -= y.mean(axis=1, keepdims=True) - y.mean()
        b = pd.DataFrame({"patient": np.repeat([f"P{i}" for i in range(6)], 3),
                          "tp": np.tile(["M00", "M12", "M24"], 6), "y": y.ravel()})
        with caplog.at_level(logging.WARNING, logger="qctfea.cohort.stats"):
            ols = st.random_intercept_lmm(b["y"], _design(b), b["patient"])
        assert ols.boundary and ols.converged and ols.var_group == 0.0
        assert "did not converge" not in caplog.text
