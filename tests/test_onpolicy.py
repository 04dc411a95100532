"""On-policy pair builder: pairing rule, resumable and deterministic sampling, settings guard, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selective_po import onpolicy
from selective_po.cli import main
from selective_po.data import check_preference_rows, load_preference_dataset, load_task_prompts
from selective_po.onpolicy import SamplingSettings, arithmetic_prompts, make_pairs, prompts_digest, sample_and_verify


def record(responses, passed, complete=None):
    return {"responses": responses, "passed": passed, "complete": complete or [True] * len(responses)}


def test_pair_is_first_complete_pass_against_first_complete_fail():
    rows = arithmetic_prompts(5, seed=0)
    records = [
        record(["a", "b", "c"], [False, True, False]),  # chosen b, rejected a
        record(["a", "b"], [True, True]),  # no failing response: no pair
        record(["a", "b", "c"], [True, False, False], complete=[False, False, True]),  # cut-off pass and fail skipped
        record(["same", "same"], [True, False]),  # identical texts are no preference
        record(["x", "y", "z"], [False, False, True], complete=[True, True, True]),
    ]
    pairs = make_pairs(rows, records)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("b", "a"), ("z", "x")]
    assert [p["pass_rate"] for p in pairs] == [1 / 3, 1 / 3]
    assert pairs[0]["answer"] == rows[0]["answer"] and pairs[0]["prompt"] == rows[0]["prompt"]
    from datasets import Dataset

    check_preference_rows(Dataset.from_list(pairs), source="built pairs")  # TRL's conversational format


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def settings_for(rows, **overrides):
    values = dict(model="tiny", samples_per_prompt=3, max_new_tokens=6, prompts_per_chunk=2, seed=5)
    return SamplingSettings(**{**values, **overrides}, prompts_sha256=prompts_digest(rows))


def test_resume_samples_only_missing_chunks_and_reproduces_them(tmp_path, tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    rows = arithmetic_prompts(5, seed=0)
    settings = settings_for(rows)
    full = sample_and_verify(model, tokenizer, rows, settings, work_dir=tmp_path / "a")
    assert [len(r["responses"]) for r in full] == [3] * 5
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "chunk-00000.jsonl", "chunk-00001.jsonl", "chunk-00002.jsonl", "settings.json"
    ]  # fmt: skip

    # As if killed after the first chunk: the other two are sampled again, with the same results.
    (tmp_path / "a" / "chunk-00001.jsonl").unlink()
    (tmp_path / "a" / "chunk-00002.jsonl").unlink()
    sampled = []
    real = onpolicy._sample_chunk
    monkeypatch.setattr(onpolicy, "_sample_chunk", lambda *a, **k: sampled.append(k["seed"]) or real(*a, **k))
    resumed = sample_and_verify(model, tokenizer, rows, settings, work_dir=tmp_path / "a")
    assert sampled == [5 * 1_000_003 + 1, 5 * 1_000_003 + 2]
    assert resumed == full

    other_seed = sample_and_verify(model, tokenizer, rows, settings_for(rows, seed=6), work_dir=tmp_path / "b")
    assert other_seed != full


def test_other_settings_are_refused_not_mixed(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    rows = arithmetic_prompts(2, seed=0)
    sample_and_verify(model, tokenizer, rows, settings_for(rows), work_dir=tmp_path)
    with pytest.raises(ValueError, match=r"temperature: stored 1.0, now 0.5"):
        sample_and_verify(model, tokenizer, rows, settings_for(rows, temperature=0.5), work_dir=tmp_path)
    with pytest.raises(ValueError, match="prompts_sha256"):
        other = arithmetic_prompts(3, seed=0)
        sample_and_verify(model, tokenizer, other, settings_for(other), work_dir=tmp_path)


def test_build_pairs_command_writes_splits_and_statistics(tmp_path, tiny_model_dir):
    out = tmp_path / "pairs"
    argv = ["build-pairs", "--model", tiny_model_dir, "--output_dir", str(out), "--arithmetic_prompts", "4",
            "--ifeval_prompts", "4", "--test_share", "0.5", "--samples_per_prompt", "2", "--max_new_tokens", "4",
            "--prompts_per_chunk", "3"]  # fmt: skip
    assert main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"]["ifeval"]["prompts"] == 2 and stats["splits"]["test"]["arithmetic"]["samples"] == 4
    samples = [json.loads(line) for line in (out / "samples-test.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == ["arithmetic"] * 2 + ["ifeval"] * 2
    assert all(len(s["responses"]) == 2 for s in samples)
    test_prompts = load_task_prompts(str(out), split="test")
    assert [r["prompt_id"] for r in test_prompts] == ["arithmetic-00000", "arithmetic-00001", "ifeval-00000", "ifeval-00001"]
    pairs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    expected = sum(onpolicy._pair_indices(s) is not None for s in map(json.loads, (out / "samples-train.jsonl").open()))
    assert len(pairs) == expected == sum(t["pairs"] for t in stats["splits"]["train"].values())
    assert " ".join(argv[1:]) in (out / "README.md").read_text()  # the data card gives the command that made it
    before = (out / "samples-train.jsonl").read_bytes()
    assert main(argv) == 0  # a rerun reuses every chunk and writes the same files
    assert (out / "samples-train.jsonl").read_bytes() == before


KILL_SCRIPT = """
import os, signal, sys
from selective_po import onpolicy
real = onpolicy.atomic_write
def write_then_maybe_die(path, payload):
    real(path, payload)
    if path.name == "chunk-00001.jsonl" and sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
