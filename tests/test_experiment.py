"""benchmarks/onpolicy_experiment.py: its grids are valid configs, SePO's beta is chosen on validation,
and its scheduler runs each run after what it needs, several at once, and contains failures."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from selective_po.compare import CompareConfig, training_args

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "onpolicy_experiment.py"


def benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiment():
    return benchmark("onpolicy_experiment")


@pytest.fixture(scope="module")
def tables():
    return benchmark("results_tables")


@pytest.mark.parametrize("preset", ["cpu", "cuda"])
def test_every_run_of_each_preset_makes_a_valid_config(experiment, preset, tmp_path):
    settings = experiment.PRESETS[preset]
    grids = {
        "main": experiment.grid_dict(settings, "onpolicy-smollm2", tmp_path / "main", experiment.main_methods(settings, 0.3)),
        "tune": experiment.tune_dict(settings, "onpolicy-smollm2", tmp_path),
    }
    for name, grid in grids.items():
        config = CompareConfig.from_dict(grid, source=name)
        for method in config.methods:
            for seed in method.seeds:
                args = training_args(config, method, seed, "start-model")
                if "sepo" in method.name:
                    assert args.oracle_ref_model_name_or_path == "start-model" and args.beta in (0.3, *experiment.SEPO_BETAS.values())
    main = CompareConfig.from_dict(grids["main"])
    seeds = {m.name: m.seeds for m in main.methods}
    assert seeds["dpo"] == seeds["sepo"] == seeds["sdpo-fixed-scores"] == settings["seeds"]
    assert seeds["sdpo-dpo-ref-random"] == settings["control_seeds"]
    assert ("sepo-random" in seeds and "sepo-all" in seeds) == settings["sepo_controls"]
    assert [m for m in seeds if re.search(r"-k\d+$", m)] == (["sdpo-dpo-ref-k20", "sdpo-dpo-ref-k60", "sdpo-dpo-ref-k80", "sdpo-dpo-ref-k100"] if settings["sweep"] else [])
    assert seeds["sepo-end-keep"] == seeds["sdpo-fixed-scores-end-keep"] == settings["seeds"]
    for name in ("sepo-end-keep", "sdpo-fixed-scores-end-keep"):
        args = training_args(main, next(m for m in main.methods if m.name == name), 0, "start-model")
        assert args.end_token_selection == "keep" and args.selection_rule == ("scorer" if "fixed" in name else "scores")
    by_name = {m.name: m.fields for m in main.methods}
    assert by_name["sdpo-dpo-ref"]["sdpo_threshold"] == 0.6
    fixed = training_args(main, next(m for m in main.methods if m.name == "sdpo-fixed-scores"), 1, "start-model")
    assert fixed.selection_rule == "scorer" and fixed.scorer_model_name_or_path.endswith("dpo/seed1/model")
    assert fixed.ref_model_name_or_path is None  # the start model anchors the loss
    dpo = training_args(main, next(m for m in main.methods if m.name == "dpo"), 0, "start-model")
    assert dpo.loss_type == ["sigmoid"] or (dpo.selection_rule == "all" and dpo.precompute_ref_log_probs)


def test_sepo_beta_is_chosen_by_validation_reward_accuracy_then_margin(experiment, tmp_path):
    def result(name, correct, margin):
        path = tmp_path / name / "seed0" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"per_item": {"reward_accuracy": correct, "mean_margin": [margin] * len(correct)}}))

    result("sepo-beta01", [1, 0, 1, 1], 0.1)
    result("sepo-beta03", [1, 1, 1, 0], 0.5)
    assert experiment.chosen_beta(tmp_path) is None  # beta 1 not measured yet
    result("sepo-beta1", [0, 0, 1, 1], 0.9)
    assert experiment.chosen_beta(tmp_path) == 0.3  # ties on accuracy with 0.1, larger margin
    assert json.loads((tmp_path / "chosen_beta.json").read_text())["beta"] == 0.3


def test_the_scheduler_orders_parallelizes_and_contains_failures(experiment, tmp_path):
    stamps = tmp_path / "stamps"
    stamps.mkdir()

    def command(task):  # each run records when it started and ended; "bad" fails
        code = (f"import sys, time, pathlib; p = pathlib.Path({str(stamps)!r}); (p / '{task['key']}.start').write_text(str(time.time())); "
                f"time.sleep(0.5); (p / '{task['key']}.end').write_text(str(time.time())); sys.exit({int(task['key'] == 'bad')})")
        return [sys.executable, "-c", code]

    def task(key, deps=(), priority=(1,), done=False):
        return {"key": key, "deps": set(deps), "priority": priority, "done": done}

    tasks = [task("old", done=True), task("late", priority=(2,)), task("a", ["old"]), task("b"), task("c", ["a", "b"]),
             task("bad"), task("after-bad", ["bad"]), task("after-after-bad", ["after-bad"])]  # fmt: skip
    added = []

    def on_done(key):
        return [task("added", ["c"])] if key == "c" and not added.append(key) else []

    failed = experiment.schedule(tasks, workers=2, logs=tmp_path / "logs", on_done=on_done, command=command)
    assert failed == ["after-after-bad", "after-bad", "bad"]
    started = {p.stem: float(p.read_text()) for p in stamps.glob("*.start")}
    ended = {p.stem: float(p.read_text()) for p in stamps.glob("*.end")}
    assert set(started) == {"late", "a", "b", "c", "bad", "added"}  # not "old" (done), not the ones behind "bad"
    assert started["c"] >= max(ended["a"], ended["b"]) and started["added"] >= ended["c"]
    assert started["late"] >= min(started[k] for k in ("a", "b", "bad"))  # lower priority waits for a free worker
    overlapping = [(x, y) for x in started for y in started if x < y and started[y] < ended[x] and started[x] < ended[y]]
    assert overlapping and all(sum(started[k] <= t < ended[k] for k in started) <= 2 for t in started.values())


def test_each_run_gets_its_share_of_the_cores_unless_the_user_set_it(experiment, tmp_path, monkeypatch):
    def command(task):  # each run writes the thread count it was given
        return [sys.executable, "-c", f"import os, pathlib; pathlib.Path({str(tmp_path)!r}, '{task['key']}').write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))"]

    tasks = [{"key": k, "deps": set(), "priority": (1,), "done": False} for k in ("x", "y")]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert experiment.schedule(tasks, workers=2, logs=tmp_path / "logs", command=command, threads=3) == []
    assert (tmp_path / "x").read_text() == (tmp_path / "y").read_text() == "3"
    cores = len(os.sched_getaffinity(0))
    assert experiment.run_threads(1) == cores and experiment.run_threads(2) == max(1, cores // 2) and experiment.run_threads(10 * cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert experiment.run_threads(2) is None  # the user's setting is inherited as it is
    assert experiment.schedule(tasks, workers=2, logs=tmp_path / "logs", command=command, threads=None) == []
    assert (tmp_path / "x").read_text() == "5"
    assert experiment.PRESETS["cpu"]["workers"] == 2


def test_runs_are_queued_first_dpo_then_seed_by_seed_main_rows_before_controls(experiment, tmp_path):
    settings = experiment.PRESETS["cuda"]  # the preset that tunes SePO's beta first
    main_file, tune_file = tmp_path / "main.yaml", tmp_path / "tune.yaml"
    main = experiment.write_grid(main_file, experiment.grid_dict(settings, "onpolicy-smollm2-large", tmp_path / "main",
                                                                 experiment.main_methods(settings, 1.0)))  # fmt: skip
    tune = experiment.write_grid(tune_file, experiment.tune_dict(settings, "onpolicy-smollm2-large", tmp_path))
    tasks = experiment.tasks_of(main, main_file) + [t for t in experiment.tasks_of(tune, tune_file) if t["method"] != "base"]
    order = [t["key"].split(":")[-1] for t in sorted(tasks, key=lambda t: t["priority"])]
    assert order[:2] == ["base/seed0", "dpo/seed0"]
    seed0, seed1 = order.index("sdpo-dpo-ref/seed0"), order.index("sdpo-dpo-ref/seed1")
    assert order.index("sdpo-dpo-ref-random/seed0") > seed0 and order.index("sepo-beta1/seed0") < seed1 < order.index("dpo/seed1") + 4
    by_key = {t["key"].split(":")[-1]: t for t in tasks}
    assert by_key["sdpo-dpo-ref/seed1"]["deps"] == {f"{tmp_path / 'main'}:dpo/seed1"}
    assert by_key["sepo/seed0"]["deps"] == {f"{tmp_path / 'main'}:dpo/seed0"}


def test_results_tables_are_the_reports_figures(tables, tmp_path, capsys, monkeypatch):
    """benchmarks/results_tables.py prints each report's means and paired differences, marks the intervals that
    exclude 0, gives as the smallest resolvable difference the median half-width over rows with every seed, judges
    each claim at a 5% family-wise error rate over its metrics (Holm), and shows each claim's interval before and now."""

    def cell(mean, per_seed=None, diff=None, p=None):
        out = {"mean": mean, "interval": [mean - 0.01, mean + 0.01]}
        if per_seed:
            out["per_seed"] = per_seed
        if diff:
            out["difference"], out["difference_interval"] = diff
            out["bootstrap_interval"] = [diff[1][0] / 2, diff[1][1] / 2]
            out["p_value"], out["interval_method"] = p, f"t over {len(per_seed or [0])} seeds"
        return out

    def both(a, b):
        return {"likelihood_accuracy": a, "reward_accuracy": b}

    methods = {
        "base": {"seeds": [0], **both(cell(0.5, [0.5], (-0.1, [-0.14, -0.06]), 0.001), cell(0.0, [0.0], (-0.7, [-0.8, -0.6]), 0.001))},
        "dpo": {"seeds": [0, 1, 2], **both(cell(0.6, [0.59, 0.6, 0.61]), cell(0.7, [0.7] * 3))},
        # each alone under 5%, not both after Holm (0.06, 0.06): cannot tell
        "sdpo-dpo-ref": {"seeds": [0, 1, 2], **both(cell(0.61, [0.6, 0.61, 0.62], (0.01, [0.001, 0.04]), 0.03),
                                                     cell(0.72, [0.72] * 3, (0.02, [0.001, 0.05]), 0.04))},
        # 0.02 x 2 = 0.04 holds; 0.6 does not reach it
        "confidence": {"seeds": [0, 1, 2], **both(cell(0.62, [0.62] * 3, (0.02, [0.01, 0.03]), 0.02),
                                                   cell(0.69, [0.69] * 3, (-0.01, [-0.05, 0.03]), 0.6))},
        "sdpo-dpo-ref-random": {"seeds": [0], **both(cell(0.55, [0.55], (-0.05, [-0.2, 0.1]), 0.5), cell(0.6, [0.6], (-0.1, [-0.3, 0.1]), 0.4))},
    }
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"summary": {"metrics": ["likelihood_accuracy", "reward_accuracy"], "methods": methods}}))
    report = json.loads(path.read_text()) | {"baseline": "dpo"}
    shown = tables.table([report], ("likelihood_accuracy",))
    assert "| DPO | 0,1,2 | 60.0% |  |" in shown
    assert "| Selective-DPO, DPO model as reference, k=40% | 0,1,2 | 61.0% | **+1.0 [+0.1, +4.0]** |" in shown
    assert "| ConfPO (confidence) | 0,1,2 | 62.0% | **+2.0 [+1.0, +3.0]** |" in shown  # excludes 0
    spread = tables.seed_spread(report, ("likelihood_accuracy",))
    # rows on every seed but the baseline: half-widths 1.95 and 1.0 points; the one-seed control is left out
    assert spread.splitlines()[0] == "| method | likelihood acc. |"
    assert spread.splitlines()[2:] == ["| DPO | 59.0% / 60.0% / 61.0% |", "| Selective-DPO, DPO model as reference, k=40% | 60.0% / 61.0% / 62.0% |",
                                       "| ConfPO (confidence) | 62.0% / 62.0% / 62.0% |", "| smallest resolvable difference | 1.5 points |"]  # fmt: skip
    judged = tables.verdicts([report], ("likelihood_accuracy", "reward_accuracy"))
    assert "| ConfPO beats DPO | likelihood acc. | 0,1,2 | +2.0 [+1.0, +3.0] | 0.040 | holds |" in judged
    assert "| ConfPO beats DPO | reward acc. | 0,1,2 | −1.0 [−5.0, +3.0] | 0.600 | cannot tell |" in judged
    assert "| Selective-DPO with a DPO-trained reference beats DPO | likelihood acc. | 0,1,2 | +1.0 [+0.1, +4.0] | 0.060 | cannot tell |" in judged
    assert "| Selective-DPO with a DPO-trained reference beats DPO | reward acc. | 0,1,2 | +2.0 [+0.1, +5.0] | 0.060 | cannot tell |" in judged
    # the instruction-following claim is judged on IFEval alone, which this report lacks
    assert "Instruction following" not in judged
    # claims against a baseline no report has are left out, not judged against another one
    assert "random 40%" not in judged and "stronger reference" not in judged
    assert tables.verdict({"difference": 0.02}, -1, 0.01) == "does not" and tables.verdict({"difference": -0.02}, -1, 0.01) == "holds"
    assert tables.verdict({"difference": -0.02}, -1, 0.051) == "cannot tell"
    change = tables.interval_change([report], ("likelihood_accuracy",))
    assert "| ConfPO beats DPO | likelihood acc. | 0,1,2 | **+2.0 [+0.5, +1.5]** | **+2.0 [+1.0, +3.0]** | t over 3 seeds |" in change
    monkeypatch.setattr(sys, "argv", ["results_tables.py", str(path)])
    tables.main()
    out = capsys.readouterr().out
    assert "Seed spread" in out and "| holds |" in out and "before" in out


