"""The paper's same-size reference recipe, end to end on the bundled model.

    python benchmarks/reference_recipe.py                 # about 15 minutes on 2 CPU cores
    python benchmarks/reference_recipe.py --steps 100 --train_pairs 400

1. DPO stage: TRL's `sigmoid` loss from the base model.
2. Score once: per-token log-probs of the training pairs under the DPO model, stored on disk.
3. Selective-DPO from the base model with the DPO model as reference, reading the stored values
   (the reference is never loaded during training).
Beside it, for comparison, Selective-DPO with the default reference (the initial policy), also from
stored values. Every trained model is then scored on held-out pairs against the *base* model, so
the reward accuracies of the rows are comparable. One seed: read differences with that in mind.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.evaluation import evaluate_preferences
from selective_po.models import DEFAULT_MODEL, resolve_model_path


def train(name, base, data, opts, *, config_class=SelectiveDPOConfig, trainer_class=SelectiveDPOTrainer, **config):
    """Train one run from `base`; returns its output folder and timings."""
    out = Path(opts.output_dir) / name
    config.setdefault("beta", 0.1)
    args = config_class(
        output_dir=str(out),
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        max_steps=opts.steps,
        per_device_train_batch_size=opts.batch_size,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=opts.seed,
        ref_logps_cache_dir=str(Path(opts.output_dir) / "ref_logps"),
        **config,
    )
    start = time.perf_counter()
    trainer = trainer_class(model=base, args=args, train_dataset=data)
    built = time.perf_counter() - start  # includes scoring when values are not stored yet
    result = trainer.train()
    trainer.save_model(str(out))
    return str(out), {"build_s": built, "train_s": result.metrics["train_runtime"], "train_loss": result.training_loss}


def heldout(model_path, base, data, opts) -> dict:
    """Held-out accuracies of `model_path`, with the base model as the reference for margins."""
    args = SelectiveDPOConfig(
        output_dir=str(Path(opts.output_dir) / "eval"),
        ref_model_name_or_path=base,
        per_device_eval_batch_size=16,
        report_to="none",
    )
    trainer = SelectiveDPOTrainer(model=model_path, args=args, train_dataset=data, eval_dataset=data)
    return evaluate_preferences(trainer, desc=f"held-out: {Path(model_path).name}").summary()


def print_results(results: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"{'run':<42}{'likelihood acc':>15}{'reward acc vs base':>20}{'margin':>9}{'build s':>9}{'train s':>9}")
    for name, r in results.items():
        build = f"{r['build_s']:.0f}" if "build_s" in r else "-"
        trained = f"{r['train_s']:.0f}" if "train_s" in r else "-"
        print(f"{name:<42}{r['likelihood_accuracy']:>15.1%}{r['reward_accuracy']:>20.1%}{r['mean_margin']:>+9.3f}"
              f"{build:>9}{trained:>9}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_pairs", type=int, default=160)
    parser.add_argument("--eval_pairs", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--sdpo_threshold", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/reference_recipe")
    opts = parser.parse_args()

    base = resolve_model_path(opts.model)
    splits = load_preference_dataset("arithmetic")
    train_data = splits["train"].shuffle(seed=opts.seed).select(range(opts.train_pairs))
    eval_data = splits["test"].select(range(opts.eval_pairs))

    runs = {}
    dpo_path, runs["DPO"] = train("dpo", base, train_data, opts, loss_type="sigmoid")
    runs["Selective-DPO, initial-policy reference"] = train(
        "sdpo-initial-ref", base, train_data, opts, sdpo_threshold=opts.sdpo_threshold, precompute_ref_log_probs=True
    )[1]
    sdpo_path, runs["Selective-DPO, DPO-trained reference"] = train(
        "sdpo-dpo-ref",
        base,
        train_data,
        opts,
        sdpo_threshold=opts.sdpo_threshold,
        ref_model_name_or_path=dpo_path,
        precompute_ref_log_probs=True,
    )
    paths = {
        "base model": base,
        "DPO": dpo_path,
        "Selective-DPO, initial-policy reference": str(Path(opts.output_dir) / "sdpo-initial-ref"),
        "Selective-DPO, DPO-trained reference": sdpo_path,
    }
    results = {name: {**runs.get(name, {}), **heldout(path, base, eval_data, opts)} for name, path in paths.items()}

    print_results(results, f"{opts.model}: {opts.train_pairs} training pairs, {opts.steps} steps x {opts.batch_size} "
                  f"pairs, lr {opts.learning_rate}, sdpo_threshold {opts.sdpo_threshold}; {opts.eval_pairs} held-out pairs")
    Path(opts.output_dir, "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
