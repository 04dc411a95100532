"""Bad input files and bad flags end a command with one line naming the file, line, field or flag,
before any model is loaded; the traceback shows only with SELECTIVE_PO_DEBUG=1."""

from __future__ import annotations

import json

import pytest

from conftest import preference_dataset
from selective_po import cli
from selective_po.cli import main

GOOD = json.dumps(preference_dataset().to_list()[0]).encode() + b"\n"
MISSING_FIELD = json.dumps({k: v for k, v in preference_dataset().to_list()[1].items() if k != "rejected"}).encode()
BAD_FILES = {
    "empty": (b"", "{path} is empty"),
    "not-utf8": (GOOD + b'{"prompt": "caf\xe9"}\n', "{path}, line 2: byte 0xe9 at column 16 is not UTF-8"),
    "not-json": (GOOD + b'{"prompt": "x", "chosen": }\n', "{path}, line 2: not valid JSON"),
    "missing-field": (GOOD + MISSING_FIELD + b"\n", "{path}, line 2: the row has no field 'rejected'"),
}


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if a command gets as far as building a trainer (loading models)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("selective_po.trainer.SelectiveDPOTrainer.__init__", refuse)


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip() and "examples/s]" not in line]  # datasets' own bars
    assert len(lines) == 2 and lines[1] == f"(set {cli.DEBUG_ENV}=1 to see the traceback)", lines
    assert lines[0].startswith(f"selective-po {command}: error: "), lines
    return lines[0]


@pytest.mark.parametrize("case", BAD_FILES)
@pytest.mark.parametrize("command", ["eval", "inspect", "train", "score"])
def test_a_bad_file_is_one_line_naming_file_and_line(tmp_path, capsys, no_models, command, case):
    content, expected = BAD_FILES[case]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(content)
    flags = ["--model", "m", "--dataset", str(path)] if command in ("eval", "inspect") else ["--dataset_name", str(path), "--output_dir", str(tmp_path / "o")]
    assert main([command, *flags]) == 1
    assert expected.format(path=path) in one_line_error(capsys, command)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="is empty"):
        main(["eval", "--model", "m", "--dataset", str(path)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["eval", "--model", "m", "--pairs", "-5"], "argument --pairs: expected a count of 0 or more (0: all), got -5"),
        (["eval", "--model", "m", "--sdpo_threshold", "1.5"], "argument --sdpo_threshold: expected sdpo_threshold q in [0, 1)"),
        (["inspect", "--model", "m", "--pairs", "x"], "argument --pairs: expected a count of 0 or more (0: all), got 'x'"),
        (["build-pairs", "--output_dir", "o", "--samples_per_prompt", "1"], "argument --samples_per_prompt: expected at least 2"),
        (["build-pairs", "--output_dir", "o", "--test_share", "1.0"], "argument --test_share: expected a share in (0, 1)"),
        (["demo", "--max_steps", "0"], "argument --max_steps: expected an integer of 1 or more"),
    ],
)
def test_bad_flags_stop_before_any_work(capsys, monkeypatch, flags, message):
    monkeypatch.setattr(cli, "load_preference_split", lambda *a, **k: pytest.fail("data loaded before the flags were checked"))
    with pytest.raises(SystemExit) as exit:
        main(flags)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_split_lists_the_splits_and_names_the_flag(tmp_path, capsys, no_models):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(GOOD)
    assert main(["eval", "--model", "m", "--dataset", str(path), "--split", "test"]) == 1
    assert f"Dataset {str(path)!r} has no split 'test'; it has ['train']. Pick one with --split." in one_line_error(capsys, "eval")
    assert main(["eval", "--model", "m", "--dataset", "arithmetic", "--split", "validation"]) == 1
    assert "it has ['test', 'train']. Pick one with --split." in one_line_error(capsys, "eval")


def test_a_single_file_is_evaluated_and_inspected_whole(tmp_path, capsys, tiny_model_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in preference_dataset(3).to_list()))
    out = tmp_path / "eval.json"
    flags = ["--model", tiny_model_dir, "--ref_model", tiny_model_dir, "--dataset", str(path)]
    assert main(["eval", *flags, "--max_new_tokens", "2", "--output_json", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"] == 3
    assert f"on {path} (split 'train')" in capsys.readouterr().out
    page = tmp_path / "page.html"
    assert main(["inspect", *flags, "--pairs", "0", "--output", str(page)]) == 0  # 0: every pair
    assert "Wrote" in capsys.readouterr().out and page.read_text().count('class="pair"') == 3
