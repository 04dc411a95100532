"""`selective-po` command line: `train` (TRL-style) and `demo` (the main job on the defaults).

`train` parses exactly as TRL's own scripts do (`TrlParser`): every field of the method's config
(`SelectiveDPOConfig`, or `SePOConfig` when `loss_type` is `sepo`), of TRL's `ModelConfig` and of
the script arguments below is a `--flag`; `--config file.yaml` sets
defaults and flags given on the command line override it. It runs unchanged under
`accelerate launch -m selective_po train ...` on many GPUs and nodes.

Every command checks its flags before any long work starts, and an error ends the command with one
line naming the file, row, field or flag at fault; `SELECTIVE_PO_DEBUG=1` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .config import SEPO_LOSS_TYPES, SelectiveDPOConfig, SePOConfig
from .data import load_preference_dataset, load_preference_split
from .models import DEFAULT_MODEL

USAGE = """usage: selective-po {train,score,eval,inspect,build-pairs,compare,demo} [options]

  train   train with Selective-DPO, SePO (--loss_type sepo) or any TRL DPO loss; `train --help` lists the flags
  score   store per-token reference log-probs for a run (same flags as train), so that training with
          --precompute_ref_log_probs true never loads the reference
  eval    held-out measurements without a judge: preference accuracy, margin, how well the token scores
          find known spans, greedy task accuracy; a table and JSON (`eval --help`)
  inspect an HTML page of chosen/rejected pairs with every token shaded by its score and the kept ones marked
  build-pairs
          on-policy pairs with verifiable answers: sample from a model, check each response (arithmetic,
          IFEval instructions), pair a passing with a failing one; resumable (`build-pairs --help`)
  compare train several methods for several seeds from one start and measure each on the same held-out
          data; a table with paired 95% intervals of each difference to a baseline, and a plot; resumable
          (`compare --help`)
  demo    Selective-DPO on the bundled model and data, with held-out accuracy before and after (3 min 17 s on 2 cores, first use included)
"""


@dataclass
class TrainScriptArguments(ScriptArguments):
    """TRL's script arguments, with this project's defaults."""

    dataset_name: str | None = field(
        default="arithmetic",
        metadata={
            "help": "Preference dataset: a bundled name (`arithmetic`), a local .json/.jsonl/.parquet file or "
            "saved dataset folder, or a Hub dataset name."
        },
    )


@dataclass
class TrainModelConfig(ModelConfig):
    """TRL's model arguments, defaulting to the embedded SmolLM2-135M-Instruct."""

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"Policy to train: a hub id, a local folder or an embedded name (`{DEFAULT_MODEL}`)."},
    )


def config_class_for(argv: list[str]) -> type[SelectiveDPOConfig]:
    """The method's config class, picked by `loss_type` (a flag wins over the YAML file)."""
    loss_type = None
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        with open(path) as handle:
            loss_type = (yaml.safe_load(handle) or {}).get("loss_type")
    if "--loss_type" in argv:
        loss_type = argv[argv.index("--loss_type") + 1]
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
    return SePOConfig if any(name in SEPO_LOSS_TYPES for name in names) else SelectiveDPOConfig


def make_train_parser(config_class: type[SelectiveDPOConfig] = SelectiveDPOConfig, prog: str = "selective-po train") -> TrlParser:
    parser = TrlParser((TrainScriptArguments, config_class, TrainModelConfig), prog=prog)
    # argparse %-formats help strings: a literal "40%" in a field's help (ours or TRL's) would crash `--help`.
    for action in parser._actions:
        if action.help:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    return parser


def parse_train_args(
    argv: list[str], prog: str = "selective-po train"
) -> tuple[TrainScriptArguments, SelectiveDPOConfig, TrainModelConfig]:
    """Parse `train`/`score` arguments into the config class of the method that `loss_type` names."""
    return make_train_parser(config_class_for(argv), prog=prog).parse_args_and_config(args=argv)


# ----- flag checks for the argparse commands: a bad value stops at parse time, naming the flag -----


