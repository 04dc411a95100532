"""Weightings: how much each completion token counts in the loss, from its score.

Data flow: token scores (`scoring.py`) -> **a mask or weights per token** (this module) -> loss.

The second part of a method (`methods.py`). A weighting maps a batch's `TokenScores` (and, where it
needs them, its `TokenValues`) to a `(chosen, rejected)` pair of `(B, T)` tensors: bool masks for the
selective methods (a token is in or out), float weights for the reweighting ones. Either is zero
outside the completion mask. The mask primitives live in `selection.py`.

| weighting | tokens | used by |
| --- | --- | --- |
| `TopShare` | the top share of each response by score, ties kept; a response with no score outside its noise bound keeps all | Selective-DPO, SePO, the fixed-score variant |
| `RandomShare`, `AllTokens` | as many tokens drawn uniformly; every token | the controls |
| `AboveMean` | scores above their response's mean | ConfPO |
| `Given` | the tokens the data names | span supervision |
| `RankRange` | weight `low + (high - low) * rank / (n - 1)`, ranks ascending | TIS-DPO |
| `Affine` | weight `1 + s * score` on chosen, `1 - s * score` on rejected tokens | TGDPO |
| `LengthDesensitized` | another weighting's, times `alpha` past the shorter response's length | TRL's `ld_alpha` (LD-DPO) |
| `EndTokens` | another selection's, on the tokens up to each response's end-of-turn token, which it ranks, keeps, drops or pairs | `end_token_selection` |
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .selection import (
    CONFIDENCE_TIE_TOLERANCE,
    END_TOKEN_MODES,
    SCORE_TIE_TOLERANCE,
    above_mean_mask,
    quantile_mask,
    random_share_mask,
    rows_with_signal,
    top_share_mask,
)
from .token_values import Pair, TokenScores, TokenValues


@dataclass(frozen=True)
class TopShare:
    """Keep the highest-scoring share of each response's tokens (`selection.top_share_mask`, or with
    `count_rule="quantile"` the official Selective-DPO count, `selection.quantile_mask`). With noise bounds, a response
    whose every score lies within its bound keeps every token."""

    chosen_share: float
    rejected_share: float
    count_rule: str = "ceil"
    tie_tolerance: float = SCORE_TIE_TOLERANCE
    ranks_scores = True  # its cut needs the scores' noise bound

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        sides = ((scores.chosen, values.mask[0], self.chosen_share, scores.chosen_bound),
                 (scores.rejected, values.mask[1], self.rejected_share, scores.rejected_bound))  # fmt: skip
        return tuple(self._side(*side) for side in sides)

    def _side(self, scores: Tensor, mask: Tensor, share: float, bound: Tensor | None) -> Tensor:
        if self.count_rule == "quantile":
            keep = quantile_mask(scores, mask, quantile=1.0 - share, tie_tolerance=self.tie_tolerance)
        else:
            keep = top_share_mask(scores, mask, keep_share=share, tie_tolerance=self.tie_tolerance)
        if bound is None:
            return keep
        return torch.where(rows_with_signal(scores, mask, bound).unsqueeze(-1), keep, mask.bool())  # (B, T)


@dataclass(frozen=True)
class RandomShare:
    """The control for `TopShare`: as many tokens per response, drawn uniformly with the batch's generator."""

    chosen_share: float
    rejected_share: float
    ranks_scores = False

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        if values.generator is None:
            raise ValueError("The random control needs a seeded torch.Generator (TokenValues.generator).")
        return (random_share_mask(values.mask[0], keep_share=self.chosen_share, generator=values.generator),
                random_share_mask(values.mask[1], keep_share=self.rejected_share, generator=values.generator))  # fmt: skip


@dataclass(frozen=True)
class AllTokens:
    """Every completion token: with a selective loss, that loss's plain form (DPO, SimPO)."""

    ranks_scores = False

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        return values.mask[0].bool().clone(), values.mask[1].bool().clone()


@dataclass(frozen=True)
class AboveMean:
    """ConfPO: each response's tokens scoring above its mean score (`selection.above_mean_mask`)."""

    ranks_scores = False

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        return (above_mean_mask(scores.chosen, values.mask[0], tie_tolerance=CONFIDENCE_TIE_TOLERANCE),
                above_mean_mask(scores.rejected, values.mask[1], tie_tolerance=CONFIDENCE_TIE_TOLERANCE))  # fmt: skip


