"""The reference side of a run is one object: what is stored is what runs live, for every kind of reference.

Each test computes the values it expects straight from the model's logits (float64 log-softmax), so a
reference object that scores the wrong model, or the right model in the wrong state, fails here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from conftest import build_model, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer
from test_trainer import COMMON


def plain_logps(model, rows, pad_token_id: int) -> list[torch.Tensor]:
    """Completion log-probs of `rows` (chosen rows, then rejected rows) from a plain forward's logits."""
    batch = DataCollatorForPreference(pad_token_id=pad_token_id)(rows)
    mask = batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].size(1) :]  # prompt tuning prepends virtual tokens
    logps = logits[:, :-1].double().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return [row[m] for row, m in zip(logps, mask)]


def stored_values(dataset) -> list[torch.Tensor]:
    rows = list(dataset)
    return [torch.tensor(r["ref_chosen_token_logps"], dtype=torch.float64) for r in rows] + [
        torch.tensor(r["ref_rejected_token_logps"], dtype=torch.float64) for r in rows
    ]


def max_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def args_for(tmp_path, **overrides):
    return SelectiveDPOConfig(**{"output_dir": str(tmp_path / "out"), "ref_logps_cache_dir": str(tmp_path / "cache"), **COMMON, **overrides})


def test_an_explicit_ref_model_is_what_is_stored_and_then_freed(tmp_path, tiny_tokenizer):
    policy, reference = build_model(tiny_tokenizer, seed=1), build_model(tiny_tokenizer, seed=2)
    trainer = SelectiveDPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tiny_tokenizer,
        args=args_for(tmp_path, precompute_ref_log_probs=True), train_dataset=preference_dataset(),
    )  # fmt: skip
    pad = tiny_tokenizer.pad_token_id
    stored = stored_values(trainer.train_dataset)
    assert max_gap(stored, plain_logps(reference, list(trainer.train_dataset), pad)) < 1e-5
    assert max_gap(stored, plain_logps(policy, list(trainer.train_dataset), pad)) > 0.05
    assert trainer.ref_model is None  # stored, so not kept in memory while training
    assert trainer.reference.identity()["reference"].startswith("weights:")

    # The policy as its own reference is another entry, not the ref_model's.
    own = SelectiveDPOTrainer(
        model=copy.deepcopy(policy), processing_class=tiny_tokenizer, args=args_for(tmp_path, precompute_ref_log_probs=True),
        train_dataset=preference_dataset(),
    )  # fmt: skip
    assert own.reference_stores["train"] != trainer.reference_stores["train"]
    assert max_gap(stored_values(own.train_dataset), plain_logps(policy, list(own.train_dataset), pad)) < 1e-5


def lora_not_a_no_op():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)


def prompt_tuning():
    from peft import PromptTuningConfig

    return PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")


@pytest.mark.parametrize("adapter", [lora_not_a_no_op, prompt_tuning], ids=["lora-init-false", "prompt-tuning"])
def test_peft_stores_the_base_model_with_the_adapter_off(tmp_path, tiny_model_dir, adapter):
    from transformers import AutoModelForCausalLM

    trainer = SelectiveDPOTrainer(
        model=tiny_model_dir, args=args_for(tmp_path, precompute_ref_log_probs=True), train_dataset=preference_dataset(),
        peft_config=adapter(),
    )  # fmt: skip
    rows, pad = list(trainer.train_dataset), trainer._tokenizer.pad_token_id
    stored = stored_values(trainer.train_dataset)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert max_gap(stored, plain_logps(base, rows, pad)) < 1e-5
    trainer.model.eval()
    assert max_gap(stored, plain_logps(trainer.model, rows, pad)) > 1e-3  # the adapter is not a no-op
    assert trainer.reference.identity()["adapter"] == "disabled"


