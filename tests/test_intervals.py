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


def seed_and_item_intervals(values):
    """The two candidate half-widths, from `statistics` in float64: over the seed means (t on S - 1) and over seeds
    and items (Welch-Satterthwaite)."""
    seeds, items = len(values), len(values[0])
    per_seed = [statistics.fmean(row) for row in values.tolist()]
    per_item = [statistics.fmean(column) for column in values.T.tolist()]
    a, b = statistics.variance(per_seed) / seeds, statistics.variance(per_item) / items
    df = (a + b) ** 2 / (a * a / (seeds - 1) + b * b / (items - 1))
    return (student_t_quantile(0.975, seeds - 1) * math.sqrt(a), seeds - 1), (student_t_quantile(0.975, df) * math.sqrt(a + b), df)


@pytest.mark.parametrize("shared_items", [False, True], ids=["seeds-wider", "items-wider"])
def test_the_seed_interval_is_the_wider_of_the_seed_means_and_the_seeds_and_items(shared_items):
    rng = np.random.default_rng(3)
    if shared_items:  # the items differ a lot, the same way for every seed: the seed means agree closely
        values = 0.3 + 2.0 * rng.normal(size=(1, 50)) + rng.normal(0.0, 0.05, (3, 50))
    else:
        values = rng.normal(0.1, 1.0, (3, 50)) + 0.6 * rng.normal(size=(3, 1))
    low, high, p = seed_t_interval(values)
    (seed_half, _), (both_half, _) = seed_and_item_intervals(values)
    assert (both_half > seed_half) == shared_items
    mean = statistics.fmean(values.ravel().tolist())
    half = max(seed_half, both_half)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-6)
    assert 0 < p < 1 and (p < 0.05) == (low > 0 or high < 0)


def test_with_two_seeds_the_p_value_is_students():
    values = np.array([[0.3, 0.1, 0.2, 0.6], [0.2, 0.25, 0.1, 0.05]])
    low, high, p = seed_t_interval(values)
    (seed_half, _), (both_half, df) = seed_and_item_intervals(values)
    error = (high - low) / 2 / (student_t_quantile(0.975, 1) if seed_half >= both_half else student_t_quantile(0.975, df))
    t = values.mean() / error
    expected = 1 - 2 * math.atan(abs(t)) / math.pi if seed_half >= both_half else 2 * (1 - student_t_cdf(abs(t), df))
    assert p == pytest.approx(expected, abs=1e-9)


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
