"""Tests for the arithmetic data generator and the preference dataset loader."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import datasets
import pytest

from selective_po.data import BUNDLED_DATASETS, check_preference_columns, load_preference_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_arithmetic_data.py"
BUNDLED = BUNDLED_DATASETS["arithmetic"]
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
FINAL_ANSWER = re.compile(r"= (\d+)\.$")


@pytest.fixture(scope="module")
def generator():
    """The generator script, imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_arithmetic_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so register before running.
    monkeypatch_modules = pytest.MonkeyPatch()
    monkeypatch_modules.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    yield module
    monkeypatch_modules.undo()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a jsonl file, parsed independently of the loader under test."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def bundled_splits() -> dict[str, list[dict]]:
    return {split: read_jsonl(BUNDLED / f"{split}.jsonl") for split in ("train", "test")}


def expected_result(record: dict) -> int:
    """Independent ground truth, so a generator bug cannot grade itself."""
    a, b = record["a"], record["b"]
    return {"add": a + b, "sub": a - b, "mul": a * b}[record["operation"]]


def problem_key(record: dict) -> tuple:
    """Same problem regardless of operand order for the commutative addition."""
    a, b = record["a"], record["b"]
    return (record["operation"], *(sorted((a, b)) if record["operation"] == "add" else (a, b)))


def record_errors(record: dict) -> list[str]:
    """Every rule a bundled record breaks (empty when it is valid)."""
    chosen = record["chosen"][0]["content"]
    rejected = record["rejected"][0]["content"]
    (c0, c1), (r0, r1) = record["chosen_span"], record["rejected_span"]
    c_num, r_num = chosen[c0:c1], rejected[r0:r1]
    errors = []
    if chosen[:c0] != rejected[:r0] or chosen[c1:] != rejected[r1:]:
        errors.append("texts differ outside the spans")
    if not (c_num.isdigit() and r_num.isdigit()):
        errors.append(f"span texts {c_num!r}/{r_num!r} are not numbers")
        return errors
    if c_num == r_num:
        errors.append("span texts are equal")
    # The span must cover a whole number, not a piece of one.
    if chosen[c0 - 1 : c0].isdigit() or chosen[c1 : c1 + 1].isdigit():
        errors.append("chosen span cuts a number")
    if abs(int(c_num) - int(r_num)) not in (1, 2, 10):
        errors.append(f"wrong number {r_num} is not off by 1, 2 or 10 from {c_num}")
    truth = expected_result(record)
    chosen_final = int(FINAL_ANSWER.search(chosen).group(1))
    rejected_final = int(FINAL_ANSWER.search(rejected).group(1))
    if chosen_final != truth or record["answer"] != truth:
        errors.append(f"chosen final {chosen_final} / answer {record['answer']} != {truth}")
    if record["error_type"] == "final" and (rejected_final == truth or c1 != len(chosen) - 1):
        errors.append("error_type final but the rejected final answer is not the changed number")
    if record["error_type"] == "intermediate" and (rejected_final != truth or c1 == len(chosen) - 1):
        errors.append("error_type intermediate but the final answer changed")
    if f"{record['a']} {SYMBOLS[record['operation']]} {record['b']}" not in record["prompt"][0]["content"]:
        errors.append("prompt does not show the problem")
    return errors


# --- generator ---------------------------------------------------------------------------


def test_generator_is_deterministic(generator):
    assert generator.make_splits(0, 60, 20) == generator.make_splits(0, 60, 20)
    assert generator.make_splits(0, 60, 20) != generator.make_splits(1, 60, 20)


def test_make_pair_changes_exactly_the_chosen_slot(generator):
    rng = random.Random(3)
    for _ in range(200):
        record = generator.make_pair(rng, operation="mul", a=47, b=6)
        assert record_errors(record) == []
        assert record["answer"] == 282


@pytest.mark.parametrize(
    ("operation", "a", "b"),
    [("sub", 38, 47), ("sub", 40, 40), ("mul", 47, 12), ("add", 7, 38), ("div", 40, 2)],
)
def test_make_pair_rejects_operands_outside_the_problem_space(generator, operation, a, b):
    with pytest.raises(ValueError, match="must|needs|Unknown"):
        generator.make_pair(random.Random(0), operation=operation, a=a, b=b)


def test_make_splits_refuses_more_problems_than_exist(generator):
    with pytest.raises(ValueError, match="'mul' problems"):
        generator.make_splits(0, 3000, 10)


def test_bundled_files_match_generator_defaults(generator, tmp_path):
    generator.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (BUNDLED / name).read_bytes(), name
    default_command = generator.regenerate_command(
        seed=0, n_train=1000, n_test=200, out="src/selective_po/bundled/arithmetic"
    )
    assert default_command in (BUNDLED / "README.md").read_text(encoding="utf-8")


