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
