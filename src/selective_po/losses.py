"""Losses: per-example preference losses over the tokens that selection kept.

Each loss is a pure function of per-token log-probs `(B, T)` and boolean completion masks. It returns
per-example values and leaves the reduction (mean over the batch, gradient accumulation) to the
caller, as TRL does. Rewards are detached: they are for logging.

Selective-DPO (Dong, arXiv 2507.07725), as implemented here:
    keep_c = top share (1 - q) of chosen tokens by   ref - pi
    keep_r = top share (1 - q) of rejected tokens by pi - ref
    Delta  = (sum_{keep_c} pi_c - sum_{keep_c} ref_c) - (sum_{keep_r} pi_r - sum_{keep_r} ref_r)
    loss   = -(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)
The same mask is applied to policy and reference, so each side's log-ratio is over one token set.
With q = 0 every completion token is kept and the loss is TRL's `sigmoid` DPO loss. A pair whose
kept sets are both empty has Delta = 0 and loss log 2: finite, with no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .scoring import sdpo_token_scores
from .selection import top_share_mask


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


def select_sdpo_tokens(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    threshold: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score every response token and keep the top `1 - threshold` share of each response.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: Shape `(B, T)`.
        chosen_mask, rejected_mask: Shape `(B, T)`, bool. True on real response tokens.
        threshold: `sdpo_threshold` `q` in `[0, 1)`.

    Returns:
        `(chosen_scores, rejected_scores, chosen_keep, rejected_keep)`, each `(B, T)`; scores float32
        and detached, keep masks bool.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold (sdpo_threshold) must lie in [0, 1), got {threshold}.")
    chosen_scores, rejected_scores = sdpo_token_scores(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    keep_share = 1.0 - threshold
    chosen_keep = top_share_mask(chosen_scores, chosen_mask, keep_share=keep_share)  # (B, T)
    rejected_keep = top_share_mask(rejected_scores, rejected_mask, keep_share=keep_share)  # (B, T)
    return chosen_scores, rejected_scores, chosen_keep, rejected_keep


@dataclass
class SelectiveDPOOutput:
    """What `selective_dpo_loss` computes; every tensor is per example or per token.

    Attributes:
        losses: `(B,)` per-example losses (carry the gradient).
        chosen_logps: `(B,)` policy log-prob of the chosen response over its kept tokens.
        rejected_logps: `(B,)` same for the rejected response.
        ref_chosen_logps: `(B,)` reference log-prob of the chosen response over the same tokens.
        ref_rejected_logps: `(B,)` same for the rejected response.
        chosen_rewards: `(B,)` `beta * (chosen_logps - ref_chosen_logps)`, detached.
        rejected_rewards: `(B,)` `beta * (rejected_logps - ref_rejected_logps)`, detached.
        chosen_scores: `(B, T)` token scores of the chosen response (float32, detached).
        rejected_scores: `(B, T)` token scores of the rejected response.
        chosen_keep: `(B, T)` bool, kept chosen tokens.
        rejected_keep: `(B, T)` bool, kept rejected tokens.
    """

    losses: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_keep: Tensor
    rejected_keep: Tensor


def selective_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    threshold: float,
    beta: float,
    label_smoothing: float = 0.0,
) -> SelectiveDPOOutput:
    """Selective-DPO loss: DPO on the top `1 - threshold` share of tokens of each response.

    Args:
        policy_chosen_logps: Shape `(B, T)`. Policy log-prob of each chosen token (with gradient).
        policy_rejected_logps: Shape `(B, T)`. Policy log-prob of each rejected token (with gradient).
        ref_chosen_logps: Shape `(B, T)`. Reference log-prob of each chosen token.
        ref_rejected_logps: Shape `(B, T)`. Reference log-prob of each rejected token.
        chosen_mask: Shape `(B, T)`, bool. True on real chosen-response tokens (no prompt, no padding).
        rejected_mask: Shape `(B, T)`, bool. True on real rejected-response tokens.
        threshold: `sdpo_threshold` `q` in `[0, 1)`; the top `1 - q` share of tokens is kept.
        beta: DPO's inverse temperature.
        label_smoothing: cDPO's label-flip probability.

    Returns:
        A `SelectiveDPOOutput`; `losses` has shape `(B,)`.
    """
    chosen_scores, rejected_scores, chosen_keep, rejected_keep = select_sdpo_tokens(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
        threshold=threshold,
    )
    chosen_logps = masked_sum(policy_chosen_logps, chosen_keep)
    rejected_logps = masked_sum(policy_rejected_logps, rejected_keep)
    ref_chosen = masked_sum(ref_chosen_logps, chosen_keep).detach()
    ref_rejected = masked_sum(ref_rejected_logps, rejected_keep).detach()

    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    losses = dpo_sigmoid_loss(chosen_logratios, rejected_logratios, beta=beta, label_smoothing=label_smoothing)
    return SelectiveDPOOutput(
        losses=losses,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_keep=chosen_keep,
        rejected_keep=rejected_keep,
    )