def test_rebuilding_a_report_moves_its_runs_to_the_runs_file_and_keeps_a_digest(tables, tmp_path):
    def run(method, seed, values):
        return {"method": method, "seed": seed, "per_item": {"likelihood_accuracy": values}, "measured_on": "d"}

    runs = {f"{m}/seed{s}": run(m, s, [float((s + i + (m == "x")) % 2) for i in range(6)]) for m in ("dpo", "x") for s in (0, 1)}
    report = tmp_path / "cpu_main.json"
    report.write_text(json.dumps({"summary": {"methods": {"dpo": {"seeds": [0, 1]}, "x": {"seeds": [0, 1]}}}, "runs": runs}))
    report.with_suffix(".md").write_text("m on `d` (train trains, test is held out); every model measured against m with beta 0.1. Old.\n")
    store = tmp_path / "cpu_runs.json"
    tables.rebuild([report], store, resamples=200, every_run=False)
    rebuilt = json.loads(report.read_text())
    assert json.loads(store.read_text()) == runs and "runs" not in rebuilt
    assert rebuilt["runs_sha256"] == hashlib.sha256(store.read_bytes()).hexdigest() and rebuilt["run_keys"] == list(runs)
    cell = rebuilt["summary"]["methods"]["x"]["likelihood_accuracy"]
    assert cell["interval_method"] == "t over 2 seeds" and "p_value" in cell
    assert "Student's t" in report.with_suffix(".md").read_text() and report.with_suffix(".png").is_file()


