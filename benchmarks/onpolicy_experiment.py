"""The papers' claims at small scale, on on-policy pairs with verifiable answers, as `selective-po compare` grids.

    python benchmarks/onpolicy_experiment.py                                   # CPU preset, two runs at once, a core each
    python benchmarks/onpolicy_experiment.py --preset cuda --build_data --workers 10   # on a GPU (cuda_experiment.sh)

Data: pairs sampled from the bundled model itself and checked by the arithmetic and IFEval verifiers
(`selective-po build-pairs`; `--build_data` builds them with the preset's settings, resumably, else
`--dataset` names them). Every run starts from the bundled model with the same data order per seed;
only the loss and its token selection differ. Three grids share one output folder:

1. `main.yaml`, held out on `test`: DPO, Selective-DPO with the start model and with the DPO model
   of the same seed as reference (k = 40%), SePO with that DPO model as oracle (30%), and ConfPO's
   confidence rule, on the main seeds; on the control seeds, random selection at the same shares,
   every token (SePO), and the k sweep of Selective-DPO with the DPO reference.
2. `tune.yaml`, held out on `validation`: SePO's beta, chosen before the main SePO rows run, by
   reward accuracy on the validation pairs (the seed-0 DPO model as oracle).
3. Each is measured by `compare` against the start model: likelihood and reward accuracy and margin on
   the held-out pairs, greedy arithmetic accuracy and IFEval pass rate on the held-out prompts, with
   paired bootstrap intervals of each difference to DPO.

Runs are scheduled as a graph (a run waits for the models its `@name` fields name, SePO for the
tuning), `--workers` at a time, each in its own process (`compare`'s `run_grid` for one method and
seed) with the cores split between them (`OMP_NUM_THREADS`, unless it is set already). Every finished
run keeps its `result.json`, so a stopped experiment resumes where it stopped; a run measured on other
held-out data than the dataset's now (a grown test split) is measured again, not retrained.
Outputs: the grids' `compare.md/json/png` in `--output_dir`, copied to `--docs_dir`, where every finished
run's `result.json` (per-item outcomes, training curves, wall times) is kept once, in `<preset>_runs.json`
(added to the runs already there), and each report's JSON names its runs in that file by key and digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from selective_po.compare import CompareConfig, finished_results, held_out_digest, is_measured, load_held_out, run_grid, write_report
from selective_po.files import atomic_write
from selective_po.progress import bar

# Shares of response tokens kept (Selective-DPO keeps the top 1 - sdpo_threshold).
SWEEP = (0.2, 0.4, 0.6, 0.8, 1.0)
SEPO_BETAS = {"sepo-beta01": 0.1, "sepo-beta03": 0.3, "sepo-beta1": 1.0}
# Second views of the main grid: against Selective-DPO with the DPO reference (the stronger reference, the
# share sweep, its random control), against SePO (its random and all-token controls) and against SePO and the
# fixed-score variant as published (each with the end-of-turn token kept on both sides).
CLAIM_BASELINES = ("sdpo-dpo-ref", "sepo", "sdpo-fixed-scores")

PRESETS = {
    # Two runs at once on 2 CPU cores, one core each (together about 1.5 times the work per hour of one run on both: the
    # small model's matmuls gain little from a second core). The GPU preset's budget (100 steps of 8, about 1.5 epochs
    # over every training pair, learning rate 1e-5), every main row on 3 seeds and the random control on 1, measured on every held-out pair
    # and prompt. One epoch at 3e-5 lowered DPO's greedy arithmetic accuracy (docs/results/cpu_budget_check_*.json).
    # DPO runs as Selective-DPO keeping every token (`selection_rule: all`), which is DPO's loss exactly, on the stored
    # per-token values and the shared prompt. SePO's beta is not tuned here: 1.0, which won the GPU preset's tuning.
    "cpu": {
        "data": ["--arithmetic_prompts", "1000", "--ifeval_prompts", "1000", "--test_share", "0.3", "--validation_share", "0.1",
                 "--samples_per_prompt", "8", "--temperature", "0.7", "--top_p", "0.9", "--prompts_per_chunk", "64",
                 "--extra_test_prompts", "80"],
        "model": "smollm2-135m-instruct", "seeds": [0, 1, 2], "control_seeds": [0], "sweep": False, "sepo_controls": False,
        "sepo_beta": 1.0, "dpo": {"loss_type": "sdpo", "selection_rule": "all"}, "train_pairs": 0, "eval_pairs": 0,
        "prompts": 760, "validation_pairs": 0, "eval_batch_size": 16, "generation_batch_size": 64,
        "training": {"max_steps": 100, "per_device_train_batch_size": 8, "learning_rate": 1.0e-5}, "workers": 2,
    },  # fmt: skip
    # A GPU, several runs side by side: main rows on 5 seeds, controls and the sweep on 3; SePO's beta tuned first.
    "cuda": {
        "data": ["--arithmetic_prompts", "1000", "--ifeval_prompts", "1000", "--test_share", "0.3", "--validation_share", "0.1",
                 "--samples_per_prompt", "8", "--temperature", "0.7", "--top_p", "0.9", "--prompts_per_chunk", "64",
                 "--extra_test_prompts", "80"],
        "model": "smollm2-135m-instruct", "seeds": [0, 1, 2, 3, 4], "control_seeds": [0, 1, 2], "sweep": True,
        "sepo_controls": True, "sepo_beta": None, "dpo": {"loss_type": "sigmoid"}, "train_pairs": 0, "eval_pairs": 0,
        "prompts": 400, "validation_pairs": 0, "eval_batch_size": 64, "generation_batch_size": 64,
        "training": {"max_steps": 100, "per_device_train_batch_size": 8, "learning_rate": 1.0e-5}, "workers": 10,
    },  # fmt: skip
}


def sdpo(k: float, **fields) -> dict:
    return {"loss_type": "sdpo", "sdpo_threshold": round(1 - k, 6), **fields}


def sepo(k: float, beta: float, **fields) -> dict:
    return {"loss_type": "sepo", "oracle_model_name_or_path": "@dpo", "oracle_ref_model_name_or_path": "@base", "beta": beta, "sepo_chosen_share": k, "sepo_rejected_share": k, **fields}


def main_methods(preset: dict, sepo_beta: float | None) -> dict[str, dict]:
    """The main grid's methods; without SePO rows until its beta is tuned (`sepo_beta=None`)."""
    controls = {"seeds": preset["control_seeds"]}
    methods = {
        "dpo": dict(preset["dpo"]),
        "sdpo-init-ref": sdpo(0.4),
        "sdpo-dpo-ref": sdpo(0.4, ref_model_name_or_path="@dpo"),
        "confidence": {"loss_type": "sdpo", "selection_rule": "confidence"},
        # Ours: the DPO model's scores of the start model, fixed before training; the start model stays the loss's reference.
        "sdpo-fixed-scores": sdpo(0.4, selection_rule="scorer", scorer_model_name_or_path="@dpo"),
        "sdpo-dpo-ref-random": sdpo(0.4, ref_model_name_or_path="@dpo", selection_rule="random", **controls),
        # The token-weighting methods: TGDPO with the DPO model as reward model; TIS-DPO with it and a DPO model trained
        # on the swapped pairs as its forward and reverse models.
        "dpo-reversed": {**preset["dpo"], "swap_chosen_rejected": True, **controls},
        "tgdpo": {"loss_type": "tgdpo", "tgdpo_reward_model_name_or_path": "@dpo", **controls},
        "tisdpo": {"loss_type": "tisdpo", "tisdpo_forward_model_name_or_path": "@dpo",
                   "tisdpo_reverse_model_name_or_path": "@dpo-reversed", **controls},
    }
    if preset["sweep"]:
        for k in SWEEP:
            if k != 0.4:
                methods[f"sdpo-dpo-ref-k{round(k * 100)}"] = sdpo(k, ref_model_name_or_path="@dpo", **controls)
    if sepo_beta is not None:
        methods["sepo"] = sepo(0.3, sepo_beta)
        # The end-of-turn token kept on both sides, as DPO counts it: the scorers of SePO and the fixed-score variant
        # kept it on most rejected and few chosen responses, and their greedy answers stopped ending.
        methods["sepo-end-keep"] = sepo(0.3, sepo_beta, end_token_selection="keep")
        methods["sdpo-fixed-scores-end-keep"] = sdpo(0.4, selection_rule="scorer", scorer_model_name_or_path="@dpo",
                                                     end_token_selection="keep")  # fmt: skip
        if preset["sepo_controls"]:
            methods["sepo-random"] = sepo(0.3, sepo_beta, selection_rule="random", **controls)
            methods["sepo-all"] = sepo(1.0, sepo_beta, **controls)
    return methods


