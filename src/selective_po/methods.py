"""Methods: each a named composition of a scorer, a weighting and a loss.

Data flow: `TokenValues` (per-token log-probs of the run's models) -> scorer (`scoring.py`) -> weighting
(`weighting.py`) -> loss (`losses.py`). A `Method` runs the three in order and reports what each decided
(scores, kept tokens or weights, noise diagnostics) beside the per-example losses.

| method | `loss_type` | scorer | weighting | loss | models besides the policy |
| --- | --- | --- | --- | --- | --- |
| Selective-DPO | `sdpo` | `PolicyGap` | `TopShare` | `WeightedDPO` | reference |
| fixed-score variant | `sdpo`, rule `scorer` | `FixedGap` | `TopShare` | `WeightedDPO` | reference, scorer (stored) |
| ConfPO rule | `sdpo`/`sepo`, rule `confidence` | `Confidence` | `AboveMean` | the method's | none |
| controls | rule `random` / `all` | the method's | `RandomShare` / `AllTokens` | the method's | the method's |
| span supervision | rule `spans` | the method's | `Given` | the method's | the method's |
| SePO | `sepo` | `OracleReward` | `TopShare` | `LengthNormalizedKept` | oracle and its reference (stored) |
| TGDPO | `tgdpo` | `RewardModelGap` | `Affine` | `WeightedDPO` | reference, reward model (stored) |
| TIS-DPO | `tisdpo` | `ContrastiveGap` | `RankRange` | `WeightedDPO` | reference, forward and reverse DPO models (stored) |

A new method is one more composition here (and its float64 reference test); no other function changes.
The functions at the end (`selective_dpo_loss`, `sepo_loss`, `tgdpo_loss`, `tisdpo_loss`, ...) run a
composition on plain tensors, for use outside the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from .losses import LengthNormalizedKept, LossTerms, SelectiveDPOOutput, SelectiveLossOutput, WeightedDPO, masked_sum
from .noise import NoiseBound
from .scoring import Confidence, ContrastiveGap, FixedGap, GivenTokens, OracleReward, PolicyGap, RewardModelGap
from .selection import COUNT_RULES, SCORE_TIE_TOLERANCE, SELECTION_RULES, rows_with_signal, uncertain_decisions
from .token_values import Pair, TokenScores, TokenValues
from .weighting import AboveMean, Affine, AllTokens, EndTokens, Given, LengthDesensitized, RandomShare, RankRange, TopShare


class Scorer(Protocol):
    reads_policy: bool  # whether its scores compare the policy's log-probs (ranked live, every step)
    description: str  # what its scores are, and what to do when one is not finite, for the error that says so
    remedy: str

    def __call__(self, values: TokenValues, noise: NoiseBound | None = None) -> TokenScores: ...


class Weighting(Protocol):
    ranks_scores: bool

    def __call__(self, scores: TokenScores, values: TokenValues) -> Pair: ...


class Loss(Protocol):
    sparse: bool  # whether it reads the policy's log-probs only where a weight is non-zero

    def __call__(self, values: TokenValues, weights: Pair) -> LossTerms: ...


@dataclass(frozen=True)
class Method:
    """A scorer, a weighting and a loss, run in that order on one batch's `TokenValues`."""

    name: str
    scorer: Scorer
    weighting: Weighting
    loss: Loss

    @property
    def needs_noise_bound(self) -> bool:
        """Whether its weighting cuts ranked scores, so that the scores' noise bound decides rows without signal."""
        return self.weighting.ranks_scores

    @property
    def weights_before_forward(self) -> bool:
        """Whether its weights follow from stored values alone and its loss reads the policy only where they are
        non-zero (SePO): the policy's LM head then need project only those positions."""
        return self.loss.sparse and not self.scorer.reads_policy

    def weights(self, values: TokenValues, noise: NoiseBound | None = None) -> Pair:
        """The weighting's masks or weights `(B, T)` each, e.g. to know before the policy's forward which positions the
        loss reads (when the scorer needs no policy log-probs)."""
        return self.weighting(self.scorer(values, noise if self.needs_noise_bound else None), values)

    def __call__(self, values: TokenValues, *, noise: NoiseBound | None = None, weights: Pair | None = None) -> SelectiveLossOutput:
        """Per-example losses `(B,)` and what decided them. `weights`: the weighting's output when already computed
        (`Method.weights`); the scores are still computed, for the report."""
        scores = self.scorer(values, noise if self.needs_noise_bound else None)
        if weights is None:
            weights = self.weighting(scores, values)
        # The noise diagnostics read the tokens the rule chose among (`EndTokens` leaves out those after the end of turn).
        candidates = self.weighting.candidates(values) if hasattr(self.weighting, "candidates") else values.mask
        return report(scores, weights, self.loss(values, weights), candidates, shown=getattr(self.scorer, "shown", None))


