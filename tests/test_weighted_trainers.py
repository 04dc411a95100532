"""TGDPO and TIS-DPO in the trainer: stored values of their extra models, the loss against the float64 references
of the official formulas on the trainer's own batch, a short training run, and the errors for what they need."""

from __future__ import annotations

import pytest
import torch

from conftest import preference_dataset, saved_model
from reference import reference_tgdpo, reference_tisdpo, reference_tisdpo_weights
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.token_values import end_of_sequence_mask
from selective_po.trainer import policy_forward
from test_sepo_trainer import direct_logps
from test_trainer import COMMON, one_batch_loss


@pytest.fixture
def extra_models(tmp_path, tiny_tokenizer):
    """A reference, a reward model and a forward/reverse pair: other seeds, the policy's tokenizer."""
    seeds = {"ref": 7, "reward": 9, "forward": 11, "reverse": 12}
    return {name: saved_model(tmp_path / name, tiny_tokenizer, seed=seed) for name, seed in seeds.items()}


def make(tmp_path, model_dir, models, loss_type, **overrides):
    fields = {"tgdpo": {"tgdpo_reward_model_name_or_path": models["reward"]},
              "tisdpo": {"tisdpo_forward_model_name_or_path": models["forward"],
                         "tisdpo_reverse_model_name_or_path": models["reverse"]}}[loss_type]  # fmt: skip
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path / "out"), loss_type=loss_type, ref_model_name_or_path=models["ref"], beta=0.5,
        precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache"), **fields, **{**COMMON, **overrides},
    )  # fmt: skip
    return SelectiveDPOTrainer(model=model_dir, args=args, train_dataset=preference_dataset())


def stored_and_policy(trainer):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
    return batch, policy.double(), mask


def test_tgdpo_stores_the_reward_model_and_trains_on_the_official_loss(tmp_path, tiny_model_dir, extra_models):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path, tiny_model_dir, extra_models, "tgdpo", tgdpo_alpha=2.0)
    assert trainer.ref_model is None and set(trainer.reference_stores) == {"train", "train/reward_model"}
    reward = AutoModelForCausalLM.from_pretrained(extra_models["reward"])
    row = trainer.train_dataset[2]
    for side in ("chosen", "rejected"):
        expected = direct_logps(reward, row["prompt_ids"], row[f"{side}_ids"])
        torch.testing.assert_close(torch.tensor(row[f"reward_model_{side}_token_logps"]), expected, rtol=1e-4, atol=1e-4)

    loss, grads, metrics = one_batch_loss(trainer)
    batch, policy, mask = stored_and_policy(trainer)
    ref, rm = batch["ref_per_token_logps"].double(), batch["reward_model_per_token_logps"].double()
    expected = reference_tgdpo(*policy.chunk(2), *ref.chunk(2), *rm.chunk(2), *mask.chunk(2), beta=0.5, alpha=2.0)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-5, atol=1e-6)
    assert grads and metrics["selection/kept_share_chosen"] == 1.0  # every token is in the loss, weighted
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.args.max_steps = 2
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize("decimals", [None, 2])
def test_tisdpo_weights_and_loss_follow_the_official_code(tmp_path, tiny_model_dir, extra_models, decimals):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path, tiny_model_dir, extra_models, "tisdpo", tisdpo_score_decimals=decimals)
    assert set(trainer.reference_stores) == {"train", "train/contrastive"}
    loss, _, metrics = one_batch_loss(trainer)
    batch, policy, mask = stored_and_policy(trainer)
    forward, reverse = (AutoModelForCausalLM.from_pretrained(extra_models[n]) for n in ("forward", "reverse"))
    rows = [trainer.train_dataset[i] for i in range(4)]
    width = mask.size(1)

    def per_token(model, side):  # the model's log-probs laid out as the batch's (B, T-1), right-padded
        out = torch.zeros(4, width)
        for i, row in enumerate(rows):
            values = direct_logps(model, row["prompt_ids"], row[f"{side}_ids"])
            start = int(mask.chunk(2)[0 if side == "chosen" else 1][i].nonzero()[0]) if values.numel() else 0
            out[i, start : start + values.numel()] = values
        return out

    ends = end_of_sequence_mask(batch["input_ids"][:, 1:], mask, trainer._end_ids).chunk(2)
    w_c = reference_tisdpo_weights(per_token(forward, "chosen"), per_token(reverse, "chosen"), mask.chunk(2)[0], ends[0],
                                   chosen=True, decimals=decimals)  # fmt: skip
    w_r = reference_tisdpo_weights(per_token(forward, "rejected"), per_token(reverse, "rejected"), mask.chunk(2)[1], ends[1],
                                   chosen=False, decimals=decimals)  # fmt: skip
    ref = batch["ref_per_token_logps"].double()
    expected = reference_tisdpo(*policy.chunk(2), *ref.chunk(2), w_c, w_r, *mask.chunk(2), beta=0.5)
    torch.testing.assert_close(loss.double(), expected.mean(), rtol=1e-4, atol=1e-5)
    assert metrics["selection/kept_share_chosen"] < 1.0  # the end-of-sequence token weighs 0


def test_swap_chosen_rejected_trains_the_reversed_preference(tmp_path, tiny_model_dir):
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), loss_type="sigmoid", swap_chosen_rejected=True, **COMMON)
    swapped = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "plain"), loss_type="sigmoid", **COMMON)
    plain = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    for i in range(len(plain.train_dataset)):
        assert swapped.train_dataset[i]["chosen_ids"] == plain.train_dataset[i]["rejected_ids"]
        assert swapped.train_dataset[i]["rejected_ids"] == plain.train_dataset[i]["chosen_ids"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": "tgdpo", "precompute_ref_log_probs": True}, "needs tgdpo_reward_model_name_or_path"),
        ({"loss_type": "tisdpo", "precompute_ref_log_probs": True, "tisdpo_forward_model_name_or_path": "a"},
         "needs tisdpo_reverse_model_name_or_path"),
        ({"loss_type": "tgdpo", "tgdpo_reward_model_name_or_path": "a"}, "set precompute_ref_log_probs=True"),
        ({"loss_type": "sdpo", "tgdpo_reward_model_name_or_path": "a"}, "read only with loss_type='tgdpo'"),
        ({"loss_type": "tgdpo", "tgdpo_reward_model_name_or_path": "a", "precompute_ref_log_probs": True,
          "selection_rule": "random"}, "weights every token"),
        ({"loss_type": "tisdpo", "tisdpo_score_decimals": -1}, "whole number >= 0"),
    ],
)
def test_config_names_what_the_weighting_methods_need(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        SelectiveDPOConfig(output_dir=str(tmp_path), **options)
