"""Stored per-token reference log-probs: equal to the live reference, keyed, resumable, checked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from conftest import CHAT_TEMPLATE, build_model, build_tokenizer, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po import reference_cache, reference_scoring, references as trainer_module
from selective_po.reference_cache import PerTokenReferenceCollator, ReferenceLogpsStore
from test_trainer import COMMON, one_batch_loss


def make(tmp_path, model_dir, *, ref=None, precompute=True, dataset=None, **overrides):
    args = SelectiveDPOConfig(
        output_dir=str(tmp_path / "out"),
        ref_model_name_or_path=ref,
        precompute_ref_log_probs=precompute,
        ref_logps_cache_dir=str(tmp_path / "cache"),
        **{**COMMON, **overrides},
    )
    return SelectiveDPOTrainer(model=model_dir, args=args, train_dataset=dataset or preference_dataset())


def count_writes(monkeypatch) -> list:
    written = []
    original = ReferenceLogpsStore.write_shard
    monkeypatch.setattr(ReferenceLogpsStore, "write_shard", lambda self, shard, *a: (written.append(shard.index), original(self, shard, *a))[1])
    return written


@pytest.mark.parametrize("use_ref_path", [True, False], ids=["ref-from-path", "initial-policy"])
def test_stored_values_reproduce_the_live_reference(tmp_path, tiny_model_dir, ref_dir, use_ref_path):
    ref = ref_dir if use_ref_path else None
    live = make(tmp_path / "live", tiny_model_dir, ref=ref, precompute=False)
    stored = make(tmp_path / "stored", tiny_model_dir, ref=ref)
    assert stored.ref_model is None  # nothing kept in memory for training
    live_loss, live_grads, live_metrics = one_batch_loss(live)
    loss, grads, metrics = one_batch_loss(stored)
    torch.testing.assert_close(loss, live_loss, rtol=1e-5, atol=1e-6)
    for name in live_grads:
        torch.testing.assert_close(grads[name], live_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert metrics.keys() == live_metrics.keys()
    for key, value in live_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_a_scored_run_never_loads_the_reference(tmp_path, tiny_model_dir, ref_dir, monkeypatch):
    make(tmp_path, tiny_model_dir, ref=ref_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference was loaded although its values are stored")

    monkeypatch.setattr(trainer_module, "create_model_from_path", refuse)
    monkeypatch.setattr(reference_scoring, "create_model_from_path", refuse)
    written = count_writes(monkeypatch)
    trainer = make(tmp_path, tiny_model_dir, ref=ref_dir)
    assert written == [] and trainer.ref_model is None
    trainer.args.max_steps, trainer.args.report_to = 2, []
    trainer.train()  # and training runs from the stored values alone


def _variations(tmp_path, tiny_tokenizer, ref_dir):
    """One change of each key component, as (name, make kwargs, setup)."""
    changed_rows = preference_dataset().to_list()
    changed_rows[3]["chosen"] = [{"role": "assistant", "content": "Add the ones: 5 + 5 = 10. So 30."}]

    def retemplate(model_dir):
        tokenizer = build_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "<|im_start|> ")
        tokenizer.save_pretrained(model_dir)

    def reweight(_):
        build_model(tiny_tokenizer, seed=8).save_pretrained(ref_dir)  # same path, other weights

    return [
        ("dataset", {"dataset": Dataset.from_list(changed_rows)}, None),
        ("tokenizer", {}, retemplate),
        ("reference weights", {}, reweight),
        ("max_length", {"max_length": 40}, None),
        ("truncation_mode", {"truncation_mode": "keep_end"}, None),
        ("dtype", {"model_init_kwargs": {"dtype": "bfloat16"}}, None),
    ]


@pytest.mark.parametrize("change", range(6), ids=["dataset", "tokenizer", "reference-weights", "max_length", "truncation", "dtype"])
def test_any_key_change_rescores(tmp_path, tiny_tokenizer, ref_dir, monkeypatch, change):
    model_dir = tmp_path / "policy"
    build_model(tiny_tokenizer, seed=1).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    base = make(tmp_path, str(model_dir), ref=ref_dir).reference_stores["train"]

    name, kwargs, setup = _variations(tmp_path, tiny_tokenizer, ref_dir)[change]
    if setup is not None:
        setup(model_dir)
    written = count_writes(monkeypatch)
    changed = make(tmp_path, str(model_dir), ref=ref_dir, **kwargs).reference_stores["train"]
    assert changed != base, f"changing the {name} reused the cache entry"
    assert written, f"changing the {name} scored nothing"


def test_corrupt_or_truncated_shards_are_recomputed(tmp_path, tiny_model_dir, ref_dir, monkeypatch):
    monkeypatch.setattr(trainer_module, "REFERENCE_SHARD_ROWS", 3)  # 8 rows: shards of 3, 3, 2
    first = make(tmp_path, tiny_model_dir, ref=ref_dir)
    path = first.reference_stores["train"]
    original = [first.train_dataset[i]["ref_chosen_token_logps"] for i in range(8)]

    shard0, shard2 = path / "shard-00000.parquet", path / "shard-00002.parquet"
    data = bytearray(shard0.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: still a file, wrong content
    shard0.write_bytes(bytes(data))
    shard2.write_bytes(shard2.read_bytes()[:20])  # a partial write
    written = count_writes(monkeypatch)
    second = make(tmp_path, tiny_model_dir, ref=ref_dir)
    assert sorted(written) == [0, 2]  # exactly the two damaged shards, nothing else
    assert [second.train_dataset[i]["ref_chosen_token_logps"] for i in range(8)] == original


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import preference_dataset
    from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
    from selective_po import references as trainer_module
    from selective_po.reference_cache import ReferenceLogpsStore

    trainer_module.REFERENCE_SHARD_ROWS = 2
    kill_after = int(sys.argv[1])
    original = ReferenceLogpsStore.write_shard
    def write_then_maybe_die(self, shard, *args):
        original(self, shard, *args)
        print("wrote", shard.index, flush=True)
        if kill_after and shard.index + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    ReferenceLogpsStore.write_shard = write_then_maybe_die

    args = SelectiveDPOConfig(output_dir={out!r}, ref_model_name_or_path={ref!r}, precompute_ref_log_probs=True,
                              ref_logps_cache_dir=sys.argv[2], report_to="none", max_length=64)
    trainer = SelectiveDPOTrainer(model={model!r}, args=args, train_dataset=preference_dataset())
    print("rows", [list(r) for r in trainer.train_dataset["ref_rejected_token_logps"]], flush=True)
    """
)