def grid_dict(preset: dict, dataset: str, output_dir: Path, methods: dict, **changes) -> dict:
    grid = {
        "model": preset["model"], "dataset": dataset, "train_split": "train", "eval_split": "test",
        "train_pairs": preset["train_pairs"], "eval_pairs": preset["eval_pairs"], "prompts": preset["prompts"],
        "eval_batch_size": preset["eval_batch_size"], "generation_batch_size": preset["generation_batch_size"], "seeds": preset["seeds"], "baseline": "dpo", "output_dir": str(output_dir),
        "training": {"lr_scheduler_type": "constant", "beta": 0.1, "precompute_ref_log_probs": True, "bf16": False,
                     **preset["training"]},
        "methods": methods,
    }  # fmt: skip
    return {**grid, **changes}


def tune_dict(preset: dict, dataset: str, output_dir: Path) -> dict:
    """SePO's beta on the validation split, the seed-0 DPO model of the main grid as oracle."""
    oracle = str(output_dir / "main" / "dpo" / f"seed{preset['seeds'][0]}" / "model")  # run_dir of the main grid's dpo
    methods = {name: sepo(0.3, beta, oracle_model_name_or_path=oracle) for name, beta in SEPO_BETAS.items()}
    return grid_dict(
        preset, dataset, output_dir / "tune", methods, eval_split="validation", eval_pairs=preset["validation_pairs"], prompts=0,
        seeds=preset["seeds"][:1], baseline="sepo-beta1",
    )  # fmt: skip


