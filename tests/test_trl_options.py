"""TRL's options keep TRL's meaning under the selective losses, or are refused.

Where the selective loss has a TRL counterpart (Selective-DPO keeping every token is TRL's `sigmoid`
loss), the option is checked against TRL's own trainer on the same batch: loss and gradients. The
other options are checked by what they must do (a quantized model is quantized, a synced reference
is synced). `tests/test_parity.py` holds the list of every option and points here.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from conftest import PAIRS, build_model, build_tokenizer, preference_dataset, saved_model
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer
from test_trainer import COMMON, one_batch_loss


def trl_and_ours(tmp_path, *, options: dict, ours: dict | None = None, model=None, reference=None, dataset=None, tokenizer=None,
                 **trainer_kwargs):  # fmt: skip
    """TRL's sigmoid-loss trainer and ours at sdpo_threshold=0, built alike with `options`, each with its own copies."""
    tokenizer = tokenizer or build_tokenizer()
    model = model if model is not None else build_model(tokenizer, seed=1)
    reference = reference if reference is not None else build_model(tokenizer, seed=2)
    dataset = dataset if dataset is not None else preference_dataset()
    built = []
    variants = ((DPOTrainer, DPOConfig, {"loss_type": "sigmoid", "bf16": False}),
                (SelectiveDPOTrainer, SelectiveDPOConfig, {"sdpo_threshold": 0.0, **(ours or {})}))  # fmt: skip
    for cls, cfg, extra in variants:
        args = cfg(output_dir=str(tmp_path / cls.__name__), **{**COMMON, **extra, **options})
        built.append(cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(reference), args=args, train_dataset=dataset,
                         processing_class=copy.deepcopy(tokenizer), **trainer_kwargs))  # fmt: skip
    return built


def assert_same_step(trl_trainer, ours, *, n=4):
    (trl_loss, trl_grads, trl_metrics), (loss, grads, metrics) = one_batch_loss(trl_trainer, n), one_batch_loss(ours, n)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == trl_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for key in ("rewards/chosen", "rewards/margins", "logps/chosen", "aux_loss"):
        if key in trl_metrics:
            assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-4, abs=1e-6), key
    return loss


