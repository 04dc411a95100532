"""Bootstrap intervals for means over pairs, prompts or responses."""

from __future__ import annotations

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
    seeds, items = values.shape
    generator = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 500):  # chunks keep the (chunk, S, N) gather small
        n = min(500, resamples - start)
        seed_draw = generator.integers(0, seeds, size=(n, seeds))
        item_draw = generator.integers(0, items, size=(n, items))
        means[start : start + n] = values[seed_draw[:, :, None], item_draw[:, None, :]].mean(axis=(1, 2))
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