def write_grid(path: Path, grid: dict) -> CompareConfig:
    atomic_write(path, yaml.safe_dump(grid, sort_keys=False).encode())
    return CompareConfig.from_yaml(path)


def chosen_beta(tune_dir: Path) -> float | None:
    """The tuned beta once every tuning run is measured: best validation reward accuracy, then margin."""
    scores = {}
    for name, beta in SEPO_BETAS.items():
        path = tune_dir / name / "seed0" / "result.json"
        if not path.is_file():
            return None
        items = json.loads(path.read_text())["per_item"]
        scores[beta] = (sum(items["reward_accuracy"]) / len(items["reward_accuracy"]), sum(items["mean_margin"]) / len(items["mean_margin"]))
    best = max(scores, key=lambda beta: scores[beta])
    atomic_write(tune_dir / "chosen_beta.json", json.dumps({"beta": best, "validation": {str(b): s for b, s in scores.items()}}, indent=1).encode())
    return best


# ----- the scheduler: one process per (grid, method, seed), each waiting for what it needs -----


def tasks_of(config: CompareConfig, grid_file: Path, extra_deps: dict[str, set] | None = None) -> list[dict]:
    methods = {m.name: m for m in config.methods}
    digest = held_out_digest(*load_held_out(config))  # a run measured on other held-out data is measured again
    seeds_of = {"base": config.seeds, **{m.name: m.seeds for m in config.methods}}
    tasks = []
    for method, seed in config.runs():
        # keyed by output folder: main.yaml and main-untuned.yaml are one grid, the latter before SePO is tuned
        deps = {f"{config.output_dir}:{dep}/seed{seed}" for dep in (methods[method].depends_on() if method != "base" else ())}
        deps |= (extra_deps or {}).get(method, set())
        # The start model and the first seed's DPO model first (most runs wait for it); then seed by seed,
        # main rows before controls (SePO's tuning with them), so a stopped experiment has every row on its first seeds.
        first = method == "base" or (method == "dpo" and seed == config.seeds[0])
        control = grid_file.stem == "tune" or not set(config.seeds) <= set(seeds_of[method])
        priority = (0 if first else 1, config.seeds.index(seed), int(control))
        tasks.append({"key": f"{config.output_dir}:{method}/seed{seed}", "grid": str(grid_file), "method": method, "seed": seed,
                      "deps": deps, "priority": priority, "done": is_measured(config, method, seed, digest)})  # fmt: skip
    return tasks


def run_command(task: dict) -> list[str]:
    """One scheduled run, in its own process (see `main`)."""
    return [sys.executable, __file__, "--_run", task["grid"], task["method"], str(task["seed"])]


