"""Held-out measurements that need no judge, and a view of which tokens were selected.

Two accuracies per pair, both from one policy and one reference forward over TRL's own batches:

- likelihood accuracy: the policy gives the chosen response a higher log-probability than the
  rejected one (`sum log pi(y_w) > sum log pi(y_l)`). Defined before training too, so it shows what
  training changed.
- reward accuracy: DPO's implicit reward margin over all response tokens is positive,
  `beta * [(log pi - log ref)(y_w) - (log pi - log ref)(y_l)] > 0`. It is exactly 0 while the
  policy equals the reference, so it only means something after training.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from accelerate.utils import tqdm

from .losses import masked_sum, select_sdpo_tokens
from .trainer import SelectiveDPOTrainer


@dataclass
class PreferenceEvaluation:
    """Per-pair sums over all response tokens, each `(N,)`, and the accuracies they give."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    beta: float

    @property
    def margins(self) -> torch.Tensor:
        return self.beta * ((self.policy_chosen - self.ref_chosen) - (self.policy_rejected - self.ref_rejected))

    def summary(self) -> dict[str, float]:
        return {
            "pairs": len(self.policy_chosen),
            "likelihood_accuracy": (self.policy_chosen > self.policy_rejected).float().mean().item(),
            "reward_accuracy": (self.margins > 0).float().mean().item(),
            "mean_margin": self.margins.mean().item(),
        }


@torch.no_grad()
def evaluate_preferences(trainer: SelectiveDPOTrainer, dataset=None, *, desc: str = "Scoring pairs") -> PreferenceEvaluation:
    """Score every pair of `dataset` (default: the trainer's prepared `eval_dataset`).

    `dataset` must already be tokenized by the trainer (pass it as `eval_dataset` when building it).
    """
    if dataset is None and trainer.eval_dataset is None:
        raise ValueError("No dataset to evaluate: build the trainer with `eval_dataset=` or pass `dataset=`.")
    was_training = trainer.model.training
    trainer.model.eval()
    sums: dict[str, list[torch.Tensor]] = {"pc": [], "pr": [], "rc": [], "rr": []}
    try:
        for batch in tqdm(trainer.get_eval_dataloader(dataset), desc=desc, disable=_quiet()):
            batch = trainer._prepare_inputs(batch)
            _, policy, ref, mask = trainer.per_token_logps(trainer.model, batch)
            policy_sums = masked_sum(policy.float(), mask)  # (2B,)
            ref_sums = masked_sum(ref.float(), mask)
            gathered = trainer.accelerator.gather_for_metrics((*policy_sums.chunk(2), *ref_sums.chunk(2)))
            for key, value in zip(("pc", "pr", "rc", "rr"), gathered):
                sums[key].append(value.cpu())
    finally:
        trainer.model.train(was_training)
    pc, pr, rc, rr = (torch.cat(sums[key]) for key in ("pc", "pr", "rc", "rr"))
    return PreferenceEvaluation(pc, pr, rc, rr, beta=trainer.beta)


@torch.no_grad()
def explain_pair(trainer: SelectiveDPOTrainer, example: dict, *, threshold: float, color: bool | None = None) -> str:
    """Render one tokenized pair with the tokens Selective-DPO keeps at `threshold` marked.

    Kept tokens are shown reversed on a terminal and wrapped in `⟦ ⟧` elsewhere.
    """
    batch = trainer._prepare_inputs(trainer.data_collator([example]))
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        _, policy, ref, mask = trainer.per_token_logps(trainer.model, batch)
    finally:
        trainer.model.train(was_training)
    chosen_mask, rejected_mask = mask.chunk(2)
    chosen_scores, rejected_scores, chosen_keep, rejected_keep = select_sdpo_tokens(
        *policy.chunk(2), *ref.chunk(2), chosen_mask=chosen_mask, rejected_mask=rejected_mask, threshold=threshold
    )
    # Position t scores token t + 1.
    chosen_ids, rejected_ids = batch["input_ids"][:, 1:].chunk(2)
    color = sys.stdout.isatty() if color is None else color
    tokenizer = trainer._tokenizer
    lines = []
    for side, ids, keep, side_mask in (
        ("chosen", chosen_ids, chosen_keep, chosen_mask),
        ("rejected", rejected_ids, rejected_keep, rejected_mask),
    ):
        n, k = int(side_mask.sum()), int(keep.sum())
        text = _mark_tokens(tokenizer, ids[0][side_mask[0]].tolist(), keep[0][side_mask[0]].tolist(), color=color)
        lines.append(f"{side:>8} ({k}/{n} tokens kept): {text}")
    return "\n".join(lines)


def _mark_tokens(tokenizer, ids: list[int], keep: list[bool], *, color: bool) -> str:
    pieces = []
    for token_id, kept in zip(ids, keep):
        piece = tokenizer.decode([token_id])
        if kept:
            piece = f"\033[7m{piece}\033[0m" if color else f"⟦{piece}⟧"
        pieces.append(piece)
    return "".join(pieces).replace("\n", "\\n")


def _quiet() -> bool:
    return bool(os.environ.get("TQDM_DISABLE"))
