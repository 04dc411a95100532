"""`selective-po compare`: train several methods for several seeds from one start, measure each on the
same held-out pairs (and prompts) against one reference, and report every metric with paired 95%
intervals of its difference to a baseline method (`intervals.difference_summary`).

One YAML file describes the grid (see `example_config` and the README):

    model: smollm2-135m-instruct      # every run starts from it; also the default evaluation reference
    dataset: arithmetic               # `train_split` trains, `eval_split` is held out
    seeds: [0, 1, 2]
    baseline: dpo
    training: {max_steps: 20, per_device_train_batch_size: 4, learning_rate: 1.0e-5, beta: 0.1}
    methods:
      dpo: {loss_type: sigmoid}
      sdpo: {sdpo_threshold: 0.6}
      sdpo-dpo-ref: {ref_model_name_or_path: "@dpo"}    # the dpo run of the same seed
      random: {selection_rule: random, seeds: [0]}       # a control on fewer seeds

`@name` in a method's fields is the model that method trained with the same seed (`@base`: the
start model), so a DPO-trained reference or a SePO oracle is trained first, within the grid.

Runs with the same seed see the same data order (TRL shuffles with `seed`). Every run is measured
with the same evaluation reference and `eval_beta`, its per-token values stored once for all. A run
leaves `trained.json` when its model is saved and `result.json` when it is measured (each written
whole or not at all); training saves checkpoints and resumes from the last complete one (they are
deleted once the run's model is saved), so the grid can be killed at any point and run again. Outputs in `output_dir`: `compare.md`, `compare.json`,
`compare.png`.

The terminal shows the grid's progress bar (the run in progress and its step) and then the table.
Everything a run prints (TRL's logged dicts, its progress bars, warnings) goes to its own folder's
`log.txt`, `<output_dir>/<method>/seed<N>/log.txt`, appended across resumed attempts.

`result.json` records a digest of the held-out pairs and prompts it was measured on. When they change
(a grown test split, another `eval_pairs`), the next run measures every trained model again, without
retraining; a report never pairs items of different held-out data.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .evaluation import ANSWERS_END, TASK_METRICS
from .files import atomic_write
from .intervals import difference_summary, paired_bootstrap_interval, seed_t_interval
from .progress import bar

TOP_LEVEL = {
    "model", "dataset", "train_split", "eval_split", "train_pairs", "eval_pairs", "prompts", "max_new_tokens", "seeds",
    "baseline", "output_dir", "reference", "eval_beta", "eval_batch_size", "generation_batch_size", "training", "methods",
}  # fmt: skip
# Per held-out pair. The two changes are the model's log-likelihood of the whole chosen (rejected) response
# minus the evaluation reference's (the start model, by default), in nats: DPO's known failure lowers both.
PAIR_METRICS = ("likelihood_accuracy", "reward_accuracy", "mean_margin", "chosen_logp_change", "rejected_logp_change")
PERCENT = {"likelihood_accuracy", "reward_accuracy", *TASK_METRICS.values(), ANSWERS_END}


@dataclass
class Method:
    name: str
    fields: dict
    seeds: list[int]

    def depends_on(self) -> set[str]:
        return {v[1:] for v in self.fields.values() if isinstance(v, str) and v.startswith("@") and v != "@base"}


@dataclass
class CompareConfig:
    model: str
    dataset: str
    methods: list[Method]
    seeds: list[int]
    baseline: str
    output_dir: str = "outputs/compare"
    train_split: str = "train"
    eval_split: str = "test"
    train_pairs: int = 0
    eval_pairs: int = 0
    prompts: int = 0
    max_new_tokens: int = 96
    reference: str | None = None
    eval_beta: float = 0.1
    eval_batch_size: int = 16  # pairs per scoring batch when measuring
    generation_batch_size: int | None = None  # prompts per greedy generate call; None: eval_batch_size
    training: dict = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> CompareConfig:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: cannot read the compare config: {error}") from error
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "compare config") -> CompareConfig:
        unknown = sorted(set(raw) - TOP_LEVEL)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}; allowed: {sorted(TOP_LEVEL)}.")
        for key in ("model", "dataset", "methods", "seeds", "baseline"):
            if key not in raw:
                raise ValueError(f"{source}: {key!r} is missing.")
        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"{source}: 'seeds' must be a non-empty list of integers, got {seeds!r}.")
        if not isinstance(raw["methods"], dict) or not raw["methods"]:
            raise ValueError(f"{source}: 'methods' must map method names to their config fields.")
        methods = []
        for name, spec in raw["methods"].items():
            spec = dict(spec or {})
            if name == "base" or not str(name).replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"{source}: method name {name!r}: use letters, digits, '-' and '_' (and not 'base').")
            method_seeds = spec.pop("seeds", seeds)
            fixed = sorted({"output_dir", "seed"} & (set(spec) | set(raw.get("training") or {})))
            if fixed:
                raise ValueError(f"{source}: {fixed} are set by the grid for each run (output_dir/method/seedN, the run's seed).")
            if not set(method_seeds) <= set(seeds):
                raise ValueError(f"{source}: method {name!r} uses seeds {method_seeds} that are not in 'seeds' {seeds}.")
            methods.append(Method(str(name), spec, list(method_seeds)))
        config = cls(
            **{k: v for k, v in raw.items() if k not in ("methods", "seeds")}, methods=order_methods(methods, source=source),
            seeds=seeds,
        )  # fmt: skip
        names = [m.name for m in config.methods]
        if config.baseline not in names:
            raise ValueError(f"{source}: baseline {config.baseline!r} is not one of the methods {names}.")
        return config

    def runs(self, seeds: list[int] | None = None, methods: list[str] | None = None) -> list[tuple[str, int]]:
        """Every (method, seed), dependencies first; `base` (the start model, untrained) first of all.

        `seeds` / `methods` keep only those runs (base goes with the grid's first seed). A seed's runs depend
        on no other seed's, so separate processes can run disjoint seeds of one grid side by side; a
        method's runs need those of the methods its `@name` fields name to be finished first."""
        runs = [("base", self.seeds[0])] + [(m.name, s) for m in self.methods for s in m.seeds]
        for wanted, known, what in ((seeds, self.seeds, "seeds"), (methods, ["base", *(m.name for m in self.methods)], "methods")):
            unknown = sorted(set(wanted or ()) - set(known))
            if unknown:
                raise ValueError(f"{what} {unknown} are not in the grid's {what} {known}.")
        return [(m, s) for m, s in runs if (seeds is None or s in seeds) and (methods is None or m in methods)]


def order_methods(methods: list[Method], *, source: str) -> list[Method]:
    """Methods ordered so that each comes after the methods its `@name` fields refer to."""
    by_name = {m.name: m for m in methods}
    ordered: list[Method] = []
    visiting: set[str] = set()

    def visit(method: Method) -> None:
        if method in ordered:
            return
        if method.name in visiting:
            raise ValueError(f"{source}: methods refer to each other in a cycle through {method.name!r}.")
        visiting.add(method.name)
        for name in sorted(method.depends_on()):
            if name not in by_name:
                raise ValueError(f"{source}: method {method.name!r} refers to @{name}, which is not a method.")
            missing = set(method.seeds) - set(by_name[name].seeds)
            if missing:
                raise ValueError(f"{source}: method {method.name!r} needs @{name} for seeds {sorted(missing)}, which it does not train.")
            visit(by_name[name])
        visiting.discard(method.name)
        ordered.append(method)

    for method in methods:
        visit(method)
    return ordered


# ----- running the grid -----


def run_dir(config: CompareConfig, method: str, seed: int) -> Path:
    return Path(config.output_dir) / method / f"seed{seed}"


def model_of(config: CompareConfig, base: str, method: str, seed: int) -> str:
    return base if method == "base" else str(run_dir(config, method, seed) / "model")


def training_args(config: CompareConfig, method: Method, seed: int, base: str):
    """The method's config object for one seed, with `@name` fields resolved."""
    from .config import SelectiveDPOConfig, SePOConfig

    resolved = {
        key: model_of(config, base, value[1:], seed) if isinstance(value, str) and value.startswith("@") else value
        for key, value in {**config.training, **method.fields}.items()
    }  # fmt: skip
    out = run_dir(config, method.name, seed)
    defaults = dict(
        output_dir=str(out / "checkpoints"), save_strategy="steps", save_steps=max(1, resolved.get("max_steps", 100) // 4),
        save_total_limit=1, logging_steps=1, report_to="none", ref_logps_cache_dir=str(Path(config.output_dir) / "cache"),
    )  # fmt: skip
    loss_type = resolved.get("loss_type", "sdpo")
    config_class = SePOConfig if loss_type == "sepo" or loss_type == ["sepo"] else SelectiveDPOConfig
    try:
        return config_class(**{**defaults, **resolved, "seed": seed})
    except TypeError as error:
        raise ValueError(f"method {method.name!r}: {error} (fields come from {config_class.__name__})") from error


@contextlib.contextmanager
def run_log(path: Path):
    """Within the block, what one run prints goes to `path` (appended), not to the terminal: its stdout and
    stderr, progress bars included, and the library loggers' messages. Bars opened before it keep their terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        handlers = list(dict.fromkeys(h for name in ("", "transformers", "datasets", "accelerate", "trl", "selective_po")
                                      for h in logging.getLogger(name).handlers if getattr(h, "stream", None) in consoles))  # fmt: skip
        streams = [h.setStream(log) for h in handlers]
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)


def _step_in_bar(progress, key: str):
    """A trainer callback that shows the run's step in the grid's bar, and prints each logged dict as a JSON
    line (inside `run_log`, into the run's log)."""
    from transformers import TrainerCallback

    class StepInBar(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress.set_postfix_str(f"{key}: step {state.global_step}/{state.max_steps}")

        def on_log(self, args, state, control, logs=None, **kwargs):
            print(json.dumps({"step": state.global_step, **(logs or {})}), flush=True)

    return StepInBar()


def train_one(config: CompareConfig, method: Method, seed: int, base: str, train_pairs, *, progress=None) -> dict:
    from transformers import ProgressCallback

    from .trainer import SelectiveDPOTrainer, SePOTrainer, last_complete_checkpoint

    args = training_args(config, method, seed, base)
    trainer_class = SePOTrainer if "sepo" in args.loss_type else SelectiveDPOTrainer
    start = time.perf_counter()
    trainer = trainer_class(model=base, args=args, train_dataset=train_pairs)
    if progress is not None:  # the grid's bar says which step; the run's own bar and dicts go to its log
        for callback in list(trainer.callback_handler.callbacks):
            if isinstance(callback, ProgressCallback):
                trainer.remove_callback(callback)
        trainer.add_callback(_step_in_bar(progress, f"{method.name}/seed{seed}"))
    resume = None
    if Path(args.output_dir).is_dir():  # a run stopped part-way: go on from its last complete checkpoint
        try:
            resume = last_complete_checkpoint(args.output_dir)
        except ValueError:
            pass  # stopped before its first checkpoint was whole: start again
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(run_dir(config, method.name, seed) / "model"))
    curves = [row for row in trainer.state.log_history if "loss" in row]
    del trainer
    gc.collect()
    return {"train_s": time.perf_counter() - start, "resumed_from": resume, "curves": curves}


def measure_one(config: CompareConfig, model_path: str, reference: str, eval_pairs, prompts: list[dict]) -> dict:
    """Per-pair (and per-prompt) outcomes of one model against the evaluation reference."""
    from .config import SelectiveDPOConfig
    from .evaluation import evaluate_preferences, greedy_task_outcomes
    from .trainer import SelectiveDPOTrainer

    args = SelectiveDPOConfig(
        output_dir=str(Path(config.output_dir) / "eval"), ref_model_name_or_path=reference, beta=config.eval_beta,
        per_device_eval_batch_size=config.eval_batch_size, precompute_ref_log_probs=True,
        precompute_ref_batch_size=config.eval_batch_size,
        ref_logps_cache_dir=str(Path(config.output_dir) / "cache"), report_to="none", plot_curves=False,
        bf16=config.training.get("bf16"),  # measured in the precision the grid trains in
    )  # fmt: skip
    start = time.perf_counter()
    trainer = SelectiveDPOTrainer(model=model_path, args=args, train_dataset=eval_pairs, eval_dataset=eval_pairs)
    evaluation = evaluate_preferences(trainer, desc=f"Held-out pairs: {model_path}")
    per_item = {
        "likelihood_accuracy": evaluation.likelihood_correct.float().tolist(),
        "reward_accuracy": (evaluation.margins > 0).float().tolist(),
        "mean_margin": evaluation.margins.tolist(),
        "chosen_logp_change": (evaluation.policy_chosen - evaluation.ref_chosen).tolist(),
        "rejected_logp_change": (evaluation.policy_rejected - evaluation.ref_rejected).tolist(),
    }
    if prompts:
        outcomes = greedy_task_outcomes(
            trainer.model, trainer._tokenizer, prompts, batch_size=config.generation_batch_size or config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
        )  # fmt: skip
        per_item.update({metric: [float(passed) for passed in results] for metric, results in outcomes.items()})
    del trainer
    gc.collect()
    return {"per_item": per_item, "eval_s": time.perf_counter() - start}


def load_held_out(config: CompareConfig):
    """The held-out pairs (a `datasets.Dataset`) and prompts (rows with a task) every run is measured on."""
    from .data import load_preference_dataset, load_task_prompts
    from .evaluation import balanced_task_rows

    eval_pairs = load_preference_dataset(config.dataset, split=config.eval_split)
    if config.eval_pairs:
        eval_pairs = eval_pairs.select(range(min(config.eval_pairs, len(eval_pairs))))
    prompts = []
    if config.prompts:
        prompts = balanced_task_rows(load_task_prompts(config.dataset, split=config.eval_split, fallback=eval_pairs), config.prompts)
    return eval_pairs, prompts


def held_out_digest(eval_pairs, prompts: list[dict]) -> str:
    """sha256 of what a run is measured on: the pairs' prompt/chosen/rejected and the prompts with their tasks."""
    keys = ("prompt", "chosen", "rejected")
    payload = json.dumps(
        {"pairs": [[row[k] for k in keys] for row in eval_pairs.select_columns(list(keys))], "prompts": prompts}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def is_measured(config: CompareConfig, method: str, seed: int, digest: str) -> bool:
    """Whether the run has a result measured on the held-out data with this digest."""
    path = run_dir(config, method, seed) / "result.json"
    return path.is_file() and json.loads(path.read_text()).get("measured_on") == digest


def finished_results(config: CompareConfig) -> dict[str, dict]:
    """The result of every run of the grid that has one, keyed `method/seedN`."""
    results = {}
    for method, seed in config.runs():
        path = run_dir(config, method, seed) / "result.json"
        if path.is_file():
            results[f"{method}/seed{seed}"] = json.loads(path.read_text())
    return results


def run_grid(config: CompareConfig, *, seeds: list[int] | None = None, methods: list[str] | None = None) -> None:
    """Train and measure every run not yet done (of `seeds` and `methods` only, when given); each leaves its
    `result.json` (read back by `finished_results`). A run measured on other held-out data than the
    config's now is measured again (its model is kept; it is not trained again)."""
    from .data import load_preference_dataset
    from .models import resolve_model_path

    runs = config.runs(seeds, methods)
    eval_pairs, prompts = load_held_out(config)
    digest = held_out_digest(eval_pairs, prompts)
    todo = [r for r in runs if not is_measured(config, *r, digest)]
    if not todo:
        return  # nothing to load the models for
    base = resolve_model_path(config.model)
    reference = resolve_model_path(config.reference) if config.reference else base
    train_pairs = load_preference_dataset(config.dataset, split=config.train_split)
    if config.train_pairs:
        train_pairs = train_pairs.select(range(min(config.train_pairs, len(train_pairs))))
    methods = {m.name: m for m in config.methods}
    with bar(total=len(runs), desc="Compare grid", unit="run", initial=len(runs) - len(todo), file=sys.stderr) as progress:
        for method, seed in todo:
            folder = run_dir(config, method, seed)
            key = f"{method}/seed{seed}"
            progress.set_postfix_str(key)
            trained = {"curves": []}
            if method != "base":
                if (folder / "trained.json").is_file():
                    trained = json.loads((folder / "trained.json").read_text())
                else:
                    missing = [n for n in sorted(methods[method].depends_on()) if not (run_dir(config, n, seed) / "trained.json").is_file()]
                    if missing:
                        raise ValueError(f"{key} needs the model of {', '.join('@' + n for n in missing)} (seed {seed}), not trained yet: run it first.")
                    with run_log(folder / "log.txt"):
                        trained = train_one(config, methods[method], seed, base, train_pairs, progress=progress)
                    atomic_write(folder / "trained.json", json.dumps(trained, indent=1).encode())
                    # The model is saved: its checkpoints (weights and optimizer state) are only for resuming.
                    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            progress.set_postfix_str(f"{key}: measuring")
            with run_log(folder / "log.txt"):
                measured = measure_one(config, model_of(config, base, method, seed), reference, eval_pairs, prompts)
            result = {"method": method, "seed": seed, **trained, **measured, "measured_on": digest}
            atomic_write(folder / "result.json", json.dumps(result).encode())
            progress.update(1)


# ----- the report -----


def summarize(config: CompareConfig, results: dict[str, dict], *, resamples: int = 4000) -> dict:
    """Per method and metric: mean over seeds and items with its interval, each seed's mean, and the paired
    difference to the baseline (seeds both ran, the same items) with its interval and p-value
    (`intervals.difference_summary`: a t-interval with 2 or more seeds, the bootstrap over items with one)."""
    by_method: dict[str, dict[int, dict]] = {}
    for result in results.values():
        by_method.setdefault(result["method"], {})[result["seed"]] = result["per_item"]
    metrics = [m for m in (*PAIR_METRICS, *TASK_METRICS.values(), ANSWERS_END) if any(m in r["per_item"] for r in results.values())]
    baseline = by_method[config.baseline]
    summary = {}
    for method, seeds in by_method.items():
        row = {"seeds": sorted(seeds)}
        for metric in metrics:
            if not all(metric in per_item for per_item in seeds.values()):
                continue
            values = np.array([seeds[s][metric] for s in sorted(seeds)], dtype=np.float64)  # (S, N)
            interval = seed_t_interval(values)[:2] if len(values) > 1 else paired_bootstrap_interval(values, resamples=resamples)
            cell = {"mean": float(values.mean()), "interval": interval,
                    "per_seed": values.mean(axis=1).tolist()}  # the seed spread, beside the interval it widens
            if method != config.baseline:
                # The untrained start model is the same for every seed: pair it with each baseline seed. Only the
                # baseline's seeds that measured this metric pair (a run measured before a metric existed has none).
                measured = {s for s, per_item in baseline.items() if metric in per_item}
                shared = sorted(measured) if method == "base" else sorted(set(seeds) & measured)
                mine = np.array([seeds[s if method != "base" else min(seeds)][metric] for s in shared], dtype=np.float64)
                theirs = np.array([baseline[s][metric] for s in shared], dtype=np.float64)
                if shared:
                    cell.update(difference_summary(mine - theirs, resamples=resamples))
            row[metric] = cell
        summary[method] = row
    return {"metrics": metrics, "methods": summary}


def markdown_report(config: CompareConfig, summary: dict, *, caption: str) -> str:
    def fmt(metric: str, value: float, signed: bool = False) -> str:
        if math.isnan(value):
            return "n/a"
        if metric in PERCENT:
            return f"{value * 100:+.1f}" if signed else f"{value:.1%}"
        return f"{value:+.3f}"

    lines = [caption, ""]
    for metric in summary["metrics"]:
        unit = " (points)" if metric in PERCENT else ""
        lines += [f"### {metric}", "", f"| method | seeds | mean | 95% interval | vs {config.baseline}{unit} | 95% interval |",
                  "| --- | --- | ---: | --- | ---: | --- |"]  # fmt: skip
        for method, row in summary["methods"].items():
            cell = row.get(metric)
            if cell is None:
                continue
            low, high = cell["interval"]
            line = f"| {method} | {','.join(map(str, row['seeds']))} | {fmt(metric, cell['mean'])} | [{fmt(metric, low)}, {fmt(metric, high)}] |"
            if "difference" in cell:
                d_low, d_high = cell["difference_interval"]
                verdict = " (excludes 0)" if d_low > 0 or d_high < 0 else ""
                line += f" {fmt(metric, cell['difference'], True)} | [{fmt(metric, d_low, True)}, {fmt(metric, d_high, True)}]{verdict} |"
            else:
                line += " | |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def plot_differences(config: CompareConfig, summary: dict, path: Path) -> None:
    """One panel per metric: each method's difference to the baseline with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = summary["metrics"]
    columns = min(3, len(metrics))  # rows of three panels: readable at a page's width
    rows = math.ceil(len(metrics) / columns)
    height = 0.8 + 0.3 * len(summary["methods"])
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, height * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, metrics):
        names, centers, lows, highs = [], [], [], []
        for method, row in summary["methods"].items():
            cell = row.get(metric, {})
            if "difference" in cell:
                scale = 100 if metric in PERCENT else 1
                names.append(method)
                centers.append(cell["difference"] * scale)
                lows.append((cell["difference"] - cell["difference_interval"][0]) * scale)
                highs.append((cell["difference_interval"][1] - cell["difference"]) * scale)
        ax.errorbar(centers, range(len(names)), xerr=[lows, highs], fmt="o", capsize=3)
        ax.axvline(0, color="gray", ls="--")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel(f"{metric} vs {config.baseline}" + (" (points)" if metric in PERCENT else ""))
    fig.suptitle("Difference to the baseline, paired 95% intervals (t over seeds; bootstrap over items with one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(config: CompareConfig, results: dict[str, dict], *, resamples: int = 4000, stem: str = "compare") -> dict:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` to output_dir: every finished run against the
    config's baseline (another `stem` and baseline give a second view of the same runs)."""
    if not any(result["method"] == config.baseline for result in results.values()):
        raise ValueError(f"{config.output_dir}: no finished run of the baseline {config.baseline!r} yet, nothing to compare with.")
    digests = {result.get("measured_on") for result in results.values()}
    if len(digests) > 1:
        by_digest = {d: sorted(k for k, r in results.items() if r.get("measured_on") == d) for d in digests}
        details = "; ".join(f"{str(d)[:12]}: {', '.join(keys)}" for d, keys in by_digest.items())
        raise ValueError(
            f"{config.output_dir}: the runs were measured on different held-out data ({details}); a paired comparison "
            "needs the same items. Run `selective-po compare` on the grid again (without --report_only) to measure "
            "every run on the current data."
        )
    summary = summarize(config, results, resamples=resamples)
    out = Path(config.output_dir)
    atomic_write(out / f"{stem}.json", json.dumps({"summary": summary, "runs": results}, indent=1).encode())
    atomic_write(out / f"{stem}.md", markdown_report(config, summary, caption=report_caption(config)).encode())
    plot_differences(config, summary, out / f"{stem}.png")
    return summary


def report_caption(config: CompareConfig) -> str:
    """What a report measured and how its intervals are computed (the first paragraph of `compare.md`)."""
    return (
        f"{config.model} on `{config.dataset}` ({config.train_split} trains, {config.eval_split} is held out); every "
        f"model measured against {config.reference or config.model} with beta {config.eval_beta}. Means over seeds and "
        f"items. 95% intervals, paired with {config.baseline} on the same seeds and items: with 2 or more seeds, Student's t "
        "over the per-seed means (S - 1 degrees of freedom) or, where wider, over seeds and items together (or every "
        "seed-and-item value, a floor); with one seed, "
        "the bootstrap over items, which says nothing of another training seed. \"Excludes 0\" is per row, with no "
        "correction for the number of rows."
    )


def compare(
    config: CompareConfig, *, resamples: int = 4000, seeds: list[int] | None = None, report_only: bool = False, stem: str = "compare"
) -> dict:
    """Run the grid (resuming; only `seeds`, when given), then write `<stem>.json`, `<stem>.md` and
    `<stem>.png` over every finished run. `report_only` runs nothing and reports the finished runs."""
    if not report_only:
        run_grid(config, seeds=seeds)
    return write_report(config, finished_results(config), resamples=resamples, stem=stem)