def test_rerun_gives_byte_identical_files(generator, tmp_path):
    generator.main(["--out", str(tmp_path), "--seed", "5", "--n-train", "30", "--n-test", "10"])
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    generator.main(["--out", str(tmp_path), "--seed", "5", "--n-train", "30", "--n-test", "10"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == first
    assert set(first) == {"train.jsonl", "test.jsonl", "README.md"}


# --- bundled data ---------------------------------------------------------------------------


def test_every_bundled_record_is_valid(bundled_splits):
    failures = {
        (split, i): errs
        for split, records in bundled_splits.items()
        for i, record in enumerate(records)
        if (errs := record_errors(record))
    }
    assert failures == {}


def test_bundled_prompts_unique_and_splits_disjoint(bundled_splits):
    train = [problem_key(r) for r in bundled_splits["train"]]
    test = [problem_key(r) for r in bundled_splits["test"]]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_bundled_mix_of_operations_and_error_types(bundled_splits):
    records = bundled_splits["train"] + bundled_splits["test"]
    for operation in SYMBOLS:
        share = sum(r["operation"] == operation for r in records) / len(records)
        assert 0.25 < share < 0.42, operation
    final_share = sum(r["error_type"] == "final" for r in records) / len(records)
    assert 0.4 < final_share < 0.6
    words = [len(r["chosen"][0]["content"].split()) for r in records]
    assert 20 <= min(words) and max(words) <= 45


# --- loader -------------------------------------------------------------------------------


def small_records() -> list[dict]:
    return [
        {"prompt": "1 + 1?", "chosen": "2", "rejected": "3", "n": 0},
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "n": 1},
    ]


def test_load_bundled_splits(bundled_splits):
    loaded = load_preference_dataset("arithmetic")
    assert set(loaded) == {"train", "test"}
    assert loaded["train"].num_rows == 1000 and loaded["test"].num_rows == 200
    assert loaded["test"].to_list() == bundled_splits["test"]
    test = load_preference_dataset("arithmetic", split="test")
    assert test[0] == bundled_splits["test"][0]


def test_load_jsonl_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in small_records()))
    loaded = load_preference_dataset(str(path))
    assert list(loaded) == ["train"]
    assert loaded["train"].to_list() == small_records()


def test_load_parquet_file(tmp_path):
    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list(small_records()).to_parquet(str(path))
    assert load_preference_dataset(str(path), split="train").to_list() == small_records()


def test_load_saved_dataset(tmp_path):
    datasets.Dataset.from_list(small_records()).save_to_disk(str(tmp_path / "ds"))
    loaded = load_preference_dataset(str(tmp_path / "ds"))
    assert list(loaded) == ["train"]
    assert loaded["train"].to_list() == small_records()


def test_load_saved_dataset_dict(tmp_path):
    records = small_records()
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records[:1]), "eval": datasets.Dataset.from_list(records[1:])}
    )
    saved.save_to_disk(str(tmp_path / "dd"))
    assert load_preference_dataset(str(tmp_path / "dd"), split="eval").to_list() == records[1:]


def test_load_folder_of_data_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in small_records()))
    assert load_preference_dataset(str(folder), split="train").to_list() == small_records()


def test_missing_split_lists_available_splits():
    with pytest.raises(ValueError, match=r"'validation'.*\['test', 'train'\]"):
        load_preference_dataset("arithmetic", split="validation")


def test_missing_columns_named_with_source(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "a", "rejected": "b"}) + "\n")
    with pytest.raises(ValueError, match="the row has no field 'chosen'") as info:
        load_preference_dataset(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}, line 1: ")
    assert "TRL's preference dataset format" in message


def test_implicit_prompt_accepted():
    implicit = datasets.Dataset.from_list([{"chosen": "Q: 1+1? A: 2", "rejected": "Q: 1+1? A: 3"}])
    check_preference_columns(implicit, source="implicit")
    with pytest.raises(ValueError, match=r"in-memory.*\['chosen'\]"):
        check_preference_columns(implicit.rename_column("chosen", "good"), source="in-memory")


@pytest.mark.parametrize("name", ["missing.jsonl", "./nowhere", "no/such/folder", "/abs/missing"])
def test_nonexistent_local_path_raises(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError(f"tried the Hub with {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match=re.escape(name)):
        load_preference_dataset(name)


def test_config_name_rejected_for_local_data():
    with pytest.raises(ValueError, match="config_name"):
        load_preference_dataset("arithmetic", config_name="default")
