"""Held-out evaluation and the kept-token view, on a tiny model."""

import re

import numpy as np

import torch

from conftest import build_model, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.evaluation import evaluate_preferences, explain_pair
from selective_po.selection import keep_counts


def make_trainer(tmp_path, tokenizer, *, ref_seed=None):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_eval_batch_size=3, max_length=64)
    ref = build_model(tokenizer, seed=ref_seed) if ref_seed is not None else None
    return SelectiveDPOTrainer(
        model=build_model(tokenizer, seed=1),
        ref_model=ref if ref is not None else build_model(tokenizer, seed=1),
        args=args,
        train_dataset=preference_dataset(),
        eval_dataset=preference_dataset(),
        processing_class=tokenizer,
    )


def direct_sums(trainer):
    """Per-pair full-response log-probs, one pair at a time, straight from the model."""
    sums = []
    for example in trainer.eval_dataset:
        row = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([example["prompt_ids"] + example[side]])
            logps = trainer.model(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            row.append(logps[len(example["prompt_ids"]) - 1 :].sum().item())
        sums.append(row)
    return torch.tensor(sums)


def test_untrained_policy_has_zero_margins_and_matching_likelihoods(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer)
    result = evaluate_preferences(trainer)
    assert len(result.policy_chosen) == len(trainer.eval_dataset)  # batch of 3 does not divide 8: none lost
    assert torch.equal(result.margins, torch.zeros_like(result.margins))
    expected = direct_sums(trainer)
    torch.testing.assert_close(result.policy_chosen, expected[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.policy_rejected, expected[:, 1], rtol=1e-4, atol=1e-4)
    summary = result.summary()
    assert summary["reward_accuracy"] == 0.0
    assert summary["likelihood_accuracy"] == (expected[:, 0] > expected[:, 1]).float().mean().item()


def test_explain_pair_marks_the_selected_count(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, ref_seed=5)
    example = trainer.eval_dataset[0]
    text = explain_pair(trainer, example, threshold=0.6, color=False)
    chosen_line, rejected_line = text.splitlines()
    n_chosen = len(example["chosen_ids"])
    kept = int(keep_counts(torch.tensor([n_chosen]), 0.4))
    assert f"({kept}/{n_chosen} tokens kept)" in chosen_line  # random reference: no ties expected
    assert len(re.findall("⟦", chosen_line)) == kept
    assert rejected_line.lstrip().startswith("rejected")


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_data():
    from selective_po.evaluation import bootstrap_interval

    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    rng = np.random.default_rng(1)
    small, large = rng.normal(1.0, 1.0, 30), rng.normal(1.0, 1.0, 3000)
    low, high = bootstrap_interval(small)
    assert low < small.mean() < high
    low_large, high_large = bootstrap_interval(large)
    assert low_large < 1.0 < high_large and high_large - low_large < (high - low) / 5


def test_the_reference_evaluates_from_stored_values_alone(tmp_path, tiny_model_dir):
    """Before training the policy is the reference: its stored values give the same sums as a forward."""
    from selective_po.evaluation import PreferenceEvaluation

    args = SelectiveDPOConfig(
        output_dir=str(tmp_path), report_to="none", precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "c")
    )
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(), eval_dataset=preference_dataset())
    stored = PreferenceEvaluation.of_reference(trainer.eval_dataset, beta=trainer.beta)
    live = evaluate_preferences(trainer)
    torch.testing.assert_close(stored.policy_chosen, live.policy_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stored.policy_rejected, live.policy_rejected, rtol=1e-5, atol=1e-4)
    assert stored.summary()["likelihood_accuracy"] == live.summary()["likelihood_accuracy"]
    assert stored.summary()["mean_margin"] == 0.0
