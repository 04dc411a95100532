"""Selective-DPO with fixed scores (`selection_rule="scorer"`): stored scorer values, a loss whose kept
tokens do not move as the policy learns, and the errors for what it cannot honour."""

from __future__ import annotations

import pytest
import torch

from conftest import preference_dataset
from reference import reference_keep, reference_sdpo
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.trainer import policy_forward
from test_sepo_trainer import direct_logps
from test_trainer import COMMON, one_batch_loss


def make(tmp_path, model_dir, scorer, **overrides):
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path / "out"), selection_rule="scorer", scorer_model_name_or_path=scorer,
        precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache"), sdpo_threshold=0.6,
        **{**COMMON, **overrides},
    )  # fmt: skip
    return SelectiveDPOTrainer(model=model_dir, args=args, train_dataset=preference_dataset())


def test_scorer_values_are_stored_beside_the_reference(tmp_path, tiny_model_dir, ref_dir):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path, tiny_model_dir, ref_dir)
    assert trainer.ref_model is None and set(trainer.reference_stores) == {"train", "train/scorer"}
    scorer, policy = AutoModelForCausalLM.from_pretrained(ref_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for i in (0, 6):
        row = trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            ids = (row["prompt_ids"], row[f"{side}_ids"])
            torch.testing.assert_close(torch.tensor(row[f"scorer_{side}_token_logps"]), direct_logps(scorer, *ids), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.tensor(row[f"ref_{side}_token_logps"]), direct_logps(policy, *ids), rtol=1e-4, atol=1e-4)


def test_the_kept_tokens_are_fixed_and_the_loss_is_the_reference_formula(tmp_path, tiny_model_dir, ref_dir):
    trainer = make(tmp_path, tiny_model_dir, ref_dir, beta=0.5, learning_rate=5e-2, max_steps=3)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_c, ref_r = batch["ref_per_token_logps"].double().chunk(2)
    scorer_c, scorer_r = batch["scorer_per_token_logps"].double().chunk(2)
    loss, _, metrics = one_batch_loss(trainer)
    with torch.no_grad():
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
    cm, rm = mask.chunk(2)
    # Step 0: the policy is its reference, so Selective-DPO's own scores would all be 0 (every token kept).
    expected, keep_c, keep_r = reference_sdpo(
        *policy.double().chunk(2), ref_c, ref_r, cm, rm, threshold=0.6, beta=0.5, scorer=(scorer_c, scorer_r)
    )
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-5, atol=1e-6)
    assert torch.equal(keep_c, reference_keep(scorer_c - ref_c, cm, 0.6)) and keep_c.sum() < cm.sum()
    assert metrics["selection/kept_share_chosen"] < 0.5
    trainer.train()  # the policy moves; the same batch keeps the same tokens
    trainer.model.eval()
    with torch.no_grad():
        _, moved, _ = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
        result, *_ = trainer.method_step(batch, moved, mask)
    assert not torch.allclose(moved, policy)
    assert torch.equal(result.chosen_keep, keep_c) and torch.equal(result.rejected_keep, keep_r)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"selection_rule": "scorer"}, "needs scorer_model_name_or_path"),
        ({"scorer_model_name_or_path": "x"}, "used only with selection_rule='scorer'"),
        ({"selection_rule": "scorer", "scorer_model_name_or_path": "x", "precompute_ref_log_probs": False}, "precompute_ref_log_probs=True"),
        ({"loss_type": "sigmoid", "scorer_model_name_or_path": "x"}, "uses every token"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        SelectiveDPOConfig(output_dir="unused", **{"precompute_ref_log_probs": True, **overrides})


def test_sepo_refuses_the_scorer_rule():
    from selective_po import SePOConfig

    with pytest.raises(ValueError, match="SePO's oracle already fixes"):
        SePOConfig(output_dir="unused", selection_rule="scorer", scorer_model_name_or_path="x", oracle_model_name_or_path="a",
                   oracle_ref_model_name_or_path="b")  # fmt: skip


@pytest.mark.parametrize("field", ["scorer_model_name_or_path", "ref_model_name_or_path"])
def test_an_adapter_folder_as_a_reference_side_model_is_refused(tmp_path, tiny_model_dir, field):
    """Values of a PEFT adapter depend on the base model it names inside, which no cache key would see."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "somewhere", "peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    fields = {"selection_rule": "scorer", "scorer_model_name_or_path": str(adapter)} if field.startswith("scorer") else {
        "ref_model_name_or_path": str(adapter)}
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True, **{**COMMON, **fields})
    with pytest.raises(ValueError, match=f"{field}=.*is a PEFT adapter folder.*merge_and_unload"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(4))
