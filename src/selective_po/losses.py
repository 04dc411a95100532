"""Losses: per-example preference losses over weighted or selected per-token log-probs.

Data flow: per-token log-probs and a mask or weights per token (`weighting.py`) -> **per-example
losses** (this module) -> the trainer's mean over the batch.

The third part of a method (`methods.py`). Each loss reads the policy's (and the reference's) per-token
log-probs `(B, T)` from a batch's `TokenValues` and the weights `(B, T)` (bool masks or floats) from a
weighting, and returns per-example values, leaving the reduction (mean over the batch, gradient
accumulation) to the caller, as TRL does. Rewards are detached: they are for logging.

`WeightedDPO`, DPO on weighted sums (Selective-DPO, TIS-DPO, TGDPO):
    Delta = (sum_t w^c_t pi^c_t - sum_t w^c_t ref^c_t) - (sum_t w^r_t pi^r_t - sum_t w^r_t ref^r_t)
    loss  = -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
With 0/1 weights (a keep mask) each side's log-ratio is over the kept tokens, and keeping every token
is TRL's `sigmoid` DPO loss. A pair with no kept token has Delta = 0 and loss log 2: finite, with no
gradient.

`LengthNormalizedKept`, SePO's reference-free loss (SimPO's form when every token is kept):
    u(y) = (beta / |S|) sum_{t in S} log pi(y_t)          (u = 0 when S is empty)
    loss = -log sigmoid(u(y_w) - u(y_l) - gamma)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .token_values import Pair, TokenValues


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum of `per_token` over the positions where `mask` is True.

    `torch.where` rather than a product, so a non-finite value at a masked-out position (a padded
    `-inf`) cannot turn the sum into NaN, and masked positions get exactly zero gradient.

    Args:
        per_token: Shape `(B, T)`.
        mask: Shape `(B, T)`, bool.

    Returns:
        Shape `(B,)`.
    """
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def weighted_sum(per_token: Tensor, weights: Tensor, mask: Tensor) -> Tensor:
    """Sum of `weights * per_token` over the positions where `mask` is True; bool `weights` select (`masked_sum`).

    Args:
        per_token: Shape `(B, T)`.
        weights: Shape `(B, T)`, bool or floating.
        mask: Shape `(B, T)`, bool.

    Returns:
        Shape `(B,)`.
    """
    if weights.dtype == torch.bool:
        return masked_sum(per_token, weights & mask)
    return masked_sum(weights.to(per_token.dtype) * per_token, mask)


def dpo_sigmoid_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """DPO's sigmoid loss with conservative label smoothing (cDPO).

    Args:
        chosen_logratios: Shape `(B,)`. `log pi(y_w|x) - log ref(y_w|x)` over the scored tokens.
        rejected_logratios: Shape `(B,)`. Same for the rejected response.
        beta: Inverse temperature of the implicit reward.
        label_smoothing: Probability `eps` that a pair's label is flipped; 0 is plain DPO.

    Returns:
        Shape `(B,)`: per-example losses.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@dataclass
class SelectiveLossOutput:
    """What a selective loss computes; every tensor is per example `(B,)` or per token `(B, T)`.

    Attributes:
        losses: `(B,)` per-example losses (carry the gradient).
        chosen_rewards: `(B,)` the chosen response's reward as the loss sees it, detached.
        rejected_rewards: `(B,)` same for the rejected response.
        chosen_scores: `(B, T)` the per-token values selection ranked (float32, detached).
        rejected_scores: `(B, T)` same for the rejected response.
        chosen_keep: `(B, T)` bool, kept chosen tokens.
        rejected_keep: `(B, T)` bool, kept rejected tokens.
        chosen_fallback: `(B,)` bool, chosen responses that kept every token because none of their scores
            left the noise bound (`None` without a bound, or for rules without a score cut).
        rejected_fallback: `(B,)` bool, the same for rejected responses.
        chosen_uncertain: `(B, T)` bool, chosen tokens of ranked responses whose score lies within its noise
            bound of the other side of the cut: noise may have decided them (`None` as for `chosen_fallback`).
        rejected_uncertain: `(B, T)` bool, the same for rejected tokens.
        chosen_weights: `(B, T)` float, each chosen token's weight in the loss, for weighting methods (their
            `chosen_keep` marks the tokens of non-zero weight); `None` for selective ones.
        rejected_weights: `(B, T)` float, the same for rejected tokens.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_keep: Tensor
    rejected_keep: Tensor
    chosen_fallback: Tensor | None = field(default=None, kw_only=True)
    rejected_fallback: Tensor | None = field(default=None, kw_only=True)
    chosen_uncertain: Tensor | None = field(default=None, kw_only=True)
    rejected_uncertain: Tensor | None = field(default=None, kw_only=True)
    chosen_weights: Tensor | None = field(default=None, kw_only=True)
    rejected_weights: Tensor | None = field(default=None, kw_only=True)


