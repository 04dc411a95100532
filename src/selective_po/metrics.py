"""What the trainers log each step: TRL's DPO metrics under TRL's names, and the selection's own.

Data flow: per-token log-probs, selection mask and loss -> **logged metrics** (this module) -> the
trainer's `_metrics`, which TRL averages over each logging window.

Every function returns `{name: value}` for one step, with every count and sum gathered over the
processes first (`gather_for_metrics` drops the duplicates of an uneven last batch), so each value is
the same on every process and means the same with 1 or N of them.
"""

from __future__ import annotations

import torch
from accelerate.utils import gather_object
from torch import Tensor

from .losses import SelectiveLossOutput, masked_sum


def dpo_metrics(
    accelerator, *, outputs, per_token_logps: Tensor, shift_mask: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> dict[str, float]:
    """What TRL's DPOTrainer logs, under the same names.

    Selective-DPO passes DPO's rewards over every response token, so curves compare with a plain
    DPO run; the selective loss's own margin is `selection/rewards_margin_kept`, which reads low by
    design (selection picks the tokens where the policy is furthest behind on chosen and ahead on
    rejected). SePO passes its `u(y)`, as SimPO-style trainers do.

    Args:
        outputs: The policy's fused-LM-head outputs (`entropy`, `mean_logits`, `is_top1`), `(2B, T')`.
        per_token_logps: Shape `(2B, T-1)`, the policy's log-probs, `[chosen; rejected]`.
        shift_mask: Shape `(2B, T-1)`, bool, completion positions.
        chosen_rewards, rejected_rewards: Shape `(B,)`.
    """
    gather_sum = lambda t: accelerator.gather_for_metrics(t).sum()  # noqa: E731
    seq_len = shift_mask.size(1)
    chosen_mask, _ = shift_mask.chunk(2, dim=0)
    logged = {}

    tokens = gather_sum(shift_mask.sum())
    entropy = gather_sum((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum())
    logged["entropy"] = (entropy / tokens).item() if tokens > 0 else 0.0

    chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
    for side, logits, mask in zip(("chosen", "rejected"), (chosen_logits, rejected_logits), shift_mask.chunk(2, dim=0)):
        total, count = gather_sum(logits[mask].sum()).item(), gather_sum(mask.sum()).item()
        logged[f"logits/{side}"] = total / count if count > 0 else 0.0

    chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
    correct, count = gather_sum((chosen_top1 & chosen_mask).sum()), gather_sum(chosen_mask.sum())
    logged["mean_token_accuracy"] = (correct / count).item() if count > 0 else 0.0

    chosen_rewards, rejected_rewards = accelerator.gather(chosen_rewards), accelerator.gather(rejected_rewards)
    logged["rewards/chosen"] = chosen_rewards.mean().item()
    logged["rewards/rejected"] = rejected_rewards.mean().item()
    logged["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float().mean().item()
    logged["rewards/margins"] = (chosen_rewards - rejected_rewards).mean().item()
    chosen_logps, rejected_logps = masked_sum(per_token_logps, shift_mask).chunk(2, dim=0)
    logged["logps/chosen"] = accelerator.gather(chosen_logps).mean().item()
    logged["logps/rejected"] = accelerator.gather(rejected_logps).mean().item()
    return logged


def selection_metrics(accelerator, result: SelectiveLossOutput, chosen_mask: Tensor, rejected_mask: Tensor,
                      end_turn: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """Share of completion tokens kept, mean score of kept and dropped tokens, the loss's own margin, what the
    noise bound decided: `fallback_rows` (share of responses that kept every token because no score left the
    bound) and `uncertain_share` (share of the ranked responses' tokens whose cut decision lay within the bound,
    so noise may have made it), and `end_kept` (share of the responses with an end-of-turn token that kept it).

    Args:
        result: The selective loss's output (scores and keep masks `(B, T)`, rewards `(B,)`).
        chosen_mask, rejected_mask: Shape `(B, T)`, bool, completion positions.
        end_turn: `(chosen, rejected)`, `(B, T)` bool each: each response's first end-of-turn token.
    """
    gather_sum = lambda t: accelerator.gather_for_metrics(t).sum().item()  # noqa: E731
    logged = {"selection/rewards_margin_kept": accelerator.gather(result.chosen_rewards - result.rejected_rewards).mean().item()}
    sides = (
        ("chosen", result.chosen_scores, result.chosen_keep, chosen_mask, result.chosen_fallback, result.chosen_uncertain),
        ("rejected", result.rejected_scores, result.rejected_keep, rejected_mask, result.rejected_fallback, result.rejected_uncertain),
    )
    for (side, scores, keep, mask, fallback, uncertain), end in zip(sides, end_turn or (None, None)):
        if end is not None and (n_ends := gather_sum(end.sum())) > 0:
            logged[f"selection/end_kept_{side}"] = gather_sum((keep & end).sum()) / n_ends
        dropped = mask & ~keep
        n_tokens, n_kept, n_dropped = gather_sum(mask.sum()), gather_sum(keep.sum()), gather_sum(dropped.sum())
        kept_score = gather_sum(masked_sum(scores, keep).sum())
        dropped_score = gather_sum(masked_sum(scores, dropped).sum())
        if n_tokens > 0:
            logged[f"selection/kept_share_{side}"] = n_kept / n_tokens
        if fallback is not None:
            n_rows = gather_sum(mask.any(-1).sum())
            ranked_tokens = gather_sum((mask & ~fallback.unsqueeze(-1)).sum())
            if n_rows > 0:
                logged[f"selection/fallback_rows_{side}"] = gather_sum(fallback.sum()) / n_rows
            if ranked_tokens > 0:
                logged[f"selection/uncertain_share_{side}"] = gather_sum(uncertain.sum()) / ranked_tokens
        # An empty set has no mean; logging 0 would read as a real score.
        if n_kept > 0:
            logged[f"selection/score_kept_{side}"] = kept_score / n_kept
        if n_dropped > 0:
            logged[f"selection/score_dropped_{side}"] = dropped_score / n_dropped
    return logged


def step_metrics(accelerator, result: SelectiveLossOutput, *, outputs, per_token_logps: Tensor, shift_mask: Tensor,
                 score_mask: Tensor | None, rewards: tuple[Tensor, Tensor], aux_loss: bool,
                 end_turn: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    """Everything a selective trainer logs for one step: TRL's DPO metrics (`dpo_metrics`, over the positions the LM
    head projected: `score_mask` when it was limited), the selection's (`selection_metrics`) and a mixture-of-experts
    model's `aux_loss`."""
    logged = dpo_metrics(accelerator, outputs=outputs, per_token_logps=per_token_logps,
                         shift_mask=shift_mask if score_mask is None else score_mask, chosen_rewards=rewards[0],
                         rejected_rewards=rewards[1])  # fmt: skip
    logged.update(selection_metrics(accelerator, result, *shift_mask.chunk(2, dim=0), end_turn=end_turn))
    if aux_loss:
        logged["aux_loss"] = accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
    return logged


def check_finite_scores(accelerator, result: SelectiveLossOutput, chosen_mask: Tensor, rejected_mask: Tensor, *,
                        where: str, description: str, remedy: str) -> None:  # fmt: skip
    """Raise if a score that selection ranked is NaN or inf: the top share of NaN is arbitrary tokens.

    Every process learns whether any process found one (one small all-reduce per step), so all of
    them stop with the same message rather than waiting for the failed one in the next collective.
    The offending row is looked up only on failure.

    Args:
        result: The selective loss's output; its `chosen_scores` / `rejected_scores` are `(B, T)`.
        chosen_mask, rejected_mask: Shape `(B, T)`, bool, completion positions.
        where: The step, for the message (`training step 3`).
        description, remedy: What the scores are, and what to do about non-finite ones.
    """
    sides = (("chosen", result.chosen_scores, chosen_mask), ("rejected", result.rejected_scores, rejected_mask))
    bad = [~torch.isfinite(scores) & mask for _, scores, mask in sides]  # (B, T) each
    found = torch.stack([b.any() for b in bad]).any().to(torch.int32).reshape(1)
    if accelerator.num_processes > 1:
        found = accelerator.reduce(found, reduction="sum")
    if not found.item():
        return
    message = None
    if any(b.any() for b in bad):
        (side, scores, _), side_bad = next((side, b) for side, b in zip(sides, bad) if b.any())
        row, token = (int(i) for i in side_bad.nonzero()[0])
        message = (
            f"{description} are not finite at {where}: {side} response, row {row} of the batch, "
            f"position {token} is {scores[row, token].item()}"
        )
    messages = gather_object([message]) if accelerator.num_processes > 1 else [message]
    process, message = next((i, m) for i, m in enumerate(messages) if m is not None)
    on = f" on process {process}" if accelerator.num_processes > 1 else ""
    raise ValueError(f"{message}{on}. Selecting tokens by them would keep arbitrary tokens, so training stops. {remedy}")