def test_kill_9_while_scoring_then_resume(tmp_path, tiny_model_dir, ref_dir):
    script = tmp_path / "score.py"
    tests = str(Path(__file__).parent)
    script.write_text(KILL_SCRIPT.format(tests=tests, out=str(tmp_path / "o"), ref=ref_dir, model=tiny_model_dir))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    run = lambda kill_after, cache: subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(kill_after), str(cache)], capture_output=True, text=True, env=env
    )
    wrote = lambda out: [int(line.split()[1]) for line in out.splitlines() if line.startswith("wrote")]  # noqa: E731
    killed = run(2, tmp_path / "cache")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert wrote(killed.stdout) == [0, 1]

    resumed = run(0, tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert wrote(resumed.stdout) == [2, 3]  # 8 rows in shards of 2: only the two shards not yet on disk

    clean = run(0, tmp_path / "clean-cache")
    assert clean.returncode == 0, clean.stderr[-2000:]
    rows = lambda out: out.split("rows", 1)[1]  # noqa: E731
    assert rows(resumed.stdout) == rows(clean.stdout)


class FakeAccelerator:
    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world


def test_processes_split_the_shards_and_run_equal_forwards(tmp_path, monkeypatch):
    """Shards go round-robin; a process with less work runs dummy forwards so that every process runs as many
    (under ZeRO-3 and FSDP each forward is a collective). Together the processes store every row once."""
    dataset = Dataset.from_dict({"prompt_ids": [[1, 2]] * 5, "chosen_ids": [[3, 4, 5]] * 5, "rejected_ids": [[6]] * 5})
    store = ReferenceLogpsStore(tmp_path, {"test": 1}, n_rows=5, shard_size=2)
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = DataCollatorForPreference(pad_token_id=0)
    calls = []

    def forward(batch):
        calls.append(len(batch["input_ids"]) // 2)
        return -batch["input_ids"][:, 1:].float(), batch["completion_mask"][:, 1:].bool()

    plans = reference_scoring.shard_plans(store.shards(), batch_size=1, world_size=2)
    assert [[(s.index, a, b) for s, a, b in plan] for plan in plans] == [[(0, 0, 1), (0, 1, 2), (2, 4, 5)], [(1, 2, 3), (1, 3, 4)]]
    monkeypatch.setattr(reference_scoring, "gather_object", lambda objects: objects * 2)  # both processes fine
    missing = store.missing_shards()
    counts = []
    for rank in (0, 1):
        calls.clear()
        counts.append(reference_scoring.score_missing_shards(
            store, dataset, missing=missing, score_rows=reference_cache.collated_scorer(collator, forward), batch_size=1,
            accelerator=FakeAccelerator(rank, 2),
        ))  # fmt: skip
        assert len(calls) == 3  # process 1 has 2 batches and runs one dummy forward
    assert counts == [2, 1] and store.missing_shards() == []
    stored = store.load()
    assert stored["ref_chosen_token_logps"] == [[-3.0, -4.0, -5.0]] * 5
    assert stored["ref_rejected_token_logps"] == [[-6.0]] * 5


def test_a_problem_on_one_process_stops_every_process_with_its_message(tmp_path, monkeypatch):
    dataset = Dataset.from_dict({"prompt_ids": [[1, 2]] * 2, "chosen_ids": [[3, 4]] * 2, "rejected_ids": [[6]] * 2})
    store = ReferenceLogpsStore(tmp_path, {"test": 3}, n_rows=2, shard_size=1)
    peer_problem = "ValueError: the other process found a NaN"
    monkeypatch.setattr(reference_scoring, "gather_object", lambda objects: [objects[0], peer_problem])
    fine = lambda rows: ([np.zeros(2)] * len(rows), [np.zeros(1)] * len(rows))  # noqa: E731
    with pytest.raises(ValueError, match="stopped on process 1 of 2: ValueError: the other process found a NaN"):
        reference_scoring.score_missing_shards(
            store, dataset, missing=store.missing_shards(), score_rows=fine, batch_size=1, accelerator=FakeAccelerator(0, 2)
        )
    assert store.missing_shards() == store.shards()  # this process stored nothing after the exchange failed
    nan = lambda rows: ([np.array([0.0, np.nan])] * len(rows), [np.zeros(1)] * len(rows))  # noqa: E731
    with pytest.raises(ValueError, match=r"not finite for dataset row 0, chosen response, token 1 \(nan\)"):
        reference_scoring.score_missing_shards(store, dataset, missing=store.missing_shards(), score_rows=nan, batch_size=1)


def test_missing_or_mismatched_values_are_errors():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collator = PerTokenReferenceCollator(DataCollatorForPreference(pad_token_id=0))
    example = {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
    with pytest.raises(ValueError, match="selective-po score"):
        collator([example])
    with pytest.raises(ValueError, match="has 1 stored values for 2 completion tokens"):
        collator([{**example, "ref_chosen_token_logps": [-1.0], "ref_rejected_token_logps": [-1.0]}])
    batch = collator([{**example, "ref_chosen_token_logps": [-1.0, -2.0], "ref_rejected_token_logps": [-3.0]}])
    assert batch["ref_per_token_logps"].tolist() == [[0.0, -1.0, -2.0], [0.0, -3.0, 0.0]]


def test_non_finite_values_are_never_stored(tmp_path):
    store = ReferenceLogpsStore(tmp_path, {"test": 2}, n_rows=1, shard_size=1)
    with pytest.raises(ValueError, match="Non-finite"):
        store.write_shard(store.shards()[0], [np.array([np.nan])], [np.array([0.0])])
    assert store.missing_shards() == store.shards()


def test_score_command_then_train_without_the_reference(tmp_path, tiny_model_dir, ref_dir, monkeypatch):
    from selective_po.cli import main

    flags = [
        "--model_name_or_path", tiny_model_dir, "--ref_model_name_or_path", ref_dir,
        "--dataset_name", "arithmetic", "--max_length", "96", "--report_to", "none",
        "--ref_logps_cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run"),
        "--per_device_train_batch_size", "8",
    ]  # fmt: skip
    assert main(["score", *flags]) == 0
    monkeypatch.setattr(trainer_module, "create_model_from_path", lambda *a, **k: pytest.fail("reference loaded"))
    monkeypatch.setattr(reference_scoring, "create_model_from_path", lambda *a, **k: pytest.fail("reference loaded"))
    written = count_writes(monkeypatch)
    assert main(["train", *flags, "--precompute_ref_log_probs", "true", "--max_steps", "1", "--save_strategy", "no"]) == 0
    assert written == []