onpolicy.atomic_write = write_then_maybe_die
from selective_po.cli import main
main(["build-pairs", "--model", {model!r}, "--output_dir", sys.argv[2], "--arithmetic_prompts", "6",
      "--ifeval_prompts", "0", "--test_share", "0.5", "--samples_per_prompt", "2", "--max_new_tokens", "4",
      "--prompts_per_chunk", "1"])
"""


def test_kill_9_while_sampling_then_rerun(tmp_path, tiny_model_dir):
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(model=tiny_model_dir))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    run = lambda mode, out: subprocess.run([sys.executable, str(script), mode, str(out)], capture_output=True, text=True, env=env)  # noqa: E731
    killed = run("kill", tmp_path / "killed")
    assert killed.returncode == -9, killed.stderr[-2000:]
    work = tmp_path / "killed" / "work" / "train"
    assert sorted(p.name for p in work.iterdir()) == ["chunk-00000.jsonl", "chunk-00001.jsonl", "settings.json"]
    assert not list(Path(tmp_path / "killed").glob("*.jsonl"))  # nothing final written from a partial run
    assert run("resume", tmp_path / "killed").returncode == 0
    assert run("resume", tmp_path / "clean").returncode == 0
    for name in ("samples-train.jsonl", "samples-test.jsonl", "train.jsonl", "test.jsonl"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


@pytest.mark.parametrize("name, held_out", [("onpolicy-smollm2", ("test",)), ("onpolicy-smollm2-large", ("validation", "test"))])
def test_the_shipped_pairs_load_and_match_their_samples(name, held_out):
    dataset = load_preference_dataset(name)
    assert sorted(dataset) == sorted(("train", *held_out))
    for split in dataset:
        check_preference_rows(dataset[split], source=f"{name}/{split}")
        assert set(dataset[split]["task"]) == {"arithmetic", "ifeval"}
    train_ids = {row["prompt_id"] for row in dataset["train"]}
    for split in held_out:
        prompts = load_task_prompts(name, split=split)
        assert {row["prompt_id"] for row in dataset[split]} <= {row["prompt_id"] for row in prompts}
        assert not train_ids & {row["prompt_id"] for row in prompts}
    # Each pair's verdicts hold under today's verifiers: chosen passes, rejected fails.
    from selective_po.verifiers import verify

    for row in dataset["test"]:
        assert verify(row["chosen"][0]["content"], row) and not verify(row["rejected"][0]["content"], row)


def test_a_build_pairs_folder_loads_only_its_pair_files(tmp_path):
    from selective_po.onpolicy import ifeval_prompts

    rows = arithmetic_prompts(3, seed=0) + ifeval_prompts(2, seed=0)
    pairs = make_pairs(rows, [record(["1", "2"], [True, False])] * 5)
    write = lambda name, items: (tmp_path / name).write_text("".join(json.dumps(i) + "\n" for i in items))  # noqa: E731
    write("train.jsonl", pairs[:3])
    write("test.jsonl", pairs[3:])
    write("samples-train.jsonl", rows[:3])
    write("samples-test.jsonl", rows[3:])
    write("test_prompts.jsonl", rows[3:])
    loaded = load_preference_dataset(str(tmp_path))
    assert {split: len(rows) for split, rows in loaded.items()} == {"train": 3, "test": 2}
    assert load_task_prompts(str(tmp_path), split="test") == load_task_prompts(str(tmp_path / "test_prompts.jsonl"), split="x")


def test_a_validation_split_is_held_out_apart_from_test(tmp_path, tiny_model_dir):
    splits = onpolicy.split_prompts({"arithmetic": 10, "ifeval": 10}, test_share=0.3, validation_share=0.2, seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [10, 4, 6]
    ids = [{row["prompt_id"] for row in splits[s]} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # Test prompts are the same with or without a validation split: adding one never moves them.
    assert splits["test"] == onpolicy.split_prompts({"arithmetic": 10, "ifeval": 10}, test_share=0.3, seed=0)["test"]
    assert "validation" not in onpolicy.split_prompts({"arithmetic": 10}, test_share=0.3, seed=0)
    with pytest.raises(ValueError, match=r"validation_share must be in \[0, 1 - test_share\)"):
        onpolicy.split_prompts({"arithmetic": 10}, test_share=0.5, validation_share=0.5, seed=0)
    out = tmp_path / "pairs"
    assert main(["build-pairs", "--model", tiny_model_dir, "--output_dir", str(out), "--arithmetic_prompts", "4",
                 "--ifeval_prompts", "0", "--test_share", "0.5", "--validation_share", "0.25", "--samples_per_prompt", "2",
                 "--max_new_tokens", "4"]) == 0  # fmt: skip
    assert [r["prompt_id"] for r in load_task_prompts(str(out), split="validation")] == ["arithmetic-00002"]
    assert json.loads((out / "stats.json").read_text())["splits"]["validation"]["arithmetic"]["prompts"] == 1
    card = (out / "README.md").read_text()
    assert "`validation.jsonl`" in card and "`samples-validation.jsonl`" in card


def test_a_built_dataset_grows_its_test_split_by_sampling_only_the_new_prompts(tmp_path, tiny_model_dir, monkeypatch, capsys):
    plain = onpolicy.split_prompts({"arithmetic": 6, "ifeval": 6}, test_share=0.5, validation_share=0.25, seed=0)
    grown = onpolicy.split_prompts({"arithmetic": 6, "ifeval": 6}, test_share=0.5, validation_share=0.25, seed=0, extra_test_prompts=2)
    assert all(grown[split] == plain[split] for split in plain)  # no prompt of any split moves
    assert [r["prompt_id"] for r in grown["test-extra"]] == ["arithmetic-00006", "arithmetic-00007", "ifeval-00006", "ifeval-00007"]
    texts = lambda rows: {json.dumps(r["prompt"]) for r in rows}  # noqa: E731
    assert not texts(grown["test-extra"]) & texts(plain["train"] + plain["validation"] + plain["test"])

    argv = ["build-pairs", "--model", tiny_model_dir, "--arithmetic_prompts", "4", "--ifeval_prompts", "4", "--test_share", "0.5",
            "--samples_per_prompt", "2", "--max_new_tokens", "4", "--prompts_per_chunk", "3"]  # fmt: skip
    built = tmp_path / "built"
    assert main([*argv, "--output_dir", str(built)]) == 0
    shipped = tmp_path / "shipped"  # as a bundled dataset: the files, not the work/ chunks
    shipped.mkdir()
    for path in built.glob("*.*"):
        (shipped / path.name).write_bytes(path.read_bytes())
    sampled = []
    real = onpolicy._sample_chunk
    monkeypatch.setattr(onpolicy, "_sample_chunk", lambda *a, **k: sampled.append(k["seed"]) or real(*a, **k))
    assert main([*argv, "--output_dir", str(shipped), "--extra_test_prompts", "2"]) == 0
    assert sampled == [2, 3]  # the 4 new prompts only, in chunks after the test split's two
    for name in ("train.jsonl", "samples-train.jsonl"):
        assert (shipped / name).read_bytes() == (built / name).read_bytes()
    before = (built / "samples-test.jsonl").read_text().splitlines()
    after = (shipped / "samples-test.jsonl").read_text().splitlines()
    assert after[:4] == before and [json.loads(line)["prompt_id"] for line in after[4:]] == [
        "arithmetic-00004", "arithmetic-00005", "ifeval-00004", "ifeval-00005"]  # fmt: skip
    assert len(load_task_prompts(str(shipped), split="test")) == 8
    stats = json.loads((shipped / "stats.json").read_text())
    assert stats["extra_test_prompts"] == 2 and stats["splits"]["test"]["ifeval"]["extra_prompts"] == 2
    assert "The test split was grown after it was built" in (shipped / "README.md").read_text()

    sampled.clear()
    assert main([*argv, "--output_dir", str(shipped), "--extra_test_prompts", "2"]) == 0  # all written: nothing sampled
    assert sampled == [] and (shipped / "samples-test.jsonl").read_text().splitlines() == after
    capsys.readouterr()
    assert main([*argv, "--output_dir", str(shipped), "--extra_test_prompts", "3", "--temperature", "0.5"]) == 1
    assert "was built with other settings (temperature: stored 1.0, now 0.5)" in capsys.readouterr().err