@dataclass(frozen=True)
class Given:
    """The tokens the data names (`TokenValues.given`), kept exactly whatever their scores."""

    ranks_scores = False

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        given = values.require("given")
        return given[0].bool() & values.mask[0].bool(), given[1].bool() & values.mask[1].bool()


def rank_range_weights(scores: Tensor, mask: Tensor, *, low: float, high: float) -> Tensor:
    """Weights from ranks: each row's tokens sorted ascending by score (a stable sort: tied scores rank in position
    order), the `i`-th of `n` weighted `low + (high - low) * i / (n - 1)`; a lone token weighs 1. Zero off `mask`.

    Args:
        scores: `(B, T)`.
        mask: `(B, T)` bool, the tokens ranked.
        low, high: The weights of the lowest- and highest-scoring token.

    Returns:
        `(B, T)` float32.
    """
    mask = mask.bool()
    n = mask.sum(-1, keepdim=True)  # (B, 1)
    # Unranked positions sort last (ties among them keep position order, and they get weight 0 below).
    order = scores.float().masked_fill(~mask, float("inf")).sort(dim=-1, stable=True).indices  # (B, T)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.size(-1), device=order.device).expand_as(order))
    spread = ranks.float() / (n - 1).clamp(min=1).float()  # (B, T)
    weights = torch.where(n > 1, low + (high - low) * spread, torch.ones_like(spread))
    return torch.where(mask, weights, torch.zeros_like(weights))


@dataclass(frozen=True)
class RankRange:
    """TIS-DPO's `rank_based` weights (`rank_range_weights`), per response. With `zero_end`, the official code's
    treatment of the end of a response: its end-of-sequence token (and anything after it, `TokenValues.end`) weighs 0
    and the ranks run over the tokens before it."""

    low: float = 0.7
    high: float = 1.3
    zero_end: bool = True
    ranks_scores = False

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        ranked = values.mask
        if self.zero_end:
            end = values.require("end")
            ranked = (values.mask[0].bool() & ~end[0], values.mask[1].bool() & ~end[1])
        return (rank_range_weights(scores.chosen, ranked[0], low=self.low, high=self.high),
                rank_range_weights(scores.rejected, ranked[1], low=self.low, high=self.high))  # fmt: skip


@dataclass(frozen=True)
class Affine:
    """TGDPO's weights: `1 + scale * r` on chosen and `1 - scale * r` on rejected tokens (`scale = alpha * beta` in
    the official code). Unclipped, as there: a large reward can make a weight negative."""

    scale: float
    ranks_scores = False

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        chosen = torch.where(values.mask[0].bool(), 1.0 + self.scale * scores.chosen, torch.zeros_like(scores.chosen))
        rejected = torch.where(values.mask[1].bool(), 1.0 - self.scale * scores.rejected, torch.zeros_like(scores.rejected))
        return chosen, rejected


def length_desensitized_weights(chosen_mask: Tensor, rejected_mask: Tensor, *, alpha: float) -> Pair:
    """LD-DPO's per-token weights (TRL's `ld_alpha`): 1 on each response's first `m` completion tokens, `m` the
    shorter response's length, and `alpha` on the rest of the longer one; 0 off the completion.

    Args:
        chosen_mask: `(B, T)` bool, the chosen completion tokens.
        rejected_mask: `(B, T)` bool, the rejected ones.
        alpha: The weight of the tokens past the shared length.

    Returns:
        `(chosen, rejected)`, each `(B, T)` float32.
    """
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1)).unsqueeze(-1)  # (B, 1)

    def side(mask: Tensor) -> Tensor:
        position = mask.long().cumsum(-1)  # 1-based among the completion tokens
        weights = torch.where(position <= shared, 1.0, alpha).float()
        return torch.where(mask.bool(), weights, torch.zeros_like(weights))

    return side(chosen_mask), side(rejected_mask)


