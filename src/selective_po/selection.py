"""Selection: which completion tokens of each sequence enter the loss.

Per sequence, with `n` completion tokens and a keep share `p` (Selective-DPO's `1 - sdpo_threshold`),
`k = ceil(p * n)` tokens are asked for and every completion token whose score is at least the k-th
largest score of its sequence is kept. Ties at the boundary are all kept, so a sequence may keep
more than `k` tokens; that is what makes "reference equals policy" (every score exactly 0) keep
every token and reduce the loss to plain DPO. A sequence with no completion tokens keeps nothing.

Scores come from log-probs, and log-probs carry rounding noise: the same weights on the same tokens
give other values in another batch layout (padding, batch size and packing change the kernels'
summation order), by up to ~5e-5 nats in float32 and ~0.4 in bfloat16 on CPU, more the less likely
the token. Two rules keep that noise from choosing tokens without giving up the method:

- **A row with no signal falls back whole.** Each token has a noise bound (`noise.NoiseBound`,
  measured per run, growing as the token's probability falls). A response whose every score lies
  within its token's bound carries no information the dtype can resolve: it keeps every token, a
  plain DPO row (`rows_with_signal`).
- **Every other row is ranked at float32 precision** (`SCORE_TIE_TOLERANCE`), in every dtype, so it
  keeps the share asked for. Where a token's score lies within its bound of the other side of the cut,
  noise may have decided it: `uncertain_decisions` marks those, and the trainer logs their share.

Where policy and reference are known to be the same function, the trainer makes the scores exactly
0 by construction rather than by a tolerance (`SelectiveDPOTrainer`).

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
# At least twice the float32 floor measured by benchmarks/noise_floor.py (4.2e-5), rounded up. Rows are
# ranked with it in every dtype; coarser dtypes' noise is handled by the per-token noise bound instead.
SCORE_TIE_TOLERANCE = 9e-5
# The same for probabilities (ConfPO's `1 - p` scores): float32 noise of `exp(logp)` is far below this.
CONFIDENCE_TIE_TOLERANCE = 1e-6


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


def kth_score(scores: Tensor, completion_mask: Tensor, *, keep_share: float) -> Tensor:
    """The k-th largest completion score of each sequence, `k = ceil(keep_share * n)`: the `ceil` rule's cut.

    Args:
        scores: Shape `(B, T)`.
        completion_mask: Shape `(B, T)`, bool.
        keep_share: Share of completion tokens asked for, in `[0, 1]`.

    Returns:
        Shape `(B, 1)`; `-inf` for a sequence asked for no token.
    """
    k = keep_counts(completion_mask.sum(dim=-1), keep_share)  # (B,)
    # Non-completion positions sort last, so the first n entries of a row are its completion scores.
    ranked = scores.masked_fill(~completion_mask, float("-inf")).sort(dim=-1, descending=True).values  # (B, T)
    kth = ranked.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))  # (B, 1)
    return kth.masked_fill((k == 0).unsqueeze(-1), float("-inf"))


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
    asked = keep_counts(completion_mask.sum(dim=-1), keep_share) > 0  # (B,)
    cut = kth_score(scores, completion_mask, keep_share=keep_share)  # (B, 1)
    return completion_mask & (scores >= cut - tie_tolerance) & asked.unsqueeze(-1)


SELECTION_RULES = ("scores", "random", "all", "confidence", "spans", "scorer")
# How many tokens `scores` keeps: `ceil` (the module docstring) or `quantile` (the official Selective-DPO code).
COUNT_RULES = ("ceil", "quantile")
# How a selection rule treats each response's end-of-turn token (`weighting.EndTokens`); `candidate` as published.
END_TOKEN_MODES = ("candidate", "keep", "exclude", "paired")


def quantile_cut(scores: Tensor, completion_mask: Tensor, *, quantile: float) -> Tensor:
    """Each sequence's `quantile` of its completion scores, as `torch.quantile` (linear) computes it: shape `(B, 1)`,
    float32. The `quantile` rule's cut; meaningless (but finite or inf, never an error) for an empty sequence."""
    scores = scores.float()
    n = completion_mask.sum(dim=-1)  # (B,)
    ranked = scores.masked_fill(~completion_mask, float("inf")).sort(dim=-1).values  # (B, T) ascending, padding last
    position = quantile * (n - 1).clamp(min=0).double()  # (B,)
    below, above = position.floor().long(), position.ceil().long()
    low, high = ranked.gather(-1, below.unsqueeze(-1)), ranked.gather(-1, above.unsqueeze(-1))  # (B, 1)
    weight = (position - below).float().unsqueeze(-1)
    return torch.where(weight > 0, torch.lerp(low, high, weight), low)  # torch.quantile's `linear`


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
    cut = quantile_cut(scores, completion_mask, quantile=quantile)  # (B, 1)
    return completion_mask & (scores.float() >= cut - tie_tolerance) & completion_mask.any(-1, keepdim=True)