@pytest.mark.parametrize(
    "options",
    [
        {"loss_weights": [0.5]},
        {"max_length": 26},  # cuts responses short
        {"truncation_mode": "keep_end", "max_length": 24},
        {"pad_to_multiple_of": 16},
        {"padding_free": True},  # TRL 1.16 warns and pads
        {"pad_token": "<|im_start|>"},
        {"precompute_ref_log_probs": True},
        {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 3},
        {"dataset_num_proc": 2},
        {"gradient_checkpointing_kwargs": {"use_reentrant": True}},
        {"ld_alpha": 0.5},
        {"f_divergence_type": "forward_kl"},
        {"f_divergence_type": "js_divergence"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ],
    ids=lambda options: ",".join(options),
)
def test_an_option_at_sdpo_threshold_zero_gives_trls_step(tmp_path, options):
    assert_same_step(*trl_and_ours(tmp_path, options=options, ours={"ref_logps_cache_dir": str(tmp_path / "cache")}))


def test_a_single_loss_weight_scales_the_selective_losses(tmp_path, tiny_model_dir, oracle_dirs):
    losses = {}
    for weights in (None, [0.25]):
        sdpo = SelectiveDPOTrainer(
            model=tiny_model_dir, args=SelectiveDPOConfig(output_dir=str(tmp_path / "s"), loss_weights=weights, **COMMON),
            train_dataset=preference_dataset(), ref_model=build_model(build_tokenizer(), seed=2),
        )  # fmt: skip
        sepo = SePOTrainer(
            model=tiny_model_dir, train_dataset=preference_dataset(),
            args=SePOConfig(output_dir=str(tmp_path / "p"), loss_weights=weights, oracle_model_name_or_path=oracle_dirs["oracle"],
                            oracle_ref_model_name_or_path=oracle_dirs["oracle_ref"], ref_logps_cache_dir=str(tmp_path / "cache"), **COMMON),
        )  # fmt: skip
        losses[str(weights)] = (one_batch_loss(sdpo)[0], one_batch_loss(sepo)[0])
    for plain, weighted in zip(losses["None"], losses["[0.25]"]):
        torch.testing.assert_close(weighted, 0.25 * plain)


def test_precompute_ref_batch_size_sets_the_scoring_batches(tmp_path, tiny_model_dir, ref_dir, oracle_dirs, monkeypatch):
    from selective_po import reference_scoring

    sizes = []
    original = reference_scoring.score_missing_shards
    monkeypatch.setattr(reference_scoring, "score_missing_shards",
                        lambda *a, **k: (sizes.append(k["batch_size"]), original(*a, **k))[1])  # fmt: skip
    SelectiveDPOTrainer(
        model=tiny_model_dir, train_dataset=preference_dataset(), eval_dataset=preference_dataset(3),
        args=SelectiveDPOConfig(output_dir=str(tmp_path), ref_model_name_or_path=ref_dir, precompute_ref_log_probs=True,
                                precompute_ref_batch_size=3, ref_logps_cache_dir=str(tmp_path / "a"), **COMMON),
    )  # fmt: skip
    SePOTrainer(
        model=tiny_model_dir, train_dataset=preference_dataset(),
        args=SePOConfig(output_dir=str(tmp_path), oracle_model_name_or_path=oracle_dirs["oracle"], precompute_ref_batch_size=5,
                        oracle_ref_model_name_or_path=oracle_dirs["oracle_ref"], ref_logps_cache_dir=str(tmp_path / "b"), **COMMON),
    )  # fmt: skip
    assert sizes == [3, 3, 5]


@pytest.mark.parametrize("config_class, fields", [(SelectiveDPOConfig, {}),
                                                  (SePOConfig, {"oracle_model_name_or_path": "a", "oracle_ref_model_name_or_path": "b"})])
def test_label_smoothing_is_refused_where_trls_sigmoid_ignores_it(tmp_path, config_class, fields):
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 has no meaning.*robust, exo_pair, aot"):
        config_class(output_dir=str(tmp_path), label_smoothing=0.1, **fields)
    assert SelectiveDPOConfig(output_dir=str(tmp_path), loss_type="robust", label_smoothing=0.1).label_smoothing == 0.1


# ----- mixture of experts -----


def tiny_moe(tokenizer, *, aux_coef: float):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        router_aux_loss_coef=aux_coef, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def test_a_mixture_of_experts_carries_trls_load_balancing_loss(tmp_path):
    tokenizer = build_tokenizer()
    trl_trainer, ours = trl_and_ours(tmp_path, options={}, tokenizer=tokenizer, model=tiny_moe(tokenizer, aux_coef=0.5),
                                     reference=tiny_moe(tokenizer, aux_coef=0.5))  # fmt: skip
    assert ours.aux_loss_enabled and ours._shared_prompt_mask is None  # two rows, as TRL counts the router's tokens
    assert_same_step(trl_trainer, ours)
    assert ours._metrics["train"]["aux_loss"][-1] > 0

    with pytest.raises(ValueError, match=r"share_prompt=True is not exact here: the model is a mixture of experts"):
        SelectiveDPOTrainer(
            model=tiny_moe(tokenizer, aux_coef=0.5), args=SelectiveDPOConfig(output_dir=str(tmp_path), share_prompt=True, **COMMON),
            train_dataset=preference_dataset(), processing_class=tokenizer,
        )  # fmt: skip


def test_a_mixture_of_experts_without_the_auxiliary_loss_shares_the_prompt_exactly(tmp_path):
    tokenizer = build_tokenizer()
    trl_trainer, ours = trl_and_ours(tmp_path, options={}, tokenizer=tokenizer, model=tiny_moe(tokenizer, aux_coef=0.0),
                                     reference=tiny_moe(tokenizer, aux_coef=0.0))  # fmt: skip
    assert not ours.aux_loss_enabled and ours._shared_prompt_mask == "bool"
    assert_same_step(trl_trainer, ours)


# ----- the reference: synced, dropout, quantized -----


def test_sync_ref_model_moves_the_live_reference_that_selection_reads(tmp_path, tiny_tokenizer):
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path), sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0, max_steps=1,
        learning_rate=5e-2, save_strategy="no", **COMMON,
    )  # fmt: skip
    trainer = SelectiveDPOTrainer(model=build_model(tiny_tokenizer, seed=1), ref_model=build_model(tiny_tokenizer, seed=2),
                                  args=args, train_dataset=preference_dataset(4), processing_class=tiny_tokenizer)  # fmt: skip
    trainer.train()
    # alpha = 1: the reference is now the policy, so every score is 0 and every token is kept.
    for (name, p), r in zip(trainer.model.named_parameters(), trainer.ref_model.parameters()):
        torch.testing.assert_close(p, r, msg=name)
    _, _, metrics = one_batch_loss(trainer)
    assert metrics["selection/kept_share_chosen"] == 1.0 and metrics["selection/kept_share_rejected"] == 1.0


