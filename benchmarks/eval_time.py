"""Held-out scoring time: a second model evaluated against the same reference, then and now.

    python benchmarks/eval_time.py            # 64 held-out arithmetic pairs, bundled model as reference

`selective-po eval` scores held-out pairs with the policy and the reference. It used to run both on
every call (two rows per pair, the reference live). It now stores the reference's per-token values
once (keyed like the training cache) and runs each pair as one row with its prompt once. This times,
in one process on the same pairs:

1. `live`: policy and reference forwards, two rows per pair, as `eval` did before;
2. `first`: the first model against a new reference: scoring and storing the reference, then the policy;
3. `second`: another model against the same reference: the policy alone, the reference read back.

Every call builds its trainer as `selective-po eval` does and times `evaluate_preferences` plus the
trainer's construction (where the reference is scored). The "second model" is the bundled model with
a little noise on its weights: what is timed does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output_json")
    opts = parser.parse_args()
    reference = resolve_model_path(DEFAULT_MODEL)
    rows = load_preference_dataset("arithmetic", split="test").select(range(opts.pairs))
    with tempfile.TemporaryDirectory() as tmp:
        first, second = noisy_copy(reference, f"{tmp}/a", 1e-3), noisy_copy(reference, f"{tmp}/b", 2e-3)
        cache = f"{tmp}/cache"
        figures = {}
        figures["live"], live = timed_evaluation(second, reference, rows, stored=False, cache=cache, batch_size=opts.batch_size)
        figures["first"], _ = timed_evaluation(first, reference, rows, stored=True, cache=cache, batch_size=opts.batch_size)
        figures["second"], now = timed_evaluation(second, reference, rows, stored=True, cache=cache, batch_size=opts.batch_size)
    print(f"{opts.pairs} held-out pairs, batches of {opts.batch_size}, {torch.get_num_threads()} threads")
    for name, seconds in figures.items():
        print(f"  {name:<8}{seconds:8.1f} s")
    print(f"second model now vs live: {figures['live'] / figures['second']:.2f}x faster")
    print(f"same results: live {live}, now {now}")
    if opts.output_json:
        Path(opts.output_json).write_text(json.dumps({"pairs": opts.pairs, "seconds": figures, "live": live, "stored": now}, indent=2))


if __name__ == "__main__":
    main()
