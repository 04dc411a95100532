"""SelectiveDPOTrainer on a tiny model: equivalence with TRL's DPO, a real training run, references."""

from __future__ import annotations

import copy

import pytest
import torch
from trl import DPOConfig, DPOTrainer

from conftest import build_model, build_tokenizer, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer

COMMON = dict(report_to="none", per_device_train_batch_size=4, max_length=64, disable_dropout=True, seed=0)


def one_batch_loss(trainer, n=4):
    """Loss and gradients of one fixed batch, and the metrics it logged."""
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))  # to its device
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def test_threshold_zero_reproduces_trl_sigmoid(tmp_path, tiny_tokenizer):
    model = build_model(tiny_tokenizer, seed=1)
    reference = build_model(tiny_tokenizer, seed=2)  # a reference that differs from the policy
    dataset = preference_dataset()
    trl_trainer = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(reference),
        args=DPOConfig(output_dir=str(tmp_path / "trl"), loss_type="sigmoid", bf16=False, beta=0.3, **COMMON),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    ours = SelectiveDPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(reference),
        args=SelectiveDPOConfig(output_dir=str(tmp_path / "sdpo"), sdpo_threshold=0.0, beta=0.3, **COMMON),
        train_dataset=dataset,
        processing_class=tiny_tokenizer,
    )
    trl_loss, trl_grads, trl_metrics = one_batch_loss(trl_trainer)
    loss, grads, metrics = one_batch_loss(ours)

    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == trl_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # Every metric TRL logs is logged under the same name, with the same value when every token is kept.
    assert trl_metrics.keys() <= metrics.keys(), trl_metrics.keys() - metrics.keys()
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert metrics["selection/kept_share_chosen"] == 1.0 and metrics["selection/kept_share_rejected"] == 1.0


def test_other_trl_loss_types_are_untouched(tmp_path, tiny_model_dir):
    losses = []
    for cls, cfg in ((DPOTrainer, DPOConfig), (SelectiveDPOTrainer, SelectiveDPOConfig)):
        args = cfg(output_dir=str(tmp_path / cls.__name__), loss_type="ipo", bf16=False, **COMMON)
        trainer = cls(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
        losses.append(one_batch_loss(trainer)[0])
    torch.testing.assert_close(losses[0], losses[1])


def test_selection_changes_the_loss_and_gradient(tmp_path, tiny_tokenizer):
    model, reference = build_model(tiny_tokenizer, seed=1), build_model(tiny_tokenizer, seed=2)
    results = {}
    for threshold in (0.0, 0.6):
        args = SelectiveDPOConfig(output_dir=str(tmp_path / str(threshold)), sdpo_threshold=threshold, **COMMON)
        trainer = SelectiveDPOTrainer(
            model=copy.deepcopy(model),
            ref_model=copy.deepcopy(reference),
            args=args,
            train_dataset=preference_dataset(),
            processing_class=tiny_tokenizer,
        )
        results[threshold] = one_batch_loss(trainer)
    assert not torch.isclose(results[0.0][0], results[0.6][0])
    kept = results[0.6][2]["selection/kept_share_chosen"]
    assert 0.4 <= kept < 0.6, kept  # ceil(0.4 n) of n short sequences
    assert results[0.6][2]["selection/score_kept_chosen"] > results[0.6][2]["selection/score_dropped_chosen"]


def test_training_run_updates_parameters_and_logs_selection(tmp_path, tiny_model_dir):
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        **{**COMMON, "per_device_train_batch_size": 2},
    )
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert len(changed) == len(before), set(before) - set(changed)

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    # Step 1: policy == reference, every score is 0 and every token is kept (plain DPO). After it
    # the policy has moved and the top 40% are selected.
    assert logs[0]["selection/kept_share_chosen"] == 1.0
    assert 0.4 <= logs[-1]["selection/kept_share_chosen"] < 1.0
    assert 0.4 <= logs[-1]["selection/kept_share_rejected"] < 1.0
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "selection/score_kept_rejected"):
        assert key in logs[-1]

    from PIL import Image

    with Image.open(tmp_path / "training_curves.png") as image:  # the curves, drawn when training ended
        assert image.format == "PNG" and image.width > 4 * image.height // 2


def test_reference_from_path_is_loaded_and_used(tmp_path, tiny_tokenizer, tiny_model_dir):
    ref_dir = tmp_path / "ref"
    build_model(tiny_tokenizer, seed=7).save_pretrained(ref_dir)
    tiny_tokenizer.save_pretrained(ref_dir)
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), ref_model_name_or_path=str(ref_dir), **COMMON)
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    expected = build_model(tiny_tokenizer, seed=7).state_dict()
    for name, value in trainer.ref_model.state_dict().items():
        torch.testing.assert_close(value, expected[name], msg=name)
    _, _, metrics = one_batch_loss(trainer)
    # A reference other than the policy: selection is active from the very first step.
    assert metrics["selection/kept_share_chosen"] < 1.0


def test_reference_with_another_vocabulary_is_an_error(tmp_path, tiny_model_dir):
    other_tokenizer = build_tokenizer(vocab_size=280, seed_texts=["completely different words here"] * 3)
    ref_dir = tmp_path / "other"
    build_model(other_tokenizer).save_pretrained(ref_dir)
    other_tokenizer.save_pretrained(ref_dir)
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), ref_model_name_or_path=str(ref_dir), **COMMON)
    with pytest.raises(ValueError, match="different vocabulary.*set map_across_tokenizers=True"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    # A scorer's values are never mapped, so its error does not suggest it.
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), selection_rule="scorer", scorer_model_name_or_path=str(ref_dir),
                              precompute_ref_log_probs=True, **COMMON)  # fmt: skip
    with pytest.raises(ValueError, match="different vocabulary.*A scorer's values are not mapped") as error:
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    assert "map_across_tokenizers=True" not in str(error.value)