def test_disable_dropout_reaches_the_policy_and_every_reference(tmp_path, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.3, embd_pdrop=0.3,
                        attn_pdrop=0.3, pad_token_id=tiny_tokenizer.pad_token_id)  # fmt: skip
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    for disable in (True, False):
        for stored in (False, True):
            trainer = SelectiveDPOTrainer(
                model=str(folder), train_dataset=preference_dataset(2),
                args=SelectiveDPOConfig(output_dir=str(tmp_path / "o"), ref_model_name_or_path=str(folder), precompute_ref_log_probs=stored,
                                        ref_logps_cache_dir=str(tmp_path / f"c{disable}"), **{**COMMON, "disable_dropout": disable}),
            )  # fmt: skip
            models = [trainer.model] + ([trainer.ref_model] if not stored else [trainer.reference.frozen.module()])
            rates = {m.p for model in models for m in model.modules() if isinstance(m, torch.nn.Dropout)}
            assert rates == ({0.0} if disable else {0.3}), (disable, stored, rates)


@pytest.fixture
def wide_dirs(tmp_path, tiny_tokenizer):
    """A policy and a reference 64 wide: bitsandbytes' CPU kernels pack 4-bit weights in blocks of 64 values."""
    return [saved_model(tmp_path / name, tiny_tokenizer, seed=seed, hidden=64) for name, seed in (("policy64", 0), ("ref64", 7))]


def test_quantization_reaches_the_policy_and_the_reference_and_keys_the_values(tmp_path, wide_dirs, bitsandbytes):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    identities = {}
    for name, quantization in (("4bit", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)), ("none", None)):
        for stored in (False, True):
            trainer = SelectiveDPOTrainer(
                model=wide_dirs[0], train_dataset=preference_dataset(4), peft_config=lora, quantization_config=quantization,
                args=SelectiveDPOConfig(output_dir=str(tmp_path / "o"), ref_model_name_or_path=wide_dirs[1], precompute_ref_log_probs=stored,
                                        ref_logps_cache_dir=str(tmp_path / "cache"), **COMMON),
            )  # fmt: skip
            reference = trainer.reference.frozen.module() if stored else trainer.ref_model
            for model in (trainer.model.get_base_model(), reference):
                assert bool(getattr(model, "is_loaded_in_4bit", False)) == (quantization is not None), (name, stored)
            if stored:
                identities[name] = (trainer.reference.identity(), trainer.reference_stores["train"])
                loss, grads, _ = one_batch_loss(trainer)  # QLoRA trains the adapter on CPU too
                assert torch.isfinite(loss) and grads and all("lora" in g for g in grads)
    assert "load_in_4bit" in identities["4bit"][0]["quantization"] and "quantization" not in identities["none"][0]
    assert identities["4bit"][1] != identities["none"][1]


def test_the_train_command_quantizes_as_trls_dpo_script(tmp_path, wide_dirs, bitsandbytes):
    from selective_po.cli import build_trainer, parse_train_args

    data = tmp_path / "pairs.jsonl"
    preference_dataset(4).to_json(data)
    common = ["--model_name_or_path", wide_dirs[0], "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
              "--use_peft", "true", "--lora_target_modules", "q_proj", "v_proj", "--dtype", "float32", "--report_to", "none",
              "--max_length", "64", "--eval_strategy", "no"]  # fmt: skip
    for flag, attribute in (("--load_in_4bit", "is_loaded_in_4bit"), ("--load_in_8bit", "is_loaded_in_8bit")):
        trainer = build_trainer(*parse_train_args(common + [flag, "true", "--ref_model_name_or_path", wide_dirs[1]]))
        assert getattr(trainer.model.get_base_model(), attribute) and getattr(trainer.ref_model, attribute), flag


# ----- TRL's trainer arguments -----


def test_trainer_arguments_pass_through(tmp_path, tiny_tokenizer):
    """A collator, callbacks, an optimizer and compute_metrics given to the trainer are TRL's and transformers'."""
    from transformers import TrainerCallback
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class Recorder(TrainerCallback):
        logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    model = build_model(tiny_tokenizer, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = {}
    collator = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id, pad_to_multiple_of=32)
    args = SelectiveDPOConfig(output_dir=str(tmp_path), max_steps=1, logging_steps=1, save_strategy="no", eval_strategy="no",
                              per_device_eval_batch_size=4, **COMMON)  # fmt: skip
    trainer = SelectiveDPOTrainer(
        model=model, ref_model=build_model(tiny_tokenizer, seed=2), args=args, train_dataset=preference_dataset(4),
        eval_dataset={"a": preference_dataset(4), "b": preference_dataset(2)}, processing_class=tiny_tokenizer,
        data_collator=collator, callbacks=[Recorder()], optimizers=(optimizer, None),
        compute_metrics=lambda prediction: seen.setdefault("metric", {"seen": float(len(prediction.label_ids))}),
    )  # fmt: skip
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].size(1) % 32 == 0  # the given collator made the batch
    before = [p.detach().clone() for p in model.parameters()]
    one_batch_loss(trainer)
    grads = [p.grad.clone() for p in model.parameters()]
    trainer.train()
    assert trainer.optimizer.optimizer is optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer is optimizer
    for p, p0 in zip(model.parameters(), before):
        assert not torch.equal(p, p0)
    assert grads and any("selection/kept_share_chosen" in entry for entry in Recorder.logs)
    metrics = trainer.evaluate()
    assert {"eval_a_loss", "eval_b_loss", "eval_a_seen"} <= metrics.keys()