def _checked(kind, allowed: str, ok):
    """An argparse `type`: parse with `kind`, then refuse values where `ok(value)` is false, saying what is allowed."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text}")
        return value

    return parse


COUNT = _checked(int, "a count of 0 or more", lambda v: v >= 0)
COUNT_OR_ALL = _checked(int, "a count of 0 or more (0: all)", lambda v: v >= 0)
PAIRABLE = _checked(int, "at least 2 (a pair needs two responses)", lambda v: v >= 2)
POSITIVE_INT = _checked(int, "an integer of 1 or more", lambda v: v >= 1)
THRESHOLD = _checked(float, "sdpo_threshold q in [0, 1) (0.6 keeps the top 40%)", lambda v: 0.0 <= v < 1.0)
SHARE = _checked(float, "a share in (0, 1)", lambda v: 0.0 < v < 1.0)
SHARE_OR_ZERO = _checked(float, "a share in [0, 1)", lambda v: 0.0 <= v < 1.0)
PROBABILITY = _checked(float, "a value in (0, 1]", lambda v: 0.0 < v <= 1.0)
POSITIVE_FLOAT = _checked(float, "a number above 0", lambda v: v > 0.0)
INT_LIST = _checked(lambda text: [int(part) for part in text.split(",")], "comma-separated integers, e.g. 0,1", lambda v: bool(v))

DATASET_HELP = "preference pairs: a bundled name, a .json/.jsonl/.parquet file, a folder or a Hub dataset"
SPLIT_HELP = "which split (default: `test` if the dataset has one, else its only split)"


def build_trainer(script_args: TrainScriptArguments, training_args: SelectiveDPOConfig, model_args: TrainModelConfig):
    """The method's trainer (Selective-DPO, SePO or a TRL loss) for the data and model named by the arguments."""
    from .trainer import SelectiveDPOTrainer, SePOTrainer

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}

    dataset = load_preference_dataset(script_args.dataset_name, config_name=script_args.dataset_config)
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    for needed in [train_split] + ([test_split] if training_args.eval_strategy != "no" else []):
        if needed not in dataset:
            raise ValueError(
                f"Dataset {script_args.dataset_name!r} has no split {needed!r} (it has {sorted(dataset)}); "
                "set --dataset_train_split / --dataset_test_split, or --eval_strategy no."
            )
    trainer_class = SePOTrainer if isinstance(training_args, SePOConfig) else SelectiveDPOTrainer
    return trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[train_split],
        eval_dataset=dataset[test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),  # --load_in_4bit / --load_in_8bit, as TRL's dpo.py
        peft_config=get_peft_config(model_args),
    )


def train(script_args: TrainScriptArguments, training_args: SelectiveDPOConfig, model_args: TrainModelConfig):
    """Train with the named data and model, and save the final model."""
    trainer = build_trainer(script_args, training_args, model_args)
    resume = training_args.resume_from_checkpoint
    # `--resume_from_checkpoint true` (or `last`) means the last complete checkpoint in output_dir, as in Python.
    resume = True if isinstance(resume, str) and resume.lower() in ("true", "last") else resume
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}")
    return trainer


