"""Statistics used by the cohort analysis, on plain arrays (no I/O, no tables).

Every function here is checked in ``tests/test_stats.py`` against an
independent computation or a published worked example:

* :func:`describe` -- n, mean, SD, median, IQR and a t-based CI of the mean;
* :func:`paired_tests` -- paired t test and Wilcoxon signed-rank test;
* :func:`holm` -- Holm (1979) step-down adjusted p values;
* :func:`friedman` -- Friedman test over k related samples (complete cases);
* :func:`pearson_with_ci` -- Pearson r, Fisher-z CI, Spearman rho;
* :func:`williams_t`, :func:`steiger_z` -- two dependent correlations sharing
  one variable (Williams 1959 T2; Steiger 1980 eq. 15 with the pooled r);
* :func:`random_intercept_lmm` -- linear mixed model with a random intercept
  per group, fitted by REML (profiled over the variance ratio).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize
from scipy import stats as sps

NAN = math.nan


# --------------------------------------------------------------------------- descriptives


def describe(values: Any, alpha: float = 0.05) -> dict[str, float]:
    """n, mean, SD (n-1), median, quartiles (linear interpolation), min, max and
    the t-based ``1 - alpha`` CI of the mean, ignoring NaN."""
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
        sd = float(x.std(ddof=1))
        half = float(sps.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
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

    With the m finite p values sorted ascending, ``p_(i) * (m - i + 1)``, made
    monotone by a running maximum and capped at 1.
    """
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="mergesort")]
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adj
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
    with exactly 3 pairs the CI is NaN. The CI is
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
    r = float(np.clip(pr.statistic, -1.0, 1.0))
    out["r"] = r
    out["p"] = float(pr.pvalue)
    out["rho_spearman"] = float(sr.statistic)
    out["p_spearman"] = float(sr.pvalue)
    if n > 3:
        zcrit = float(sps.norm.ppf(1.0 - alpha / 2.0))
        if abs(r) >= 1.0:
            out["ci_low"] = out["ci_high"] = r
        else:
            z = math.atanh(r)
            se = 1.0 / math.sqrt(n - 3)
            out["ci_low"] = math.tanh(z - zcrit * se)
            out["ci_high"] = math.tanh(z + zcrit * se)
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


@dataclass
class LmmResult:
    """Random-intercept linear mixed model fitted by REML.

    ``y_ij = x_ij' beta + u_i + e_ij``, ``u_i ~ N(0, var_group)``,
    ``e_ij ~ N(0, var_resid)``. ``se`` from ``var_resid * (X' H^-1 X)^-1``;
    ``df`` is the between-within denominator df (``n_obs - n_groups - (p - 1)``,
    the residual df of the two-way subject x time layout for balanced data),
    used for ``p`` (t distribution); ``p_z`` is the normal (Wald z) p as in
    statsmodels' MixedLM.
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


def _reml_parts(lam: float, groups: list[tuple[np.ndarray, np.ndarray]], p: int):
    """A, b, beta, Q, sum log(1 + n_i lam) of the scaled model (V = s2 (I + lam 11'))."""
    A = np.zeros((p, p))
    bvec = np.zeros(p)
    logdet = 0.0
    for X, y in groups:
        ni = len(y)
        c = lam / (1.0 + ni * lam)
        sx = X.sum(axis=0)
        A += X.T @ X - c * np.outer(sx, sx)
        bvec += X.T @ y - c * sx * y.sum()
        logdet += math.log1p(ni * lam)
    beta = np.linalg.solve(A, bvec)
    Q = 0.0
    for X, y in groups:
        ni = len(y)
        c = lam / (1.0 + ni * lam)
        r = y - X @ beta
        Q += float(r @ r - c * r.sum() ** 2)
    return A, beta, Q, logdet


def _reml_profile(lam: float, groups, p: int, n: int) -> float:
    """Profiled REML log-likelihood at variance ratio ``lam`` (full constant included)."""
    A, _, Q, logdet = _reml_parts(lam, groups, p)
    dof = n - p
    if Q <= 0:
        return -math.inf
    sign, logdet_a = np.linalg.slogdet(A)
    if sign <= 0:
        return -math.inf
    return -0.5 * (dof * (math.log(Q / dof) + 1.0 + math.log(2 * math.pi)) + logdet + logdet_a)


def random_intercept_lmm(
    y: Any, X: Any, groups: Sequence[Any], names: Sequence[str] | None = None
) -> LmmResult:
    """Fit ``y ~ X + (1 | group)`` by REML.

    ``X`` is the fixed-effects design (n x p, intercept included by the caller);
    rows with NaN in ``y`` or ``X`` are dropped. The variance ratio
    ``lam = var_group / var_resid >= 0`` is found by a grid over log10(lam) in
    [-8, 6] followed by bounded Brent refinement, with lam = 0 (ordinary least
    squares) as a candidate; ``boundary`` is True when lam = 0 wins.
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
    ya, Xa, g = ya[keep], Xa[keep], g[keep]
    n, p = Xa.shape
    names = list(names) if names is not None else [f"x{i}" for i in range(p)]
    if np.linalg.matrix_rank(Xa) < p:
        raise ValueError("random_intercept_lmm: the fixed-effects design is rank deficient")
    labels, inv = np.unique(g.astype(str), return_inverse=True)
    n_groups = len(labels)
    if n - p < 1 or n_groups < 2:
        raise ValueError(f"random_intercept_lmm: too few observations ({n} in {n_groups} "
                         f"groups for {p} fixed effects)")
    grp = [(Xa[inv == i], ya[inv == i]) for i in range(n_groups)]

    def negll(loglam: float) -> float:
        return -_reml_profile(10.0**loglam, grp, p, n)

    grid = np.linspace(-8.0, 6.0, 57)
    vals = np.array([negll(v) for v in grid])
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    converged = True
    best_loglam, best_val = grid[i], vals[i]
    if hi > lo:
        res = optimize.minimize_scalar(negll, bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-10, "maxiter": 500})
        converged = bool(res.success)
        if res.fun <= best_val:
            best_loglam, best_val = float(res.x), float(res.fun)
    lam = 10.0**best_loglam
    ll0 = _reml_profile(0.0, grp, p, n)
    boundary = ll0 >= -best_val
    if boundary:
        lam = 0.0
    A, beta, Q, _ = _reml_parts(lam, grp, p)
    s2 = Q / (n - p)
    cov = s2 * np.linalg.inv(A)
    return LmmResult(
        names=names, beta=beta, se=np.sqrt(np.diag(cov)), cov=cov,
        var_group=lam * s2, var_resid=s2, reml_loglik=_reml_profile(lam, grp, p, n),
        n_obs=int(n), n_groups=int(n_groups), df=float(n - n_groups - (p - 1)),
        converged=converged, boundary=bool(boundary),
    )
