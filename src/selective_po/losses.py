"""Losses: per-example preference losses over the tokens that selection kept.

Two methods, each one function: `selective_dpo_loss` (Selective-DPO) and `sepo_loss` (SePO).

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

SePO (Yang et al., arXiv 2408.13518), reference-free, with token rewards r_t = log p_oracle - log
p_oracle_ref computed offline:
    keep_w = the k_w share of chosen tokens with the highest r_t
    keep_l = the k_l share of rejected tokens with the lowest r_t
    u(y)   = (beta / |S|) sum_{t in S} log pi(y_t)          (u = 0 when S is empty)
    loss   = -log sigmoid(u(y_w) - u(y_l) - gamma)
With every token kept this is SimPO's form.

Both take a selection `rule`: `scores` (the method), the controls `random` (the same number of
tokens, drawn uniformly) and `all` (every completion token), or `confidence` (ConfPO: the tokens the
policy itself is less sure of than its response's mean, no second model; Selective-DPO's loss only).
Selective-DPO's loss also takes `scorer`, this package's variant: the scores are computed once from a
scorer model S and the reference, `S - ref` on chosen and `ref - S` on rejected tokens, so the kept
tokens are fixed by the data and a token the policy has learned stays in the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import NoiseBound
from .scoring import confidence_token_scores, sdpo_token_scores
from .selection import SCORE_TIE_TOLERANCE, rows_with_signal, select_tokens, uncertain_decisions


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
    rule: str = "scores",
    generator: torch.Generator | None = None,
    count_rule: str = "ceil",
    chosen_given: Tensor | None = None,
    rejected_given: Tensor | None = None,
    scorer_chosen_logps: Tensor | None = None,
    scorer_rejected_logps: Tensor | None = None,
    tie_tolerance: float = SCORE_TIE_TOLERANCE,
    noise: NoiseBound | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score every response token and keep the top `1 - threshold` share of each response.

    Args:
        policy_chosen_logps: Shape `(B, T)`. Policy log-prob of each chosen token.
        policy_rejected_logps: Shape `(B, T)`. Policy log-prob of each rejected token.
        ref_chosen_logps: Shape `(B, T)`. Reference log-prob of each chosen token.
        ref_rejected_logps: Shape `(B, T)`. Reference log-prob of each rejected token.
        chosen_mask: Shape `(B, T)`, bool. True on real chosen-response tokens.
        rejected_mask: Shape `(B, T)`, bool. True on real rejected-response tokens.
        threshold: `sdpo_threshold` `q` in `[0, 1)`.
        rule: `scores`, a control (`random`, seeded by `generator`, or `all`), or `confidence`
            (ConfPO's `1 - p` policy scores, kept above their response's mean; `threshold` unused).
        count_rule: How many tokens `scores` keeps: `ceil` (`ceil((1 - q) n)`) or `quantile` (at or
            above the `q` quantile, as the official code).
        chosen_given: Shape `(B, T)`, bool. With `rule="spans"`, the chosen tokens the data names; they
            are kept exactly (`threshold` unused), and the scores are only reported.
        rejected_given: Shape `(B, T)`, bool. The same for the rejected response.
        scorer_chosen_logps: Shape `(B, T)`. With `rule="scorer"`, a scorer model's log-prob of each
            chosen token; the scores are then `scorer - ref` (chosen) and `ref - scorer` (rejected),
            fixed by the data: the policy's log-probs are not used.
        scorer_rejected_logps: Shape `(B, T)`. The same for the rejected response.
        tie_tolerance: Scores this close below the cut count as tied with it (float32 precision).
        noise: The run's per-token noise bound (`noise.NoiseBound`); a response whose every score lies within
            it keeps every token. `None`: every response is ranked.

    Returns:
        `(chosen_scores, rejected_scores, chosen_keep, rejected_keep)`, each `(B, T)`; scores float32
        and detached, keep masks bool.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold (sdpo_threshold) must lie in [0, 1), got {threshold}.")
    if rule == "scorer":
        if scorer_chosen_logps is None or scorer_rejected_logps is None:
            raise ValueError("rule='scorer' needs the scorer's per-token log-probs (scorer_chosen_logps, scorer_rejected_logps).")
        # Selective-DPO's scores of the reference, with the scorer in the reference's place.
        chosen_scores, rejected_scores = sdpo_token_scores(ref_chosen_logps, ref_rejected_logps, scorer_chosen_logps, scorer_rejected_logps)
    elif rule == "confidence":
        chosen_scores, rejected_scores = confidence_token_scores(policy_chosen_logps), confidence_token_scores(policy_rejected_logps)
    else:
        chosen_scores, rejected_scores = sdpo_token_scores(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
    bounds = sdpo_noise_bounds(noise, rule, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                               ref_rejected_logps, scorer_chosen_logps, scorer_rejected_logps)  # fmt: skip
    select = dict(keep_share=1.0 - threshold, rule=rule, generator=generator, count_rule=count_rule, tie_tolerance=tie_tolerance)
    chosen_keep = select_tokens(chosen_scores, chosen_mask, given=chosen_given, noise_bound=bounds[0], **select)  # (B, T)
    rejected_keep = select_tokens(rejected_scores, rejected_mask, given=rejected_given, noise_bound=bounds[1], **select)  # (B, T)
    return chosen_scores, rejected_scores, chosen_keep, rejected_keep


def sdpo_noise_bounds(noise: NoiseBound | None, rule: str, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                      ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, scorer_chosen_logps: Tensor | None,
                      scorer_rejected_logps: Tensor | None) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """Per-token noise bounds `(B, T)` of Selective-DPO's chosen and rejected scores: the bound at the less likely of
    the two log-probs each score compares (policy and reference; scorer and reference for `scorer`). `(None, None)`
    without a bound or for rules that rank no log-prob difference."""
    if noise is None or rule not in ("scores", "scorer"):
        return None, None
    chosen, rejected = (scorer_chosen_logps, scorer_rejected_logps) if rule == "scorer" else (policy_chosen_logps, policy_rejected_logps)
    return noise(chosen.detach(), ref_chosen_logps), noise(rejected.detach(), ref_rejected_logps)


def noise_diagnostics(scores: Tensor, completion_mask: Tensor, keep: Tensor, bound: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """`(fallback (B,), uncertain (B, T))`: the responses that kept every token because no score left its noise
    bound, and the decisions of the other responses that lay within it. `(None, None)` without a bound."""
    if bound is None:
        return None, None
    fallback = completion_mask.any(-1) & ~rows_with_signal(scores, completion_mask, bound)
    return fallback, uncertain_decisions(scores, completion_mask, keep, noise_bound=bound)


def kept_token_sums(
    chosen_per_token_logps: Tensor,
    rejected_per_token_logps: Tensor,
    ref_chosen_per_token_logps: Tensor,
    ref_rejected_per_token_logps: Tensor,
    threshold: float = 0.6,
    *,
    chosen_mask: Tensor | None = None,
    rejected_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sum each response's log-probs over its selected tokens only.

    Args:
        chosen_per_token_logps: Shape `(B, T)`, the policy's log-probs of the chosen tokens.
        rejected_per_token_logps: Shape `(B, T)`, the policy's log-probs of the rejected tokens.
        ref_chosen_per_token_logps: Shape `(B, T)`, the reference's log-probs of the chosen tokens.
        ref_rejected_per_token_logps: Shape `(B, T)`, the reference's log-probs of the rejected tokens.
        threshold: `sdpo_threshold` `q`; the top `1 - q` share of each response's tokens is kept.
        chosen_mask: Shape `(B, T)`, bool; `None` means every position is a real token.
        rejected_mask: Shape `(B, T)`, bool; `None` means every position is a real token.

    Returns:
        `(chosen, rejected, ref_chosen, ref_rejected)`, each `(B,)`: log-probs summed over kept tokens.
    """
    if chosen_mask is None:
        chosen_mask = torch.ones_like(chosen_per_token_logps, dtype=torch.bool)
    if rejected_mask is None:
        rejected_mask = torch.ones_like(rejected_per_token_logps, dtype=torch.bool)
    *_, chosen_keep, rejected_keep = select_sdpo_tokens(
        chosen_per_token_logps, rejected_per_token_logps, ref_chosen_per_token_logps, ref_rejected_per_token_logps,
        chosen_mask=chosen_mask.bool(), rejected_mask=rejected_mask.bool(), threshold=threshold,
    )  # fmt: skip
    return (
        masked_sum(chosen_per_token_logps, chosen_keep),
        masked_sum(rejected_per_token_logps, rejected_keep),
        masked_sum(ref_chosen_per_token_logps, chosen_keep),
        masked_sum(ref_rejected_per_token_logps, rejected_keep),
    )


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