def test_a_pretrained_adapter_is_its_own_ref_adapter_and_keys_the_entry(tmp_path, tiny_tokenizer):
    """A PeftModel passed in: TRL's reference is a frozen "ref" copy of its adapter, not the base model."""
    from peft import get_peft_model

    keys, stores = [], []
    for seed in (0, 1):
        base = build_model(tiny_tokenizer, seed=1)
        torch.manual_seed(seed)  # the adapter's random initialization
        policy = get_peft_model(base, lora_not_a_no_op())
        trainer = SelectiveDPOTrainer(
            model=policy, args=args_for(tmp_path / str(seed), precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache")),
            train_dataset=preference_dataset(), processing_class=tiny_tokenizer,
        )  # fmt: skip
        assert "ref" in trainer.model.peft_config
        trainer.model.eval()
        rows = list(trainer.train_dataset)
        # At step 0 the "ref" adapter equals the trained one, so the reference is the adapted policy.
        assert max_gap(stored_values(trainer.train_dataset), plain_logps(trainer.model, rows, tiny_tokenizer.pad_token_id)) < 1e-5
        keys.append(trainer.reference.identity()["adapter"])
        stores.append(trainer.reference_stores["train"])
    assert keys[0].startswith("ref:") and keys[0] != keys[1] and stores[0] != stores[1]


@pytest.mark.parametrize("kind", ["ref-model", "lora-init-false", "prompt-tuning", "ref-adapter"])
def test_stored_values_give_the_live_references_step(tmp_path, tiny_tokenizer, kind):
    """The same step, live or from stored values, for every kind of reference the object can be."""
    from peft import get_peft_model
    from test_trainer import one_batch_loss

    results = []
    for stored in (False, True):
        policy, extra = build_model(tiny_tokenizer, seed=1), {}
        if kind == "ref-model":
            extra["ref_model"] = build_model(tiny_tokenizer, seed=2)
        elif kind == "ref-adapter":
            torch.manual_seed(5)
            policy = get_peft_model(policy, lora_not_a_no_op())
        else:
            extra["peft_config"] = lora_not_a_no_op() if kind == "lora-init-false" else prompt_tuning()
        trainer = SelectiveDPOTrainer(
            model=policy, args=args_for(tmp_path / str(stored), precompute_ref_log_probs=stored), processing_class=tiny_tokenizer,
            train_dataset=preference_dataset(4), **extra,
        )  # fmt: skip
        results.append(one_batch_loss(trainer))
    (live_loss, live_grads, live_metrics), (loss, grads, metrics) = results
    torch.testing.assert_close(loss, live_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == live_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], live_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    kept = metrics["selection/kept_share_chosen"]
    assert kept == live_metrics["selection/kept_share_chosen"]
    # A pretrained adapter's "ref" copy is the policy itself at step 0: every score 0, every token kept.
    assert kept == 1.0 if kind == "ref-adapter" else kept < 1.0


def train_a_little(trainer, steps=2):
    trainer.args.max_steps, trainer.args.learning_rate, trainer.args.save_strategy = steps, 5e-2, "no"
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    trainer.train()
    assert trainer.state.global_step == steps


def expected_chosen_reward(trainer, reference_model, dataset) -> float:
    """TRL's logged `rewards/chosen`: beta * (policy - reference) summed over each chosen response, averaged."""
    rows, pad = list(dataset), trainer._tokenizer.pad_token_id
    trainer.model.eval()
    policy = plain_logps(trainer.model, rows, pad)[: len(rows)]
    reference = plain_logps(reference_model, rows, pad)[: len(rows)]
    return trainer.beta * sum(float(p.sum() - r.sum()) for p, r in zip(policy, reference)) / len(rows)


def test_a_late_evaluate_under_peft_scores_the_new_data_with_the_adapter_off(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    trainer = SelectiveDPOTrainer(
        model=tiny_model_dir, args=args_for(tmp_path, precompute_ref_log_probs=True, per_device_eval_batch_size=4),
        train_dataset=preference_dataset(4), peft_config=lora_not_a_no_op(),
    )  # fmt: skip
    train_a_little(trainer)
    held_out = preference_dataset().select(range(4, 8))
    metrics = trainer.evaluate(eval_dataset=held_out)
    prepared = trainer._prepare_dataset(held_out, trainer.processing_class, trainer.args, "eval")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = expected_chosen_reward(trainer, base, prepared)
    assert abs(expected) > 1e-3
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_a_late_evaluate_with_a_reference_path_loads_it_again(tmp_path, tiny_model_dir, ref_dir):
    from transformers import AutoModelForCausalLM

    trainer = SelectiveDPOTrainer(
        model=tiny_model_dir, args=args_for(tmp_path, precompute_ref_log_probs=True, ref_model_name_or_path=ref_dir,
                                            per_device_eval_batch_size=4),
        train_dataset=preference_dataset(4),
    )  # fmt: skip
    train_a_little(trainer)
    held_out = preference_dataset().select(range(4, 8))
    metrics = trainer.evaluate(eval_dataset=held_out)
    prepared = trainer._prepare_dataset(held_out, trainer.processing_class, trainer.args, "eval")
    expected = expected_chosen_reward(trainer, AutoModelForCausalLM.from_pretrained(ref_dir), prepared)
    assert metrics["eval_rewards/chosen"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert trainer.ref_model is None  # loaded for scoring only


def test_a_late_evaluate_that_cannot_be_scored_says_why(tmp_path, tiny_tokenizer, tiny_model_dir):
    held_out = preference_dataset().select(range(4, 8))
    # The initial policy as reference: gone once training moved it.
    trainer = SelectiveDPOTrainer(
        model=tiny_model_dir, args=args_for(tmp_path / "a", precompute_ref_log_probs=True), train_dataset=preference_dataset(4)
    )
    train_a_little(trainer, steps=1)
    with pytest.raises(ValueError, match=r"the initial policy.*no longer exists after 1 training step.*eval_dataset"):
        trainer.evaluate(eval_dataset=held_out)
    # An explicit ref_model is freed once its values are stored.
    trainer = SelectiveDPOTrainer(
        model=build_model(tiny_tokenizer, seed=1), ref_model=build_model(tiny_tokenizer, seed=2),
        args=args_for(tmp_path / "b", precompute_ref_log_probs=True), train_dataset=preference_dataset(4),
        processing_class=tiny_tokenizer,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"ref_model.*freed.*ref_model_name_or_path"):
        trainer.evaluate(eval_dataset=held_out)
    # Data already stored under the same key needs no model: before training, the initial policy scores it.
    trainer = SelectiveDPOTrainer(
        model=tiny_model_dir, args=args_for(tmp_path / "c", precompute_ref_log_probs=True), train_dataset=preference_dataset(4)
    )
    assert "eval_loss" in trainer.evaluate(eval_dataset=held_out)


def test_a_late_evaluate_under_sepo_scores_with_the_oracle_pair(tmp_path, tiny_model_dir, oracle_dirs):
    args = SePOConfig(
        output_dir=str(tmp_path / "out"), oracle_model_name_or_path=oracle_dirs["oracle"],
        oracle_ref_model_name_or_path=oracle_dirs["oracle_ref"], ref_logps_cache_dir=str(tmp_path / "cache"),
        per_device_eval_batch_size=4, **COMMON,
    )  # fmt: skip
    trainer = SePOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(4))
    train_a_little(trainer, steps=1)
    metrics = trainer.evaluate(eval_dataset=preference_dataset().select(range(4, 8)))
    assert 0.0 < metrics["eval_selection/kept_share_chosen"] < 1.0
