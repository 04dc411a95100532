"""Per-token values of one batch of preference pairs: what every scorer, weighting and loss reads.

Data flow: tokens -> per-token log-probs of the run's models -> **`TokenValues`** (this module) ->
scorer (`scoring.py`) -> weighting (`weighting.py`) -> loss (`losses.py`), composed in `methods.py`.

Every value is a `(chosen, rejected)` pair of `(B, T)` tensors aligned with a boolean completion
mask: position `t` of a row holds the value of that row's token `t + 1` (TRL's shifted layout).
Positions outside the mask may hold anything and are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

Pair = tuple[Tensor, Tensor]  # (chosen, rejected), each (B, T)


@dataclass
class TokenValues:
    """What one batch offers the parts of a method.

    Attributes:
        mask: `(B, T)` bool each: the completion tokens (no prompt, no padding).
        policy: The policy's log-probs, with gradient (`None` before its forward has run).
        reference: The reference's log-probs (the loss's anchor), without gradient.
        scoring: The policy's log-probs that scores compare, when computed apart from `policy` (a no-grad float32
            pass); `None`: `policy`, detached.
        stored: Per-token values of other models by name, stored once before training: `scorer` (a fixed scorer's
            log-probs), `oracle` (SePO's token rewards), `reward_model` (TGDPO's reward model's log-probs),
            `contrastive` (TIS-DPO's `log p_forward - log p_reverse`).
        given: `(B, T)` bool each: the tokens the data names (`selection_rule="spans"`).
        end: `(B, T)` bool each: each response's first end-of-sequence token and everything after it (the last
            completion token where a truncated response has none).
        end_turn: `(B, T)` bool each: each response's first end-of-turn token only (none where a response was
            truncated before it); what the selection rules' `end_token_selection` acts on.
        generator: Seeds the `random` control's draw for this batch.
    """

    mask: Pair
    policy: Pair | None = None
    reference: Pair | None = None
    scoring: Pair | None = None
    stored: dict[str, Pair] = field(default_factory=dict)
    given: Pair | None = None
    end: Pair | None = None
    end_turn: Pair | None = None
    generator: torch.Generator | None = None

    def require(self, name: str) -> Pair:
        """The value called `name` (a field, or a key of `stored`); an error naming it when the batch lacks it."""
        value = getattr(self, name, None) if name in _FIELDS else self.stored.get(name)
        if value is None:
            raise ValueError(f"This method needs the batch's per-token {name!r} values, which were not provided.")
        return value

    def scoring_policy(self) -> Pair:
        """The policy's log-probs that scores compare: `scoring`, else `policy` detached."""
        if self.scoring is not None:
            return self.scoring
        chosen, rejected = self.require("policy")
        return chosen.detach(), rejected.detach()


_FIELDS = ("mask", "policy", "reference", "scoring", "given", "end", "end_turn")


@dataclass
class TokenScores:
    """A scorer's output: per-token scores, higher meaning more worth learning, and how far each may be off.

    Attributes:
        chosen, rejected: `(B, T)` float32, detached.
        chosen_bound, rejected_bound: `(B, T)` nats, the scores' noise bounds (`noise.NoiseBound`), or `None` when
            no bound was asked for or the scores compare no log-probs.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_bound: Tensor | None = None
    rejected_bound: Tensor | None = None


def end_of_sequence_mask(token_ids: Tensor, mask: Tensor, end_ids: list[int]) -> Tensor:
    """Each completion's first end-of-sequence token and every completion token after it; for a completion with
    none (truncated), its last token.

    Args:
        token_ids: `(B, T)` int, the token at each position.
        mask: `(B, T)` bool, the completion positions.
        end_ids: The end-of-sequence token ids.

    Returns:
        `(B, T)` bool, a subset of `mask`; empty for an empty completion.
    """
    return end_and_after(end_of_turn_mask(token_ids, mask, end_ids), mask)


def end_and_after(end_turn: Tensor, mask: Tensor) -> Tensor:
    """`end_of_sequence_mask` from `end_of_turn_mask`'s output `(B, T)`: that token and every completion token after
    it, or a truncated completion's last token."""
    mask = mask.bool()
    positions = torch.arange(mask.size(-1), device=mask.device).expand_as(mask)
    last = positions == torch.where(mask, positions, -1).amax(-1, keepdim=True)  # (B, T)
    return mask & torch.where(end_turn.any(-1, keepdim=True), end_turn.long().cumsum(-1) > 0, last)


def end_of_turn_mask(token_ids: Tensor, mask: Tensor, end_ids: list[int]) -> Tensor:
    """Each completion's first end-of-turn token: the first completion position holding any of `end_ids`.

    Args:
        token_ids: `(B, T)` int, the token at each position.
        mask: `(B, T)` bool, the completion positions.
        end_ids: The end-of-turn token ids (`end_token_ids`: never guessed from the pad id).

    Returns:
        `(B, T)` bool, at most one position per row; none for a completion truncated before its end.
    """
    is_end = torch.isin(token_ids, torch.tensor(end_ids, device=token_ids.device)) & mask.bool()  # (B, T)
    return is_end & (is_end.long().cumsum(-1) == 1)


def end_token_ids(model, tokenizer) -> list[int]:
    """The ids that end a response: every id in the model's `generation_config.eos_token_id` and the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    ids = [i for i in ids + [getattr(tokenizer, "eos_token_id", None)] if i is not None]
    if not ids:
        raise ValueError("Neither the model's generation config nor its tokenizer names an EOS token; set one.")
    return sorted(set(ids))
