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
    return _percentile_interval(values[generator.integers(0, values.size, size=(resamples, values.size))].mean(axis=1), confidence)


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


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), from its continued fraction (modified Lentz),
    taken on the side of `x` where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (real, > 0) degrees of freedom, through the incomplete beta function
    (no SciPy needed); accurate in the far tails too, where the p-values of near-constant differences lie."""
    if not df > 0:
        raise ValueError(f"Student's t needs df > 0, got {df}.")
    if math.isnan(t):
        raise ValueError("Student's t cdf of NaN.")
    tail = _upper_tail(abs(t), df)
    return 1.0 - tail if t > 0 else tail


def _upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0, computed directly: tiny tails keep their digits, where 1 - cdf would round them to 0."""
    return 0.5 * _incomplete_beta(df / (df + t * t), df / 2.0, 0.5) if math.isfinite(t) else 0.0


def student_t_quantile(q: float, df: float) -> float:
    """The `q` quantile of Student's t with `df` degrees of freedom (bisection on `student_t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must lie in (0, 1), got {q}.")
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < q:  # the bracket grows until it holds the quantile, however far out
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if student_t_cdf(middle, df) < q else (low, middle)
    return (low + high) / 2


def _reject_nan(values: np.ndarray, what: str) -> None:
    if np.isnan(values).any():
        raise ValueError(f"{what} contains NaN: pair only the items both sides measured, and leave the rest out.")


def seed_t_interval(values, *, confidence: float = 0.95) -> tuple[float, float, float]:
    """The interval of the mean of `values` `(S, N)` over seeds and items, and its two-sided p-value against 0.

    Three t-intervals, the widest one kept:

    - over seeds: the S per-seed means as S observations, Student's t on S - 1 degrees of freedom (the held-out
      items taken as fixed: they are the same for every seed);
    - over seeds and items: standard error `sqrt(s^2 / S + v / N)`, `s^2` the per-seed means' variance and `v`
      the per-item means' (over seeds), on Welch-Satterthwaite's degrees of freedom;
    - every (seed, item) value as one observation, on S N - 1 degrees of freedom: the floor when the seeds' and
      the items' means happen to agree while the values themselves vary.

    The first never lets three agreeing seeds look certain; the second adds how the mean would move on other
    items. The p-value is the largest of the three, so that it lies below 1 - `confidence` exactly when the
    interval kept excludes 0, and a smaller level (Holm's) is judged as conservatively as this one. Needs S >= 2.
    Returns `(low, high, p)`.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"A t-interval over seeds needs values of shape (seeds >= 2, items), got {values.shape}.")
    _reject_nan(values, "The paired differences")
    seeds, items = values.shape
    mean = float(values.mean())
    between = values.mean(axis=1).var(ddof=1) / seeds  # (the per-seed means' standard error)^2
    within = values.mean(axis=0).var(ddof=1) / items if items > 1 else 0.0
    candidates = [(math.sqrt(between), seeds - 1.0), (math.sqrt(values.var(ddof=1) / values.size), values.size - 1.0)]
    if within > 0.0:
        df = (between + within) ** 2 / (between**2 / (seeds - 1) + within**2 / (items - 1))
        candidates.append((math.sqrt(between + within), df))
    quantile = 1.0 - (1.0 - confidence) / 2
    half = max(student_t_quantile(quantile, df) * error for error, df in candidates)
    if half == 0.0:  # every value equal
        return mean, mean, 1.0 if mean == 0.0 else 0.0
    p = max(2.0 * _upper_tail(abs(mean) / error, df) if error > 0.0 else float(mean == 0.0) for error, df in candidates)
    return mean - half, mean + half, min(1.0, max(p, 0.0))


def bootstrap_p_value(values, *, resamples: int = 4000, seed: int = 0) -> float:
    """Two-sided p-value of "the mean of `values` `(S, N)` is 0" from the same paired bootstrap as
    `paired_bootstrap_interval`: twice the share of resampled means on the far side of 0, at least 1/resamples."""
    return _two_sided_p(_paired_bootstrap_means(np.asarray(values, dtype=np.float64), resamples=resamples, seed=seed))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values of one family of tests (in the order given): a test is rejected at level
    alpha when its adjusted p-value is at most alpha, which controls the family-wise error rate."""
    _reject_nan(np.asarray(p_values, dtype=np.float64), "The family of p-values")
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
    _reject_nan(difference, "The paired differences")
    means = _paired_bootstrap_means(difference, resamples=resamples, seed=0)  # one draw for the interval and the p-value
    bootstrap = _percentile_interval(means, 0.95)
    cell = {"difference": float(difference.mean()), "bootstrap_interval": bootstrap}
    if difference.shape[0] >= 2:
        low, high, p = seed_t_interval(difference)
        cell.update(difference_interval=(low, high), p_value=p, interval_method=f"t over {difference.shape[0]} seeds")
    else:
        cell.update(difference_interval=bootstrap, p_value=_two_sided_p(means), interval_method="bootstrap over items, 1 seed")
    return cell
