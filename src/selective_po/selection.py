"""Selection: which completion tokens of each sequence enter the loss.

Per sequence, with `n` completion tokens and a keep share `p` (Selective-DPO's `1 - sdpo_threshold`),
`k = ceil(p * n)` tokens are asked for and every completion token whose score is at least the k-th
largest score of its sequence is kept. Ties at the boundary are all kept, so a sequence may keep
more than `k` tokens; that is what makes "reference equals policy" (every score 0) keep every token
and reduce the loss to plain DPO. A sequence with no completion tokens keeps nothing.

Scores less than a tie tolerance below the k-th count as ties, and the tolerance follows the dtype
the log-probs were computed in (`TIE_TOLERANCES`). The same weights on the same tokens give other
log-probs with the batch they run in (its padding, size and packing change the kernels' summation
order); `benchmarks/noise_floor.py` measured the largest such difference on the bundled model at
4.2e-5 nats in float32, 0.053 in float16 and 0.47 in bfloat16 (`docs/results/noise_floor.md`).
The tolerance is at least twice that floor. Then, if every score is within the floor of its exact
value, every token the exact scores keep is kept, and a token is dropped only when at least k tokens
of its response outscore it by more than the floor: noise never decides a drop. A stored reference
and the same model run live (the first step with the default reference) keep every token in every
dtype. The price is in bf16: tokens within 1 nat below the cut are all kept, so a response keeps more
than its share wherever its scores are that close (logged as `selection/tied_share_*`).

Everything is vectorized over the batch: one sort per call, no Python loop over rows, and padding
may sit on either side because only the boolean mask says which positions are real.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

# `p * n` is computed in float64; a product that should be an integer (0.4 * 10) can land a hair
# above it (4.000000000000001) and `ceil` would then ask for one token too many. Shares are given
# with a few decimals, so a true fractional part is far larger than this slack.
_ROUNDING_SLACK = 1e-9
# Score differences below this (in nats) are float32 noise of the log-probs, not information: ties.
# At least twice the float32 floor measured by benchmarks/noise_floor.py (4.2e-5), rounded up.
SCORE_TIE_TOLERANCE = 9e-5
# Per dtype the log-probs were computed in (`score_tie_tolerance`): at least twice each measured floor
# (float16 0.053, bfloat16 0.47 nats; float64 is held to float32's).
TIE_TOLERANCES = {torch.float32: SCORE_TIE_TOLERANCE, torch.float64: SCORE_TIE_TOLERANCE, torch.float16: 0.15, torch.bfloat16: 1.0}
# The same for probabilities (ConfPO's `1 - p` scores): float32 noise of `exp(logp)` is far below this.
CONFIDENCE_TIE_TOLERANCE = 1e-6


def score_tie_tolerance(dtype: torch.dtype) -> float:
    """The tie tolerance (nats) for scores from log-probs computed in `dtype` (`TIE_TOLERANCES`)."""
    if dtype not in TIE_TOLERANCES:
        raise ValueError(f"No tie tolerance is known for log-probs computed in {dtype}; set score_tie_tolerance.")
    return TIE_TOLERANCES[dtype]


def compute_dtypes(model, args) -> set[torch.dtype]:
    """The dtypes a trainer's log-probs are computed in: the weights' floating dtype and any autocast."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point} or {torch.float32}
    if getattr(args, "bf16", False):
        dtypes.add(torch.bfloat16)
    if getattr(args, "fp16", False):
        dtypes.add(torch.float16)
    return dtypes


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



SELECTION_RULES = ("scores", "random", "all", "confidence", "spans", "scorer")
# How many tokens `scores` keeps: `ceil` (the module docstring) or `quantile` (the official Selective-DPO code).
COUNT_RULES = ("ceil", "quantile")


