"""Statistics of a multi-seed comparison: a mean with its t confidence interval, paired t-tests.

Both follow the textbook formulas with scipy's distributions:

- confidence interval of a mean over n runs:
  ``mean +- t_{(1+c)/2, n-1} * sd / sqrt(n)`` with the sample standard deviation ``sd``
  (ddof = 1) and the Student t quantile ``scipy.stats.t.ppf``;
- paired t-test over the same seeds: ``scipy.stats.ttest_rel(a, b)``, i.e. a one-sample t-test
  of the differences ``d = a - b``: ``t = mean(d) / (sd(d) / sqrt(n))`` with n - 1 degrees of
  freedom, two-sided.

Degenerate inputs do not raise: with n = 1 there is no spread to estimate, so the interval, t
and p are NaN; with zero spread (all values, or all paired differences, equal) the interval
collapses to the mean and the t statistic is undefined (0/0) or infinite, so t and p are
reported as NaN with a note saying why. Empty or non-finite input is a ValueError.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
from scipy import stats as sps

__all__ = [
    "EffectSize",
    "MeanCI",
    "PairedTest",
    "adjust_p_values",
    "mean_ci",
    "paired_effect_size",
    "paired_power",
    "paired_ttest",
    "seeds_for_power",
]


class MeanCI(NamedTuple):
    """Mean of n values with a two-sided confidence interval (NaN bounds when n = 1)."""

    mean: float
    low: float
    high: float
    half_width: float
    sd: float
    n: int
    confidence: float


class PairedTest(NamedTuple):
    """Paired t-test of ``a`` against ``b`` (differences ``a - b``), two-sided."""

    n: int
    mean_diff: float
    ci_low: float  # confidence interval of the mean difference
    ci_high: float
    t: float  # NaN when undefined (n < 2, or all differences equal)
    p: float
    df: int
    alpha: float
    note: str  # why t/p are NaN, else ""

    @property
    def significant(self) -> bool:
        """p < alpha (False when the test is undefined)."""
        return bool(np.isfinite(self.p) and self.p < self.alpha)


def _as_values(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{name} must be finite, got {x.tolist()} (filter NaN/inf values, e.g. "
            "diverged runs' losses, before computing statistics)"
        )
    return x


def _check_level(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} = {value!r}: must be in (0, 1)")


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean and t confidence interval ``mean +- t_{(1+c)/2, n-1} sd/sqrt(n)`` (sd with ddof=1).

    n = 1: the bounds, half-width and sd are NaN. Zero spread: the interval is [mean, mean].
    """
    _check_level(confidence, "confidence")
    x = _as_values(values, "values")
    n = x.size
    mean = float(x.mean())
    if n < 2:
        return MeanCI(mean, math.nan, math.nan, math.nan, math.nan, n, confidence)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, half, sd, n, confidence)


def paired_ttest(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> PairedTest:
    """Two-sided paired t-test of ``a`` vs ``b`` (``scipy.stats.ttest_rel``) and the
    (1 - alpha) confidence interval of the mean difference ``mean(a - b)``.

    ``a[i]`` and ``b[i]`` must come from the same seed. n < 2 or all differences equal: t and p
    are NaN and ``note`` says why (the difference's interval still follows :func:`mean_ci`).
    """
    _check_level(alpha, "alpha")
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    diff = mean_ci(x - y, confidence=1.0 - alpha)
    n = x.size
    if n < 2:
        return PairedTest(
            n, diff.mean, diff.low, diff.high, math.nan, math.nan, 0, alpha, "n/a: one pair only"
        )
    if np.all(x - y == (x - y)[0]):
        return PairedTest(
            n,
            diff.mean,
            diff.low,
            diff.high,
            math.nan,
            math.nan,
            n - 1,
            alpha,
            "n/a: all paired differences are equal",
        )
    result = sps.ttest_rel(x, y)
    # scipy's own interval of the mean difference (the same numbers as mean_ci of x - y)
    ci = result.confidence_interval(confidence_level=1.0 - alpha)
    return PairedTest(
        n,
        diff.mean,
        float(ci.low),
        float(ci.high),
        float(result.statistic),
        float(result.pvalue),
        int(result.df),
        alpha,
        "",
    )


class EffectSize(NamedTuple):
    """Standardised paired effect ``d_z = mean(d) / sd(d)`` with its confidence interval."""

    d: float
    low: float
    high: float
    n: int
    confidence: float


def paired_effect_size(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> EffectSize:
    """Cohen's d_z of the paired differences ``a - b``, with the exact interval obtained by
    inverting the noncentral t distribution: ``t = d_z sqrt(n)`` follows
    ``nct(df = n - 1, nc = delta sqrt(n))``, and the bounds are the deltas at which the
    observed t sits at the (1 +- c) / 2 quantiles (Steiger & Fouladi 1997). NaN when n < 2 or
    all differences are equal (no spread: d_z is undefined)."""
    from scipy.optimize import brentq

    _check_level(confidence, "confidence")
    x, y = _as_values(a, "a"), _as_values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    diff, n = x - y, x.size
    if n < 2 or np.all(diff == diff[0]):
        return EffectSize(math.nan, math.nan, math.nan, n, confidence)
    d = float(diff.mean() / diff.std(ddof=1))
    t_obs, df, root_n = d * math.sqrt(n), n - 1, math.sqrt(n)

    def bound(quantile: float) -> float:
        def f(delta: float) -> float:  # falls as delta grows
            value = float(sps.nct.cdf(t_obs, df, delta * root_n))
            if math.isnan(value):  # scipy's cdf fails at some (t, df, nc); its sf may not
                value = 1.0 - float(sps.nct.sf(t_obs, df, delta * root_n))
            return value - quantile

        # bracket within a few standard errors of d: far out, scipy's nct.cdf returns NaN
        step = 4.0 * math.sqrt(1.0 / n + d * d / (2.0 * n))
        lo, hi = d - step, d + step
        while f(lo) < 0:
            lo -= step
        while f(hi) > 0:
            hi += step
        try:
            return float(brentq(f, lo, hi))
        except ValueError:  # the distribution could not be evaluated in the bracket
            return math.nan

    tail = (1.0 - confidence) / 2
    return EffectSize(d, bound(1.0 - tail), bound(tail), n, confidence)


def paired_power(d: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with n pairs at true effect d_z (noncentral t)."""
    if n < 2:
        return math.nan
    df, nc = n - 1, d * math.sqrt(n)
    crit = float(sps.t.ppf(1.0 - alpha / 2, df))
    return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


def seeds_for_power(
    d: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 100_000
) -> int | None:
    """Smallest number of seeds (pairs) at which the paired t-test detects a true effect d_z
    with the given power; None when d is 0 or NaN, or more than ``max_n`` would be needed."""
    _check_level(alpha, "alpha")
    _check_level(power, "power")
    if not math.isfinite(d) or d == 0:
        return None
    # the normal approximation n ~ ((z_{1-alpha/2} + z_power) / d)^2 is a slight underestimate
    # for the t-test: start a little below it and walk up with the exact noncentral-t power
    z = float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power))
    guess = (z / abs(d)) ** 2
    if guess > max_n:
        return None
    n = max(2, int(guess) - 2)
    while n <= max_n:
        if paired_power(d, n, alpha) >= power:
            return n
        n += 1
    return None


def adjust_p_values(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (``scipy.stats.false_discovery_control``) over
    the finite entries; NaN entries (undefined tests) stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = sps.false_discovery_control(p[finite], method="bh")
    return out.tolist()