def test_kept_tokens_splits_each_change_into_the_scorers_kept_share_and_the_rest():
    """benchmarks/kept_tokens.py: the kept part is the change summed over the top share of the DPO model's
    Selective-DPO score of the start model, the other part the rest; both add up to the response's change."""
    kept = benchmark("kept_tokens")
    import torch

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    start = {"chosen": [t(-1.0, -2.0, -3.0, -1.0, -0.5), t(-1.0, -1.0)], "rejected": [t(-2.0, -2.0, -2.0), t(-1.0, -4.0, -1.0)]}
    # chosen scores (scorer - start): row 0 [2, 0, 1, 0.5, 0], top 40% of 5 = 2 tokens: positions 0 and 2
    scorer = {"chosen": [t(1.0, -2.0, -2.0, -0.5, -0.5), t(-0.5, -2.0)], "rejected": [t(-3.0, -2.0, -5.0), t(-1.0, -4.5, -0.5)]}
    trained = {side: [r + torch.arange(1, len(r) + 1, dtype=torch.float64) for r in rows] for side, rows in start.items()}
    out = kept.kept_and_other_changes(start, scorer, trained, keep_share=0.4, ends={"chosen": [4, 1], "rejected": [2, 1]})
    assert out["chosen"]["kept"] == pytest.approx([1 + 3, 1]) and out["chosen"]["other"] == pytest.approx([2 + 4 + 5, 2])
    # rejected scores (start - scorer): row 0 [1, 0, 3] keeps 2 of 3 (ceil 1.2): positions 2 and 0; row 1 [0, 0.5, -0.5]: 1 and 0
    assert out["rejected"]["kept"] == pytest.approx([3 + 1, 2 + 1]) and out["rejected"]["other"] == pytest.approx([2, 3])
    assert out["chosen"]["end"] == pytest.approx([5, 2]) and out["chosen"]["end_kept"] == [0.0, 0.0]
    assert out["rejected"]["end"] == pytest.approx([3, 2]) and out["rejected"]["end_kept"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="no end-of-turn"):
        kept.first_end([5, 6, 7], 1, end_id=2)


