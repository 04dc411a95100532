"""A damaged cache is never used: every kind of file the cache holds is edited, cut short or deleted,
and the values used afterwards are the true ones, with the damage reported in one line.

The cache holds two kinds of entries: stored per-token values (`ref_logps/<key>/`: `key.json`, Parquet
shards and their manifests) and converted embedded models (`models/<name>/`: the checkpoint files
and their manifest), plus a memo of file checksums (`file_hashes.json`).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model
from selective_po import models
from selective_po.files import MANIFEST_NAME
from test_reference_cache import count_writes, make

DAMAGES = ("edit", "truncate", "delete")


def values(trainer, column="ref_rejected_token_logps"):
    return [list(trainer.train_dataset[i][column]) for i in range(len(trainer.train_dataset))]


def damage(path, how, edit):
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        edit(path)


def edit_json(field, value):
    def edit(path):
        meta = json.loads(path.read_text())
        meta[field] = value
        path.write_text(json.dumps(meta))

    return edit


def edit_parquet(path):
    """A well-formed Parquet file with other values: only the checksum can tell."""
    table = pq.read_table(path)
    column = "ref_rejected_token_logps"
    shifted = pa.array([[v + 1.0 for v in row] for row in table[column].to_pylist()], pa.list_(pa.float32()))
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, shifted), path)


STORED_FILES = {
    "key.json": ("key.json", edit_json("max_length", 4096)),
    "shard": ("shard-00000.parquet", edit_parquet),
    "manifest": ("shard-00000.json", edit_json("sha256", "0" * 64)),
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("kind", STORED_FILES)
def test_damaged_stored_values_are_reported_and_rescored(tmp_path, tiny_model_dir, monkeypatch, caplog, kind, how):
    name, edit = STORED_FILES[kind]
    first = make(tmp_path, tiny_model_dir)
    true_values = values(first)
    entry = first.reference_stores["train"]
    damage(entry / name, how, edit)

    written = count_writes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="selective_po.reference_cache"):
        second = make(tmp_path, tiny_model_dir)
    assert values(second) == true_values
    assert second.reference_stores["train"] == entry
    reports = [r.getMessage() for r in caplog.records if r.name == "selective_po.reference_cache"]
    assert len(reports) == 1 and name in reports[0] and "\n" not in reports[0], reports
    assert written == ([] if kind == "key.json" else [0])  # a damaged key.json is rewritten, its shards are intact


def test_a_derived_copy_left_by_an_earlier_version_is_never_read(tmp_path, tiny_model_dir):
    first = make(tmp_path, tiny_model_dir)
    stale = first.reference_stores["train"] / "arrow"
    stale.mkdir()
    (stale / "data-00000-of-00001.arrow").write_bytes(b"not the stored values")
    assert values(make(tmp_path, tiny_model_dir)) == values(first)
    assert not stale.exists()


@pytest.fixture
def embedded(tmp_path, monkeypatch, tiny_tokenizer):
    """`smollm2-135m-instruct` converted from a tiny stand-in: each conversion is counted."""
    monkeypatch.setenv("SELECTIVE_PO_CACHE", str(tmp_path / "cache"))
    conversions = []

    def stand_in_gguf(spec, workdir):
        return workdir / "model.gguf"

    def stand_in_dequantize(gguf_path, out_dir, *, steps, chat_template=None):
        conversions.append(out_dir)
        build_model(tiny_tokenizer, seed=3).save_pretrained(out_dir)
        tiny_tokenizer.save_pretrained(out_dir)

    monkeypatch.setattr(models, "_locate_gguf", stand_in_gguf)
    monkeypatch.setattr(models, "_dequantize_gguf", stand_in_dequantize)
    return conversions


def weights(folder):
    return {key: tensor.clone() for key, tensor in load_file(str(folder / "model.safetensors")).items()}


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 40] ^= 0xFF  # inside the tensor data, past the header
    path.write_bytes(bytes(data))


MODEL_FILES = {
    "model.safetensors": flip_a_byte,
    "config.json": edit_json("num_hidden_layers", 1),
    "tokenizer.json": flip_a_byte,
    MANIFEST_NAME: edit_json("files", {}),
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", MODEL_FILES)
def test_a_damaged_converted_model_is_reported_and_converted_again(embedded, capfd, name, how):
    from pathlib import Path

    folder = Path(models.resolve_model_path("smollm2-135m-instruct"))
    true_weights = weights(folder)
    assert len(embedded) == 1
    damage(folder / name, how, MODEL_FILES[name])
    capfd.readouterr()

    assert models.resolve_model_path("smollm2-135m-instruct") == str(folder)
    assert len(embedded) == 2
    report = [line for line in capfd.readouterr().err.splitlines() if "converting smollm2-135m-instruct again" in line]
    assert len(report) == 1 and name in report[0], report
    for key, tensor in weights(folder).items():
        torch.testing.assert_close(tensor, true_weights[key], rtol=0, atol=0)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_checksum_memo_costs_at_most_a_conversion(embedded, how):
    from pathlib import Path

    folder = Path(models.resolve_model_path("smollm2-135m-instruct"))
    true_weights = weights(folder)
    assert models.file_digest_memo().is_file()

    def wrong_digests(path):
        path.write_text(json.dumps({key: "0" * 64 for key in json.loads(path.read_text())}))

    damage(models.file_digest_memo(), how, wrong_digests)
    models.resolve_model_path("smollm2-135m-instruct")
    assert len(embedded) == (2 if how == "edit" else 1)  # wrong memoized sums read as damage, never as intact
    for key, tensor in weights(folder).items():
        torch.testing.assert_close(tensor, true_weights[key], rtol=0, atol=0)
