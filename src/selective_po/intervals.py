"""Intervals and tests for means over pairs, prompts or responses, and over training seeds.

A paired difference between two methods is a `(S, N)` array: S training seeds by N held-out items.
With 2 or more seeds its interval is a t-interval (`seed_t_interval`): over the per-seed means, or,
where wider, over seeds and items together. A bootstrap that resamples 3 seeds has only 10 distinct
draws and understates the seed-to-seed spread.
With one seed only the items can be resampled (`paired_bootstrap_interval`). `holm` adjusts a family
of p-values for multiplicity.
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_interval(
    values, *, confidence: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` `(N,)` (resampling its entries).

    For a paired change, pass the per-pair differences: the pairs are resampled together.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    generator = np.random.default_rng(seed)
    means = values[generator.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap_interval(
    values, *, confidence: float = 0.95, resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` `(S, N)`: S seeds (runs) by N items (pairs or
    prompts), resampling seeds and items, each with replacement, and the same items for every seed.

    For a paired difference between two methods, pass the per-seed, per-item differences. With one
    seed this is `bootstrap_interval` over the items.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be (seeds, items), got shape {values.shape}.")
    if values.size == 0:
        return float("nan"), float("nan")
    return _percentile_interval(_paired_bootstrap_means(values, resamples=resamples, seed=seed), confidence)


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _two_sided_p(means: np.ndarray) -> float:
    """Twice the share of resampled means on the far side of 0, at least 1 / resamples."""
    tail = min((means <= 0).mean(), (means >= 0).mean())
    return float(min(1.0, max(2.0 * tail, 1.0 / means.size)))


def _paired_bootstrap_means(values: np.ndarray, *, resamples: int, seed: int) -> np.ndarray:
    """`(resamples,)` means of `values` `(S, N)`, seeds and items each drawn with replacement, the same items for every seed."""
    seeds, items = values.shape
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # chunks keep the (chunk, S, N) gather small
        n = min(500, resamples - start)
        seed_draw = generator.integers(0, seeds, size=(n, seeds))
        item_draw = generator.integers(0, items, size=(n, items))
        means[start : start + n] = values[seed_draw[:, :, None], item_draw[:, None, :]].mean(axis=(1, 2))
    return means


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (real, > 0) degrees of freedom (Simpson's rule on the density; no SciPy needed)."""
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0, got {df}.")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    x = np.linspace(0.0, abs(t), 20001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0]
    half = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    return float(0.5 + math.copysign(min(half, 0.5), t))


def student_t_quantile(q: float, df: float) -> float:
    """The `q` quantile of Student's t with `df` degrees of freedom (bisection on `student_t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q}.")
    low, high = -1e4, 1e4
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, df) < q else (low, middle)
    return (low + high) / 2


def seed_t_interval(values, *, confidence: float = 0.95) -> tuple[float, float, float]:
    """The interval of the mean of `values` `(S, N)` over seeds and items, and its two-sided p-value against 0.

    Two t-intervals, the wider one kept:

    - over seeds: the S per-seed means as S observations, Student's t on S - 1 degrees of freedom (the held-out
      items taken as fixed: they are the same for every seed);
    - over seeds and items: standard error `sqrt(s^2 / S + v / N)`, `s^2` the per-seed means' variance and `v`
      the per-item values' (averaged over seeds), on Welch-Satterthwaite's degrees of freedom.

    The first never lets three agreeing seeds look certain; the second adds how the mean would move on other
    items. Needs S >= 2. Returns `(low, high, p)`, the p-value of the interval kept.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"A t-interval over seeds needs values of shape (seeds >= 2, items), got {values.shape}.")
    seeds, items = values.shape
    mean = float(values.mean())
    between = values.mean(axis=1).var(ddof=1) / seeds  # (the per-seed means' standard error)^2
    within = values.mean(axis=0).var(ddof=1) / items if items > 1 else 0.0
    candidates = [(math.sqrt(between), seeds - 1.0)]
    if within > 0.0:
        df = (between + within) ** 2 / (between**2 / (seeds - 1) + within**2 / (items - 1))
        candidates.append((math.sqrt(between + within), df))
    quantile = 1.0 - (1.0 - confidence) / 2
    half, error, df = max((student_t_quantile(quantile, df) * error, error, df) for error, df in candidates)
    if error == 0.0:
        return mean, mean, 1.0 if mean == 0.0 else 0.0
    p = 2.0 * (1.0 - student_t_cdf(abs(mean) / error, df))
    return mean - half, mean + half, min(1.0, max(p, 0.0))


def bootstrap_p_value(values, *, resamples: int = 4000, seed: int = 0) -> float:
    """Two-sided p-value of "the mean of `values` `(S, N)` is 0" from the same paired bootstrap as
    `paired_bootstrap_interval`: twice the share of resampled means on the far side of 0, at least 1/resamples."""
    return _two_sided_p(_paired_bootstrap_means(np.asarray(values, dtype=np.float64), resamples=resamples, seed=seed))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values of one family of tests (in the order given): a test is rejected at level
    alpha when its adjusted p-value is at most alpha, which controls the family-wise error rate."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def difference_summary(difference, *, resamples: int = 4000) -> dict:
    """A paired difference `(S, N)` (seeds by items): its mean, 95% interval, two-sided p-value and how they were
    computed. With 2 or more seeds, a t-interval (`seed_t_interval`); with one, the
    bootstrap over the items (which says nothing of the training seed). `bootstrap_interval` is the paired
    bootstrap over seeds and items in both cases, for comparison."""
    difference = np.asarray(difference, dtype=np.float64)
    means = _paired_bootstrap_means(difference, resamples=resamples, seed=0)  # one draw for the interval and the p-value
    bootstrap = _percentile_interval(means, 0.95)
    cell = {"difference": float(difference.mean()), "bootstrap_interval": bootstrap}
    if difference.shape[0] >= 2:
        low, high, p = seed_t_interval(difference)
        cell.update(difference_interval=(low, high), p_value=p, interval_method=f"t over {difference.shape[0]} seeds")
    else:
        cell.update(difference_interval=bootstrap, p_value=_two_sided_p(means), interval_method="bootstrap over items, 1 seed")
    return cell
