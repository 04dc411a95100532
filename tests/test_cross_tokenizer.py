"""References and oracles with another tokenizer: values moved onto the policy's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_model, build_tokenizer, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer
from test_trainer import COMMON, one_batch_loss

OTHER_TEMPLATE = (
    "{% for message in messages %}<s>[{{ message['role'] }}] {{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>[assistant] {% endif %}"
)


def save(path, tokenizer, seed, **model):
    build_model(tokenizer, seed=seed, **model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def other_tokenizer():
    """A genuinely different tokenizer: other vocabulary size, other merges, other chat template."""
    texts = ["Add the ones and carry. The answer is " + str(n) for n in range(200)] + ["What is x?"] * 20
    tokenizer = build_tokenizer(vocab_size=420, seed_texts=texts)
    tokenizer.chat_template = OTHER_TEMPLATE
    tokenizer.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    return tokenizer


def sdpo(tmp_path, model_dir, ref_dir, *, mapped, **overrides):
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path / "out"), ref_model_name_or_path=ref_dir, precompute_ref_log_probs=True,
        map_across_tokenizers=mapped, ref_logps_cache_dir=str(tmp_path / "cache"), **{**COMMON, **overrides},
    )  # fmt: skip
    return SelectiveDPOTrainer(model=model_dir, args=args, train_dataset=preference_dataset())


def test_mapping_through_the_same_tokenizer_changes_nothing(tmp_path, tiny_tokenizer, tiny_model_dir):
    """Same tokenizer on both sides: character mapping must reproduce the direct per-token values."""
    ref_dir = save(tmp_path / "ref", tiny_tokenizer, seed=7)
    direct = sdpo(tmp_path / "direct", tiny_model_dir, ref_dir, mapped=False)
    mapped = sdpo(tmp_path / "mapped", tiny_model_dir, ref_dir, mapped=True)
    assert direct.reference_stores["train"] != mapped.reference_stores["train"]  # keyed apart
    for i in range(len(direct.train_dataset)):
        for column in ("ref_chosen_token_logps", "ref_rejected_token_logps"):
            np.testing.assert_allclose(mapped.train_dataset[i][column], direct.train_dataset[i][column], atol=2e-5)


def test_reference_with_another_tokenizer(tmp_path, tiny_model_dir, other_tokenizer):
    ref_dir = save(tmp_path / "ref", other_tokenizer, seed=7)
    with pytest.raises(ValueError, match="map_across_tokenizers=True"):
        sdpo(tmp_path / "refused", tiny_model_dir, ref_dir, mapped=False)
    trainer = sdpo(tmp_path / "mapped", tiny_model_dir, ref_dir, mapped=True)
    row = trainer.train_dataset[0]
    assert len(row["ref_chosen_token_logps"]) == len(row["chosen_ids"])  # one value per policy token
    # conservation: the policy's tokens carry the other model's whole completion log-prob
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(ref_dir)
    prompt = other_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
    full = other_tokenizer.apply_chat_template(row["prompt"] + row["chosen"], return_dict=True)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logps = other(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    # the completion starts where prompt and prompt+completion tokens diverge, as in TRL
    start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    np.testing.assert_allclose(sum(row["ref_chosen_token_logps"]), logps[start - 1 :].sum().item(), rtol=1e-4)
    loss, _, metrics = one_batch_loss(trainer)
    assert torch.isfinite(loss) and 0.4 <= metrics["selection/kept_share_chosen"] < 1.0


def test_sepo_with_an_oracle_of_another_tokenizer(tmp_path, tiny_model_dir, other_tokenizer):
    oracle = save(tmp_path / "oracle", other_tokenizer, seed=7, layers=1, hidden=16)
    oracle_ref = save(tmp_path / "oracle_ref", other_tokenizer, seed=8, layers=1, hidden=16)
    args = SePOConfig(
        output_dir=str(tmp_path / "out"), oracle_model_name_or_path=oracle, oracle_ref_model_name_or_path=oracle_ref,
        map_across_tokenizers=True, ref_logps_cache_dir=str(tmp_path / "cache"), max_steps=2, logging_steps=1,
        save_strategy="no", **COMMON,
    )  # fmt: skip
    trainer = SePOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    row = trainer.train_dataset[0]
    assert len(row["oracle_rejected_token_rewards"]) == len(row["rejected_ids"])
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(0.3 <= e["selection/kept_share_chosen"] < 0.5 for e in logs)


def test_mapping_needs_stored_values():
    with pytest.raises(ValueError, match="set precompute_ref_log_probs=True"):
        SelectiveDPOConfig(output_dir="unused", report_to="none", map_across_tokenizers=True)
