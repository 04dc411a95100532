"""`selective-po compare`: the grid's config, its order, paired intervals, the report, and resuming."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import preference_dataset
from selective_po.cli import main
from selective_po.compare import CompareConfig, run_dir
from selective_po.intervals import paired_bootstrap_interval

GRID = {
    "seeds": [0, 1],
    "baseline": "dpo",
    "training": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "beta": 0.1, "max_length": 64,
                 "bf16": False, "plot_curves": False},
    "methods": {
        "sdpo-dpo-ref": {"ref_model_name_or_path": "@dpo", "sdpo_threshold": 0.6},  # listed before what it needs
        "dpo": {"loss_type": "sigmoid"},
        "random": {"selection_rule": "random", "seeds": [0]},
    },
}  # fmt: skip


def grid_files(tmp_path, model_dir: str, **changes) -> Path:
    data = tmp_path / "pairs"
    data.mkdir(exist_ok=True)
    rows = preference_dataset().to_list()
    for split, part in (("train", rows), ("test", rows[:6])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    config = {**GRID, "model": model_dir, "dataset": str(data), "output_dir": str(tmp_path / "out"), **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # methods in the order written
    return path


def test_methods_run_after_the_methods_they_refer_to(tmp_path, tiny_model_dir):
    config = CompareConfig.from_yaml(grid_files(tmp_path, tiny_model_dir))
    runs = config.runs()
    assert runs[0] == ("base", 0)
    assert runs.index(("dpo", 0)) < runs.index(("sdpo-dpo-ref", 0)) and runs.index(("dpo", 1)) < runs.index(("sdpo-dpo-ref", 1))
    assert ("random", 0) in runs and ("random", 1) not in runs


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, r"unknown keys \['colour'\]"),
        ({"baseline": "ipo"}, "baseline 'ipo' is not one of the methods"),
        ({"methods": {"a": {"ref_model_name_or_path": "@b"}}, "baseline": "a"}, "method 'a' refers to @b, which is not a method"),
        ({"methods": {"a": {"x": "@b"}, "b": {"x": "@a"}}, "baseline": "a"}, "in a cycle"),
        ({"methods": {"a": {"seeds": [7]}}, "baseline": "a"}, r"uses seeds \[7\] that are not in 'seeds'"),
        ({"methods": {"a": {}, "b": {"x": "@a", "seeds": [0, 1]}}, "baseline": "a"}, None),
        ({"methods": {"a": {"seeds": [0]}, "b": {"x": "@a"}}, "baseline": "a"}, r"needs @a for seeds \[1\]"),
        ({"seeds": []}, "'seeds' must be a non-empty list"),
        ({"training": {"seed": 3}}, r"\['seed'\] are set by the grid"),
    ],
)
def test_bad_grids_are_named(tmp_path, change, message):
    raw = {**GRID, "model": "m", "dataset": "d", **change}
    if message is None:
        CompareConfig.from_dict(raw)
        return
    with pytest.raises(ValueError, match=message):
        CompareConfig.from_dict(raw)


def test_paired_interval_resamples_seeds_and_items():
    assert paired_bootstrap_interval(np.full((3, 40), 0.25)) == (0.25, 0.25)
    generator = np.random.default_rng(0)
    items = generator.normal(size=(1, 200))
    low, high = paired_bootstrap_interval(items)
    assert low < items.mean() < high and 0.15 < high - low < 0.4  # about 2 * 1.96 / sqrt(200) = 0.28
    # Seeds that disagree widen the interval beyond what the items alone give.
    spread = items + np.array([[-1.0], [0.0], [1.0]])
    assert np.subtract(*paired_bootstrap_interval(spread)[::-1]) > 2 * (high - low)
    with pytest.raises(ValueError, match="seeds, items"):
        paired_bootstrap_interval(np.zeros(5))


def test_the_grid_runs_reports_and_resumes_from_what_a_kill_leaves(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from transformers import Trainer

    grid = grid_files(tmp_path, tiny_model_dir)
    config = CompareConfig.from_yaml(grid)
    stopped = run_dir(config, "sdpo-dpo-ref", 1)
    save_rng_state = Trainer._save_rng_state

    def die_while_saving(self, output_dir):  # as a kill -9 would: checkpoint-2 has its weights, not its state
        if self.state.global_step == 2 and str(stopped) in self.args.output_dir:
            raise RuntimeError("killed")
        save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", die_while_saving)
    assert main(["compare", "--config", str(grid), "--resamples", "200"]) == 1  # stopped in sdpo-dpo-ref/seed1
    assert (stopped / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (stopped / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    assert not (run_dir(config, "random", 0)).exists()  # never started
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)
    finished = {r: (run_dir(config, *r) / "result.json").read_text() for r in [("base", 0), ("dpo", 0), ("dpo", 1), ("sdpo-dpo-ref", 0)]}
    (run_dir(config, "dpo", 1) / "result.json").unlink()  # trained, not yet measured
    capsys.readouterr()
    assert main(["compare", "--config", str(grid), "--dry_run"]) == 0
    listing = capsys.readouterr().out
    assert "dpo/seed0: done" in listing and "dpo/seed1: to measure\n" in listing and "sdpo-dpo-ref/seed1: to run" in listing

    assert main(["compare", "--config", str(grid), "--resamples", "200"]) == 0
    shown = capsys.readouterr()
    # The terminal shows the table, not the runs' logged dicts: those are in each run's log.txt, resumed ones appended.
    assert "### likelihood_accuracy" in shown.out and "'loss'" not in shown.out + shown.err and '"loss"' not in shown.out + shown.err
    logged = [json.loads(line) for line in (stopped / "log.txt").read_text().splitlines() if line.startswith('{"step"')]
    assert [entry["step"] for entry in logged if "loss" in entry] == [1, 2, 2]  # killed at step 2, then resumed from 1
    again = {r: (run_dir(config, *r) / "result.json").read_text() for r in finished}
    assert all(again[r] == finished[r] for r in finished if r != ("dpo", 1))  # finished runs were not redone
    assert json.loads(again[("dpo", 1)])["per_item"] == json.loads(finished[("dpo", 1)])["per_item"]  # measured again alike
    assert json.loads((stopped / "result.json").read_text())["resumed_from"].endswith("checkpoint-1")
    assert not any(Path(config.output_dir).glob("*/seed*/checkpoints"))  # deleted once each model was saved

    out = Path(config.output_dir)
    report = (out / "compare.md").read_text()
    assert "### likelihood_accuracy" in report and "| sdpo-dpo-ref | 0,1 |" in report and "| random | 0 |" in report
    summary = json.loads((out / "compare.json").read_text())["summary"]
    cell = summary["methods"]["sdpo-dpo-ref"]["reward_accuracy"]
    low, high = cell["difference_interval"]
    assert low <= cell["difference"] <= high
    assert "difference" not in summary["methods"]["dpo"]["reward_accuracy"]  # the baseline itself
    for seed, mean in zip((0, 1), cell["per_seed"], strict=True):
        result = json.loads((run_dir(config, "sdpo-dpo-ref", seed) / "result.json").read_text())
        assert mean == pytest.approx(np.mean(result["per_item"]["reward_accuracy"]))
    assert (out / "compare.png").stat().st_size > 0


def test_runs_can_be_picked_by_seed_and_method_and_wait_for_their_references(tmp_path):
    config = CompareConfig.from_yaml(grid_files(tmp_path, "unused-model"))
    assert config.runs(seeds=[1]) == [("dpo", 1), ("sdpo-dpo-ref", 1)]
    assert config.runs(seeds=[0], methods=["base", "random"]) == [("base", 0), ("random", 0)]
    with pytest.raises(ValueError, match=r"seeds \[7\] are not in the grid's seeds \[0, 1\]"):
        config.runs(seeds=[7])
    with pytest.raises(ValueError, match=r"methods \['sigmoid'\] are not in the grid's methods"):
        config.runs(methods=["sigmoid"])
    from selective_po.compare import run_grid

    # Its @dpo model is not trained yet: an error that says so, before anything is loaded.
    with pytest.raises(ValueError, match=r"sdpo-dpo-ref/seed1 needs the model of @dpo \(seed 1\), not trained yet"):
        run_grid(config, seeds=[1], methods=["sdpo-dpo-ref"])


def test_report_only_reports_the_finished_runs_and_runs_nothing(tmp_path, tiny_model_dir, capsys):
    grid = grid_files(tmp_path, tiny_model_dir, methods={"dpo": {"loss_type": "sigmoid"}, "sdpo": {"sdpo_threshold": 0.6}})
    with pytest.raises(SystemExit):  # --seeds is checked as a list of integers
        main(["compare", "--config", str(grid), "--seeds", "zero"])
    assert main(["compare", "--config", str(grid), "--report_only"]) == 1  # no baseline result yet
    assert "no finished run of the baseline 'dpo' yet" in capsys.readouterr().err
    assert main(["compare", "--config", str(grid), "--seeds", "1", "--resamples", "100"]) == 0  # only seed 1: no base
    config = CompareConfig.from_yaml(grid)
    assert sorted(p.parent.parent.name + "/" + p.parent.name for p in Path(config.output_dir).glob("*/seed*/result.json")) == [
        "dpo/seed1", "sdpo/seed1"]  # fmt: skip
    assert main(["compare", "--config", str(grid), "--report_only", "--resamples", "100"]) == 0
    assert not (run_dir(config, "base", 0) / "result.json").exists()  # reported, nothing run
    report = (Path(config.output_dir) / "compare.md").read_text()
    assert "| sdpo | 1 |" in report and "| base |" not in report
    # The same runs against another method, beside the main report rather than over it.
    assert main(["compare", "--config", str(grid), "--report_only", "--baseline", "sdpo", "--resamples", "100"]) == 0
    assert "vs sdpo" in (Path(config.output_dir) / "compare-vs-sdpo.md").read_text()
    assert (Path(config.output_dir) / "compare.md").read_text() == report


def test_a_grown_held_out_split_is_measured_again_without_training_again(tmp_path, tiny_model_dir, capsys):
    grid = grid_files(tmp_path, tiny_model_dir, seeds=[0], methods={"dpo": {"loss_type": "sigmoid"}, "sdpo": {"sdpo_threshold": 0.6}})
    assert main(["compare", "--config", str(grid), "--resamples", "100"]) == 0
    config = CompareConfig.from_yaml(grid)
    trained = {m: (run_dir(config, m, 0) / "trained.json").read_bytes() for m in ("dpo", "sdpo")}
    weights = {m: (run_dir(config, m, 0) / "model" / "model.safetensors").stat().st_mtime_ns for m in trained}
    first = json.loads((run_dir(config, "dpo", 0) / "result.json").read_text())
    assert len(first["per_item"]["reward_accuracy"]) == 6
    # The log-likelihood changes against the evaluation reference (the start model) make up the margin.
    items, beta = first["per_item"], config.eval_beta
    assert [beta * (c - r) for c, r in zip(items["chosen_logp_change"], items["rejected_logp_change"])] == pytest.approx(items["mean_margin"], abs=1e-6)
    assert min(map(abs, items["chosen_logp_change"])) > 1e-3
    base = json.loads((run_dir(config, "base", 0) / "result.json").read_text())["per_item"]
    assert base["chosen_logp_change"] == pytest.approx([0.0] * 6, abs=1e-4)

    rows = preference_dataset().to_list()
    Path(config.dataset, "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))  # two more held-out pairs
    capsys.readouterr()
    assert main(["compare", "--config", str(grid), "--dry_run"]) == 0
    assert "dpo/seed0: to measure again (the held-out data changed)" in capsys.readouterr().out
    from selective_po.compare import run_grid

    run_grid(config, methods=["base"])  # base alone on the grown split: the report must not pair it with the others
    assert main(["compare", "--config", str(grid), "--report_only", "--resamples", "100"]) == 1
    assert "measured on different held-out data" in capsys.readouterr().err

    assert main(["compare", "--config", str(grid), "--resamples", "100"]) == 0
    for method in trained:  # measured again, not trained again
        assert (run_dir(config, method, 0) / "trained.json").read_bytes() == trained[method]
        assert (run_dir(config, method, 0) / "model" / "model.safetensors").stat().st_mtime_ns == weights[method]
    again = json.loads((run_dir(config, "dpo", 0) / "result.json").read_text())
    assert len(again["per_item"]["reward_accuracy"]) == 8 and again["measured_on"] != first["measured_on"]
    assert again["per_item"]["likelihood_accuracy"][:6] == first["per_item"]["likelihood_accuracy"]


def test_compare_reports_the_answers_that_end_per_prompt(tmp_path, tiny_model_dir):
    from selective_po.onpolicy import arithmetic_prompts

    grid = grid_files(tmp_path, tiny_model_dir, seeds=[0], prompts=4, max_new_tokens=3,
                      methods={"dpo": {"loss_type": "sigmoid"}})  # fmt: skip
    (tmp_path / "pairs" / "test_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arithmetic_prompts(4, seed=0)))
    assert main(["compare", "--config", str(grid), "--resamples", "100"]) == 0
    config = CompareConfig.from_yaml(grid)
    items = json.loads((run_dir(config, "dpo", 0) / "result.json").read_text())["per_item"]
    assert len(items["answers_that_end"]) == 4 and set(items["answers_that_end"]) <= {0.0, 1.0}
    assert "### answers_that_end" in (Path(config.output_dir) / "compare.md").read_text()


def test_a_metric_the_baseline_lacks_on_some_seeds_pairs_only_where_both_have_it():
    from selective_po.compare import summarize

    def run(method, seed, with_end):
        items = {"likelihood_accuracy": [1.0, 0.0, 1.0]}
        if with_end:
            items["answers_that_end"] = [1.0, 1.0, 0.0] if method == "x" else [0.0, 1.0, 0.0]
        return {"method": method, "seed": seed, "per_item": items}

    results = {"dpo/seed0": run("dpo", 0, True), "dpo/seed1": run("dpo", 1, False), "x/seed0": run("x", 0, True),
               "x/seed1": run("x", 1, True)}  # fmt: skip
    summary = summarize(SimpleNamespace(baseline="dpo"), results, resamples=100)
    cell = summary["methods"]["x"]["answers_that_end"]
    assert cell["difference"] == pytest.approx(1 / 3) and cell["interval_method"].startswith("bootstrap over items, 1 seed")
    assert "answers_that_end" not in summary["methods"]["dpo"]  # not measured on every seed of the row
