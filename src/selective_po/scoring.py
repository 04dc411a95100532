"""Token scores: how much each response token says about the preference.

Selective-DPO (Dong, arXiv 2507.07725) scores a response token by how far the policy is from the
reference on it, signed so that a high score marks a token the policy still has to learn:

    chosen   s_t = log p_ref(y_t) - log p_pi(y_t)   (the policy under-rates a good token)
    rejected s_t = log p_pi(y_t) - log p_ref(y_t)   (the policy over-rates a bad token)

ConfPO (arXiv 2506.08712) needs no second model: `confidence_token_scores` scores a token by how
unsure the policy is of it.

The scorers below are the first part of a method (`methods.py`): each reads the values it needs from a
batch's `TokenValues` and returns `TokenScores`, with each score's noise bound when asked for one.

Scores only pick tokens; they carry no gradient. They are computed in float32 even when the
log-probs come in bf16, since a bf16 difference collapses many distinct scores into ties.

Every function here is pure and works on `(B, T)` per-token tensors aligned with a boolean
completion mask; positions outside the mask may hold anything and are ignored downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .noise import NoiseBound
from .token_values import TokenScores, TokenValues


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


def round_like_python(values: Tensor, decimals: int) -> Tensor:
    """`round(float(v), decimals)` of every element, as Python computes it (the exact decimal value rounded half to
    even), in float64. The official TIS-DPO code rounds its token scores so before ranking them.

    `torch.round(v * 10**decimals)` agrees except where `v * 10**decimals` lies within float64 rounding of a half:
    those few elements are rounded by Python itself.
    """
    values = values.double()
    scaled = values * 10**decimals
    rounded = torch.round(scaled) / 10**decimals  # round half to even, as Python
    near_half = ((scaled - scaled.floor()) - 0.5).abs() < 1e-6
    if near_half.any():
        exact = torch.tensor([round(v, decimals) for v in values[near_half].tolist()], dtype=torch.float64)
        rounded[near_half] = exact.to(rounded.device)
    return rounded


def _bounds(noise: NoiseBound | None, chosen: tuple[Tensor, Tensor], rejected: tuple[Tensor, Tensor]):
    """Per-token noise bounds of two sides' scores, each comparing two log-probs of a token (`(None, None)` without)."""
    if noise is None:
        return None, None
    return noise(chosen[0].detach(), chosen[1]), noise(rejected[0].detach(), rejected[1])


@dataclass(frozen=True)
class PolicyGap:
    """Selective-DPO: `ref - pi` on chosen tokens, `pi - ref` on rejected ones (`sdpo_token_scores`)."""

    reads_policy = True
    description = "Selective-DPO token scores (reference log-prob minus policy log-prob)"
    remedy = ("The policy's or the reference's log-probs overflowed: lower learning_rate, train in float32 or bf16 rather "
              "than fp16, and check that the reference's weights are finite.")

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        (pc, pr), (rc, rr) = values.scoring_policy(), values.require("reference")
        chosen, rejected = sdpo_token_scores(pc, pr, rc, rr)
        return TokenScores(chosen, rejected, *_bounds(noise, (pc, rc), (pr, rr)))


@dataclass(frozen=True)
class FixedGap:
    """The fixed-score variant: Selective-DPO's scores with a scorer model in the policy's place, `scorer - ref`
    on chosen and `ref - scorer` on rejected tokens, fixed by the data (stored value `scorer`)."""

    reads_policy = False
    description = "fixed token scores (scorer log-prob minus reference log-prob)"
    remedy = "The scorer's or the reference's stored log-probs are not finite: check both models' weights."

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        (sc, sr), (rc, rr) = values.require("scorer"), values.require("reference")
        chosen, rejected = sdpo_token_scores(rc, rr, sc, sr)
        return TokenScores(chosen, rejected, *_bounds(noise, (sc, rc), (sr, rr)))


