"""Held-out measurements that need no judge, and a view of which tokens were selected.

- preference accuracies and margin (below);
- each response's token scores against its known differing span (`span_responses`; the measures
  are in `selection_quality.py`);
- greedy task accuracy under each row's verifier (`greedy_task_accuracy`; arithmetic answers and
  IFEval instructions, see `verifiers.py`), and the share of greedy answers that end: emit an
  end-of-turn token within the token budget (a model trained to push that token down rambles on).

Two accuracies per pair, both from one policy and one reference forward over TRL's own batches:

- likelihood accuracy: the policy gives the chosen response a higher log-probability than the
  rejected one (`sum log pi(y_w) > sum log pi(y_l)`). Defined before training too, so it shows what
  training changed.
- reward accuracy: DPO's implicit reward margin over all response tokens is positive,
  `beta * [(log pi - log ref)(y_w) - (log pi - log ref)(y_l)] > 0`. It is exactly 0 while the
  policy equals the reference, so it only means something after training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from . import spans
from .alignment import span_token_mask
from .intervals import bootstrap_interval  # noqa: F401  (re-exported: part of this module's API)
from .losses import masked_sum
from .methods import select_sdpo_tokens
from .models import generate_completions
from .progress import bar
from .trainer import SelectiveDPOTrainer
from .verifiers import task_of, verify


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

    @property
    def likelihood_correct(self) -> torch.Tensor:
        """`(N,)` bool: the policy gives the chosen response the higher log-probability."""
        return self.policy_chosen > self.policy_rejected

    def summary(self) -> dict[str, float]:
        return {
            "pairs": len(self.policy_chosen),
            "likelihood_accuracy": self.likelihood_correct.float().mean().item(),
            "reward_accuracy": (self.margins > 0).float().mean().item(),
            "mean_margin": self.margins.mean().item(),
        }

    @classmethod
    def of_reference(cls, dataset, *, beta: float) -> PreferenceEvaluation:
        """The evaluation of the reference itself (the policy before training) from stored per-token
        values alone: no forward. `dataset` is the trainer's prepared dataset with stored columns."""
        from .reference_cache import CHOSEN_COLUMN, REJECTED_COLUMN

        missing = [c for c in (CHOSEN_COLUMN, REJECTED_COLUMN) if c not in dataset.column_names]
        if missing:
            raise ValueError(f"No stored reference values (columns {missing}): build the trainer with precompute_ref_log_probs=True.")
        chosen = torch.tensor([float(np.sum(v, dtype=np.float64)) for v in dataset[CHOSEN_COLUMN]])
        rejected = torch.tensor([float(np.sum(v, dtype=np.float64)) for v in dataset[REJECTED_COLUMN]])
        return cls(chosen, rejected, chosen.clone(), rejected.clone(), beta=beta)


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
        loader = trainer.get_eval_dataloader(dataset)
        for batch in bar(total=len(loader), desc=desc, unit="batch", iterable=loader):
            batch = trainer._prepare_inputs(batch)
            model = trainer.inference_model()
            _, policy, ref, mask = trainer.per_token_logps(model, batch)
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
    _, sides = next(selected_tokens(trainer, rows=[example], threshold=threshold))
    color = sys.stdout.isatty() if color is None else color
    lines = []
    for side, (ids, _, keep) in sides.items():
        text = _mark_tokens(trainer._tokenizer, ids, keep.tolist(), color=color)
        lines.append(f"{side:>8} ({int(keep.sum())}/{len(ids)} tokens kept): {text}")
    return "\n".join(lines)


def _mark_tokens(tokenizer, ids: list[int], keep: list[bool], *, color: bool) -> str:
    pieces = []
    for token_id, kept in zip(ids, keep):
        piece = tokenizer.decode([token_id])
        if kept:
            piece = f"\033[7m{piece}\033[0m" if color else f"⟦{piece}⟧"
        pieces.append(piece)
    return "".join(pieces).replace("\n", "\\n")