@pytest.mark.parametrize("reports", [("cpu_main", "cpu_main-vs-sdpo-dpo-ref", "cpu_main-vs-sepo", "cpu_main-vs-sdpo-fixed-scores"), ("cuda_main",),
                                     ("cpu_40x4_main", "cpu_40x4_main-vs-sdpo-dpo-ref", "cpu_40x4_main-vs-sepo")])
def test_the_results_page_shows_the_committed_reports_tables(tables, capsys, monkeypatch, reports):
    """Every table row of each grid's section in docs/results.md is what benchmarks/results_tables.py prints from the
    committed reports: the page's figures cannot drift from the runs."""
    results = SCRIPT.parents[1] / "docs" / "results"
    monkeypatch.setattr(sys, "argv", ["results_tables.py", *(str(results / f"{name}.json") for name in reports)])
    tables.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    page = (SCRIPT.parents[1] / "docs" / "results.md").read_text().splitlines()
    assert len(rows) > 15 and [row for row in rows if row not in page] == []


def test_the_methods_page_shows_the_committed_weighting_report():
    """docs/methods.md's table of TGDPO and TIS-DPO against DPO quotes the committed compare report cell by cell."""
    docs = SCRIPT.parents[1] / "docs"
    report = (docs / "results" / "cpu_weighting.md").read_text()
    sections = {title: body for title, body in re.findall(r"### (\w+)\n(.*?)(?=\n### |\Z)", report, re.S)}
    row_names = {"DPO": "dpo", "TGDPO": "tgdpo", "TIS-DPO": "tisdpo", "DPO, swapped pairs": "dpo-reversed"}
    columns = ("likelihood_accuracy", "reward_accuracy", "greedy_accuracy_arithmetic", "ifeval_pass_rate")
    page = (docs / "methods.md").read_text().split("## Measured on the CPU preset")[1]
    checked = 0
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip("| ").split(" | ")]
        if cells[0] not in row_names:
            continue
        for metric, cell in zip(columns, cells[1:], strict=True):
            row = next(r for r in sections[metric].splitlines() if r.startswith(f"| {row_names[cells[0]]} |"))
            parts = [p.strip() for p in row.strip("| ").split(" | ")]
            expected = parts[2] if cells[0] == "DPO" else f"{parts[4]} {parts[5].split(' (')[0]}"
            assert cell.replace("\u2212", "-") == expected, (cells[0], metric)
            checked += 1
    assert checked == 16