def test_ref_model_and_ref_path_together_is_an_error(tmp_path, tiny_tokenizer, tiny_model_dir):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), ref_model_name_or_path=tiny_model_dir, **COMMON)
    with pytest.raises(ValueError, match="only one"):
        SelectiveDPOTrainer(
            model=tiny_model_dir, ref_model=build_model(tiny_tokenizer), args=args, train_dataset=preference_dataset()
        )


def test_plain_dpo_config_is_rejected_with_a_hint(tmp_path, tiny_model_dir):
    with pytest.raises(TypeError, match="SelectiveDPOConfig"):
        SelectiveDPOTrainer(
            model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path), bf16=False), train_dataset=preference_dataset()
        )


def test_peft_reference_is_the_base_model_as_in_trl(tmp_path, tiny_model_dir):
    """With LoRA and no ref_model, the reference is the policy with its adapter disabled."""
    from peft import LoraConfig

    results = []
    for cls, cfg, loss_type in ((DPOTrainer, DPOConfig, "sigmoid"), (SelectiveDPOTrainer, SelectiveDPOConfig, "sdpo")):
        args = cfg(output_dir=str(tmp_path / loss_type), loss_type=loss_type, bf16=False, **COMMON)
        if loss_type == "sdpo":
            args.sdpo_threshold = 0.0
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        trainer = cls(model=tiny_model_dir, args=args, train_dataset=preference_dataset(), peft_config=lora)
        assert trainer.ref_model is None
        # LoRA starts as a no-op (B = 0); give it the same non-zero weights in both runs so the
        # policy differs from the reference.
        generator = torch.Generator().manual_seed(0)
        for name, param in sorted(trainer.model.named_parameters()):
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.5
        results.append(one_batch_loss(trainer))
    (trl_loss, trl_grads, _), (loss, grads, metrics) = results
    assert not torch.isclose(trl_loss, torch.log(torch.tensor(2.0)))  # the adapter really moved the policy
    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == trl_grads.keys() and all("lora" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_missing_model_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model' does not exist"):
        SelectiveDPOTrainer(model=missing, args=SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none"),
                            train_dataset=preference_dataset())
    args = SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none", ref_model_name_or_path="./missing-ref")
    with pytest.raises(FileNotFoundError, match="missing-ref' does not exist"):
        SelectiveDPOTrainer(model=str(tmp_path), args=args, train_dataset=preference_dataset())


@pytest.mark.parametrize("options", [{"selection_rule": "confidence"}, {"sdpo_count_rule": "quantile"}])
def test_confidence_rule_and_quantile_count_reach_the_loss(tmp_path, tiny_tokenizer, options):
    from selective_po.losses import selective_dpo_loss

    model, reference = build_model(tiny_tokenizer, seed=1), build_model(tiny_tokenizer, seed=2)
    # 0.7: the quantile count keeps one token fewer for responses of 4, 7, 14, ... tokens (frac(0.7 n) > 0.7)
    args = SelectiveDPOConfig(output_dir=str(tmp_path), sdpo_threshold=0.7, **options, **COMMON)
    trainer = SelectiveDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=preference_dataset(),
                                  processing_class=tiny_tokenizer)  # fmt: skip
    loss, _, metrics = one_batch_loss(trainer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        _, policy, ref, mask = trainer.per_token_logps(trainer.model, batch)
    expected = {}
    for name, rule_options in (("this", options), ("default", {})):
        result = selective_dpo_loss(*policy.chunk(2), *ref.chunk(2), chosen_mask=mask.chunk(2)[0], rejected_mask=mask.chunk(2)[1],
                                    threshold=0.7, beta=trainer.beta, **{k.replace("selection_", "").replace("sdpo_", ""): v
                                                                           for k, v in rule_options.items()})  # fmt: skip
        expected[name] = result
    torch.testing.assert_close(loss, expected["this"].losses.mean(), rtol=1e-5, atol=1e-6)
    kept = int(expected["this"].chosen_keep.sum())
    assert metrics["selection/kept_share_chosen"] == pytest.approx(kept / int(mask.chunk(2)[0].sum()))
    keeps = {name: torch.cat([result.chosen_keep, result.rejected_keep]) for name, result in expected.items()}
    assert not torch.equal(keeps["this"], keeps["default"])  # the option changed the selection


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("rule", ["scores", "scorer", "spans"])
def test_the_policy_forward_gets_only_model_inputs(tmp_path, tiny_model_dir, ref_dir, rule, share_prompt):
    """The per-token values the collators add for the loss (stored reference, scorer, given spans) never reach the
    model's forward, which for many models would take them silently as attention keyword arguments."""
    from test_spans import with_answer_spans

    options = {"scorer_model_name_or_path": ref_dir} if rule == "scorer" else {}
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), selection_rule=rule, precompute_ref_log_probs=True,
                              share_prompt=share_prompt, ref_logps_cache_dir=str(tmp_path / "cache"), **{**COMMON, **options})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=with_answer_spans(preference_dataset(4)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert {"ref_per_token_logps", {"scorer": "scorer_per_token_logps", "spans": "selection_given"}.get(rule, "input_ids")} <= set(batch)
    seen = []
    hook = trainer.model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        one_batch_loss(trainer)
    finally:
        hook.remove()
    model_inputs = {"input_ids", "attention_mask", "position_ids", "use_cache", "labels", "fused_lm_head", "shift_labels"}
    assert seen and all(keys <= model_inputs for keys in seen), seen