def schedule(tasks: list[dict], *, workers: int, logs: Path, on_done=None, command=run_command, threads: int | None = None) -> list[str]:
    """Run every task not done, at most `workers` at once, each after its dependencies, the lowest
    `priority` first; return the keys of the tasks that failed or waited on one that failed.
    `on_done(key)` may return new tasks (appended to the queue). `threads`: each run's `OMP_NUM_THREADS`
    (None: inherited)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = {t["key"] for t in tasks if t["done"]}
    failed: set[str] = set()
    running: dict[str, tuple[subprocess.Popen, object, float]] = {}
    with bar(total=len(tasks), desc="Experiment", unit="run", initial=len(done)) as progress:
        while True:
            for key, (process, log, started) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[key]
                if process.returncode == 0:
                    done.add(key)
                    progress.update(1)
                    for task in on_done(key) if on_done else ():
                        tasks.append(task)
                        progress.total += 1
                        if task["done"]:
                            done.add(task["key"])
                            progress.update(1)
                else:
                    failed.add(key)
                    print(f"\nFAILED {key} (exit {process.returncode}) after {time.time() - started:.0f} s; log: {log.name}", file=sys.stderr)
            pending = [t for t in tasks if t["key"] not in done | failed | set(running)]
            blocked = [t for t in pending if t["deps"] & failed]
            failed |= {t["key"] for t in blocked}
            ready = sorted((t for t in pending if t not in blocked and t["deps"] <= done), key=lambda t: t["priority"])
            for task in ready[: max(0, workers - len(running))]:
                log = open(logs / (task["key"].replace("/", "_").replace(":", "__") + ".log"), "a")
                running[task["key"]] = (subprocess.Popen(command(task), stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
                progress.set_postfix_str(", ".join(k.split(":")[-1] for k in running))
            if not running and not [t for t in pending if t not in blocked]:
                return sorted(failed)
            if not running:
                stuck = [t["key"] for t in pending if t not in blocked]
                raise RuntimeError(f"runs wait for results that no run will make: {stuck}")
            try:
                time.sleep(2)
            except KeyboardInterrupt:  # stopped (Ctrl-C, a time limit): stop the runs too; each resumes later
                for process, log, _ in running.values():
                    process.terminate()
                    process.wait()
                    log.close()
                raise


def run_threads(workers: int) -> int | None:
    """Each run's share of this process's cores, or None when `OMP_NUM_THREADS` is set (the user's choice stands)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def tuned_tasks(preset: dict, dataset: str, out: Path, main_file: Path, untuned_file: Path, tune_file: Path):
    """The runs of the main grid and of SePO's tuning; the SePO rows join once the tuning is measured."""
    untuned = write_grid(untuned_file, grid_dict(preset, dataset, out / "main", main_methods(preset, None)))
    tune = write_grid(tune_file, tune_dict(preset, dataset, out))
    dpo_seed0 = f"{untuned.output_dir}:dpo/seed{preset['seeds'][0]}"
    tune_tasks = tasks_of(tune, tune_file, extra_deps={name: {dpo_seed0} for name in SEPO_BETAS})
    tune_keys = {t["key"] for t in tune_tasks if t["method"] != "base"}
    state = {"pending_tune": set(tune_keys)}

    def sepo_tasks() -> list[dict]:
        beta = chosen_beta(out / "tune")
        config = write_grid(main_file, grid_dict(preset, dataset, out / "main", main_methods(preset, beta)))
        tasks = tasks_of(config, main_file)
        # the non-SePO runs are already scheduled through main-untuned.yaml (same folders)
        return [t for t in tasks if t["method"].startswith("sepo")]

    def on_done(key: str) -> list[dict]:
        if key in state["pending_tune"]:
            state["pending_tune"].discard(key)
            if not state["pending_tune"]:
                return sepo_tasks()
        return []

    tasks = tasks_of(untuned, untuned_file) + [t for t in tune_tasks if t["method"] != "base"]
    if all(t["done"] for t in tasks if t["key"] in tune_keys):
        state["pending_tune"].clear()
        tasks += sepo_tasks()
    return tasks, on_done


def experiment(opts) -> None:
    preset = PRESETS[opts.preset]
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = opts.dataset
    if opts.build_data and not opts.report_only:
        dataset = str(out / "data")
        command = [sys.executable, "-m", "selective_po", "build-pairs", "--model", preset["model"], "--output_dir", dataset, *preset["data"]]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    main_file, untuned_file, tune_file = out / "main.yaml", out / "main-untuned.yaml", out / "tune.yaml"
    if preset["sepo_beta"] is not None:  # SePO's beta is given: one grid, nothing to tune first
        tuned = False
        config = write_grid(main_file, grid_dict(preset, dataset, out / "main", main_methods(preset, preset["sepo_beta"])))
        tasks, on_done = tasks_of(config, main_file), None
    else:
        tuned = True
        tasks, on_done = tuned_tasks(preset, dataset, out, main_file, untuned_file, tune_file)
    if opts.only:  # these methods' runs, the start model's, and every run they wait for
        wanted, by_key = {t["key"] for t in tasks if t["method"] in {"base", *opts.only}}, {t["key"]: t for t in tasks}
        frontier = list(wanted)
        while frontier:
            for dep in by_key[frontier.pop()]["deps"] - wanted:
                wanted.add(dep)
                frontier.append(dep)
        tasks = [t for t in tasks if t["key"] in wanted]
    workers = opts.workers or preset["workers"]
    started, interrupted = time.time(), False
    try:
        failed = [] if opts.report_only else schedule(tasks, workers=workers, logs=out / "logs", on_done=on_done, threads=run_threads(workers))
    except KeyboardInterrupt:
        failed, interrupted = [], True
    print(f"\nruns {'stopped' if interrupted else 'finished'} after {time.time() - started:.0f} s; failed: {failed or 'none'}", flush=True)
    docs = Path(opts.docs_dir) if opts.docs_dir else None
    main_grid = main_file if main_file.is_file() else untuned_file
    store, runs, digest = None, {}, None
    if docs:  # every run's per-item outcomes, kept once: the runs already there, and the finished ones here over them
        docs.mkdir(parents=True, exist_ok=True)
        store = docs / f"{opts.preset}_runs.json"
        runs = {**(json.loads(store.read_text()) if store.is_file() else {}), **finished_results(CompareConfig.from_yaml(main_grid))}
        data = json.dumps(runs, separators=(",", ":")).encode()
        atomic_write(store, data)
        digest = hashlib.sha256(data).hexdigest()
    # The main grid against DPO, then the same runs against the rows the papers' claims compare with.
    reports = [*((("tune", tune_file, None),) if tuned else ()), ("main", main_grid, None), *((f"main-vs-{b}", main_grid, b) for b in CLAIM_BASELINES)]
    for name, grid_file, baseline in reports:
        config = CompareConfig.from_yaml(grid_file, **({"baseline": baseline} if baseline else {}))
        stem = "compare" if baseline is None else f"compare-vs-{baseline}"
        if docs and grid_file == main_grid:  # the stored runs of this grid too, also those whose models are gone
            wanted = {f"{method}/seed{seed}" for method, seed in config.runs()}
            results = {key: run for key, run in runs.items() if key in wanted}
        else:
            results = finished_results(config)
        try:
            summary = write_report(config, results, resamples=opts.resamples, stem=stem)
        except ValueError as error:
            print(f"{name}: no report yet ({error})")
            continue
        print(f"\n## {name}\n" + Path(config.output_dir, f"{stem}.md").read_text())
        if docs:
            for suffix in ("md", "png"):
                shutil.copy(Path(config.output_dir, f"{stem}.{suffix}"), docs / f"{opts.preset}_{name}.{suffix}")
            # The docs' copy keeps the summary and names its runs in the runs file (by key, with that file's digest).
            reference = {"runs_file": store.name, "runs_sha256": digest, "run_keys": list(results)} if grid_file == main_grid else {"runs": results}
            atomic_write(docs / f"{opts.preset}_{name}.json", json.dumps({"summary": summary, **reference}, indent=1).encode())
    if interrupted:
        raise SystemExit("Stopped before every run finished; the reports above cover the finished runs. Run again to resume.")
    if failed:
        raise SystemExit(f"{len(failed)} runs failed or could not run: {failed}; their logs are in {out / 'logs'}. Run again to resume.")


def main() -> None:
    if sys.argv[1:2] == ["--_run"]:  # one scheduled run, in its own process
        grid, method, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
        run_grid(CompareConfig.from_yaml(grid), seeds=[seed], methods=[method])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods (and the runs they wait for)")
    parser.add_argument("--dataset", default="onpolicy-smollm2-large", help="the pairs (bundled name or build-pairs folder)")
    parser.add_argument("--build_data", action="store_true", help="sample the pairs first, into output_dir/data (resumable)")
    parser.add_argument("--workers", type=int, default=None, help="runs at once, each its own process with an equal share of the cores (default: the preset's, 2 on CPU)")
    parser.add_argument("--output_dir", default=None, help="default: outputs/onpolicy_<preset>")
    parser.add_argument("--docs_dir", default=None, help="copy each grid's compare.md/json/png here")
    parser.add_argument("--resamples", type=int, default=4000)
    parser.add_argument("--report_only", action="store_true", help="run nothing: report the runs finished in output_dir")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override preset fields (tests, smoke runs)")
    opts = parser.parse_args()
    opts.output_dir = opts.output_dir or f"outputs/onpolicy_{opts.preset}"
    for item in opts.set:
        key, value = item.split("=", 1)
        PRESETS[opts.preset][key] = json.loads(value)
    experiment(opts)


if __name__ == "__main__":
    main()
