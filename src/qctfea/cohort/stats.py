"""Statistics used by the cohort analysis, on plain arrays (no I/O, no tables).

Every function here is checked in ``tests/test_stats.py`` against an
independent computation or a published worked example:

* :func:`describe` -- n, mean, SD, median, IQR and the t-based CI of the mean
  (scipy's one-sample t test);
* :func:`paired_tests` -- paired t test and Wilcoxon signed-rank test (scipy);
* :func:`holm` -- Holm (1979) step-down adjusted p values (statsmodels);
* :func:`friedman` -- Friedman test over k related samples (complete cases; scipy);
* :func:`pearson_with_ci` -- Pearson r with scipy's Fisher-z CI, Spearman rho;
* :func:`williams_t`, :func:`steiger_z` -- two dependent correlations sharing
  one variable (Williams 1959 T2; Steiger 1980 eq. 15 with the pooled r), written
  out here as no maintained library has them;
* :func:`random_intercept_lmm` -- linear mixed model with a random intercept
  per group, fitted by REML with statsmodels' MixedLM.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sps
from statsmodels.regression.linear_model import OLS
from statsmodels.regression.mixed_linear_model import MixedLM, MixedLMParams
from statsmodels.stats.multitest import multipletests

NAN = math.nan
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- descriptives


def describe(values: Any, alpha: float = 0.05) -> dict[str, float]:
    """n, mean, SD (n-1), median, quartiles (linear interpolation), min, max and
    the t-based ``1 - alpha`` CI of the mean (``mean +- t_{1-alpha/2, n-1} SD / sqrt(n)``,
    scipy's one-sample t test), ignoring NaN."""
    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    n = int(len(x))
    out = {"n": n, "mean": NAN, "sd": NAN, "median": NAN, "q1": NAN, "q3": NAN,
           "min": NAN, "max": NAN, "ci_low": NAN, "ci_high": NAN}
    if n == 0:
        return out
    out.update(mean=float(x.mean()), median=float(np.median(x)),
               q1=float(np.percentile(x, 25)), q3=float(np.percentile(x, 75)),
               min=float(x.min()), max=float(x.max()))
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's precision-loss warning: constant x
            ci = sps.ttest_1samp(x, 0.0).confidence_interval(confidence_level=1 - alpha)
        out.update(sd=float(x.std(ddof=1)), ci_low=float(ci.low), ci_high=float(ci.high))
    return out


# --------------------------------------------------------------------------- paired tests


def paired_tests(b: Any, f: Any) -> dict[str, float]:
    """Descriptives, paired t test and two-sided Wilcoxon signed-rank test.

    ``b`` and ``f`` are paired arrays without NaN (baseline, follow-up).
    ``t``/``p_ttest`` are NaN with fewer than 2 pairs or zero variance of the
    differences; ``p_wilcoxon`` is NaN with fewer than 2 pairs or all differences
    zero. The Wilcoxon p is scipy's default: exact null distribution for small
    samples without ties/zeros, normal approximation otherwise.
    """
    b = np.asarray(b, dtype=float)
    f = np.asarray(f, dtype=float)
    n = len(b)
    d = f - b
    res: dict[str, float] = {
        "n_pairs": n,
        "mean_baseline": float(np.mean(b)) if n else NAN,
        "mean_followup": float(np.mean(f)) if n else NAN,
        "mean_change": float(np.mean(d)) if n else NAN,
        "mean_change_pct": NAN,
        "sd_change": float(np.std(d, ddof=1)) if n >= 2 else NAN,
        "t": NAN,
        "p_ttest": NAN,
        "p_wilcoxon": NAN,
    }
    if n:
        with np.errstate(divide="ignore", invalid="ignore"):
            pct = np.where(b != 0, 100.0 * d / b, np.nan)
        if np.isfinite(pct).any():
            res["mean_change_pct"] = float(np.nanmean(pct))
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if res["sd_change"] > 0:
                tt = sps.ttest_rel(f, b)
                res["t"] = float(tt.statistic)
                res["p_ttest"] = float(tt.pvalue)
            if np.any(d != 0):
                try:
                    res["p_wilcoxon"] = float(sps.wilcoxon(f, b).pvalue)
                except ValueError:
                    res["p_wilcoxon"] = NAN
    return res


def holm(pvalues: Any) -> np.ndarray:
    """Holm (1979) step-down adjusted p values; NaN entries stay NaN and are not counted.

    statsmodels' ``multipletests(method="holm")`` on the m finite p values: sorted
    ascending, ``p_(i) * (m - i + 1)``, made monotone by a running maximum and capped at 1.
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def friedman(matrix: Any) -> dict[str, float]:
    """Friedman test on an (n subjects x k conditions) array; rows with NaN are dropped.

    Returns ``n`` (complete rows used), ``k``, ``chi2`` (tie-corrected), ``df`` and
    ``p`` (chi-square approximation). NaN statistics with k < 3 or n < 2 or
    when every row is tied throughout.
    """
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2:
        raise ValueError("friedman: expected a 2-D array (subjects x conditions)")
    a = a[np.all(np.isfinite(a), axis=1)]
    n, k = a.shape
    out = {"n": int(n), "k": int(k), "chi2": NAN, "df": float(k - 1), "p": NAN}
    if k < 3 or n < 2:
        return out
    ranks = np.apply_along_axis(sps.rankdata, 1, a)
    if np.all(ranks == (k + 1) / 2):
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sps.friedmanchisquare(*a.T)
    out["chi2"] = float(res.statistic)
    out["p"] = float(res.pvalue)
    return out


# --------------------------------------------------------------------------- correlation


def pearson_with_ci(x: Any, y: Any, alpha: float = 0.05) -> dict[str, float]:
    """Pearson r with two-sided p and Fisher-z CI, plus Spearman rho and p.

    Pairs with a NaN in either variable are dropped. With fewer than 3 pairs
    or a constant variable every statistic is NaN (``n`` is still reported);
    with exactly 3 pairs the CI is NaN. The CI is scipy's Fisher-z interval,
    ``tanh(atanh(r) +- z_{1-alpha/2} / sqrt(n - 3))``.
    """
    xa = np.asarray(x, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"pearson_with_ci: x and y differ in length ({len(xa)} vs {len(ya)})")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(len(xa))
    out: dict[str, float] = {
        "n": n, "r": NAN, "p": NAN, "ci_low": NAN, "ci_high": NAN,
        "rho_spearman": NAN, "p_spearman": NAN,
    }
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = sps.pearsonr(xa, ya)
        sr = sps.spearmanr(xa, ya)
        if n > 3:  # scipy gives (-1, 1) for n = 3
            ci = pr.confidence_interval(confidence_level=1.0 - alpha)
            out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    out["r"] = float(np.clip(pr.statistic, -1.0, 1.0))
    out["p"] = float(pr.pvalue)
    out["rho_spearman"] = float(sr.statistic)
    out["p_spearman"] = float(sr.pvalue)
    return out


def _p_from(stat: float, dist: Any) -> tuple[float, float]:
    """(two-sided p, one-sided p for 'greater')."""
    if not math.isfinite(stat):
        return NAN, NAN
    return float(2.0 * dist.sf(abs(stat))), float(dist.sf(stat))


def _check_r(*rs: float) -> bool:
    return all(math.isfinite(r) and -1.0 < r < 1.0 for r in rs)


def williams_t(r12: float, r13: float, r23: float, n: int) -> dict[str, float]:
    """Williams' (1959) t (Steiger's 1980 T2) for H0: rho12 = rho13 (variable 1 shared).

    ``t = (r12 - r13) sqrt((n-1)(1+r23) / (2 (n-1)/(n-3) |R| + rbar^2 (1-r23)^3))``
    with ``|R| = 1 - r12^2 - r13^2 - r23^2 + 2 r12 r13 r23``, ``rbar = (r12+r13)/2``,
    df = n - 3. ``p_greater`` tests H1: rho12 > rho13.
    """
    out = {"statistic": NAN, "df": float(n - 3), "p": NAN, "p_greater": NAN}
    if n < 4 or not _check_r(r12, r13, r23):
        return out
    det = 1 - r12**2 - r13**2 - r23**2 + 2 * r12 * r13 * r23
    rbar = (r12 + r13) / 2
    denom = 2 * (n - 1) / (n - 3) * det + rbar**2 * (1 - r23) ** 3
    if denom <= 0:
        return out
    t = (r12 - r13) * math.sqrt((n - 1) * (1 + r23) / denom)
    out["statistic"] = t
    out["p"], out["p_greater"] = _p_from(t, sps.t(n - 3))
    return out


def steiger_z(r12: float, r13: float, r23: float, n: int) -> dict[str, float]:
    """Steiger's (1980) Z for H0: rho12 = rho13 (variable 1 shared), pooled-r version.

    ``z = (atanh r12 - atanh r13) sqrt(n-3) / sqrt(2 - 2 s)`` with
    ``s = psi / (1 - rbar^2)^2``, ``psi = r23 (1 - 2 rbar^2) - rbar^2 (1 - 2 rbar^2 - r23^2) / 2``
    and ``rbar = (r12 + r13) / 2`` (Steiger 1980, eqs. 3, 10, 14-15).
    ``p_greater`` tests H1: rho12 > rho13.
    """
    out = {"statistic": NAN, "p": NAN, "p_greater": NAN, "covariance": NAN}
    if n < 4 or not _check_r(r12, r13, r23):
        return out
    rbar = (r12 + r13) / 2
    psi = r23 * (1 - 2 * rbar**2) - 0.5 * rbar**2 * (1 - 2 * rbar**2 - r23**2)
    s = psi / (1 - rbar**2) ** 2
    if 2 - 2 * s <= 0:
        return out
    z = (math.atanh(r12) - math.atanh(r13)) * math.sqrt(n - 3) / math.sqrt(2 - 2 * s)
    out["statistic"] = z
    out["covariance"] = s
    out["p"], out["p_greater"] = _p_from(z, sps.norm)
    return out


# --------------------------------------------------------------------------- mixed model

#: statsmodels' optimisers, tried in turn until one converges. Not its default (BFGS, then
#: L-BFGS, then CG): where the REML criterion is flat BFGS can stop short, and L-BFGS then
#: reports convergence away from the optimum; Nelder-Mead does not.
_METHODS = ["bfgs", "nm"]
#: BFGS's gradient tolerance (on the REML criterion per observation as a function of the
#: square root of the variance ratio, so scale-free). statsmodels' default (1e-5) leaves the
#: variances about 1e-5 (relative) from the optimum; 1e-8 brings them to about 1e-8.
_GTOL = 1e-8
#: A fit counts as converged only if statsmodels says so and its gradient (as for _GTOL)
#: is at most this.
_SCORE_TOL = 1e-4
#: A variance ratio just above the boundary, where statsmodels can still evaluate its REML
#: criterion (it inverts the random-effects covariance); used to check that the boundary
#: solution is a maximum (the criterion decreases away from it).
_RATIO_NEAR_0 = 1e-6


@dataclass
class LmmResult:
    """Random-intercept linear mixed model fitted by REML (statsmodels' MixedLM).

    ``y_ij = x_ij' beta + u_i + e_ij``, ``u_i ~ N(0, var_group)``,
    ``e_ij ~ N(0, var_resid)``. ``se`` from ``var_resid * (X' H^-1 X)^-1`` (the GLS
    covariance of beta at the REML variances; statsmodels' ``bse_fe`` differs slightly, as
    it inverts the Hessian of all parameters together); ``df`` is the between-within
    denominator df (``n_obs - n_groups - (p - 1)``, the residual df of the two-way
    subject x time layout for balanced data), used for ``p`` and :meth:`ci`
    (t distribution); ``p_z`` is the normal (Wald z) p as in statsmodels' MixedLM.
    ``converged`` is False when the optimiser did not converge (the numbers are then
    not to be used; a warning is logged); ``boundary`` is True when the REML optimum is
    ``var_group = 0``, where the fit equals ordinary least squares.
    """

    names: list[str]
    beta: np.ndarray
    se: np.ndarray
    cov: np.ndarray
    var_group: float
    var_resid: float
    reml_loglik: float
    n_obs: int
    n_groups: int
    df: float
    converged: bool
    boundary: bool
    t: np.ndarray = field(init=False)
    p: np.ndarray = field(init=False)
    p_z: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            self.t = self.beta / self.se
        if self.df > 0:
            self.p = 2 * sps.t.sf(np.abs(self.t), self.df)
        else:
            self.p = np.full_like(self.beta, np.nan)
        self.p_z = 2 * sps.norm.sf(np.abs(self.t))

    def ci(self, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """t-based (``df``) confidence interval of each coefficient."""
        if self.df <= 0:
            nan = np.full_like(self.beta, np.nan)
            return nan, nan
        q = float(sps.t.ppf(1 - alpha / 2, self.df))
        return self.beta - q * self.se, self.beta + q * self.se

    @property
    def icc(self) -> float:
        tot = self.var_group + self.var_resid
        return self.var_group / tot if tot > 0 else NAN


def _ols_reml_loglik(ols: Any, X: np.ndarray) -> float:
    """REML log-likelihood of the linear model (statsmodels' MixedLM criterion in the
    limit ``var_group -> 0``, which it cannot evaluate at 0 itself):
    ``-((N - p) (log(RSS / (N - p)) + 1 + log 2 pi) + log |X'X|) / 2``."""
    dof = ols.df_resid
    _, logdet = np.linalg.slogdet(X.T @ X)
    return float(-0.5 * (dof * (math.log(ols.scale) + 1.0 + math.log(2 * math.pi)) + logdet))


def random_intercept_lmm(
    y: Any, X: Any, groups: Sequence[Any], names: Sequence[str] | None = None
) -> LmmResult:
    """Fit ``y ~ X + (1 | group)`` by REML with statsmodels' MixedLM.

    ``X`` is the fixed-effects design (n x p, intercept included by the caller);
    rows with NaN in ``y`` or ``X`` are dropped. statsmodels cannot reach
    ``var_group = 0`` (it optimises over the square root of the variance ratio and
    inverts the random-effects covariance), so the boundary is a candidate of its own:
    when the REML criterion of ordinary least squares is at least the one statsmodels
    found, ``boundary`` is True and the fit is statsmodels' OLS (``var_group = 0``).
    The boundary solution counts as converged when the criterion decreases away from it
    (whether or not statsmodels converged on its way there, or failed with a singular
    matrix). A fit that did not converge is returned with ``converged = False`` and
    logged as a warning, with statsmodels' messages.
    Raises ``ValueError`` for a rank-deficient design or too few observations.
    """
    ya = np.asarray(y, dtype=float).ravel()
    Xa = np.asarray(X, dtype=float)
    if Xa.ndim == 1:
        Xa = Xa[:, None]
    g = np.asarray(list(groups), dtype=object)
    if not (len(ya) == len(Xa) == len(g)):
        raise ValueError("random_intercept_lmm: y, X and groups differ in length")
    keep = np.isfinite(ya) & np.all(np.isfinite(Xa), axis=1)
    ya, Xa, g = ya[keep], Xa[keep], g[keep].astype(str)
    n, p = Xa.shape
    names = list(names) if names is not None else [f"x{i}" for i in range(p)]
    if np.linalg.matrix_rank(Xa) < p:
        raise ValueError("random_intercept_lmm: the fixed-effects design is rank deficient")
    n_groups = len(np.unique(g))
    if n - p < 1 or n_groups < 2:
        raise ValueError(f"random_intercept_lmm: too few observations ({n} in {n_groups} "
                         f"groups for {p} fixed effects)")

    model = MixedLM(ya, Xa, groups=g)
    fit, failure = None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = model.fit(reml=True, method=_METHODS, gtol=_GTOL)
        except np.linalg.LinAlgError as exc:
            # statsmodels raises this when its optimiser ends very near the boundary
            failure = [f"statsmodels failed: {exc}"]
    messages = "; ".join(dict.fromkeys(
        [str(w.message) for w in caught if "have no effect" not in str(w.message)] + failure))
    ols = OLS(ya, Xa).fit()
    ll0 = _ols_reml_loglik(ols, Xa)
    boundary = fit is None or not fit.llf > ll0  # NaN too
    if boundary:
        # A maximum at 0 when the criterion decreases away from it (statsmodels usually
        # reports non-convergence here, approaching the boundary without reaching it).
        near = MixedLMParams.from_components(fe_params=np.zeros(p),
                                             cov_re=np.array([[_RATIO_NEAR_0]]))
        converged = bool(model.loglike(near, profile_fe=True) <= ll0)
        beta, cov, var_group, var_resid, loglik = (
            np.asarray(ols.params), np.asarray(ols.cov_params()), 0.0, float(ols.scale), ll0)
    else:
        packed = fit.params_object.get_packed(use_sqrt=model.use_sqrt, has_fe=False)
        score = float(np.max(np.abs(model.score(packed, profile_fe=True)))) / n
        converged = bool(fit.converged) and score <= _SCORE_TOL
        if bool(fit.converged) and not converged:
            messages += f"{'; ' if messages else ''}gradient {score:.2g} per observation"
        hess, _ = model.hessian(fit.params_object)
        beta = np.asarray(fit.fe_params)
        cov = np.linalg.inv(-hess[:p, :p])  # the fixed effects' block alone: GLS covariance
        var_group, var_resid = float(np.asarray(fit.cov_re)[0, 0]), float(fit.scale)
        loglik = float(fit.llf)
    if not converged:
        log.warning("random_intercept_lmm: REML fit (%d observations in %d groups) did not "
                    "converge: %s", n, n_groups, messages or "no message")
    elif messages:
        log.debug("random_intercept_lmm: statsmodels: %s", messages)
    return LmmResult(
        names=names, beta=beta, se=np.sqrt(np.diag(cov)), cov=cov,
        var_group=var_group, var_resid=var_resid, reml_loglik=loglik,
        n_obs=int(n), n_groups=int(n_groups), df=float(n - n_groups - (p - 1)),
        converged=converged, boundary=boundary,
    )