@dataclass(frozen=True)
class OracleReward:
    """SePO: the oracle's token reward `r = log p_oracle - log p_oracle_ref` on chosen tokens and `-r` on rejected
    ones (stored value `oracle`). Only the difference is stored, so every token gets the largest bin's bound."""

    reads_policy = False
    description = "SePO oracle token rewards (oracle log-prob minus oracle-reference log-prob)"
    remedy = ("They come from the stored values in ref_logps_cache_dir: delete that entry to score them again, and check "
              "that the oracle's and its reference's weights are finite.")

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        chosen_rewards, rejected_rewards = values.require("oracle")
        chosen, rejected = chosen_rewards.detach().float(), -rejected_rewards.detach().float()
        if noise is None:
            return TokenScores(chosen, rejected)
        return TokenScores(chosen, rejected, torch.full_like(chosen, noise.largest()), torch.full_like(rejected, noise.largest()))

    @staticmethod
    def shown(scores: TokenScores) -> tuple[Tensor, Tensor]:
        """What SePO reports and logs: the token rewards themselves, `r` on both sides (it ranks `-r` on rejected)."""
        return scores.chosen, -scores.rejected


@dataclass(frozen=True)
class Confidence:
    """ConfPO: `1 - p` of each token under the policy (`confidence_token_scores`); no second model, no bound."""

    reads_policy = True
    description = "ConfPO token scores (1 minus the policy's probability)"
    remedy = "The policy's log-probs overflowed: lower learning_rate, or train in float32 or bf16 rather than fp16."

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        chosen, rejected = values.scoring_policy()
        return TokenScores(confidence_token_scores(chosen), confidence_token_scores(rejected))


@dataclass(frozen=True)
class GivenTokens:
    """1 on the tokens the data names, 0 elsewhere (`selection_rule="spans"` without a model to score them)."""

    reads_policy = False
    description = "span indicators"
    remedy = ""

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        (chosen, rejected), (chosen_mask, rejected_mask) = values.require("given"), values.mask
        return TokenScores((chosen.bool() & chosen_mask).float(), (rejected.bool() & rejected_mask).float())


@dataclass(frozen=True)
class RewardModelGap:
    """TGDPO: a reward model's token reward against the loss's reference, `r = log p_RM - log p_ref`, on both sides
    (unsigned: the weighting decides what a reward means on each side). Stored value `reward_model`."""

    reads_policy = False
    description = "TGDPO token rewards (reward-model log-prob minus reference log-prob)"
    remedy = "The reward model's or the reference's log-probs are not finite: check both models' weights."

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        (mc, mr), (rc, rr) = values.require("reward_model"), values.require("reference")
        with torch.no_grad():
            return TokenScores(mc.float() - rc.float(), mr.float() - rr.float())


@dataclass(frozen=True)
class ContrastiveGap:
    """TIS-DPO: `d = log p_forward - log p_reverse` from two models DPO-trained on the data and on the data with
    chosen and rejected swapped (stored value `contrastive`, computed in float32): `d` on chosen tokens and `-d` on
    rejected ones.

    `decimals`: round as the official code does (it rounds `log p_reverse - log p_forward` to 2 decimals with
    Python's `round` and negates it for chosen tokens); `None` keeps the float32 values.
    """

    reads_policy = False
    description = "TIS-DPO contrastive token scores (forward-model log-prob minus reverse-model log-prob)"
    remedy = ("They come from the stored values in ref_logps_cache_dir: delete that entry to score them again, and check "
              "that the forward and reverse models' weights are finite.")

    decimals: int | None = None

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores:
        chosen, rejected = (d.detach().float() for d in values.require("contrastive"))
        if self.decimals is None:
            return TokenScores(chosen, -rejected)
        # The official order: the reverse-minus-forward value is rounded, then negated for chosen tokens.
        chosen = -round_like_python(-chosen, self.decimals)
        rejected = round_like_python(-rejected, self.decimals)
        return TokenScores(chosen.float(), rejected.float())