def score(script_args: TrainScriptArguments, training_args: SelectiveDPOConfig, model_args: TrainModelConfig):
    """Store per-token reference log-probs for the run these arguments describe, and stop.

    A later `train` with the same arguments and `--precompute_ref_log_probs true` finds them and never
    loads the reference. Interrupted runs resume where they stopped.
    """
    if not training_args.uses_selection:
        raise ValueError(f"`score` stores per-token values for selective losses; loss_type is {training_args.loss_type}.")
    training_args.precompute_ref_log_probs = True
    trainer = build_trainer(script_args, training_args, model_args)
    for name, path in trainer.reference_stores.items():
        trainer.accelerator.print(f"{name}: per-token log-probs stored in {path}")  # `train`, and `train/scorer`
    return trainer


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selective-po demo",
        description="Train Selective-DPO on the bundled model and arithmetic data, then show held-out accuracy "
        "before and after, with 95%% bootstrap intervals, and which tokens were selected on one held-out pair. The "
        "reference (the initial model) scores the training and held-out pairs once; training and both evaluations "
        "reuse those stored values.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="policy (and reference) model")
    parser.add_argument("--dataset", default="arithmetic", help="preference dataset with train and test splits")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the trained model and logs go")
    parser.add_argument("--sdpo_threshold", type=THRESHOLD, default=0.6, help="keep the top 1 - q share of tokens")
    parser.add_argument("--max_steps", type=POSITIVE_INT, default=20, help="optimizer steps")
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=4, help="pairs per step")
    parser.add_argument("--learning_rate", type=POSITIVE_FLOAT, default=2e-5)
    parser.add_argument("--beta", type=POSITIVE_FLOAT, default=0.1)
    parser.add_argument("--eval_pairs", type=POSITIVE_INT, default=64, help="held-out pairs to score")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def demo(argv: list[str]) -> dict[str, dict[str, float]]:
    """The main job on the defaults: before/after held-out accuracy with intervals, and one explained pair."""
    from .evaluation import PreferenceEvaluation, bootstrap_interval, evaluate_preferences, explain_pair
    from .models import resolve_model_path
    from .trainer import SelectiveDPOTrainer

    opts = demo_parser().parse_args(argv)
    start = time.time()
    model_path = resolve_model_path(opts.model)
    data = load_preference_dataset(opts.dataset)
    train_pairs = data["train"].shuffle(seed=opts.seed).select(range(min(len(data["train"]), opts.max_steps * opts.batch_size)))
    eval_pairs = data["test"].select(range(min(len(data["test"]), opts.eval_pairs)))
    args = SelectiveDPOConfig(
        output_dir=opts.output_dir,
        loss_type="sdpo",
        sdpo_threshold=opts.sdpo_threshold,
        beta=opts.beta,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=16,
        # The reference is the initial model: its per-token log-probs are scored once (and kept in the
        # cache for the next run), so no step runs a reference forward and evaluation needs none.
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=16,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=opts.seed,
    )
    trainer = SelectiveDPOTrainer(model=model_path, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs)

    before = PreferenceEvaluation.of_reference(trainer.eval_dataset, beta=opts.beta)  # the policy is the reference
    trainer.train()
    after = evaluate_preferences(trainer, desc="Held-out pairs, after training")
    trainer.save_model(opts.output_dir)

    n = len(eval_pairs)
    print(f"\nSelective-DPO on {opts.model}: {len(train_pairs)} training pairs, {opts.max_steps} steps, keeping the top "
          f"{1 - opts.sdpo_threshold:.0%} of each response's tokens. Held out: {n} pairs; [95% bootstrap interval].")  # fmt: skip
    pct = lambda low_high: f"[{low_high[0]:.0%}, {low_high[1]:.0%}]"  # noqa: E731
    was, now = before.likelihood_correct.float().numpy(), after.likelihood_correct.float().numpy()
    change = bootstrap_interval(now - was)
    margins = after.margins.numpy()
    print(f"{'held-out metric':<22}{'before':>9}{'after':>9}   interval")
    print(f"{'likelihood accuracy':<22}{was.mean():>9.1%}{now.mean():>9.1%}   change {now.mean() - was.mean():+.1%} "
          f"[{change[0]:+.1%}, {change[1]:+.1%}]")  # fmt: skip
    print(f"{'reward accuracy':<22}{'-':>9}{(margins > 0).mean():>9.1%}   {pct(bootstrap_interval(margins > 0))}; 50% is chance")
    low, high = bootstrap_interval(margins)
    print(f"{'mean reward margin':<22}{0:>9.3f}{margins.mean():>+9.3f}   [{low:+.3f}, {high:+.3f}]")
    print(
        "likelihood accuracy: the policy gives the chosen response a higher log-probability than the rejected one.\n"
        "reward accuracy: DPO's implicit reward margin, beta * (log-ratio of chosen - log-ratio of rejected) against\n"
        "the initial model, is positive. Before training the policy is that model, so every margin is 0."
    )
    print(f"\nOne held-out pair, tokens kept at sdpo_threshold={opts.sdpo_threshold} marked:")
    print(f"  prompt: {eval_pairs[0]['prompt'][-1]['content']}")
    print(explain_pair(trainer, trainer.eval_dataset[0], threshold=opts.sdpo_threshold))
    print(f"\nDone in {time.time() - start:.0f} s; model saved to {opts.output_dir}")
    return {"before": before.summary(), "after": after.summary()}


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selective-po eval",
        description="Measure a trained model on held-out preference pairs, with no judge model: preference accuracy "
        "(implicit reward margin > 0) and mean margin against the reference, likelihood accuracy, how well "
        "Selective-DPO's token scores find the known differing span (AUROC, top-1 and recall at the kept share, with "
        "95%% intervals and the random baseline; when the data has chosen_span / rejected_span), and greedy task "
        "accuracy under the arithmetic verifier (when it has answer).",
    )
    parser.add_argument("--model", required=True, help="the trained model (folder, hub id or embedded name)")
    parser.add_argument("--ref_model", default=DEFAULT_MODEL, help="the reference for margins and selection")
    parser.add_argument("--dataset", default="arithmetic", help=DATASET_HELP)
    parser.add_argument("--split", help=SPLIT_HELP)
    parser.add_argument("--pairs", type=COUNT_OR_ALL, default=64, help="how many pairs of the split (0: all)")
    parser.add_argument("--sdpo_threshold", type=THRESHOLD, default=0.6, help="selection whose kept share is used for span recall")
    parser.add_argument(
        "--selection_rule", choices=("scores", "confidence"), default="scores",
        help="token scores checked against the spans: Selective-DPO's reference gap (scores) or ConfPO's 1 - p (confidence)",
    )  # fmt: skip
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=16)
    parser.add_argument("--max_new_tokens", type=POSITIVE_INT, default=96)
    parser.add_argument(
        "--task_prompts", help="JSON-lines prompts with a verifiable task for greedy accuracy and IFEval pass rate "
        "(default: the dataset's {split}_prompts.jsonl when it has one, else the pairs' own prompts)",
    )  # fmt: skip
    parser.add_argument("--prompts", type=COUNT_OR_ALL, default=0, help="how many task prompts, split evenly over the tasks (0: all)")
    parser.add_argument("--output_json", help="also write the results here")
    return parser