def rows_with_signal(scores: Tensor, completion_mask: Tensor, noise_bound: Tensor) -> Tensor:
    """Sequences with at least one completion score outside its noise bound, `|s_t| > bound_t`.

    A sequence whose every score is within its bound could have come from a reference that is the
    policy itself: ranking it would let rounding noise choose the tokens, so it keeps them all.

    Args:
        scores: Shape `(B, T)`.
        completion_mask: Shape `(B, T)`, bool.
        noise_bound: Shape `(B, T)`, nats, `>= 0`: how far each score may lie from its exact value.

    Returns:
        Shape `(B,)`, bool; False for a sequence with no completion tokens.
    """
    return (completion_mask.bool() & (scores.float().abs() > noise_bound)).any(dim=-1)


def uncertain_decisions(scores: Tensor, completion_mask: Tensor, keep: Tensor, *, noise_bound: Tensor) -> Tensor:
    """Tokens of ranked sequences (`rows_with_signal`) whose keep/drop decision the scores' precision cannot
    vouch for: a kept token within its noise bound above the highest dropped score of its sequence, or a
    dropped token within its bound below the lowest kept score.

    Args:
        scores: Shape `(B, T)`.
        completion_mask: Shape `(B, T)`, bool.
        keep: Shape `(B, T)`, bool: the kept tokens.
        noise_bound: Shape `(B, T)`, nats.

    Returns:
        Shape `(B, T)`, bool, a subset of `completion_mask`; none in a sequence that kept or dropped everything.
    """
    completion_mask = completion_mask.bool()
    scores = scores.float()
    kept, dropped = completion_mask & keep, completion_mask & ~keep
    lowest_kept = scores.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)  # (B, 1)
    highest_dropped = scores.masked_fill(~dropped, float("-inf")).amax(-1, keepdim=True)  # (B, 1)
    near = (kept & (scores - highest_dropped <= noise_bound)) | (dropped & (lowest_kept - scores <= noise_bound))
    return near & rows_with_signal(scores, completion_mask, noise_bound).unsqueeze(-1)


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
    noise_bound: Tensor | None = None,
) -> Tensor:
    """Keep mask `(B, T)` under a selection rule: by `scores` (highest first; `scorer` is the same rule
    on scores fixed before training), `random`, `all`,
    `confidence` (`scores` are then `1 - p` of each token: keep those above the sequence's mean), or
    `spans` (the tokens the data names, `given`: `(B, T)` bool).

    `random` and `all` are the controls that tell whether choosing by score helped. `count_rule`
    says how many tokens `scores` keeps: `ceil(keep_share * n)` or, with `quantile`, those at or
    above the `1 - keep_share` quantile. `tie_tolerance` (nats) is the score rules' tie band. With
    `noise_bound` (`(B, T)`, nats), a sequence whose every score lies within it keeps all its tokens
    (`rows_with_signal`): the score rules then never let rounding noise pick tokens.
    """
    if count_rule not in COUNT_RULES:
        raise ValueError(f"Unknown count rule {count_rule!r}; expected one of {COUNT_RULES}.")
    if rule in ("scores", "scorer"):
        if count_rule == "quantile":
            keep = quantile_mask(scores, completion_mask, quantile=1.0 - keep_share, tie_tolerance=tie_tolerance)
        else:
            keep = top_share_mask(scores, completion_mask, keep_share=keep_share, tie_tolerance=tie_tolerance)
        if noise_bound is None:
            return keep
        signal = rows_with_signal(scores, completion_mask, noise_bound).unsqueeze(-1)  # (B, 1)
        return torch.where(signal, keep, completion_mask.bool())
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
