"""train.stats on fixed numbers: hand formulas with tabulated t quantiles, and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from hacbo_jax.experiments.stats import mean_ci, paired_ttest

# Student t quantiles from printed tables: t_{0.975, 4} and t_{0.975, 2}.
T_975_DF4 = 2.776445105
T_975_DF2 = 4.302652730


def test_mean_ci_matches_the_hand_formula():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd = sqrt(10 / 4), half width = t * sd / sqrt(5)
    half = T_975_DF4 * math.sqrt(2.5) / math.sqrt(5)
    assert ci.n == 5 and ci.mean == pytest.approx(3.0)
    assert ci.sd == pytest.approx(math.sqrt(2.5))
    assert ci.half_width == pytest.approx(half, rel=1e-8)
    assert (ci.low, ci.high) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-8)


def test_mean_ci_other_level_and_uneven_values():
    values = [31.5, 28.0, 35.0]
    ci = mean_ci(values, confidence=0.95)
    sd = np.std(values, ddof=1)
    assert ci.half_width == pytest.approx(T_975_DF2 * sd / math.sqrt(3), rel=1e-8)
    ci90 = mean_ci(values, confidence=0.90)
    assert ci90.half_width == pytest.approx(sps.t.ppf(0.95, 2) * sd / math.sqrt(3))
    assert ci90.half_width < ci.half_width


def test_mean_ci_degenerate_inputs():
    one = mean_ci([0.42])
    assert one.mean == 0.42 and one.n == 1
    assert all(math.isnan(v) for v in (one.low, one.high, one.half_width, one.sd))
    flat = mean_ci([30.0, 30.0, 30.0])
    assert (flat.low, flat.mean, flat.high, flat.half_width) == (30.0, 30.0, 30.0, 0.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, float("inf")]])
def test_mean_ci_rejects_empty_and_non_finite(bad):
    with pytest.raises(ValueError, match="values"):
        mean_ci(bad)


def test_mean_ci_rejects_bad_confidence():
    with pytest.raises(ValueError, match="confidence = 1.5"):
        mean_ci([1.0, 2.0], confidence=1.5)


def test_paired_ttest_matches_scipy_and_hand_formula():
    a = [34.0, 31.5, 36.0, 29.0, 33.5]
    b = [30.0, 31.0, 33.0, 27.5, 30.5]
    test = paired_ttest(a, b)
    reference = sps.ttest_rel(a, b)
    assert test.t == pytest.approx(float(reference.statistic))
    assert test.p == pytest.approx(float(reference.pvalue))
    assert test.df == 4 and test.n == 5
    d = np.subtract(a, b)  # [4, 0.5, 3, 1.5, 3]
    t_hand = d.mean() / (d.std(ddof=1) / math.sqrt(5))
    assert test.t == pytest.approx(t_hand)
    assert test.mean_diff == pytest.approx(2.4)
    half = T_975_DF4 * d.std(ddof=1) / math.sqrt(5)
    assert (test.ci_low, test.ci_high) == pytest.approx((2.4 - half, 2.4 + half), rel=1e-8)
    assert test.significant == (reference.pvalue < 0.05)
    assert test.note == ""


def test_paired_ttest_not_significant_case():
    a, b = [30.0, 32.0, 29.0], [31.0, 30.0, 29.5]
    test = paired_ttest(a, b)
    assert test.p == pytest.approx(float(sps.ttest_rel(a, b).pvalue))
    assert test.p > 0.05 and not test.significant


def test_paired_ttest_degenerate_inputs():
    same = paired_ttest([30.0, 31.0, 32.0], [30.0, 31.0, 32.0])
    assert math.isnan(same.t) and math.isnan(same.p) and not same.significant
    assert "equal" in same.note and same.mean_diff == 0.0
    shifted = paired_ttest([31.0, 32.0, 33.0], [30.0, 31.0, 32.0])
    assert math.isnan(shifted.t) and shifted.mean_diff == pytest.approx(1.0)
    assert (shifted.ci_low, shifted.ci_high) == (1.0, 1.0)
    single = paired_ttest([31.0], [30.0])
    assert math.isnan(single.p) and "one pair" in single.note


def test_paired_ttest_rejects_unequal_lengths():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ttest([1.0, 2.0], [1.0])


def _run_with_log(tmp_path, rows):
    from hacbo_jax.experiments import report as report_lib

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return report_lib.load_run(tmp_path)


def test_controlled_fraction_counts_probation_that_left_at_its_own_measurement(tmp_path):
    """HACBO logs ``probation_steps`` (updates applied in probation, cumulative): each logging
    window's share comes from its increments, so one update in probation that left at once (the
    logged ``probation`` state never shows it) still counts. Blocks of 30 and 10 parameters."""
    from hacbo_jax.experiments.compare.stats import controlled_fraction

    def row(step, counts):
        return {
            "step": step,
            "controller": {"kind": "hacbo", "probation": [False, False], "probation_steps": counts},
        }

    run = _run_with_log(tmp_path, [row(5, [0, 0]), row(10, [1, 0]), row(20, [1, 10])])
    steps, fraction = controlled_fraction(run, np.array([30.0, 10.0]))
    np.testing.assert_array_equal(steps, [5, 10, 20])
    # windows (0,5], (5,10], (10,20]: block 0 1 of 5 updates in the second; block 1 all of the third
    np.testing.assert_allclose(fraction, [0.0, (30 * 0.2) / 40, (10 * 1.0) / 40])
