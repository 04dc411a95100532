"""Every command the README and the documentation show runs, as written, and every `--help` prints.

The ```bash blocks of the README, then of each docs page in the site's navigation order, are read
in order and each command line runs in one shared working folder, so later commands see what
earlier ones wrote (`eval --model outputs/demo` after the demo). A line shown on several pages runs
once, where it first appears.
Model names map onto tiny models built here, so each command runs in seconds:

- the embedded `smollm2-135m-instruct` is a tiny model placed, with a valid manifest, where the
  conversion would leave the real one (`$SELECTIVE_PO_CACHE/models/`);
- Hub ids (`Qwen/...`) are tiny models in a Hub cache, read offline;
- the placeholders a user would write (`my_pairs.jsonl`, `my_run.yaml`) are small files.

`make X` runs the `selective-po` line of the Makefile's recipe for X. `selective-po ...` runs in this
process; `accelerate launch` and `torchrun` lines run as processes. A command the tests cannot run
carries `# not run by the tests: <why>`, after it on its line or on a comment line above it (which
marks every command down to the next blank or comment line), and is reported as a skip with that
reason; nothing is skipped without one. A command continued over lines with `\\` runs as one line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import build_model, build_tokenizer, preference_dataset
from selective_po.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
NOT_RUN = "not run by the tests:"
HUB_IDS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
           "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct")


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """`(command line, reason it is not run or None)` for every command in the README's bash blocks.

    A command continued over lines with `\\` is one command, its pieces joined by single spaces. The
    reason comes from the command's own trailing `# not run by the tests: ...` comment, or from a
    comment line of that form above it (continued on the comment lines right after it), which marks
    every command below it up to the next blank line or comment line.
    """
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        above, continued = None, False  # the reason a `# not run by the tests: ...` line gives the lines below
        for line in re.sub(r"[ \t]*\\\n[ \t]*", " ", block).splitlines():
            if line.strip().startswith("#"):
                note = line.strip().lstrip("#").strip()
                if note.startswith(NOT_RUN):
                    above, continued = note[len(NOT_RUN) :].strip(), True
                elif continued:
                    above = f"{above} {note}"
                else:
                    above = None
                continue
            continued = False
            code, _, comment = line.partition(" #")
            code = code.strip()
            if not code:
                above = None
                continue
            comment = comment.strip()
            reason = comment[len(NOT_RUN) :].strip() if comment.startswith(NOT_RUN) else above
            commands.append((code, reason))
    return commands


def doc_pages() -> list[Path]:
    """The README, then every page of the site in its navigation order (mkdocs.yml)."""
    def flatten(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from flatten(value) if isinstance(value, list) else [value]

    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    return [REPO / "README.md", *(REPO / "docs" / page for page in flatten(nav))]


def shown_commands() -> list[tuple[str, str, str | None]]:
    """`(page, command line, reason it is not run or None)`, each line once, where it first appears."""
    seen, commands = set(), []
    for page in doc_pages():
        for line, reason in readme_commands(page.read_text()):
            if line not in seen:
                seen.add(line)
                commands.append((str(page.relative_to(REPO)), line, reason))
    return commands


SHOWN = shown_commands()
COMMAND_LINES = [(line, reason) for _, line, reason in SHOWN]


def test_the_docs_show_commands_and_mark_each_one_not_run():
    pages = {page for page, _, _ in SHOWN}
    assert len(COMMAND_LINES) >= 10 and {"README.md", "docs/getting-started.md", "docs/evaluation.md"} <= pages
    for line, reason in COMMAND_LINES:
        assert reason is None or len(reason) > 10, f"{line!r} is marked not run without saying why"
    every_page = {str(p.relative_to(REPO)) for p in doc_pages()} | {"README.md"}
    on_disk = {str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md")}
    assert on_disk <= every_page, f"pages outside the navigation, whose commands nothing runs: {sorted(on_disk - every_page)}"


def make_recipe(target: str) -> list[str]:
    """The `selective-po` command of a Makefile target, as argv (without the program)."""
    lines = (REPO / "Makefile").read_text().split(f"\n{target}:", 1)[1].split("\n\n", 1)[0].splitlines()
    command = next(line.strip() for line in lines if "selective-po" in line)
    return shlex.split(command.replace("$(BIN)/", ""))[1:]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A working folder with the README's inputs, and the name mapping (tiny models) in place."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "examples", root / "examples")
    # The committed reports, for the lines that tabulate them (`python benchmarks/results_tables.py ...`).
    shutil.copytree(REPO / "benchmarks", root / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "docs" / "results", root / "docs" / "results")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)

    from selective_po.files import FileDigests, write_manifest

    embedded = root / "cache" / "models" / "smollm2-135m-instruct"
    model.save_pretrained(embedded)
    tokenizer.save_pretrained(embedded)
    write_manifest(embedded, FileDigests(None), source="tiny stand-in for the tests")
    for hub_id in HUB_IDS:
        repo = root / "hub" / f"models--{hub_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("0" * 40)
        model.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)

    rows = preference_dataset().to_list()
    (root / "my_pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    my_run = {
        "model_name_or_path": "smollm2-135m-instruct", "dataset_name": "my_pairs.jsonl", "max_steps": 2,
        "per_device_train_batch_size": 2, "max_length": 128, "output_dir": "outputs/my_run", "report_to": "none",
        "save_strategy": "no",
    }  # fmt: skip
    (root / "my_run.yaml").write_text(yaml.safe_dump(my_run))
    return root


@pytest.fixture
def in_workspace(workspace, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(workspace)
    env = {"SELECTIVE_PO_CACHE": str(workspace / "cache"), "HF_HUB_CACHE": str(workspace / "hub"), "HF_HUB_OFFLINE": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub read these when it was imported; reading the Hub cache offline needs them now.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return workspace


@pytest.mark.parametrize("line, reason", COMMAND_LINES, ids=[f"{page}: {line[:60]}" for page, line, _ in SHOWN])
def test_readme_command_runs_as_written(line, reason, in_workspace):
    if reason is not None:
        pytest.skip(f"README marks it {NOT_RUN} {reason}")
    argv = shlex.split(line)
    if argv[0] == "make":
        if argv[1] == "test":
            pytest.skip("`make test` is what CI runs: this suite")
        argv = ["selective-po", *make_recipe(argv[1])]
    if argv[0] == "selective-po":
        assert run_in_process(argv[1:]) == 0, line
        return
    if argv[0] in ("accelerate", "torchrun", "python"):
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, f"{line}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return
    pytest.fail(f"The README shows {line!r}, which this test does not know how to run; mark it `# {NOT_RUN} ...`.")


def run_in_process(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse ends `--help` (and its own errors) with SystemExit
        return exit.code


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_help_prints(command, capsys):
    status = run_in_process([command, "--help"] if command else ["--help"])
    out = capsys.readouterr().out
    assert status == 0 and "usage" in out.lower(), out[-2000:]
    assert command in out
