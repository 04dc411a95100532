"""Selection: which completion tokens of each sequence enter the loss.

Per sequence, with `n` completion tokens and a keep share `p` (Selective-DPO's `1 - sdpo_threshold`),
`k = ceil(p * n)` tokens are asked for and every completion token whose score is at least the k-th
largest score of its sequence is kept. Ties at the boundary are all kept, so a sequence may keep
more than `k` tokens; that is what makes "reference equals policy" (every score 0) keep every token
and reduce the loss to plain DPO. A sequence with no completion tokens keeps nothing.

Scores within `SCORE_TIE_TOLERANCE` (1e-5 nats) below the k-th count as ties. Float32 log-probs of
the same model on the same tokens differ by about 1e-6 with the batch they were computed in (its
padding and size change the kernels' summation order), so a reference stored once and the same
model run live give scores of ~1e-6 instead of exact zeros; without the tolerance that noise, not
the model, would pick the tokens.

Everything is vectorized over the batch: one sort per call, no Python loop over rows, and padding
may sit on either side because only the boolean mask says which positions are real.
"""

from __future__ import annotations

import torch
from torch import Tensor

# `p * n` is computed in float64; a product that should be an integer (0.4 * 10) can land a hair
# above it (4.000000000000001) and `ceil` would then ask for one token too many. Shares are given
# with a few decimals, so a true fractional part is far larger than this slack.
_ROUNDING_SLACK = 1e-9
# Score differences below this (in nats) are float32 noise of the log-probs, not information: ties.
SCORE_TIE_TOLERANCE = 1e-5


def keep_counts(num_tokens: Tensor, keep_share: float) -> Tensor:
    """Number of tokens to ask for in each sequence, `ceil(keep_share * n)`.

    Args:
        num_tokens: Shape `(B,)`. Completion tokens per sequence.
        keep_share: Share of tokens to keep, in `[0, 1]`.

    Returns:
        Shape `(B,)`, int64, between 0 and `num_tokens`.
    """
    if not 0.0 <= keep_share <= 1.0:
        raise ValueError(f"keep_share must lie in [0, 1], got {keep_share}.")
    wanted = torch.ceil(num_tokens.double() * keep_share - _ROUNDING_SLACK).long()
    return torch.minimum(wanted.clamp(min=0), num_tokens.long())


def top_share_mask(scores: Tensor, completion_mask: Tensor, *, keep_share: float, tie_tolerance: float = 0.0) -> Tensor:
    """Keep the highest-scoring `keep_share` of each sequence's completion tokens (ties kept).

    Args:
        scores: Shape `(B, T)`. Token scores; values outside the completion mask are ignored.
        completion_mask: Shape `(B, T)`, bool. True on real completion tokens only.
        keep_share: Share of completion tokens to keep, in `[0, 1]`.
        tie_tolerance: Scores this far below the k-th largest still count as tied with it.

    Returns:
        Shape `(B, T)`, bool: True on kept tokens, always a subset of `completion_mask`.
    """
    if scores.shape != completion_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and completion_mask {tuple(completion_mask.shape)} differ.")
    completion_mask = completion_mask.bool()
    k = keep_counts(completion_mask.sum(dim=-1), keep_share)  # (B,)
    # Non-completion positions sort last, so the first n entries of a row are its completion scores.
    ranked = scores.masked_fill(~completion_mask, float("-inf")).sort(dim=-1, descending=True).values  # (B, T)
    kth_score = ranked.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))  # (B, 1)
    return completion_mask & (scores >= kth_score - tie_tolerance) & (k > 0).unsqueeze(-1)



SELECTION_RULES = ("scores", "random", "all")


def random_share_mask(completion_mask: Tensor, *, keep_share: float, generator: torch.Generator) -> Tensor:
    """Keep `ceil(keep_share * n)` completion tokens of each sequence chosen uniformly at random.

    The control for score-based selection: the same number of tokens, no information in the choice.

    Args:
        completion_mask: Shape `(B, T)`, bool.
        keep_share: Share of completion tokens to keep, in `[0, 1]`.
        generator: Seeds the draw (a CPU generator; the mask is moved to the mask's device).

    Returns:
        Shape `(B, T)`, bool.
    """
    noise = torch.rand(completion_mask.shape, generator=generator).to(completion_mask.device)  # (B, T)
    return top_share_mask(noise, completion_mask, keep_share=keep_share)


def select_tokens(
    scores: Tensor,
    completion_mask: Tensor,
    *,
    keep_share: float,
    rule: str = "scores",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep mask `(B, T)` under a selection rule: by `scores` (highest first), `random`, or `all`.

    `random` and `all` are the controls that tell whether choosing by score helped.
    """
    if rule == "scores":
        return top_share_mask(scores, completion_mask, keep_share=keep_share, tie_tolerance=SCORE_TIE_TOLERANCE)
    if rule == "random":
        if generator is None:
            raise ValueError("rule='random' needs a seeded torch.Generator.")
        return random_share_mask(completion_mask, keep_share=keep_share, generator=generator)
    if rule == "all":
        return completion_mask.bool().clone()
    raise ValueError(f"Unknown selection rule {rule!r}; expected one of {SELECTION_RULES}.")
