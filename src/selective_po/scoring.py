"""Token scores: how much each response token says about the preference.

Selective-DPO (Dong, arXiv 2507.07725) scores a response token by how far the policy is from the
reference on it, signed so that a high score marks a token the policy still has to learn:

    chosen   s_t = log p_ref(y_t) - log p_pi(y_t)   (the policy under-rates a good token)
    rejected s_t = log p_pi(y_t) - log p_ref(y_t)   (the policy over-rates a bad token)

ConfPO (arXiv 2506.08712) needs no second model: `confidence_token_scores` scores a token by how
unsure the policy is of it.

Scores only pick tokens; they carry no gradient. They are computed in float32 even when the
log-probs come in bf16, since a bf16 difference collapses many distinct scores into ties.

Every function here is pure and works on `(B, T)` per-token tensors aligned with a boolean
completion mask; positions outside the mask may hold anything and are ignored downstream.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sdpo_token_scores(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Selective-DPO scores of the chosen and rejected response tokens.

    Args:
        policy_chosen_logps: Shape `(B, T)`. Policy log-prob of each chosen token.
        policy_rejected_logps: Shape `(B, T)`. Policy log-prob of each rejected token.
        ref_chosen_logps: Shape `(B, T)`. Reference log-prob of each chosen token.
        ref_rejected_logps: Shape `(B, T)`. Reference log-prob of each rejected token.

    Returns:
        `(chosen_scores, rejected_scores)`, each `(B, T)` float32 and detached.
    """
    with torch.no_grad():
        chosen_scores = ref_chosen_logps.float() - policy_chosen_logps.float()
        rejected_scores = policy_rejected_logps.float() - ref_rejected_logps.float()
    return chosen_scores, rejected_scores


def confidence_token_scores(policy_logps: Tensor) -> Tensor:
    """ConfPO's token scores (arXiv 2506.08712), `1 - p_pi(y_t)`: a low-confidence token scores high.

    No reference or oracle is involved. `selection.above_mean_mask` then keeps the tokens whose
    probability is below their response's mean.

    Args:
        policy_logps: Shape `(B, T)`. Policy log-prob of each token.

    Returns:
        Shape `(B, T)`, float32 and detached.
    """
    with torch.no_grad():
        return -torch.expm1(policy_logps.float())