def evaluate(argv: list[str]) -> dict[str, float]:
    """`selective-po eval`: every judge-free measurement the data allows, as a table and JSON."""
    import tempfile

    from .data import load_task_prompts
    from .evaluation import balanced_task_rows, evaluate_preferences, greedy_task_accuracy, span_responses
    from .selection_quality import span_selection_quality
    from .models import resolve_model_path
    from .trainer import SelectiveDPOTrainer

    opts = eval_parser().parse_args(argv)
    rows, split = load_preference_split(opts.dataset, opts.split)
    if opts.pairs:
        rows = rows.select(range(min(opts.pairs, len(rows))))
    task_rows = load_task_prompts(opts.task_prompts or opts.dataset, split=split, fallback=rows)
    task_rows = balanced_task_rows(task_rows, opts.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        # The reference's per-token log-probs are stored (keyed by its weights and the tokens), so evaluating
        # a second model against the same reference runs one forward, not two.
        args = SelectiveDPOConfig(
            output_dir=tmp, ref_model_name_or_path=opts.ref_model, per_device_eval_batch_size=opts.batch_size,
            precompute_ref_log_probs=True, precompute_ref_batch_size=opts.batch_size, report_to="none",
        )  # fmt: skip
        trainer = SelectiveDPOTrainer(model=resolve_model_path(opts.model), args=args, train_dataset=rows, eval_dataset=rows)
        results = evaluate_preferences(trainer, desc="Scoring held-out pairs").summary()
        quality = {}
        if "chosen_span" in rows.column_names:
            responses = span_responses(trainer, threshold=opts.sdpo_threshold, batch_size=opts.batch_size, rule=opts.selection_rule)
            quality = span_selection_quality(responses, keep_share=1 - opts.sdpo_threshold)
        if task_rows:
            results["task_prompts"] = len(task_rows)
            results.update(greedy_task_accuracy(
                trainer.accelerator.unwrap_model(trainer.inference_model()), trainer._tokenizer, task_rows, batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens,
            ))  # fmt: skip
    print(f"\n{opts.model} on {opts.dataset} (split {split!r}), reference {opts.ref_model}")
    for key, value in results.items():
        shown = f"{value:.1%}" if any(word in key for word in ("accuracy", "rate", "answers_that_end")) else f"{value:+.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<28}{shown:>12}")
    if quality:
        print_selection_quality(quality, keep_share=1 - opts.sdpo_threshold, rule=opts.selection_rule)
    results |= quality
    if opts.output_json:
        Path(opts.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output_json).write_text(json.dumps({"model": opts.model, "ref_model": opts.ref_model, **results}, indent=2))
    return results