@torch.no_grad()
def selected_tokens(
    trainer: SelectiveDPOTrainer, *, threshold: float, rows=None, batch_size: int = 16, desc: str | None = None, rule: str = "scores"
):
    """Per pair of `rows` (default: `trainer.eval_dataset`, tokenized by the trainer): the row, and
    for each side its completion tokens' ids, scores and keep flags (numpy, one entry per scored
    token), from the trainer's own batches and selection code. `rule`: `scores` (Selective-DPO's
    reference gap), `confidence` (ConfPO), `spans` (the tokens the data names, beside Selective-DPO's
    scores; the trainer must be built with `selection_rule="spans"`) or `scorer` (the fixed scores of a
    trainer built with `selection_rule="scorer"`). `desc` shows a progress bar.
    """
    if rule not in ("scores", "confidence", "spans", "scorer"):
        raise ValueError(f"rule={rule!r}: tokens are selected by 'scores', 'confidence', 'spans' or 'scorer'.")
    if rule == "scorer" and trainer.args.selection_rule != "scorer":
        raise ValueError("rule='scorer' shows a scorer's fixed scores: build the trainer with selection_rule='scorer' and "
                         "scorer_model_name_or_path.")  # fmt: skip
    dataset = trainer.eval_dataset if rows is None else rows
    was_training = trainer.model.training
    trainer.model.eval()
    progress = bar(total=len(dataset), desc=desc, unit="pair", disable=desc is None)
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = trainer._prepare_inputs(trainer.data_collator(rows))
            model = trainer.inference_model()
            _, policy, ref, mask = trainer.per_token_logps(model, batch)
            if rule != "scorer":  # what training ranks (a float32 pass with score_dtype); the scorer's scores leave out the policy
                policy = trainer.policy_scoring_logps(batch, policy)
            chosen_mask, rejected_mask = mask.chunk(2)
            given = spans.given_keep(batch, mask) if rule == "spans" else (None, None)
            scorer = trainer.token_values(batch).stored["scorer"] if rule == "scorer" else (None, None)
            chosen_scores, rejected_scores, chosen_keep, rejected_keep = select_sdpo_tokens(
                *policy.chunk(2), *ref.chunk(2), chosen_mask=chosen_mask, rejected_mask=rejected_mask, threshold=threshold,
                rule=rule, count_rule=trainer.args.sdpo_count_rule, chosen_given=given[0], rejected_given=given[1],
                scorer_chosen_logps=scorer[0], scorer_rejected_logps=scorer[1],
                noise=trainer.score_noise_bound(model, batch) if rule in ("scores", "scorer") else None,  # as training keeps them
            )  # fmt: skip
            chosen_ids, rejected_ids = batch["input_ids"][:, 1:].chunk(2)  # position t scores token t + 1
            sides = {
                "chosen": (chosen_ids, chosen_scores, chosen_keep, chosen_mask),
                "rejected": (rejected_ids, rejected_scores, rejected_keep, rejected_mask),
            }
            progress.update(len(rows))
            for i, row in enumerate(rows):
                yield row, {
                    side: (ids[i][m[i]].tolist(), scores[i][m[i]].cpu().numpy(), keep[i][m[i]].cpu().numpy())
                    for side, (ids, scores, keep, m) in sides.items()
                }
    finally:
        progress.close()
        trainer.model.train(was_training)


