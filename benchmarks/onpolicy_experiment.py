"""The papers' main comparisons at small scale, on on-policy pairs with verifiable answers.

    python benchmarks/onpolicy_experiment.py                # CPU preset, about 75 minutes on 2 cores
    python benchmarks/onpolicy_experiment.py --preset cuda  # longer runs, every row with 3 seeds

Data: the bundled `onpolicy-smollm2` pairs (sampled from the bundled model itself, checked by the
arithmetic and IFEval verifiers; see its README). Every run starts from the bundled model and gets
the same pairs, steps, batch size and learning rate; only the loss and its token selection differ.

Rows (seeds: `--seeds` for the main rows, the first seed for controls and the sweep):
- base model (no training);
- DPO (TRL's `sigmoid`), which also serves as the strong reference and the oracle, seed for seed;
- Selective-DPO, initial model as reference, keeping k = 40% (`sdpo_threshold` 0.6);
- Selective-DPO, DPO-trained reference, k = 40%;
- SePO, DPO-trained oracle, 30% of chosen and rejected tokens;
- random-selection controls at the same shares (Selective-DPO with the DPO reference; SePO);
- Selective-DPO with the DPO reference at k in {20, 40, 60, 80}%.

Every trained model is measured on the held-out split with the base model as reference: likelihood
accuracy, reward accuracy and mean margin on held-out pairs, greedy arithmetic accuracy and IFEval
pass rate on held-out prompts. Each finished run leaves `result.json` in its folder and is skipped
when the script runs again, so a stopped experiment resumes. Outputs: `results.json` here, and under
`--docs_dir` a markdown table and two PNG plots (accuracy vs k; training curves).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer, load_preference_dataset
from selective_po.data import load_task_prompts
from selective_po.evaluation import balanced_task_rows, evaluate_preferences, greedy_task_accuracy
from selective_po.models import DEFAULT_MODEL, resolve_model_path
from selective_po.files import atomic_write

PRESETS = {
    # Sized so that 17 runs and 18 evaluations finish in a working session on 2 CPU cores.
    "cpu": {"steps": 15, "batch_size": 4, "learning_rate": 1e-5, "seeds": [0, 1, 2], "prompts": 64, "control_seeds": 1},
    "cuda": {"steps": 100, "batch_size": 8, "learning_rate": 5e-6, "seeds": [0, 1, 2], "prompts": 0, "control_seeds": 3},
}
METRICS = ("likelihood_accuracy", "reward_accuracy", "mean_margin", "greedy_accuracy_arithmetic", "ifeval_pass_rate")
SWEEP = (0.2, 0.4, 0.6, 0.8)


def plan(opts) -> list[dict]:
    """Every run, in an order where each reference or oracle is trained before it is needed."""
    runs = []
    main_seeds, control_seeds = opts.seeds, opts.seeds[: opts.control_seeds]
    for seed in main_seeds:
        runs.append({"name": f"dpo/seed{seed}", "row": "DPO", "seed": seed, "method": "dpo"})
    for seed in main_seeds:
        runs.append({"name": f"sdpo-init-ref/seed{seed}", "row": "Selective-DPO, initial reference, k=40%", "seed": seed,
                     "method": "sdpo", "k": 0.4, "ref": "base"})  # fmt: skip
        runs.append({"name": f"sdpo-dpo-ref/seed{seed}", "row": "Selective-DPO, DPO reference, k=40%", "seed": seed,
                     "method": "sdpo", "k": 0.4, "ref": "dpo"})  # fmt: skip
        runs.append({"name": f"sepo/seed{seed}", "row": "SePO, DPO oracle, 30%", "seed": seed, "method": "sepo",
                     "k": 0.3})  # fmt: skip
    for seed in control_seeds:
        runs.append({"name": f"sdpo-random/seed{seed}", "row": "control: Selective-DPO, DPO reference, random 40%",
                     "seed": seed, "method": "sdpo", "k": 0.4, "ref": "dpo", "rule": "random"})  # fmt: skip
        runs.append({"name": f"sepo-random/seed{seed}", "row": "control: SePO, random 30%", "seed": seed,
                     "method": "sepo", "k": 0.3, "rule": "random"})  # fmt: skip
    for k in SWEEP:
        if k != 0.4:  # k = 40% is the main row
            runs.append({"name": f"sdpo-dpo-ref-k{int(k * 100)}/seed{opts.seeds[0]}", "row": f"sweep: Selective-DPO, DPO reference, k={k:.0%}",
                         "seed": opts.seeds[0], "method": "sdpo", "k": k, "ref": "dpo"})  # fmt: skip
    return runs


def train_run(run: dict, *, base: str, data, opts) -> tuple[str, dict]:
    out = Path(opts.output_dir) / run["name"]
    common = dict(
        output_dir=str(out), learning_rate=opts.learning_rate, lr_scheduler_type="constant", max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size, logging_steps=1, save_strategy="no", report_to="none",
        seed=run["seed"], selection_rule=run.get("rule", "scores"), plot_curves=False,
    )  # fmt: skip
    dpo_model = str(Path(opts.output_dir) / f"dpo/seed{run['seed']}")
    if run["method"] == "dpo":
        args, trainer_class = SelectiveDPOConfig(loss_type="sigmoid", beta=0.1, **common), SelectiveDPOTrainer
    elif run["method"] == "sdpo":
        ref = base if run["ref"] == "base" else dpo_model
        args = SelectiveDPOConfig(beta=0.1, sdpo_threshold=round(1 - run["k"], 6), ref_model_name_or_path=ref, **common)
        trainer_class = SelectiveDPOTrainer
    else:
        args = SePOConfig(
            oracle_model_name_or_path=dpo_model, oracle_ref_model_name_or_path=base, sepo_chosen_share=run["k"],
            sepo_rejected_share=run["k"], ref_logps_cache_dir=str(Path(opts.output_dir) / "oracle_rewards"), **common,
        )  # fmt: skip
        trainer_class = SePOTrainer
    start = time.perf_counter()
    trainer = trainer_class(model=base, args=args, train_dataset=data)
    result = trainer.train()
    trainer.save_model(str(out))
    curves = [row for row in trainer.state.log_history if "loss" in row]
    del trainer
    gc.collect()
    return str(out), {"train_s": time.perf_counter() - start, "train_loss": result.training_loss, "curves": curves}


def measure(model_path: str, *, base: str, pairs, prompts: list[dict], opts) -> dict:
    """Held-out measurements of one model, with the base model as reference."""
    args = SelectiveDPOConfig(
        output_dir=str(Path(opts.output_dir) / "eval"), ref_model_name_or_path=base, per_device_eval_batch_size=16,
        report_to="none",
    )  # fmt: skip
    trainer = SelectiveDPOTrainer(model=model_path, args=args, train_dataset=pairs, eval_dataset=pairs)
    start = time.perf_counter()
    results = evaluate_preferences(trainer, desc=f"held-out pairs: {model_path}").summary()
    results.update(greedy_task_accuracy(trainer.model, trainer._tokenizer, prompts, batch_size=16, max_new_tokens=opts.max_new_tokens))
    results["eval_s"] = time.perf_counter() - start
    del trainer
    gc.collect()
    return results


def summarize(results: dict[str, dict]) -> dict[str, dict]:
    """Per row: mean, sample standard deviation and range of each metric over its seeds."""
    rows: dict[str, list[dict]] = {}
    for result in results.values():
        rows.setdefault(result["row"], []).append(result)
    summary = {}
    for row, seeds in rows.items():
        summary[row] = {"seeds": len(seeds)}
        for metric in METRICS:
            values = [s[metric] for s in seeds]
            summary[row][metric] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values),
            }  # fmt: skip
    return summary


def markdown_table(summary: dict[str, dict], *, caption: str) -> str:
    def cell(stat, *, percent: bool) -> str:
        fmt = (lambda v: f"{v:.1%}") if percent else (lambda v: f"{v:+.3f}")  # noqa: E731
        return fmt(stat["mean"]) + (f" ± {fmt(stat['std']).lstrip('+')}" if stat["std"] else "")

    lines = [caption, "", "| run | seeds | likelihood acc | reward acc | margin | arithmetic (greedy) | IFEval pass |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row, s in summary.items():
        cells = [cell(s[m], percent=m != "mean_margin") for m in METRICS]
        lines.append(f"| {row} | {s['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], summary: dict[str, dict], docs_dir: Path, *, first_seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Accuracy vs k: the sweep (first seed), with the main k=40% run of the same seed, and DPO as k=100%.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    sweep = sorted(
        (r["k"], r) for r in results.values()
        if r["method"] == "sdpo" and r.get("ref") == "dpo" and r.get("rule", "scores") == "scores" and r["seed"] == first_seed
    )  # fmt: skip
    dpo = results.get(f"dpo/seed{first_seed}")
    control = results.get(f"sdpo-random/seed{first_seed}")
    for ax, metric, label in zip(axes, ("reward_accuracy", "greedy_accuracy_arithmetic", "ifeval_pass_rate"),
                                 ("held-out reward accuracy", "greedy arithmetic accuracy", "IFEval pass rate")):  # fmt: skip
        ks = [k * 100 for k, _ in sweep] + ([100] if dpo else [])
        values = [r[metric] * 100 for _, r in sweep] + ([dpo[metric] * 100] if dpo else [])
        ax.plot(ks, values, "o-", label="Selective-DPO, DPO reference (k=100%: DPO)")
        if control:
            ax.plot([40], [control[metric] * 100], "s", color="tab:red", label="random 40% (control)")
        if "base model" in summary:
            ax.axhline(summary["base model"][metric]["mean"] * 100, color="gray", ls="--", label="base model")
        ax.set_xlabel("tokens kept per response, k (%)")
        ax.set_ylabel(f"{label} (%)")
        ax.set_xticks([20, 40, 60, 80, 100])
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Token share sweep (seed {first_seed})")
    fig.tight_layout()
    fig.savefig(docs_dir / "accuracy_vs_k.png", dpi=120)
    plt.close(fig)

    # Training curves of the main rows, first seed.
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, result in results.items():
        if result["seed"] != first_seed or result["row"].startswith(("sweep", "control", "base")):
            continue
        steps = [row["step"] for row in result["curves"]]
        axes[0].plot(steps, [row["loss"] for row in result["curves"]], label=result["row"])
        axes[1].plot(steps, [row.get("rewards/accuracies", float("nan")) for row in result["curves"]], label=result["row"])
    axes[0].set_ylabel("training loss (each method's own)")
    axes[1].set_ylabel("batch reward accuracy")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Training curves (seed {first_seed})")
    fig.tight_layout()
    fig.savefig(docs_dir / "training_curves.png", dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default="onpolicy-smollm2")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--control_seeds", type=int, help="how many of the seeds the controls use")
    parser.add_argument("--prompts", type=int, help="held-out prompts for greedy accuracy, split evenly over tasks (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--output_dir", default="outputs/onpolicy_experiment")
    parser.add_argument("--docs_dir", default="docs/results")
    parser.add_argument("--only", nargs="*", help="run only these run names (e.g. dpo/seed0); default all")
    opts = parser.parse_args()
    for key, value in PRESETS[opts.preset].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)

    base = resolve_model_path(opts.model)
    splits = load_preference_dataset(opts.dataset)
    train_pairs, test_pairs = splits["train"], splits["test"]
    if len(train_pairs) < opts.steps * opts.batch_size:
        print(f"note: {len(train_pairs)} training pairs for {opts.steps * opts.batch_size} pair-steps: more than one epoch")
    prompts = balanced_task_rows(load_task_prompts(opts.dataset, split="test"), opts.prompts)
    print(f"{len(train_pairs)} training pairs, {len(test_pairs)} held-out pairs, {len(prompts)} held-out prompts; "
          f"preset {opts.preset}: {opts.steps} steps x {opts.batch_size} pairs, lr {opts.learning_rate}, seeds {opts.seeds}")  # fmt: skip

    results: dict[str, dict] = {}
    runs = [{"name": "base", "row": "base model", "seed": opts.seeds[0], "method": "base"}] + plan(opts)
    for run in runs:
        if opts.only and run["name"] not in opts.only:
            continue
        done = Path(opts.output_dir) / run["name"] / "result.json"
        if done.is_file():
            results[run["name"]] = json.loads(done.read_text())
            continue
        print(f"\n=== {run['name']} ({run['row']})", flush=True)
        path, trained = (base, {"curves": []}) if run["method"] == "base" else train_run(run, base=base, data=train_pairs, opts=opts)
        result = {**run, **trained, **measure(path, base=base, pairs=test_pairs, prompts=prompts, opts=opts)}
        atomic_write(done, json.dumps(result, indent=2).encode())  # a run counts as done only once its result is whole
        results[run["name"]] = result
        print({k: round(v, 4) for k, v in result.items() if k in METRICS}, flush=True)

    summary = summarize(results)
    caption = (f"{opts.model} on `{opts.dataset}`: {len(train_pairs)} training pairs, {opts.steps} steps x "
               f"{opts.batch_size} pairs, lr {opts.learning_rate}, preset `{opts.preset}`; {len(test_pairs)} held-out "
               f"pairs and {len(prompts)} held-out prompts; reward accuracy and margin use the base model as "
               "reference. Mean ± sample standard deviation over seeds.")  # fmt: skip
    table = markdown_table(summary, caption=caption)
    print("\n" + table)
    Path(opts.output_dir, "results.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    docs_dir = Path(opts.docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / "onpolicy_table.md").write_text(table)
    plot(results, summary, docs_dir, first_seed=opts.seeds[0])
    print(f"wrote {docs_dir / 'onpolicy_table.md'}, {docs_dir / 'accuracy_vs_k.png'}, {docs_dir / 'training_curves.png'}")


if __name__ == "__main__":
    main()