def print_selection_quality(quality: dict[str, float], *, keep_share: float, rule: str) -> None:
    """The span measures as a table: mean, 95% bootstrap interval over responses, random scores' value."""
    scorer = {"scores": "Selective-DPO token scores", "confidence": "ConfPO token scores (1 - p)"}[rule]
    print(f"\n{scorer} against the known differing span (mean over responses; [95% interval]; random):")
    labels = {"span_auroc": "AUROC", "span_top1": "top-1 token in span", "span_recall_at_k": f"span recall, top {keep_share:.0%}"}
    for name, label in labels.items():
        for side in ("chosen", "rejected"):
            key = f"{name}_{side}"
            print(f"  {label + ' (' + side + ')':<34}{quality[key]:>7.3f}  [{quality[key + '_low']:.3f}, {quality[key + '_high']:.3f}]"
                  f"  random {quality[key + '_random']:.3f}  ({quality[key + '_responses']} responses)")  # fmt: skip


def inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selective-po inspect",
        description="Write a self-contained HTML page showing, for some pairs, every response token shaded by its "
        "Selective-DPO score under --model and --ref_model (ConfPO's 1 - p with --selection_rule confidence), with "
        "the tokens kept outlined: at --sdpo_threshold, below the mean probability (confidence), the data's own "
        "spans (spans: chosen_spans/rejected_spans, chosen_span/rejected_span or *_token_mask columns), or the "
        "fixed scores of --scorer against --ref_model (scorer: Selective-DPO with fixed scores; --model plays no part).",
    )
    parser.add_argument("--model", required=True, help="the policy (folder, hub id or embedded name)")
    parser.add_argument("--ref_model", default=DEFAULT_MODEL, help="the reference")
    parser.add_argument("--dataset", default="arithmetic", help=DATASET_HELP)
    parser.add_argument("--split", help=SPLIT_HELP)
    parser.add_argument("--pairs", type=COUNT_OR_ALL, default=8, help="how many pairs of the split to show (0: all)")
    parser.add_argument("--sdpo_threshold", type=THRESHOLD, default=0.6, help="tokens kept at this threshold are outlined")
    parser.add_argument("--selection_rule", choices=("scores", "confidence", "spans", "scorer"), default="scores",
                        help="which tokens are outlined")  # fmt: skip
    parser.add_argument("--scorer", help="with --selection_rule scorer: the scorer model (e.g. a DPO-trained copy of --ref_model)")
    parser.add_argument("--output", default="inspect.html", help="the HTML file to write")
    return parser


def inspect_pairs(argv: list[str]) -> Path:
    """`selective-po inspect`: the HTML page, written atomically."""
    import tempfile

    from .inspector import collect_pair_views, render_html
    from .models import resolve_model_path
    from .files import atomic_write
    from .trainer import SelectiveDPOTrainer

    parser = inspect_parser()
    opts = parser.parse_args(argv)
    if (opts.selection_rule == "scorer") != (opts.scorer is not None):
        parser.error("--scorer names the scorer of --selection_rule scorer, and that rule needs it: give both or neither.")
    rows, split = load_preference_split(opts.dataset, opts.split)
    if opts.pairs:
        rows = rows.select(range(min(opts.pairs, len(rows))))
    with tempfile.TemporaryDirectory() as tmp:
        args = SelectiveDPOConfig(
            output_dir=tmp, ref_model_name_or_path=opts.ref_model, sdpo_threshold=opts.sdpo_threshold,
            precompute_ref_log_probs=True, report_to="none", selection_rule=opts.selection_rule,
            scorer_model_name_or_path=opts.scorer,
        )  # fmt: skip
        trainer = SelectiveDPOTrainer(model=resolve_model_path(opts.model), args=args, train_dataset=rows, eval_dataset=rows)
        views = collect_pair_views(trainer, threshold=opts.sdpo_threshold, rule=opts.selection_rule)
    scored = f"scorer {opts.scorer}" if opts.scorer else opts.model
    page = render_html(
        views, title=f"Selected tokens: {scored} vs {opts.ref_model}", threshold=opts.sdpo_threshold,
        description=f"Data: {opts.dataset}, split {split!r}, first {len(views)} pairs; kept tokens: {opts.selection_rule}.",
    )  # fmt: skip
    output = Path(opts.output)
    atomic_write(output, page.encode("utf-8"))  # never a half-written page
    print(f"Wrote {output} ({len(views)} pairs)")
    return output