def quantile_mask(scores: Tensor, completion_mask: Tensor, *, quantile: float, tie_tolerance: float = 0.0) -> Tensor:
    """Keep each sequence's completion tokens scoring at or above its `quantile` of scores.

    The official Selective-DPO code's count: `torch.quantile` with linear interpolation, per sequence,
    over the real tokens only. With `n` tokens and no ties it keeps `n - ceil(quantile * (n - 1))`,
    which is one token fewer than `ceil((1 - quantile) * n)` exactly when `frac(quantile * n) > quantile`.

    Args:
        scores: Shape `(B, T)`; computed on in float32 (bf16 scores are upcast, not rejected).
        completion_mask: Shape `(B, T)`, bool. Only these positions are ranked (a real token whose
            score happens to be 0 is a token, not padding).
        quantile: In `[0, 1)`; 0 keeps every token.
        tie_tolerance: Scores this far below the quantile still count as reaching it.

    Returns:
        Shape `(B, T)`, bool, a subset of `completion_mask`; empty for a sequence with no tokens.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must lie in [0, 1), got {quantile}.")
    completion_mask = completion_mask.bool()
    scores = scores.float()
    n = completion_mask.sum(dim=-1)  # (B,)
    ranked = scores.masked_fill(~completion_mask, float("inf")).sort(dim=-1).values  # (B, T) ascending, padding last
    position = quantile * (n - 1).clamp(min=0).double()  # (B,)
    below, above = position.floor().long(), position.ceil().long()
    low, high = ranked.gather(-1, below.unsqueeze(-1)), ranked.gather(-1, above.unsqueeze(-1))  # (B, 1)
    weight = (position - below).float().unsqueeze(-1)
    cut = torch.where(weight > 0, torch.lerp(low, high, weight), low)  # torch.quantile's `linear`
    return completion_mask & (scores >= cut - tie_tolerance) & (n > 0).unsqueeze(-1)


def above_mean_mask(scores: Tensor, completion_mask: Tensor, *, tie_tolerance: float = 0.0) -> Tensor:
    """Keep each sequence's completion tokens that score above the sequence's mean score.

    With ConfPO's scores `1 - p` (`scoring.confidence_token_scores`) these are the tokens whose
    probability is below the response's mean token probability.

    Args:
        scores: Shape `(B, T)`.
        completion_mask: Shape `(B, T)`, bool.
        tie_tolerance: A score must exceed the mean by more than this (float noise is no signal).

    Returns:
        Shape `(B, T)`, bool. A sequence whose scores are all equal keeps none.
    """
    completion_mask = completion_mask.bool()
    scores = scores.float().masked_fill(~completion_mask, 0.0)
    mean = scores.sum(-1, keepdim=True) / completion_mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    return completion_mask & (scores > mean + tie_tolerance)


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
    count_rule: str = "ceil",
    given: Tensor | None = None,
    tie_tolerance: float = SCORE_TIE_TOLERANCE,
) -> Tensor:
    """Keep mask `(B, T)` under a selection rule: by `scores` (highest first; `scorer` is the same rule
    on scores fixed before training), `random`, `all`,
    `confidence` (`scores` are then `1 - p` of each token: keep those above the sequence's mean), or
    `spans` (the tokens the data names, `given`: `(B, T)` bool).

    `random` and `all` are the controls that tell whether choosing by score helped. `count_rule`
    says how many tokens `scores` keeps: `ceil(keep_share * n)` or, with `quantile`, those at or
    above the `1 - keep_share` quantile. `tie_tolerance` (nats) is the score rules' tie band: scores
    from log-probs computed in bf16 need `score_tie_tolerance(torch.bfloat16)`.
    """
    if count_rule not in COUNT_RULES:
        raise ValueError(f"Unknown count rule {count_rule!r}; expected one of {COUNT_RULES}.")
    if rule in ("scores", "scorer") and count_rule == "quantile":
        return quantile_mask(scores, completion_mask, quantile=1.0 - keep_share, tie_tolerance=tie_tolerance)
    if rule in ("scores", "scorer"):
        return top_share_mask(scores, completion_mask, keep_share=keep_share, tie_tolerance=tie_tolerance)
    if rule == "confidence":
        return above_mean_mask(scores, completion_mask, tie_tolerance=CONFIDENCE_TIE_TOLERANCE)
    if rule == "random":
        if generator is None:
            raise ValueError("rule='random' needs a seeded torch.Generator.")
        return random_share_mask(completion_mask, keep_share=keep_share, generator=generator)
    if rule == "all":
        return completion_mask.bool().clone()
    if rule == "spans":
        if given is None:
            raise ValueError("rule='spans' needs the tokens the data names (`given`, (B, T) bool).")
        return given.bool() & completion_mask.bool()
    raise ValueError(f"Unknown selection rule {rule!r}; expected one of {SELECTION_RULES}.")


class RandomControlSeeds:
    """Generators for the `random` control, seeded by (seed, training step, call within the step, process).

    Derived from the step rather than carried along, so a resumed run draws the same tokens; a step
    that selects twice (chosen and rejected in one call, evaluation batches) draws fresh tokens each call.
    """

    def __init__(self, seed: int, process_index: int):
        self.seed, self.process_index = seed, process_index
        self._step, self._calls = None, 0

    def generator(self, step: int) -> torch.Generator:
        if self._step != step:
            self._step, self._calls = step, 0
        self._calls += 1
        key = f"{self.seed}:{step}:{self._calls}:{self.process_index}"
        return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