def test_every_committed_report_names_its_runs_by_digest_and_reproduces_from_them():
    """docs/results keeps each run's per-item results once; a report names them by key with the runs file's digest,
    and its t-intervals follow from them."""
    import numpy as np

    from selective_po.intervals import seed_t_interval

    results = SCRIPT.parents[1] / "docs" / "results"
    checked = 0
    for path in sorted(results.glob("*.json")):
        report = json.loads(path.read_text())
        if "runs_file" not in report:
            assert "summary" not in report or len(path.read_bytes()) < 200_000, f"{path.name} holds its runs: rebuild it"
            continue
        runs_path = results / report["runs_file"]
        assert hashlib.sha256(runs_path.read_bytes()).hexdigest() == report["runs_sha256"], path.name
        runs = json.loads(runs_path.read_text())
        assert set(report["run_keys"]) <= set(runs)
        for method, row in report["summary"]["methods"].items():
            for metric, cell in row.items():
                if isinstance(cell, dict) and cell.get("interval_method", "").startswith("t over"):
                    baseline = next(m for m, r in report["summary"]["methods"].items() if "difference" not in r.get(metric, {"difference": 0}))
                    theirs_seeds = report["summary"]["methods"][baseline]["seeds"]
                    # the start model is the same for every seed: it is paired with each of the baseline's
                    seeds = theirs_seeds if method == "base" else sorted(set(row["seeds"]) & set(theirs_seeds))
                    mine = [runs[f"{method}/seed{row['seeds'][0] if method == 'base' else s}"]["per_item"][metric] for s in seeds]
                    theirs = [runs[f"{baseline}/seed{s}"]["per_item"][metric] for s in seeds]
                    low, high, p = seed_t_interval(np.array(mine) - np.array(theirs))
                    assert cell["difference_interval"] == pytest.approx([low, high]) and cell["p_value"] == pytest.approx(p)
                    checked += 1
    assert checked > 100


def test_the_noise_report_is_what_its_json_gives_and_fits_the_page():
    """docs/results/noise_floor.md is benchmarks/noise_floor.py's markdown of the committed JSON, and no table in it is
    wider than eight columns (wider ones scroll sideways on the docs page)."""
    noise = benchmark("noise_floor")
    results = SCRIPT.parents[1] / "docs" / "results"
    page = (results / "noise_floor.md").read_text()
    assert page == noise.markdown(json.loads((results / "noise_floor.json").read_text()))
    headers = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert headers and max(line.count(" | ") + 1 for line in headers) <= 8
