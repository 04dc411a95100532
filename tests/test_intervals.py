"""`selective_po.intervals`: Student's t without SciPy, the t-interval over seeds and items, Holm's adjustment,
and which interval a paired difference gets."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from selective_po.intervals import (
    difference_summary,
    holm,
    paired_bootstrap_interval,
    seed_t_interval,
    student_t_cdf,
    student_t_quantile,
)


@pytest.mark.parametrize("df, q, expected", [(1, 0.975, 12.706204736), (2, 0.975, 4.302652730), (4, 0.975, 2.776445105),
                                             (9, 0.95, 1.833112933), (30, 0.975, 2.042272456)])  # fmt: skip
def test_t_quantiles_match_the_tables(df, q, expected):
    assert student_t_quantile(q, df) == pytest.approx(expected, abs=1e-6)
    assert student_t_quantile(1 - q, df) == pytest.approx(-expected, abs=1e-6)


@pytest.mark.parametrize("t", [-7.0, -0.3, 0.0, 0.8, 3.0, 40.0])
def test_t_cdf_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-10)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-10)


def upper_tail(t: float, df: float, points: int = 200_001) -> float:
    """P(T > t) for t >= 0, by Simpson's rule in theta = atan(x / sqrt(df)), where the density becomes
    cos(theta)^(df - 1) on a bounded range: accurate far into the tail, and independent of the code under test."""

    def integral(start: float) -> float:
        theta = np.linspace(start, math.pi / 2, points)
        f = np.cos(theta) ** (df - 1)
        return (theta[1] - theta[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    return 0.5 * integral(math.atan(t / math.sqrt(df))) / integral(0.0)


@pytest.mark.parametrize("df", [1, 2.5, 5, 30])
@pytest.mark.parametrize("t", [0.5, 2.0, 50.0, 1e3, 2e4])
def test_t_cdf_holds_far_into_the_tails(df, t):
    """The p-value of a near-constant difference lies far out: relative accuracy there, not only absolute."""
    assert student_t_cdf(-t, df) == pytest.approx(upper_tail(t, df), rel=1e-6, abs=1e-300)
    assert student_t_cdf(t, df) == pytest.approx(1.0 - upper_tail(t, df), rel=1e-9)


def candidates(values):
    """The three candidate intervals as (half-width, standard error, df), from `statistics` in float64: over the seed
    means (t on S - 1), over seeds and items (Welch-Satterthwaite), and every value as one observation."""
    seeds, items = len(values), len(values[0])
    per_seed = [statistics.fmean(row) for row in values.tolist()]
    per_item = [statistics.fmean(column) for column in values.T.tolist()]
    a, b = statistics.variance(per_seed) / seeds, statistics.variance(per_item) / items
    c = statistics.variance(values.ravel().tolist()) / values.size
    df = (a + b) ** 2 / (a * a / (seeds - 1) + b * b / (items - 1))
    found = [(math.sqrt(a), seeds - 1), (math.sqrt(a + b), df), (math.sqrt(c), values.size - 1)]
    return [(student_t_quantile(0.975, d) * e, e, d) for e, d in found]


def p_of(mean: float, error: float, df: float) -> float:
    return 2 * upper_tail(abs(mean) / error, df)


@pytest.mark.parametrize("shared_items", [False, True], ids=["seeds-wider", "items-wider"])
def test_the_seed_interval_is_the_widest_candidate_and_its_p_the_largest(shared_items):
    rng = np.random.default_rng(3)
    if shared_items:  # the items differ a lot, the same way for every seed: the seed means agree closely
        values = 0.3 + 2.0 * rng.normal(size=(1, 50)) + rng.normal(0.0, 0.05, (3, 50))
    else:
        values = rng.normal(0.1, 1.0, (3, 50)) + 0.6 * rng.normal(size=(3, 1))
    low, high, p = seed_t_interval(values)
    (seed_half, *_), (both_half, *_), _ = found = candidates(values)
    assert (both_half > seed_half) == shared_items
    mean = statistics.fmean(values.ravel().tolist())
    half = max(h for h, _, _ in found)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-6)
    assert p == pytest.approx(max(p_of(mean, e, d) for _, e, d in found), rel=1e-5)
    assert 0 < p < 1 and (p < 0.05) == (low > 0 or high < 0)


def test_with_two_seeds_a_smaller_level_is_judged_on_the_heavier_tail():
    """Two seeds that agree: the seeds-and-items interval is the wider at 95%, but t on 1 degree of freedom has the
    heavier tail, so at Holm's smaller levels it is the wider one; the p-value is the larger, never the kept one's."""
    item = np.random.default_rng(0).normal(size=400)
    values = np.stack([item + 0.175 - 0.005, item + 0.175 + 0.005])
    (seed_half, seed_error, _), (both_half, both_error, df), _ = candidates(values)
    assert both_half > seed_half
    low, high, p = seed_t_interval(values)
    seed_p = 1 - 2 * math.atan(values.mean() / seed_error) / math.pi  # df = 1: the closed form
    assert p == pytest.approx(max(seed_p, p_of(values.mean(), both_error, df)), rel=1e-5)
    assert p == pytest.approx(seed_p, rel=1e-5) and p > 3 * p_of(values.mean(), both_error, df)
    assert holm([p, 0.5, 0.5])[0] > 0.05  # judged on the kept interval's p alone, it would "hold" in a family of 3


def test_values_that_vary_only_seed_by_item_still_get_an_interval():
    """Every seed mean and every item mean equal, the values not: the interval is not a point."""
    low, high, p = seed_t_interval(np.array([[1.0, 3.0], [3.0, 1.0]]))
    assert high - low > 1.0 and low < 2.0 < high and 0 < p < 1


def test_missing_values_are_refused_not_counted():
    with pytest.raises(ValueError, match="NaN"):
        seed_t_interval(np.array([[1.0, np.nan], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        difference_summary(np.array([[1.0, np.nan, 2.0]]), resamples=50)
    for family in ([np.nan, 0.01, 0.02], [0.01, 0.02, np.nan]):
        with pytest.raises(ValueError, match="NaN"):
            holm(family)


def test_three_agreeing_seeds_no_longer_look_certain():
    """Three seeds with nearly the same mean: the bootstrap over seeds and items can exclude 0 while the t-interval
    on 2 degrees of freedom cannot."""
    rng = np.random.default_rng(0)
    values = (rng.random((3, 380)) < 0.42).astype(float) - (rng.random((3, 380)) < 0.39).astype(float)
    low, high, _ = seed_t_interval(values)
    b_low, b_high = paired_bootstrap_interval(values)
    assert high - low > b_high - b_low


def test_holm_adjusts_step_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([]) == []
    rng = np.random.default_rng(1)
    for _ in range(50):  # the definition: reject the i-th smallest while p_(j) <= alpha / (m - j + 1) for all j <= i
        p = rng.random(5).tolist()
        alpha = 0.2
        order = sorted(range(5), key=lambda i: p[i])
        rejected = set()
        for rank, i in enumerate(order):
            if p[i] > alpha / (5 - rank):
                break
            rejected.add(i)
        assert {i for i, a in enumerate(holm(p)) if a <= alpha} == rejected


def test_a_difference_gets_the_t_interval_with_seeds_and_the_item_bootstrap_with_one():
    rng = np.random.default_rng(2)
    values = rng.normal(0.0, 1.0, (3, 40))
    many, one = difference_summary(values, resamples=500), difference_summary(values[:1], resamples=500)
    assert many["interval_method"] == "t over 3 seeds" and many["difference_interval"] == pytest.approx(seed_t_interval(values)[:2])
    assert many["bootstrap_interval"] == pytest.approx(paired_bootstrap_interval(values, resamples=500))
    assert one["interval_method"].startswith("bootstrap over items") and one["difference_interval"] == one["bootstrap_interval"]
    assert 0 < one["p_value"] <= 1 and 0 < many["p_value"] <= 1
    constant = np.full((2, 5), 0.25)
    assert seed_t_interval(constant) == (0.25, 0.25, 0.0) and seed_t_interval(np.zeros((2, 5))) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="seeds >= 2"):
        seed_t_interval(values[:1])
    assert json.loads(json.dumps(many))["interval_method"] == "t over 3 seeds"  # stored in compare.json as is
