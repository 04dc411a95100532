"""Stored values made for model A or dataset A are never used for model B or dataset B: another key
gives another entry, scored afresh, and files moved by hand between entries are an error naming the
file and the field that differs."""

from __future__ import annotations

import shutil

import pytest
from datasets import Dataset

from conftest import build_model, preference_dataset
from test_reference_cache import count_writes, make


@pytest.fixture
def policies(tmp_path, tiny_tokenizer):
    """Two policies with the same tokenizer and different weights; each is its own reference (ref=None)."""
    paths = {}
    for name, seed in (("A", 1), ("B", 2)):
        paths[name] = str(tmp_path / f"policy-{name}")
        build_model(tiny_tokenizer, seed=seed).save_pretrained(paths[name])
        tiny_tokenizer.save_pretrained(paths[name])
    return paths


def stored(trainer, column="ref_chosen_token_logps"):
    return [trainer.train_dataset[i][column] for i in range(len(trainer.train_dataset))]


def test_values_for_model_a_are_never_used_for_model_b(tmp_path, policies, monkeypatch):
    a = make(tmp_path, policies["A"])
    written = count_writes(monkeypatch)
    b = make(tmp_path, policies["B"])  # same cache directory
    assert b.reference_stores["train"] != a.reference_stores["train"]
    assert written == [0]  # B scored its own values
    fresh = make(tmp_path / "clean", policies["B"])  # B alone, in an empty cache
    assert stored(b) == stored(fresh) and stored(b) != stored(a)


def test_values_for_dataset_a_are_never_used_for_dataset_b(tmp_path, tiny_model_dir, monkeypatch):
    a = make(tmp_path, tiny_model_dir)
    written = count_writes(monkeypatch)
    reversed_rows = Dataset.from_list(preference_dataset().to_list()[::-1])
    b = make(tmp_path, tiny_model_dir, dataset=reversed_rows)
    assert b.reference_stores["train"] != a.reference_stores["train"] and written == [0]
    # Values follow the rows, not the positions: B's row i is A's row 7 - i.
    assert stored(b) == stored(a)[::-1] and stored(b) != stored(a)


def test_values_scored_in_float32_are_not_the_runs_own(tmp_path, tiny_tokenizer, monkeypatch):
    """`score_dtype="float32"` stores values of other precision for the same bf16 weights: another entry."""
    import torch

    folder = tmp_path / "bf16"
    build_model(tiny_tokenizer, seed=1).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    bf16 = {"model_init_kwargs": {"dtype": torch.bfloat16}}
    own = make(tmp_path, str(folder), **bf16)
    written = count_writes(monkeypatch)
    float32 = make(tmp_path, str(folder), score_dtype="float32", **bf16)
    assert float32.reference_stores["train"] != own.reference_stores["train"] and written == [0]
    assert stored(float32) != stored(own)


@pytest.mark.parametrize("other", ["model", "dataset"])
def test_an_entry_copied_over_another_is_refused(tmp_path, policies, monkeypatch, other):
    dataset_b = Dataset.from_list(preference_dataset().to_list()[::-1])
    path_a = make(tmp_path, policies["A"]).reference_stores["train"]
    build_b = lambda: make(tmp_path, policies["B" if other == "model" else "A"], dataset=dataset_b if other == "dataset" else None)  # noqa: E731
    path_b = build_b().reference_stores["train"]
    shutil.rmtree(path_b)
    shutil.copytree(path_a, path_b)  # A's files where B's inputs look for them

    written = count_writes(monkeypatch)
    with pytest.raises(ValueError) as error:
        build_b()
    field = "reference" if other == "model" else "tokens"
    assert str(path_b / "key.json") in str(error.value)
    assert f"{field}: stored " in str(error.value) and f"Delete {path_b}" in str(error.value)
    assert written == []  # nothing scored over A's files, nothing half-written


def test_a_shard_copied_from_another_entry_is_refused(tmp_path, policies):
    path_a = make(tmp_path, policies["A"]).reference_stores["train"]
    path_b = make(tmp_path, policies["B"]).reference_stores["train"]
    for name in ("shard-00000.parquet", "shard-00000.json"):  # intact, with a matching checksum
        shutil.copy(path_a / name, path_b / name)
    with pytest.raises(ValueError, match=rf"{path_b / 'shard-00000.json'} belongs to another cache entry \(field 'key'"):
        make(tmp_path, policies["B"])


def test_a_file_replaced_with_its_size_and_mtime_kept_is_hashed_again(tmp_path):
    """The checksum memo never serves the old digest for new content that a copy gave the old size and mtime."""
    import os

    from selective_po.files import FileDigests, sha256_file

    weights, memo = tmp_path / "model.safetensors", tmp_path / "memo.json"
    weights.write_bytes(b"A" * 64)
    digests = FileDigests(memo)
    first = digests(weights)
    digests.save()
    stat = weights.stat()
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(b"B" * 64)  # same size
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # what cp -p / rsync -a keep
    os.replace(replacement, weights)
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    again = FileDigests(memo)
    assert again(weights) == sha256_file(weights) != first