@dataclass
class SelectiveDPOOutput(SelectiveLossOutput):
    """`SelectiveLossOutput` plus the sums of a reference-anchored loss (`WeightedDPO`), each `(B,)`: over the kept
    tokens (Selective-DPO), or weighted (TIS-DPO, TGDPO).

    Rewards are `beta * (chosen_logps - ref_chosen_logps)` and likewise for rejected.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor




F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_scores(logratios: Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """A response's score under TRL's `f_divergence_type`: `f'(t)` of the likelihood ratio `t = exp(logratio)`.

    `reverse_kl` is DPO's `log t`; `forward_kl` `1 - 1/t`; `js_divergence` `log(2t / (1 + t))`; `alpha_divergence`
    `(t^(alpha - 1) - 1) / (alpha - 1)` (`log t` at `alpha = 1`), its exponent clamped as TRL clamps it.

    Args:
        logratios: Shape `(B,)`: `log pi(y) - log ref(y)` over the response's (kept, weighted) tokens.

    Returns:
        Shape `(B,)`.
    """
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        exponent = (alpha - 1.0) * logratios
        ceiling = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(exponent.dtype, 80.0)  # exp stays finite once cast back
        return (torch.exp(exponent.float().clamp(max=ceiling)) - 1.0).to(exponent.dtype) / (alpha - 1.0)
    raise ValueError(f"Unknown f_divergence_type {kind!r}; expected one of {F_DIVERGENCES}.")


@dataclass
class LossTerms:
    """What a loss part returns: per-example `losses` `(B,)` (with gradient), the rewards it logs `(B,)` (detached),
    and, for the reference-anchored losses, the four weighted sums `(B,)` behind them."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    sums: dict[str, Tensor] | None = None


@dataclass(frozen=True)
class WeightedDPO:
    """DPO's sigmoid loss (with cDPO's `label_smoothing`, and TRL's `f_divergence_type` applied to each side's
    log-ratio) on weighted sums of policy and reference log-probs.

    Sums first, then their difference, in TRL's order, so 0/1 weights give TRL's `sigmoid` loss's rounding.
    Rewards are `beta * (sum w pi - sum w ref)` per side.
    """

    beta: float
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"  # TRL's `f_divergence_type`, on each side's weighted log-ratio
    f_alpha: float = 0.5  # TRL's `f_alpha_divergence_coef`
    sparse = False  # reads the policy's log-probs at every completion position (the rewards logged use them all)

    def __call__(self, values: TokenValues, weights: Pair) -> LossTerms:
        (pc, pr), (rc, rr), (cm, rm) = values.require("policy"), values.require("reference"), values.mask
        chosen, rejected = weighted_sum(pc, weights[0], cm.bool()), weighted_sum(pr, weights[1], rm.bool())
        ref_chosen = weighted_sum(rc, weights[0], cm.bool()).detach()
        ref_rejected = weighted_sum(rr, weights[1], rm.bool()).detach()
        chosen_logratios, rejected_logratios = chosen - ref_chosen, rejected - ref_rejected
        chosen_scores, rejected_scores = (f_divergence_scores(r, self.f_divergence, self.f_alpha) for r in (chosen_logratios, rejected_logratios))
        losses = dpo_sigmoid_loss(chosen_scores, rejected_scores, beta=self.beta, label_smoothing=self.label_smoothing)
        sums = {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        return LossTerms(losses, self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach(), sums)


@dataclass(frozen=True)
class LengthNormalizedKept:
    """SePO's reference-free loss on the kept tokens (bool weights): `-log sigmoid(u(y_w) - u(y_l) - gamma)` with
    `u(y) = beta * mean of the kept log-probs`. Rewards are `u(y_w)` and `u(y_l)`."""

    beta: float
    gamma: float = 0.0
    sparse = True  # reads the policy's log-probs only where a token is kept

    def __call__(self, values: TokenValues, weights: Pair) -> LossTerms:
        (pc, pr), (chosen_keep, rejected_keep) = values.require("policy"), weights
        if chosen_keep.dtype != torch.bool or rejected_keep.dtype != torch.bool:
            raise ValueError("SePO's loss averages the log-probs of kept tokens: its weighting must give bool masks.")
        # An empty kept set has u = 0 (a zero sum over a count clamped to 1), never a division by zero.
        chosen_u = self.beta * masked_sum(pc, chosen_keep) / chosen_keep.sum(-1).clamp(min=1)
        rejected_u = self.beta * masked_sum(pr, rejected_keep) / rejected_keep.sum(-1).clamp(min=1)
        losses = -F.logsigmoid(chosen_u - rejected_u - self.gamma)
        return LossTerms(losses, chosen_u.detach(), rejected_u.detach())

