"""Held-out scoring time: a second model evaluated against the same reference, then and now.

    python benchmarks/eval_time.py            # 64 held-out arithmetic pairs, bundled model as reference

`selective-po eval` scores held-out pairs with the policy and the reference. It used to run both on
every call (two rows per pair, the reference live). It now stores the reference's per-token values
once (keyed like the training cache) and runs each pair as one row with its prompt once. This times,
in one process on the same pairs:

1. `live`: policy and reference forwards, two rows per pair, as `eval` did before;
2. `first`: the first model against a new reference: scoring and storing the reference, then the policy;
3. `second`: another model against the same reference: the policy alone, the reference read back.

Each evaluation runs in a fresh process, as each `selective-po eval` call does, builds its trainer
as `eval` does, and times the trainer's construction (where the reference is scored or its stored
values found) plus `evaluate_preferences`. `first` runs once (it stores the reference); `live` and
`second` then alternate `--repeats` times and their medians are compared, because one evaluation's
time on this machine moves by 10-20% from run to run. The models evaluated are the bundled model with a little
noise on its weights: what is timed does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.evaluation import evaluate_preferences
from selective_po.models import DEFAULT_MODEL, resolve_model_path


def noisy_copy(path: str, out: str, scale: float) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def timed_evaluation(model: str, reference: str, rows, *, stored: bool, cache: str, batch_size: int) -> tuple[float, dict]:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        args = SelectiveDPOConfig(
            output_dir=tmp, ref_model_name_or_path=reference, per_device_eval_batch_size=batch_size, report_to="none",
            precompute_ref_log_probs=stored, precompute_ref_batch_size=batch_size, ref_logps_cache_dir=cache,
            share_prompt=stored, plot_curves=False,
        )  # fmt: skip
        trainer = SelectiveDPOTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
        summary = evaluate_preferences(trainer).summary()
    return time.perf_counter() - start, summary


def evaluate_in_fresh_process(mode: str, model: str, reference: str, cache: str, opts) -> tuple[float, dict]:
    command = [sys.executable, __file__, "--one", mode, "--model", model, "--reference", reference, "--cache", cache,
               "--pairs", str(opts.pairs), "--batch_size", str(opts.batch_size)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {mode} evaluation failed:\n{result.stderr[-3000:]}")
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return answer["seconds"], answer["summary"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="live and second evaluations, alternating")
    parser.add_argument("--output_json")
    parser.add_argument("--one", choices=("live", "first", "second"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    rows = load_preference_dataset("arithmetic", split="test").select(range(opts.pairs))
    if opts.one:  # one evaluation, in this fresh process
        seconds, summary = timed_evaluation(opts.model, opts.reference, rows, stored=opts.one != "live", cache=opts.cache,
                                            batch_size=opts.batch_size)  # fmt: skip
        print(json.dumps({"seconds": seconds, "summary": summary}))
        return
    reference = resolve_model_path(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        first, second = noisy_copy(reference, f"{tmp}/a", 1e-3), noisy_copy(reference, f"{tmp}/b", 2e-3)
        cache = f"{tmp}/cache"
        runs, summaries = {"first": [], "live": [], "second": []}, {}
        schedule = [("first", first)] + [(mode, second) for _ in range(opts.repeats) for mode in ("live", "second")]
        for mode, model in schedule:
            seconds, summaries[mode] = evaluate_in_fresh_process(mode, model, reference, cache, opts)
            runs[mode].append(seconds)
            print(f"  {mode:<8}{seconds:8.1f} s", file=sys.stderr, flush=True)
    figures = {mode: statistics.median(times) for mode, times in runs.items()}
    print(f"{opts.pairs} held-out pairs, batches of {opts.batch_size}, {torch.get_num_threads()} threads, each evaluation in a fresh process")
    for name, seconds in figures.items():
        print(f"  {name:<8}{seconds:8.1f} s   (median of {', '.join(f'{t:.1f}' for t in runs[name])})")
    print(f"second model now vs live: {figures['live'] / figures['second']:.2f}x faster (medians)")
    print(f"same results: live {summaries['live']}, now {summaries['second']}")
    if opts.output_json:
        Path(opts.output_json).write_text(json.dumps(
            {"pairs": opts.pairs, "fresh_process_each": True, "seconds": figures, "runs": runs,
             "live": summaries["live"], "stored": summaries["second"]},
            indent=2,
        ))  # fmt: skip


if __name__ == "__main__":
    main()