def noise_diagnostics(scores: Tensor, mask: Tensor, keep: Tensor, bound: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """`(fallback (B,), uncertain (B, T))`: the responses that kept every token because no score left its noise
    bound, and the decisions of the other responses that lay within it. `(None, None)` without a bound."""
    if bound is None:
        return None, None
    fallback = mask.any(-1) & ~rows_with_signal(scores, mask, bound)
    return fallback, uncertain_decisions(scores, mask, keep, noise_bound=bound)


def report(scores: TokenScores, weights: Pair, terms: LossTerms, mask: Pair, *, shown=None) -> SelectiveLossOutput:
    """The method's output: the loss's terms, the scores (as `shown(scores)` gives them, when a scorer reports other
    values than it ranks), the kept tokens (non-zero weight) and the noise diagnostics over `mask`, the tokens the
    weighting chose among."""
    selective = weights[0].dtype == torch.bool
    keep = tuple(w if selective else (w != 0) & m.bool() for w, m in zip(weights, mask))
    bounds = (scores.chosen_bound, scores.rejected_bound)  # only where the weighting cut ranked scores
    chosen_fallback, chosen_uncertain = noise_diagnostics(scores.chosen, mask[0].bool(), keep[0], bounds[0])
    rejected_fallback, rejected_uncertain = noise_diagnostics(scores.rejected, mask[1].bool(), keep[1], bounds[1])
    output = SelectiveDPOOutput if terms.sums is not None else SelectiveLossOutput
    return output(
        terms.losses, terms.chosen_rewards, terms.rejected_rewards, *(shown(scores) if shown else (scores.chosen, scores.rejected)), *keep,
        chosen_fallback=chosen_fallback, rejected_fallback=rejected_fallback,
        chosen_uncertain=chosen_uncertain, rejected_uncertain=rejected_uncertain,
        chosen_weights=None if selective else weights[0], rejected_weights=None if selective else weights[1],
        **(terms.sums or {}),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The named compositions


def _selections(chosen_share: float, rejected_share: float, count_rule: str, tie_tolerance: float) -> dict:
    """The weighting of each `selection_rule` (`scorer` cuts the fixed scores as `scores` cuts the live ones)."""
    top = TopShare(chosen_share, rejected_share, count_rule=count_rule, tie_tolerance=tie_tolerance)
    return {"scores": top, "scorer": top, "random": RandomShare(chosen_share, rejected_share), "all": AllTokens(),
            "confidence": AboveMean(), "spans": Given()}  # fmt: skip


def _check_rule(rule: str, count_rule: str = "ceil") -> None:
    if rule not in SELECTION_RULES:
        raise ValueError(f"Unknown selection rule {rule!r}; expected one of {SELECTION_RULES}.")
    if count_rule not in COUNT_RULES:
        raise ValueError(f"Unknown count rule {count_rule!r}; expected one of {COUNT_RULES}.")


def selective_dpo(rule: str = "scores", *, threshold: float, beta: float, label_smoothing: float = 0.0,
                  count_rule: str = "ceil", tie_tolerance: float = SCORE_TIE_TOLERANCE) -> Method:  # fmt: skip
    """Selective-DPO (Dong, arXiv 2507.07725): DPO on the top `1 - threshold` share of each response's tokens by
    the policy's gap to the reference; `rule` swaps the selection (`selection.SELECTION_RULES`)."""
    _check_rule(rule, count_rule)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold (sdpo_threshold) must lie in [0, 1), got {threshold}.")
    scorer = {"scorer": FixedGap(), "confidence": Confidence()}.get(rule, PolicyGap())
    weighting = _selections(1.0 - threshold, 1.0 - threshold, count_rule, tie_tolerance)[rule]
    return Method(f"Selective-DPO ({rule})", scorer, weighting, WeightedDPO(beta, label_smoothing))


def sepo(rule: str = "scores", *, chosen_share: float, rejected_share: float, beta: float, gamma: float = 0.0,
         tie_tolerance: float = SCORE_TIE_TOLERANCE) -> Method:  # fmt: skip
    """SePO (Yang et al., arXiv 2408.13518): reference-free, on the highest-reward chosen and lowest-reward rejected
    tokens by a DPO-trained oracle's token rewards."""
    _check_rule(rule)
    if rule == "scorer":
        raise ValueError("rule='scorer' is Selective-DPO's fixed-score variant; SePO's oracle already fixes its tokens.")
    scorer = {"confidence": Confidence(), "spans": GivenTokens()}.get(rule, OracleReward())
    weighting = _selections(chosen_share, rejected_share, "ceil", tie_tolerance)[rule]
    return Method(f"SePO ({rule})", scorer, weighting, LengthNormalizedKept(beta, gamma))


def tgdpo(*, beta: float, alpha: float = 0.5) -> Method:
    """TGDPO (token-level reward guidance; official code dvlab-research/TGDPO): DPO whose chosen tokens weigh
    `1 + alpha * beta * r` and rejected ones `1 - alpha * beta * r`, `r = log p_RM - log p_ref` from a reward model
    DPO-trained on the data."""
    return Method("TGDPO", RewardModelGap(), Affine(alpha * beta), WeightedDPO(beta))


def tisdpo(*, beta: float, decimals: int | None = None, low: float = 0.7, high: float = 1.3) -> Method:
    """TIS-DPO (Liu et al., ICLR 2025; official code exlaw/TIS-DPO), `rank_based` weights: DPO whose tokens weigh
    `low + (high - low) * rank / (n - 1)` by the contrastive score `log p_forward - log p_reverse` (negated on
    rejected tokens), the end-of-sequence token 0. `decimals=2` rounds the scores first, as the official code does."""
    return Method("TIS-DPO", ContrastiveGap(decimals), RankRange(low, high, zero_end=True), WeightedDPO(beta))


def method_for(args) -> Method | None:
    """The composition a config asks for: the selection rules choose among each response's tokens up to its end of
    turn, deciding that token by `end_token_selection` (`weighting.EndTokens`), and TRL's `ld_alpha` and
    `f_divergence_type` apply to the reference-anchored losses; `None` for TRL's own loss types (or several of them)."""
    if len(args.loss_type) != 1:
        return None
    loss_type = args.loss_type[0]
    if loss_type == "sepo":
        method = sepo(args.selection_rule, chosen_share=args.sepo_chosen_share, rejected_share=args.sepo_rejected_share,
                      beta=args.beta, gamma=args.sepo_gamma)  # fmt: skip
        return replace(method, weighting=EndTokens(method.weighting, args.end_token_selection))
    if loss_type == "sdpo":
        method = selective_dpo(args.selection_rule, threshold=args.sdpo_threshold, beta=args.beta,
                               label_smoothing=args.label_smoothing, count_rule=args.sdpo_count_rule)  # fmt: skip
        method = replace(method, weighting=EndTokens(method.weighting, args.end_token_selection))
    elif loss_type == "tgdpo":
        method = tgdpo(beta=args.beta, alpha=args.tgdpo_alpha)
    elif loss_type == "tisdpo":
        method = tisdpo(beta=args.beta, decimals=args.tisdpo_score_decimals)
    else:
        return None
    loss = replace(method.loss, f_divergence=args.f_divergence_type, f_alpha=args.f_alpha_divergence_coef)
    weighting = method.weighting if args.ld_alpha is None else LengthDesensitized(method.weighting, args.ld_alpha)
    return replace(method, weighting=weighting, loss=loss)


# ---------------------------------------------------------------------------------------------
# The compositions on plain tensors


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
    """Selective-DPO's scores and kept tokens: the top `1 - threshold` share of each response (or `rule`'s choice).

    Args:
        policy_chosen_logps: `(B, T)`, the policy's log-probs the scores compare.
        policy_rejected_logps: `(B, T)`, the policy's log-probs the scores compare.
        ref_chosen_logps: `(B, T)`, the reference's.
        ref_rejected_logps: `(B, T)`, the reference's.
        chosen_mask: `(B, T)` bool, the completion tokens.
        rejected_mask: `(B, T)` bool, the completion tokens.
        threshold: `sdpo_threshold` `q` in `[0, 1)`.
        rule: `scores`, a control (`random`, seeded by `generator`, or `all`), `confidence` (ConfPO), `spans` (the
            tokens `chosen_given` / `rejected_given` name) or `scorer` (fixed scores from `scorer_*_logps`).
        count_rule: `ceil` or `quantile` (`weighting.TopShare`).
        tie_tolerance: The scores' tie band in nats (float32 precision).
        noise: The run's per-token noise bound; a response with no score outside it keeps every token.

    Returns:
        `(chosen_scores, rejected_scores, chosen_keep, rejected_keep)`, each `(B, T)`; scores float32 and detached.
    """
    method = selective_dpo(rule, threshold=threshold, beta=1.0, count_rule=count_rule, tie_tolerance=tie_tolerance)
    values = _sdpo_values(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_mask,
                          rejected_mask, rule, generator, chosen_given, rejected_given, scorer_chosen_logps, scorer_rejected_logps)  # fmt: skip
    scores = method.scorer(values, noise if method.needs_noise_bound else None)
    keep = method.weighting(scores, values)
    return scores.chosen, scores.rejected, keep[0], keep[1]


def _sdpo_values(pc, pr, rc, rr, chosen_mask, rejected_mask, rule, generator, chosen_given, rejected_given, sc, sr,
                 scoring=None) -> TokenValues:  # fmt: skip
    if rule == "scorer" and (sc is None or sr is None):
        raise ValueError("rule='scorer' needs the scorer's per-token log-probs (scorer_chosen_logps, scorer_rejected_logps).")
    return TokenValues(
        mask=(chosen_mask.bool(), rejected_mask.bool()), policy=(pc, pr), reference=(rc, rr), scoring=scoring,
        stored={"scorer": (sc, sr)} if sc is not None else {}, generator=generator,
        given=(chosen_given, rejected_given) if chosen_given is not None else None,
    )  # fmt: skip


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
        policy_chosen_logps: `(B, T)`, the policy's log-probs (with gradient).
        policy_rejected_logps: `(B, T)`, the policy's log-probs (with gradient).
        ref_chosen_logps: `(B, T)`, the reference's.
        ref_rejected_logps: `(B, T)`, the reference's.
        chosen_mask: `(B, T)` bool, the completion tokens (no prompt, no padding).
        rejected_mask: `(B, T)` bool, the completion tokens (no prompt, no padding).
        threshold: As in `select_sdpo_tokens`.
        rule: As in `select_sdpo_tokens`.
        generator: As in `select_sdpo_tokens`.
        count_rule: As in `select_sdpo_tokens`.
        chosen_given: As in `select_sdpo_tokens`.
        rejected_given: As in `select_sdpo_tokens`.
        scorer_chosen_logps: As in `select_sdpo_tokens`.
        scorer_rejected_logps: As in `select_sdpo_tokens`.
        tie_tolerance: As in `select_sdpo_tokens`.
        noise: As in `select_sdpo_tokens`.
        beta: DPO's inverse temperature.
        label_smoothing: cDPO's label-flip probability.
        scoring_chosen_logps: `(B, T)`, the policy's log-probs the scores compare when
            computed apart from the loss's (a no-grad float32 pass); None: the loss's, detached.
        scoring_rejected_logps: `(B, T)`, the policy's log-probs the scores compare when
            computed apart from the loss's (a no-grad float32 pass); None: the loss's, detached.

    Returns:
        A `SelectiveDPOOutput`; `losses` has shape `(B,)`.
    """
    method = selective_dpo(rule, threshold=threshold, beta=beta, label_smoothing=label_smoothing, count_rule=count_rule,
                           tie_tolerance=tie_tolerance)  # fmt: skip
    scoring = (scoring_chosen_logps, scoring_rejected_logps) if scoring_chosen_logps is not None else None
    values = _sdpo_values(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_mask,
                          rejected_mask, rule, generator, chosen_given, rejected_given, scorer_chosen_logps,
                          scorer_rejected_logps, scoring)  # fmt: skip
    return method(values, noise=noise)


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
    """Sum each response's log-probs over its Selective-DPO-selected tokens only.

    Args:
        chosen_per_token_logps: `(B, T)`, the policy's log-probs.
        rejected_per_token_logps: `(B, T)`, the policy's log-probs.
        ref_chosen_per_token_logps: `(B, T)`, the reference's.
        ref_rejected_per_token_logps: `(B, T)`, the reference's.
        threshold: `sdpo_threshold` `q`; the top `1 - q` share of each response's tokens is kept.
        chosen_mask: `(B, T)` bool; `None` means every position is a real token.
        rejected_mask: `(B, T)` bool; `None` means every position is a real token.

    Returns:
        `(chosen, rejected, ref_chosen, ref_rejected)`, each `(B,)`: log-probs summed over kept tokens.
    """
    chosen_mask = torch.ones_like(chosen_per_token_logps, dtype=torch.bool) if chosen_mask is None else chosen_mask
    rejected_mask = torch.ones_like(rejected_per_token_logps, dtype=torch.bool) if rejected_mask is None else rejected_mask
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
    """SePO's kept tokens `(B, T)` each: the highest-reward `chosen_share` of chosen tokens, the lowest-reward
    `rejected_share` of rejected tokens (or a control `rule`). They follow from the stored rewards alone, so they are
    known before the policy's forward."""
    method = sepo(rule, chosen_share=chosen_share, rejected_share=rejected_share, beta=1.0, tie_tolerance=tie_tolerance)
    values = TokenValues(mask=(chosen_mask.bool(), rejected_mask.bool()), stored={"oracle": (chosen_token_rewards, rejected_token_rewards)},
                         generator=generator)  # fmt: skip
    return method.weights(values, noise)


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
        policy_chosen_logps: `(B, T)`, the policy's log-probs (with gradient).
        policy_rejected_logps: `(B, T)`, the policy's log-probs (with gradient).
        chosen_token_rewards: `(B, T)`, oracle token rewards `log p_oracle - log p_oracle_ref`.
        rejected_token_rewards: `(B, T)`, the same for the rejected response.
        chosen_mask: `(B, T)` bool, the completion tokens.
        rejected_mask: `(B, T)` bool, the completion tokens.
        chosen_share: `k_w` in `(0, 1]`: the share of chosen tokens kept, highest reward first.
        rejected_share: `k_l` in `(0, 1]`: the share of rejected tokens kept, lowest reward first.
        beta: Scale of the length-normalized log-likelihood `u`.
        gamma: Target margin between `u(y_w)` and `u(y_l)`.
        rule: `scores`, or a control: `random` (seeded by `generator`) or `all`.
        keep: `(chosen_keep, rejected_keep)` from `sepo_keep_masks` when already chosen; `None` selects here.
        tie_tolerance: The rewards' tie band in nats.
        noise: The run's noise bound; a response whose every reward lies within it keeps every token.

    Returns:
        A `SelectiveLossOutput` whose rewards are `u(y_w)` and `u(y_l)` and whose scores are the token rewards;
        `losses` has shape `(B,)`.
    """
    method = sepo(rule, chosen_share=chosen_share, rejected_share=rejected_share, beta=beta, gamma=gamma,
                  tie_tolerance=tie_tolerance)  # fmt: skip
    values = TokenValues(mask=(chosen_mask.bool(), rejected_mask.bool()), policy=(policy_chosen_logps, policy_rejected_logps),
                         stored={"oracle": (chosen_token_rewards, rejected_token_rewards)}, generator=generator)  # fmt: skip
    return method(values, noise=noise, weights=keep)


def tgdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    reward_model_chosen_logps: Tensor,
    reward_model_rejected_logps: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    beta: float,
    alpha: float = 0.5,
) -> SelectiveDPOOutput:
    """TGDPO loss: `-log sigmoid(sum_t beta (1 + alpha beta r^c_t) D^c_t - sum_t beta (1 - alpha beta r^r_t) D^r_t)`,
    `D = log pi - log ref`, `r = log p_RM - log ref`.

    Args:
        policy_chosen_logps: `(B, T)`, the policy's log-probs (with gradient).
        policy_rejected_logps: `(B, T)`, the policy's log-probs (with gradient).
        ref_chosen_logps: `(B, T)`, the reference's.
        ref_rejected_logps: `(B, T)`, the reference's.
        reward_model_chosen_logps: `(B, T)`, the reward model's.
        reward_model_rejected_logps: `(B, T)`, the reward model's.
        chosen_mask: `(B, T)` bool, the completion tokens.
        rejected_mask: `(B, T)` bool, the completion tokens.
        beta: DPO's inverse temperature.
        alpha: The reward guidance's strength (the official default 0.5).

    Returns:
        A `SelectiveDPOOutput` with the weights; `losses` has shape `(B,)`.
    """
    values = TokenValues(mask=(chosen_mask.bool(), rejected_mask.bool()), policy=(policy_chosen_logps, policy_rejected_logps),
                         reference=(ref_chosen_logps, ref_rejected_logps),
                         stored={"reward_model": (reward_model_chosen_logps, reward_model_rejected_logps)})  # fmt: skip
    return tgdpo(beta=beta, alpha=alpha)(values)


def tisdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    contrastive_chosen: Tensor,
    contrastive_rejected: Tensor,
    *,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    chosen_end: Tensor,
    rejected_end: Tensor,
    beta: float,
    decimals: int | None = None,
) -> SelectiveDPOOutput:
    """TIS-DPO loss with `rank_based` weights: `-log sigmoid(beta [sum_t w^c_t D^c_t - sum_t w^r_t D^r_t])`.

    Args:
        policy_chosen_logps: `(B, T)`, the policy's log-probs (with gradient).
        policy_rejected_logps: `(B, T)`, the policy's log-probs (with gradient).
        ref_chosen_logps: `(B, T)`, the reference's.
        ref_rejected_logps: `(B, T)`, the reference's.
        contrastive_chosen: `(B, T)`, `log p_forward - log p_reverse` (float32).
        contrastive_rejected: `(B, T)`, `log p_forward - log p_reverse` (float32).
        chosen_mask: `(B, T)` bool, the completion tokens.
        rejected_mask: `(B, T)` bool, the completion tokens.
        chosen_end: `(B, T)` bool, each response's end-of-sequence token and after (weight 0;
            `token_values.end_of_sequence_mask`).
        rejected_end: `(B, T)` bool, each response's end-of-sequence token and after (weight 0;
            `token_values.end_of_sequence_mask`).
        beta: DPO's inverse temperature.
        decimals: Round the scores first (2: the official code).

    Returns:
        A `SelectiveDPOOutput` with the weights; `losses` has shape `(B,)`.
    """
    values = TokenValues(mask=(chosen_mask.bool(), rejected_mask.bool()), policy=(policy_chosen_logps, policy_rejected_logps),
                         reference=(ref_chosen_logps, ref_rejected_logps), end=(chosen_end, rejected_end),
                         stored={"contrastive": (contrastive_chosen, contrastive_rejected)})  # fmt: skip
    return tisdpo(beta=beta, decimals=decimals)(values)