def test_activation_offloading_wraps_our_step_as_it_wraps_trls():
    # TRL applies activation offloading in `training_step`, around whichever `compute_loss` runs.
    assert SelectiveDPOTrainer.training_step is DPOTrainer.training_step
    assert SelectiveDPOTrainer.compute_loss is DPOTrainer.compute_loss


# ----- data TRL accepts -----

TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% if m.get('tool_calls') %}{% for call in m['tool_calls'] %}<tool>{{ call['function']['name'] }}({{ call['function']['arguments'] }})</tool>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tool_call_rows():
    rows = []
    for prompt, chosen, rejected in PAIRS[:4]:
        a, b = prompt.removeprefix("What is ").removesuffix("?").split(" ")[::2]
        call = lambda answer: [  # noqa: E731
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "calc", "arguments": f"{a}, {b}"}}]},
            {"role": "tool", "content": answer, "tool_calls": None},
            {"role": "assistant", "content": f"The answer is {answer}.", "tool_calls": None},
        ]
        rows.append({"prompt": [{"role": "user", "content": prompt, "tool_calls": None}],
                     "chosen": call(chosen.split()[-1].rstrip(".")), "rejected": call(rejected.split()[-1].rstrip("."))})  # fmt: skip
    return Dataset.from_list(rows)


def multimodal_text_rows():
    return Dataset.from_list([
        {key: [{"role": role, "content": [{"type": "text", "text": text}]}] for key, role, text in
         (("prompt", "user", prompt), ("chosen", "assistant", chosen), ("rejected", "assistant", rejected))}
        for prompt, chosen, rejected in PAIRS[:4]
    ])  # fmt: skip


@pytest.mark.parametrize("rows", [tool_call_rows, multimodal_text_rows], ids=["tool-calls", "content-parts"])
def test_rows_trl_accepts_train_as_trl_trains_them(tmp_path, rows):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    trl_trainer, ours = trl_and_ours(tmp_path, options={}, dataset=rows(), tokenizer=tokenizer)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours.train_dataset[column] == trl_trainer.train_dataset[column]
    text = tokenizer.decode(ours.train_dataset[0]["chosen_ids"])
    assert "<tool>calc(12, 7)</tool>" in text or "12 + 7 = 19" in text
    assert_same_step(trl_trainer, ours)


def test_features_that_need_response_text_refuse_other_content(tmp_path, tiny_model_dir):
    from selective_po import reference_scoring

    rows = tool_call_rows()
    with pytest.raises(ValueError, match=r"selection_rule='spans' needs.*text.*row 0.*chosen"):
        from selective_po.spans import response_mask

        response_mask(None, [1, 2], rows[0]["chosen"][:1], [[0, 1]], row=0, side="chosen")
    with pytest.raises(ValueError, match=r"map_across_tokenizers=True needs.*text.*row 0"):
        reference_scoring.response_text(rows[0]["chosen"][:1], row=0, side="chosen")


def test_a_vision_dataset_is_refused_by_the_selective_losses(tmp_path, tiny_model_dir):
    rows = preference_dataset(2).add_column("images", [[], []])
    with pytest.raises(ValueError, match=r"train_dataset has images \(images column\).*selective losses do not support it yet"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=SelectiveDPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=rows)


def test_rows_whose_prompt_fills_max_length_are_dropped_as_trl_drops_them(tmp_path, tiny_model_dir, caplog):
    rows = preference_dataset().to_list()
    rows[3]["prompt"] = [{"role": "user", "content": "What is 1 + 1? " * 30}]
    args = SelectiveDPOConfig(output_dir=str(tmp_path), **COMMON)
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(rows))
    finally:
        hf_logging.disable_propagation()
    trl_trainer = DPOTrainer(model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, **COMMON),
                             train_dataset=Dataset.from_list(rows))  # fmt: skip
    assert len(trainer.train_dataset) == len(trl_trainer.train_dataset) == 7
    assert trainer.train_dataset["prompt_ids"] == trl_trainer.train_dataset["prompt_ids"]
    lines = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
    assert lines == ["Dropped 1 of 8 rows of the train dataset, as TRL does: their prompts alone fill max_length=64 tokens, "
                     "so none of their response tokens would be trained on. Raise max_length to keep them."]  # fmt: skip
    for row in rows:
        row["prompt"] = rows[3]["prompt"]
    with pytest.raises(ValueError, match=r"Every row of the train dataset \(8\) has a prompt of max_length=64 tokens or more"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(rows))
