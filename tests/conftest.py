"""Shared fixtures: a tokenizer trained in the test and a tiny Llama built from a config (no downloads)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes, for the quantization tests, lives apart (see the Makefile): on this process's path only, before
# peft is first imported, so the processes the tests start do not pay for importing it.
EXTRAS = Path(sys.prefix) / "extras"
if EXTRAS.is_dir():
    sys.path.insert(0, str(EXTRAS))

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PAIRS = [
    ("What is 12 + 7?", "12 + 7 = 19. The answer is 19.", "12 + 7 = 18. The answer is 18."),
    ("What is 30 - 4?", "30 - 4 = 26. The answer is 26.", "30 - 4 = 24. The answer is 24."),
    ("What is 6 * 7?", "6 * 7 = 42. The answer is 42.", "6 * 7 = 48. The answer is 48."),
    ("What is 15 + 15?", "Add the ones: 5 + 5 = 10. The answer is 30.", "Add the ones: 5 + 5 = 11. The answer is 31."),
    ("Name a colour.", "Blue is a colour.", "Seven is a colour."),
    ("What is 9 - 9?", "9 - 9 = 0. The answer is 0.", "9 - 9 = 1. The answer is 1."),
    ("What is 2 * 8?", "Two eights make 16.", "Two eights make 18."),
    ("What is 40 + 2?", "40 + 2 = 42.", "40 + 2 = 24."),
]


def build_tokenizer(vocab_size: int = 300, seed_texts: list[str] | None = None):
    """A byte-level BPE tokenizer trained in memory on the test texts, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = seed_texts or [" ".join(pair) for pair in PAIRS] * 4
    backend.train_from_iterator(texts + ["user assistant system"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, *, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def preference_dataset(n: int | None = None) -> Dataset:
    rows = [
        {
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for prompt, chosen, rejected in PAIRS
    ]
    return Dataset.from_list(rows[: n or len(rows)])


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny model + tokenizer folder, loadable by name like any local checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def saved_model(path, tokenizer, *, seed: int, **shape) -> str:
    build_model(tokenizer, seed=seed, **shape).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def ref_dir(tmp_path, tiny_tokenizer):
    """A reference that differs from the policy (another seed), saved with the same tokenizer."""
    return saved_model(tmp_path / "ref", tiny_tokenizer, seed=7)


@pytest.fixture
def oracle_dirs(tmp_path, tiny_tokenizer):
    """SePO's oracle and the model it was trained from: two other seeds, the policy's tokenizer."""
    return {name: saved_model(tmp_path / name, tiny_tokenizer, seed=seed) for name, seed in (("oracle", 7), ("oracle_ref", 8))}


@pytest.fixture
def bitsandbytes():
    """bitsandbytes, which `make install` puts in .venv/extras; a missing one is a failure, not a skip."""
    try:
        import bitsandbytes
    except ImportError as error:
        pytest.fail(f"bitsandbytes is not importable ({error}); `make install` puts it in {EXTRAS}.")
    return bitsandbytes
