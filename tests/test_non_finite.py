"""NaN or inf in stored values or in the scores that feed selection stops training with a message
naming where it is and what to do, instead of selecting arbitrary tokens."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from selective_po import references as trainer_module
from selective_po.reference_cache import PerTokenReferenceCollator
from test_reference_cache import make
from test_sepo_trainer import make as make_sepo


def edit_shard(path, *, row: int, column: str, token: int, value: float) -> None:
    """Change one stored value and rewrite the manifest's checksum, as a hand edit on disk would."""
    table = pq.read_table(path)
    local = table.column("row").to_pylist().index(row)
    values = table.column(column).to_pylist()
    values[local][token] = value
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.list_(pa.float32())))
    pq.write_table(table, path)
    manifest = path.with_suffix(".json")
    meta = json.loads(manifest.read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(meta))


@pytest.mark.parametrize("value", [float("nan"), float("-inf")], ids=["nan", "-inf"])
def test_a_non_finite_stored_value_is_refused_when_read(tmp_path, tiny_model_dir, ref_dir, monkeypatch, value):
    monkeypatch.setattr(trainer_module, "REFERENCE_SHARD_ROWS", 3)  # 8 rows: shards of 3, 3, 2
    path = make(tmp_path, tiny_model_dir, ref=ref_dir).reference_stores["train"]
    edit_shard(path / "shard-00001.parquet", row=5, column="ref_rejected_token_logps", token=2, value=value)
    files = lambda: {p.name: p.stat().st_mtime_ns for p in path.glob("*.*")}  # noqa: E731  shards, manifests, key
    before = files()

    with pytest.raises(ValueError) as error:
        make(tmp_path, tiny_model_dir, ref=ref_dir)
    message = str(error.value)
    assert str(path / "shard-00001.parquet") in message
    assert "row 5 (dataset index), column 'ref_rejected_token_logps', token 2" in message
    assert f"Delete {path}" in message
    # Reading wrote nothing: the entry is exactly as the edit left it.
    assert files() == before


def test_non_finite_values_in_a_prepared_dataset_are_refused_by_the_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = PerTokenReferenceCollator(DataCollatorForPreference(pad_token_id=0))
    good = {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5],
            "ref_chosen_token_logps": [-1.0, -2.0], "ref_rejected_token_logps": [-3.0]}  # fmt: skip
    collator([good, good])
    bad = {**good, "ref_rejected_token_logps": [float("inf")]}
    with pytest.raises(ValueError, match="row 1 of the batch, column 'ref_rejected_token_logps'"):
        collator([good, bad])


def corrupt_reference(trainer, monkeypatch, *, row: int, completion_index: int, side: str):
    """Make the live reference return NaN at one position; `completion_index` < 0 puts it on padding."""
    original = trainer.reference.values

    def with_nan(inputs, shift_mask):
        logps = original(inputs, shift_mask).clone()
        mask = inputs["completion_mask"][:, 1:].bool()
        batch_row = row + (mask.size(0) // 2 if side == "rejected" else 0)
        positions = mask[batch_row].nonzero()[:, 0] if completion_index >= 0 else (~mask[batch_row]).nonzero()[:, 0]
        logps[batch_row, positions[completion_index if completion_index >= 0 else 0]] = float("nan")
        return logps

    monkeypatch.setattr(trainer.reference, "values", with_nan)


def loss_of_first_batch(trainer):
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    return trainer.compute_loss(trainer.model, batch)


def test_non_finite_live_scores_stop_selective_dpo(tmp_path, tiny_model_dir, ref_dir, monkeypatch):
    trainer = make(tmp_path, tiny_model_dir, ref=ref_dir, precompute=False)
    trainer.state.global_step = 4
    corrupt_reference(trainer, monkeypatch, row=1, completion_index=2, side="rejected")
    with pytest.raises(ValueError, match=r"not finite at training step 5: rejected response, row 1 of the batch"):
        loss_of_first_batch(trainer)


def test_non_finite_values_outside_the_completion_are_ignored(tmp_path, tiny_model_dir, ref_dir, monkeypatch):
    trainer = make(tmp_path, tiny_model_dir, ref=ref_dir, precompute=False)
    corrupt_reference(trainer, monkeypatch, row=0, completion_index=-1, side="chosen")  # a prompt position
    assert torch.isfinite(loss_of_first_batch(trainer))


def test_non_finite_oracle_rewards_stop_sepo(tmp_path, tiny_model_dir, oracle_dirs):
    trainer = make_sepo(tmp_path, tiny_model_dir, oracle_dirs)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    mask = batch["completion_mask"][:, 1:].bool()
    batch["token_rewards"][2, mask[2].nonzero()[0, 0]] = float("inf")  # row 2 is a chosen response
    with pytest.raises(ValueError, match=r"SePO oracle token rewards .* not finite at training step 1: chosen response, row 2"):
        trainer.compute_loss(trainer.model, batch)
    batch["token_rewards"][2] = torch.where(mask[2], 0.0, float("nan"))  # NaN only off the completion: fine
    assert np.isfinite(trainer.compute_loss(trainer.model, batch).item())