def span_responses(trainer: SelectiveDPOTrainer, *, threshold: float, batch_size: int = 16, rule: str = "scores") -> dict[str, list]:
    """Each held-out response's token scores (`rule`: Selective-DPO's `scores` or ConfPO's `confidence`)
    and which of its tokens overlap the known span.

    Needs `chosen_span` / `rejected_span` columns (character offsets in the message content), as the
    bundled arithmetic data has.

    Returns:
        For `"chosen"` and `"rejected"`: one `(scores, in_span)` per pair, each `(n,)` over the response's
        scored tokens (the input of `selection_quality.span_selection_quality`).
    """
    for column in ("chosen_span", "rejected_span"):
        if column not in trainer.eval_dataset.column_names:
            raise ValueError(f"Selection quality needs a {column!r} column (character offsets of the known span).")
    responses: dict[str, list] = {"chosen": [], "rejected": []}
    progress = "Token scores against the spans"
    for row, sides in selected_tokens(trainer, threshold=threshold, batch_size=batch_size, desc=progress, rule=rule):
        for side, (ids, scores, _) in sides.items():
            in_span = span_token_mask(trainer._tokenizer, ids, row[side][-1]["content"], row[f"{side}_span"])
            responses[side].append((scores, in_span))
    return responses


def greedy_generations(model, tokenizer, rows: list[dict], *, batch_size: int = 16, max_new_tokens: int = 96) -> GreedyAnswers:
    """The greedy completion of each row's prompt, in batches, and whether it ended within `max_new_tokens`."""
    from .token_values import end_token_ids

    end_ids = torch.tensor(end_token_ids(model, tokenizer))
    texts: list[str] = []
    ended: list[bool] = []
    with bar(total=len(rows), desc="Greedy generation", unit="prompt") as progress:
        for start in range(0, len(rows), batch_size):
            chats = [row["prompt"] for row in rows[start : start + batch_size]]
            advance = lambda share, n=len(chats): progress.update(share * n)  # noqa: E731
            generated = generate_completions(
                model, tokenizer, chats, do_sample=False, max_new_tokens=max_new_tokens, progress=advance
            )  # fmt: skip
            texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
            # A completion that ends emits an end-of-turn id (decoding stops there; any padding comes after it).
            ended += torch.isin(generated, end_ids).any(-1).tolist()
    return GreedyAnswers([text.strip() for text in texts], ended)


@dataclass
class GreedyAnswers:
    """Greedy completions, one per prompt: the text (special tokens dropped) and whether an end-of-turn token ended
    it within the token budget."""

    texts: list[str]
    ended: list[bool]


def balanced_task_rows(rows: list[dict], n: int) -> list[dict]:
    """The first `n // tasks` rows of each task, in their order (all rows when `n` is 0)."""
    if not n:
        return rows
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(task_of(row), []).append(row)
    return [row for task_rows in by_task.values() for row in task_rows[: n // len(by_task)]]


TASK_METRICS = {"arithmetic": "greedy_accuracy_arithmetic", "ifeval": "ifeval_pass_rate"}
# The share of greedy answers, over every task prompt, that emit an end-of-turn token within the token budget.
ANSWERS_END = "answers_that_end"


def greedy_task_outcomes(model, tokenizer, rows: list[dict], *, batch_size: int = 16, max_new_tokens: int = 96) -> dict[str, list[bool]]:
    """Per task metric (`TASK_METRICS`), whether each of its prompts' greedy completion passes the task's verifier,
    and under `ANSWERS_END` whether each prompt's completion (all tasks, in `rows`' order) ended."""
    answers = greedy_generations(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    outcomes: dict[str, list[bool]] = {}
    for text, row in zip(answers.texts, rows):
        outcomes.setdefault(TASK_METRICS[task_of(row)], []).append(verify(text, row))
    outcomes[ANSWERS_END] = list(answers.ended)
    return dict(sorted(outcomes.items()))


def greedy_task_accuracy(model, tokenizer, rows: list[dict], *, batch_size: int = 16, max_new_tokens: int = 96) -> dict[str, float]:
    """Share of prompts whose greedy completion passes the verifier of its task, per task.

    Keys: `greedy_accuracy_arithmetic` (exact answer) and `ifeval_pass_rate` (every instruction of the
    prompt passes, IFEval's strict prompt-level rate), for the tasks present in `rows`, and `answers_that_end`
    (the share of all the completions that emitted an end-of-turn token within `max_new_tokens`).
    """
    outcomes = greedy_task_outcomes(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {metric: sum(passed) / len(passed) for metric, passed in outcomes.items()}
