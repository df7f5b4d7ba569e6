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

__all__ = ["MeanCI", "PairedTest", "mean_ci", "paired_ttest"]


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
    return PairedTest(
        n,
        diff.mean,
        diff.low,
        diff.high,
        float(result.statistic),
        float(result.pvalue),
        int(result.df),
        alpha,
        "",
    )