@dataclass
class SelectiveDPOOutput(SelectiveLossOutput):
    """`SelectiveLossOutput` plus Selective-DPO's kept-token sums, each `(B,)`.

    Rewards are `beta * (chosen_logps - ref_chosen_logps)` and likewise for rejected.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor


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
    rule: str = "scores",
    generator: torch.Generator | None = None,
    count_rule: str = "ceil",
    chosen_given: Tensor | None = None,
    rejected_given: Tensor | None = None,
    scorer_chosen_logps: Tensor | None = None,
    scorer_rejected_logps: Tensor | None = None,
    scoring_chosen_logps: Tensor | None = None,
    scoring_rejected_logps: Tensor | None = None,
    tie_tolerance: float = SCORE_TIE_TOLERANCE,
    noise: NoiseBound | None = None,
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
        rule: `scores`, a control (`random`, seeded by `generator`, or `all`), `confidence`, or `spans`.
        count_rule: `ceil` or `quantile` (see `select_sdpo_tokens`).
        chosen_given: Shape `(B, T)`, bool: with `rule="spans"`, the chosen tokens kept.
        rejected_given: Shape `(B, T)`, bool: with `rule="spans"`, the rejected tokens kept.
        scorer_chosen_logps: Shape `(B, T)`: with `rule="scorer"`, the scorer's log-prob of each chosen token.
        scorer_rejected_logps: Shape `(B, T)`: the same for the rejected tokens.
        scoring_chosen_logps: Shape `(B, T)`: the policy's chosen log-probs the scores compare, when computed apart
            from the loss's (e.g. a no-grad float32 pass); None: `policy_chosen_logps`.
        scoring_rejected_logps: Shape `(B, T)`: the same for the rejected tokens.
        tie_tolerance: The scores' tie band in nats (float32 precision, `selection.SCORE_TIE_TOLERANCE`).
        noise: The run's per-token noise bound; responses with no score outside it keep every token.

    Returns:
        A `SelectiveDPOOutput`; `losses` has shape `(B,)`.
    """
    scoring_chosen = policy_chosen_logps if scoring_chosen_logps is None else scoring_chosen_logps
    scoring_rejected = policy_rejected_logps if scoring_rejected_logps is None else scoring_rejected_logps
    chosen_scores, rejected_scores, chosen_keep, rejected_keep = select_sdpo_tokens(
        scoring_chosen,
        scoring_rejected,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
        threshold=threshold,
        rule=rule,
        generator=generator,
        count_rule=count_rule,
        chosen_given=chosen_given,
        rejected_given=rejected_given,
        scorer_chosen_logps=scorer_chosen_logps,
        scorer_rejected_logps=scorer_rejected_logps,
        tie_tolerance=tie_tolerance,
        noise=noise,
    )
    chosen_logps = masked_sum(policy_chosen_logps, chosen_keep)
    rejected_logps = masked_sum(policy_rejected_logps, rejected_keep)
    ref_chosen = masked_sum(ref_chosen_logps, chosen_keep).detach()
    ref_rejected = masked_sum(ref_rejected_logps, rejected_keep).detach()

    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    losses = dpo_sigmoid_loss(chosen_logratios, rejected_logratios, beta=beta, label_smoothing=label_smoothing)
    bounds = sdpo_noise_bounds(noise, rule, scoring_chosen, scoring_rejected, ref_chosen_logps,
                               ref_rejected_logps, scorer_chosen_logps, scorer_rejected_logps)  # fmt: skip
    chosen_fallback, chosen_uncertain = noise_diagnostics(chosen_scores, chosen_mask.bool(), chosen_keep, bounds[0])
    rejected_fallback, rejected_uncertain = noise_diagnostics(rejected_scores, rejected_mask.bool(), rejected_keep, bounds[1])
    return SelectiveDPOOutput(
        chosen_fallback=chosen_fallback,
        rejected_fallback=rejected_fallback,
        chosen_uncertain=chosen_uncertain,
        rejected_uncertain=rejected_uncertain,
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


def sepo_keep_masks(
    chosen_token_rewards: Tensor,
    rejected_token_rewards: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    chosen_share: float = 0.3,
    rejected_share: float = 0.3,
    rule: str = "scores",
    generator: torch.Generator | None = None,
    tie_tolerance: float = SCORE_TIE_TOLERANCE,
    noise: NoiseBound | None = None,
) -> tuple[Tensor, Tensor]:
    """SePO's kept tokens: the highest-reward `chosen_share` of chosen tokens, the lowest-reward
    `rejected_share` of rejected tokens (or a control `rule`).

    They depend only on the stored rewards, so they are known before the policy's forward, which
    then scores only these positions.

    Args:
        chosen_token_rewards: Shape `(B, T)`. Oracle token rewards of the chosen response.
        rejected_token_rewards: Shape `(B, T)`. Oracle token rewards of the rejected response.
        chosen_mask: Shape `(B, T)`, bool. True on real chosen-response tokens.
        rejected_mask: Shape `(B, T)`, bool. True on real rejected-response tokens.
        tie_tolerance: The rewards' tie band in nats (float32 precision).
        noise: The run's noise bound; a response whose every reward lies within it keeps every token.

    Returns:
        `(chosen_keep, rejected_keep)`, each `(B, T)` bool.
    """
    select = dict(rule=rule, generator=generator, tie_tolerance=tie_tolerance)
    chosen_scores, rejected_scores = chosen_token_rewards.detach().float(), -rejected_token_rewards.detach().float()
    bounds = sepo_noise_bounds(noise, rule, chosen_scores, rejected_scores)
    chosen_keep = select_tokens(chosen_scores, chosen_mask, keep_share=chosen_share, noise_bound=bounds[0], **select)
    rejected_keep = select_tokens(rejected_scores, rejected_mask, keep_share=rejected_share, noise_bound=bounds[1], **select)
    return chosen_keep, rejected_keep  # (B, T) each


def sepo_noise_bounds(noise: NoiseBound | None, rule: str, chosen_rewards: Tensor, rejected_rewards: Tensor):
    """Noise bounds `(B, T)` of SePO's stored token rewards. Only their difference is stored, not the two log-probs
    behind it, so every token gets the bound of the least likely bin (the largest). `(None, None)` without one."""
    if noise is None or rule != "scores":
        return None, None
    return torch.full_like(chosen_rewards, noise.largest()), torch.full_like(rejected_rewards, noise.largest())


def sepo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_token_rewards: Tensor,
    rejected_token_rewards: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    chosen_share: float = 0.3,
    rejected_share: float = 0.3,
    beta: float = 1.0,
    gamma: float = 0.0,
    rule: str = "scores",
    generator: torch.Generator | None = None,
    keep: tuple[Tensor, Tensor] | None = None,
    tie_tolerance: float = SCORE_TIE_TOLERANCE,
    noise: NoiseBound | None = None,
) -> SelectiveLossOutput:
    """SePO loss: reference-free, on the highest-reward chosen and lowest-reward rejected tokens.

    Args:
        policy_chosen_logps: Shape `(B, T)`. Policy log-prob of each chosen token (with gradient).
        policy_rejected_logps: Shape `(B, T)`. Policy log-prob of each rejected token (with gradient).
        chosen_token_rewards: Shape `(B, T)`. Oracle token rewards `log p_oracle - log p_oracle_ref`.
        rejected_token_rewards: Shape `(B, T)`. Same for the rejected response.
        chosen_mask: Shape `(B, T)`, bool. True on real chosen-response tokens.
        rejected_mask: Shape `(B, T)`, bool. True on real rejected-response tokens.
        chosen_share: `k_w`, share of chosen tokens kept (highest reward first), in `(0, 1]`.
        rejected_share: `k_l`, share of rejected tokens kept (lowest reward first), in `(0, 1]`.
        beta: Scale of the length-normalized log-likelihood `u`.
        gamma: Target margin between `u(y_w)` and `u(y_l)`.
        rule: `scores`, or a control: `random` (seeded by `generator`) or `all`.
        keep: `(chosen_keep, rejected_keep)` from `sepo_keep_masks` when already chosen (the policy's log-probs
            may then be filled at the kept positions only); `None` selects here.
        tie_tolerance: The rewards' tie band when selecting here (see `sepo_keep_masks`).
        noise: The run's noise bound (see `sepo_keep_masks`), for selecting here and for the diagnostics.

    Returns:
        A `SelectiveLossOutput` whose rewards are `u(y_w)` and `u(y_l)`; `losses` has shape `(B,)`.
    """
    chosen_scores = chosen_token_rewards.detach().float()
    rejected_scores = rejected_token_rewards.detach().float()
    if keep is None:
        keep = sepo_keep_masks(
            chosen_scores, rejected_scores, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
            chosen_share=chosen_share, rejected_share=rejected_share, rule=rule, generator=generator,
            tie_tolerance=tie_tolerance, noise=noise,
        )  # fmt: skip
    chosen_keep, rejected_keep = keep  # (B, T) each
    # An empty kept set has u = 0 (a zero sum over a count clamped to 1), never a division by zero.
    chosen_u = beta * masked_sum(policy_chosen_logps, chosen_keep) / chosen_keep.sum(-1).clamp(min=1)
    rejected_u = beta * masked_sum(policy_rejected_logps, rejected_keep) / rejected_keep.sum(-1).clamp(min=1)
    losses = -F.logsigmoid(chosen_u - rejected_u - gamma)
    bounds = sepo_noise_bounds(noise, rule, chosen_scores, -rejected_scores)
    chosen_fallback, chosen_uncertain = noise_diagnostics(chosen_scores, chosen_mask.bool(), chosen_keep, bounds[0])
    rejected_fallback, rejected_uncertain = noise_diagnostics(-rejected_scores, rejected_mask.bool(), rejected_keep, bounds[1])
    return SelectiveLossOutput(
        chosen_fallback=chosen_fallback,
        rejected_fallback=rejected_fallback,
        chosen_uncertain=chosen_uncertain,
        rejected_uncertain=rejected_uncertain,
        losses=losses,
        chosen_rewards=chosen_u.detach(),
        rejected_rewards=rejected_u.detach(),
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_keep=chosen_keep,
        rejected_keep=rejected_keep,
    )