def build_pairs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selective-po build-pairs",
        description="Sample several responses per prompt from --model, check each with a verifier (exact arithmetic "
        "answers; IFEval instructions via if-verifiable), and pair a passing response (chosen) with a failing one "
        "(rejected). Writes train.jsonl / test.jsonl (pairs), test_prompts.jsonl (every held-out prompt) and "
        "samples-*.jsonl (every sample and verdict) to --output_dir. A killed run resumes from --output_dir/work.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model to sample from (folder, hub id or embedded name)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--arithmetic_prompts", type=COUNT, default=200, help="arithmetic prompts, both splits")
    parser.add_argument("--ifeval_prompts", type=COUNT, default=200, help="IFEval-instruction prompts, both splits")
    parser.add_argument("--test_share", type=SHARE, default=0.25, help="share of each task's prompts held out")
    parser.add_argument(
        "--validation_share", type=SHARE_OR_ZERO, default=0.0,
        help="share of each task's prompts held out apart from test, for tuning (validation.jsonl; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--extra_test_prompts", type=COUNT, default=0,
        help="grow the test split of a built --output_dir by this many new prompts per task (the ones after each task's "
        "first N in its stream); train and validation keep theirs, and only the new prompts are sampled",
    )  # fmt: skip
    parser.add_argument("--samples_per_prompt", type=PAIRABLE, default=4, help="responses sampled per prompt (2 or more)")
    parser.add_argument("--temperature", type=POSITIVE_FLOAT, default=1.0)
    parser.add_argument("--top_p", type=PROBABILITY, default=1.0)
    parser.add_argument("--max_new_tokens", type=POSITIVE_INT, default=96)
    parser.add_argument("--prompts_per_chunk", type=POSITIVE_INT, default=16, help="prompts per generate call and per resumable file")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def build_pairs(argv: list[str]) -> dict:
    """`selective-po build-pairs`: on-policy pairs with a table of pass rates and pair counts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import check_model_folder, resolve_model_path
    from .onpolicy import build_onpolicy_dataset, render_readme
    from .files import atomic_write

    opts = build_pairs_parser().parse_args(argv)
    counts = {"arithmetic": opts.arithmetic_prompts, "ifeval": opts.ifeval_prompts}
    counts = {task: n for task, n in counts.items() if n > 0}
    if not counts:
        raise ValueError("Nothing to build: --arithmetic_prompts and --ifeval_prompts are both 0.")
    path = resolve_model_path(opts.model)
    check_model_folder(path, trust_remote_code=False, field="--model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)  # safetensors only, no folder code
    if torch.cuda.is_available():  # sampling is most of the cost: use the GPU when there is one
        model.to("cuda")
    settings = {
        "samples_per_prompt": opts.samples_per_prompt, "temperature": opts.temperature, "top_p": opts.top_p,
        "max_new_tokens": opts.max_new_tokens, "prompts_per_chunk": opts.prompts_per_chunk, "seed": opts.seed,
    }  # fmt: skip
    stats = build_onpolicy_dataset(
        model, tokenizer, model_name=opts.model, output_dir=opts.output_dir, counts=counts,
        test_share=opts.test_share, validation_share=opts.validation_share, settings=settings, extra_test_prompts=opts.extra_test_prompts,
    )  # fmt: skip
    print(f"\n{'split':<7}{'task':<12}{'prompts':>8}{'samples':>9}{'pass':>8}{'complete':>10}{'pairs':>7}")
    for split, tasks in stats.items():
        for task, s in tasks.items():
            print(
                f"{split:<7}{task:<12}{s['prompts']:>8}{s['samples']:>9}{s['pass_rate']:>8.1%}"
                f"{s['complete_rate']:>10.1%}{s['pairs']:>7}"
            )
    settings["model"] = opts.model
    stored = {"settings": settings, "splits": stats, **({"extra_test_prompts": opts.extra_test_prompts} if opts.extra_test_prompts else {})}
    atomic_write(Path(opts.output_dir, "stats.json"), json.dumps(stored, indent=2).encode())
    command = "selective-po build-pairs " + " ".join(argv)
    atomic_write(Path(opts.output_dir, "README.md"), render_readme(stats, settings=settings, command=command).encode())
    return stats


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selective-po compare",
        description="Train every method of a YAML grid for its seeds from the same start model and data order, measure "
        "each trained model on the same held-out pairs (and prompts) against one reference, whose per-token values "
        "are stored once, and write compare.md, compare.json and compare.png to output_dir: each metric with a "
        "bootstrap 95%% interval, and its difference to the baseline method with a paired interval (resampling seeds "
        "and items). Finished runs are kept: a stopped or killed grid resumes when run again.",
    )
    parser.add_argument("--config", required=True, help="the grid: model, dataset, seeds, baseline, training, methods (see the README)")
    parser.add_argument("--output_dir", help="overrides the config's output_dir")
    parser.add_argument("--resamples", type=POSITIVE_INT, default=4000, help="bootstrap resamples per interval")
    parser.add_argument("--dry_run", action="store_true", help="print the runs in order and exit")
    parser.add_argument(
        "--seeds", type=INT_LIST,
        help="run only these seeds of the grid, e.g. 0,1 (processes with disjoint seeds can share one output_dir)",
    )  # fmt: skip
    parser.add_argument("--report_only", action="store_true", help="run nothing: report the runs finished so far")
    parser.add_argument(
        "--baseline", help="report the differences to this method instead of the config's baseline (written as compare-vs-NAME.*)"
    )
    return parser


def compare_command(argv: list[str]) -> dict:
    """`selective-po compare`: the grid, then the report."""
    from .compare import CompareConfig, compare, held_out_digest, is_measured, load_held_out, run_dir

    opts = compare_parser().parse_args(argv)
    config = CompareConfig.from_yaml(opts.config, output_dir=opts.output_dir, baseline=opts.baseline)
    runs = config.runs(opts.seeds)
    if opts.dry_run:
        digest = held_out_digest(*load_held_out(config))
        for method, seed in runs:
            folder = run_dir(config, method, seed)
            if is_measured(config, method, seed, digest):
                state = "done"
            elif (folder / "result.json").is_file():
                state = "to measure again (the held-out data changed)"
            elif method != "base" and (folder / "trained.json").is_file():
                state = "to measure"
            else:
                state = "to run"
            print(f"{method}/seed{seed}: {state}")
        return {}
    stem = f"compare-vs-{opts.baseline}" if opts.baseline else "compare"
    summary = compare(config, resamples=opts.resamples, seeds=opts.seeds, report_only=opts.report_only, stem=stem)
    print(Path(config.output_dir, f"{stem}.md").read_text())
    print(f"wrote {config.output_dir}/{stem}.md, {stem}.json and {stem}.png")
    return summary


COMMANDS = {
    "train": lambda rest: train(*parse_train_args(rest)),
    "score": lambda rest: score(*parse_train_args(rest, prog="selective-po score")),
    "eval": lambda rest: evaluate(rest),
    "inspect": lambda rest: inspect_pairs(rest),
    "build-pairs": lambda rest: build_pairs(rest),
    "compare": lambda rest: compare_command(rest),
    "demo": lambda rest: demo(rest),
}
DEBUG_ENV = "SELECTIVE_PO_DEBUG"


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error prints one line (the traceback too with `SELECTIVE_PO_DEBUG=1`) and returns 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"selective-po: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
        from .engines import end_process_group

        end_process_group()  # under `accelerate launch`: ends the process here (exit 0), see its docstring
    except KeyboardInterrupt:
        print(f"\nselective-po {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"selective-po {command}: error: {message}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 to see the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