@dataclass(frozen=True)
class LengthDesensitized:
    """Another weighting's masks or weights times LD-DPO's (`length_desensitized_weights`): with every token kept,
    TRL's `ld_alpha`; with a selection, the kept tokens past the shorter response's length count `alpha`."""

    inner: object
    alpha: float

    @property
    def ranks_scores(self) -> bool:
        return self.inner.ranks_scores

    def candidates(self, values: TokenValues) -> Pair:
        """The tokens the inner weighting chooses among."""
        return self.inner.candidates(values) if hasattr(self.inner, "candidates") else values.mask

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        inner = self.inner(scores, values)
        lengths = length_desensitized_weights(values.mask[0].bool(), values.mask[1].bool(), alpha=self.alpha)
        return tuple(w.float() * ld for w, ld in zip(inner, lengths))



def end_token_candidates(mask: Tensor, end_turn: Tensor, mode: str) -> Tensor:
    """The tokens a selection rule chooses among. Under `candidate` (the published methods) every completion token,
    as in the official code and TRL's DPO (so `sdpo_threshold=0` stays TRL's step). Under the other modes each
    completion up to its first end-of-turn token, that token included under `paired` only: the tokens after it (a
    chat template's trailing newline, which decoding never produces) are never candidates.

    Args:
        mask: `(B, T)` bool, the completion tokens.
        end_turn: `(B, T)` bool, each row's first end-of-turn token (none for a truncated response).
        mode: One of `END_TOKEN_MODES`.

    Returns:
        `(B, T)` bool, a subset of `mask`.
    """
    if mode == "candidate":
        return mask.bool()
    end_turn = end_turn.bool()
    after = (end_turn.long().cumsum(-1) > 0) & ~end_turn  # (B, T)
    candidates = mask.bool() & ~after
    return candidates if mode == "paired" else candidates & ~end_turn


def end_token_keep(keep: Pair, end_turn: Pair, mode: str) -> Pair:
    """A selection's masks with `mode`'s rule for the end-of-turn token applied: `keep` adds it on both sides,
    `paired` keeps it on a side only where the other side's is kept too (a side that loses it keeps one token fewer
    than its share: no other token takes its place); `candidate` and `exclude` leave the masks as the rule chose them
    (`end_token_candidates` already removed it for `exclude`).

    Args:
        keep: `(chosen, rejected)`, `(B, T)` bool each, the rule's kept tokens.
        end_turn: `(chosen, rejected)`, `(B, T)` bool each, each response's first end-of-turn token.
        mode: One of `END_TOKEN_MODES`.

    Returns:
        `(chosen, rejected)`, `(B, T)` bool each.
    """
    end_turn = (end_turn[0].bool(), end_turn[1].bool())
    if mode == "keep":
        return keep[0] | end_turn[0], keep[1] | end_turn[1]
    if mode == "paired":
        both = (keep[0] & end_turn[0]).any(-1, keepdim=True) & (keep[1] & end_turn[1]).any(-1, keepdim=True)  # (B, 1)
        return keep[0] & (~end_turn[0] | both), keep[1] & (~end_turn[1] | both)
    return keep


@dataclass(frozen=True)
class EndTokens:
    """A selection rule with `mode` deciding each response's end-of-turn token: ranked like any other (`candidate`, as
    the published methods do: the masks are the rule's own), always kept (`keep`), never kept (`exclude`), or kept on
    one side only when kept on the other (`paired`). Under the last three the rule chooses among the tokens up to
    the end of turn (`end_token_candidates`). Needs `TokenValues.end_turn`."""

    inner: object
    mode: str = "candidate"

    def __post_init__(self):
        if self.mode not in END_TOKEN_MODES:
            raise ValueError(f"end_token_selection={self.mode!r} is unknown. Allowed: {', '.join(END_TOKEN_MODES)}.")

    @property
    def ranks_scores(self) -> bool:
        return self.inner.ranks_scores

    def candidates(self, values: TokenValues) -> Pair:
        """`(chosen, rejected)`, `(B, T)` bool each: the tokens the inner rule chooses among."""
        end_turn = values.require("end_turn")
        return tuple(end_token_candidates(m, e, self.mode) for m, e in zip(values.mask, end_turn))

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair:
        keep = self.inner(scores, replace(values, mask=self.candidates(values)))
        if keep[0].dtype != torch.bool:
            raise TypeError(f"EndTokens decides kept tokens; {type(self.inner).__name__} returns weights.")
        return end_token_keep(keep, values.require("end_turn"), self.mode)
