"""Does a scorer pick the tokens that carry the preference? Threshold-free checks against known spans.

Token scores (Selective-DPO's reference gap, SePO's oracle rewards, ...) -> per-response measures
against a boolean `in_span` flag per response token (the bundled arithmetic pairs know which
characters differ between chosen and rejected) -> a mean over responses with a bootstrap interval,
beside what random scores would give on the same responses.

Per response, with `n` tokens, `s` of them in the span:

- **AUROC**: the chance that a random span token outscores a random other token of the same
  response, ties counting half (scores within `SCORE_TIE_TOLERANCE` are ties, as in selection).
  Within a response, because selection ranks within a response. All-equal scores give exactly 0.5;
  random: 0.5. Responses whose tokens are all in the span, or none, have no AUROC and are skipped.
- **top-1**: whether the highest-scoring token is in the span; with `m` tokens tied at the top, the
  share of them in the span (what a random tie-break gives on average). Random: `s / n`.
- **recall at the kept share**: the share of span tokens among the `k = ceil(p * n)` kept, ties at
  the boundary broken at random in expectation (so all-equal scores give `k / n`, not 1). Random: `k / n`.

Scores are larger-is-kept: pass rejected-side scores with the sign the selection rule uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .intervals import bootstrap_interval
from .selection import SCORE_TIE_TOLERANCE, keep_counts

SIDES = ("chosen", "rejected")


def response_auroc(scores: np.ndarray, in_span: np.ndarray, *, tie_tolerance: float = SCORE_TIE_TOLERANCE) -> float:
    """AUROC of `scores` `(n,)` for `in_span` `(n,)` bool within one response; NaN if undefined."""
    scores, in_span = np.asarray(scores, dtype=np.float64), np.asarray(in_span, dtype=bool)
    positive, negative = scores[in_span], scores[~in_span]
    if positive.size == 0 or negative.size == 0:
        return float("nan")
    difference = positive[:, None] - negative[None, :]  # (s, n - s)
    wins = (difference > tie_tolerance).sum() + 0.5 * (np.abs(difference) <= tie_tolerance).sum()
    return float(wins / difference.size)


def _tie_band(scores: np.ndarray, k: int, tie_tolerance: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Tokens surely kept, tokens tied at the k-th score, and the chance each tied one is kept."""
    kth = np.sort(scores)[::-1][k - 1]
    above = scores > kth + tie_tolerance
    tied = np.abs(scores - kth) <= tie_tolerance
    return above, tied, (k - above.sum()) / tied.sum()


def response_top1(scores: np.ndarray, in_span: np.ndarray, *, tie_tolerance: float = SCORE_TIE_TOLERANCE) -> float:
    """Expected in-span indicator of the top-scoring token of one response (ties share it)."""
    scores, in_span = np.asarray(scores, dtype=np.float64), np.asarray(in_span, dtype=bool)
    if scores.size == 0:
        return float("nan")
    _, tied, _ = _tie_band(scores, 1, tie_tolerance)
    return float(in_span[tied].mean())


def response_recall_at_share(
    scores: np.ndarray, in_span: np.ndarray, *, keep_share: float, tie_tolerance: float = SCORE_TIE_TOLERANCE
) -> float:
    """Expected share of the span's tokens among the `ceil(keep_share * n)` kept; NaN if no span token."""
    scores, in_span = np.asarray(scores, dtype=np.float64), np.asarray(in_span, dtype=bool)
    if not in_span.any():
        return float("nan")
    k = int(keep_counts(torch.tensor([scores.size]), keep_share)[0])
    if k == 0:
        return 0.0
    above, tied, chance = _tie_band(scores, k, tie_tolerance)
    return float(((in_span & above).sum() + chance * (in_span & tied).sum()) / in_span.sum())


def _mean_and_interval(values: list[float], seed: int) -> tuple[float, float, float, int]:
    defined = np.array([v for v in values if not np.isnan(v)], dtype=np.float64)
    if defined.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    low, high = bootstrap_interval(defined, seed=seed)
    return float(defined.mean()), low, high, int(defined.size)


def span_selection_quality(
    responses: dict[str, Sequence[tuple[np.ndarray, np.ndarray]]], *, keep_share: float, seed: int = 0
) -> dict[str, float]:
    """Threshold-free selection quality per side, with 95% bootstrap intervals over responses.

    Args:
        responses: For `"chosen"` and `"rejected"`, one `(scores, in_span)` per response, each `(n,)`.
        keep_share: The share of tokens selection keeps (`1 - sdpo_threshold`), for recall at k.

    Returns:
        For each side and measure (`span_auroc`, `span_top1`, `span_recall_at_k`): the mean as
        `<measure>_<side>`, its interval as `..._low` / `..._high`, the random scorer's value as
        `..._random`, and the responses it is defined on as `..._responses`.
    """
    results: dict[str, float] = {}
    for side in SIDES:
        pairs = responses[side]
        measures = {
            "span_auroc": ([response_auroc(s, m) for s, m in pairs], [0.5 if 0 < np.sum(m) < len(m) else np.nan for _, m in pairs]),
            "span_top1": ([response_top1(s, m) for s, m in pairs], [np.mean(m) if len(m) else np.nan for _, m in pairs]),
            "span_recall_at_k": (
                [response_recall_at_share(s, m, keep_share=keep_share) for s, m in pairs],
                [response_recall_at_share(np.zeros(len(m)), m, keep_share=keep_share) for _, m in pairs],
            ),
        }
        for name, (values, random_values) in measures.items():
            key = f"{name}_{side}"
            mean, low, high, count = _mean_and_interval(values, seed)
            results |= {key: mean, f"{key}_low": low, f"{key}_high": high, f"{key}_responses": count}
            results[f"{key}_random"] = _mean_and_interval(random_values, seed)[0]
    return results
