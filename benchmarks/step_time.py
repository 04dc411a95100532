"""Step time and peak memory: TRL's DPOTrainer (`sigmoid`) against SelectiveDPOTrainer (`sdpo`).

    python benchmarks/step_time.py                      # bundled model and data, 4 pairs per step
    python benchmarks/step_time.py --steps 20 --batch_size 8

Both trainers are built in one process on the same model, reference and data, and their steps
alternate (sigmoid, sdpo, sigmoid, ...) on the same batches, so drift in machine load hits both
alike. A step is what `Trainer` does per optimizer step: forward and backward through
`training_step`, then the optimizer step.

Peak memory: on CUDA, `max_memory_allocated` around each method's steps in this process. On a CPU
there is no per-allocation counter, and one process's resident set mixes both methods, so each
method also runs alone in a fresh subprocess and its peak resident set size (`ru_maxrss`) is
reported: model, reference, optimizer state and activations together.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from trl import DPOConfig, DPOTrainer

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.models import DEFAULT_MODEL, resolve_model_path

METHODS = ("sigmoid", "sdpo")


def build_trainer(method: str, model, tokenizer, dataset, opts, output_dir: str):
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch_size,
        max_length=opts.max_length,
        learning_rate=1e-6,
        report_to="none",
        save_strategy="no",
        bf16=torch.cuda.is_available(),
        seed=opts.seed,
    )
    if method == "sigmoid":
        return DPOTrainer(model=model, args=DPOConfig(loss_type="sigmoid", **common), train_dataset=dataset, processing_class=tokenizer)
    args = SelectiveDPOConfig(loss_type="sdpo", sdpo_threshold=opts.threshold, **common)
    return SelectiveDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def load(opts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(opts.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    needed = (opts.warmup + opts.steps) * opts.batch_size
    data = load_preference_dataset(opts.dataset, split="train")
    return model, tokenizer, data.select(range(min(needed, len(data))))


def fixed_batches(trainer, opts):
    """The same collated batches for every method, in order."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    chunks = [rows[i : i + opts.batch_size] for i in range(0, len(rows), opts.batch_size)]
    return [trainer.data_collator(chunk) for chunk in chunks if len(chunk) == opts.batch_size]


def timed_step(trainer, optimizer, batch) -> float:
    device = trainer.accelerator.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(opts, methods, tmpdir):
    model, tokenizer, data = load(opts)
    trainers = {m: build_trainer(m, copy.deepcopy(model), tokenizer, data, opts, f"{tmpdir}/{m}") for m in methods}
    del model
    optimizers = {}
    for method, trainer in trainers.items():
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is bypassed here
        optimizers[method] = trainer.create_optimizer()
    batches = fixed_batches(trainers[methods[0]], opts)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    times = {m: [] for m in methods}
    peaks = {m: 0 for m in methods}
    for i, batch in enumerate(batches):
        for method in methods:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            elapsed = timed_step(trainers[method], optimizers[method], batch)
            if torch.cuda.is_available():
                peaks[method] = max(peaks[method], torch.cuda.max_memory_allocated())
            if i >= opts.warmup:
                times[method].append(elapsed)
            print(f"step {i:>3} {method:>8}: {elapsed:6.2f} s  ({tokens[i]} tokens)", file=sys.stderr, flush=True)
    return times, peaks, tokens


def peak_rss_alone(method: str, opts) -> float:
    """Peak resident set size (GiB) of a fresh process that runs only `method`."""
    command = [sys.executable, __file__, "--only", method, "--steps", str(min(opts.steps, 3)), "--warmup", "1"]
    command += ["--model", opts.model, "--dataset", opts.dataset, "--batch_size", str(opts.batch_size)]
    command += ["--max_length", str(opts.max_length), "--threshold", str(opts.threshold)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"memory run of {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default="arithmetic")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.manual_seed(opts.seed)

    import tempfile

    with tempfile.TemporaryDirectory() as tmpdir:
        if opts.only:  # child process of the CPU memory measurement
            run(opts, (opts.only,), tmpdir)
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            print(json.dumps({"peak_rss_gib": peak_kib / 2**20}))
            return
        times, peaks, tokens = run(opts, METHODS, tmpdir)

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        peaks = {m: peak_rss_alone(m, opts) * 2**30 for m in METHODS}
        memory_label = "peak RSS alone (GiB)"
    else:
        memory_label = "peak allocated (GiB)"
    median = {m: statistics.median(times[m]) for m in METHODS}
    print(f"\n{opts.model} on {device}; {opts.batch_size} pairs/step, median {statistics.median(tokens)} tokens/step; "
          f"{opts.steps} timed steps per method after {opts.warmup} warm-up, alternating")
    print(f"{'method':<10}{'median step (s)':>17}{'min':>8}{'max':>8}{memory_label:>24}")
    for m in METHODS:
        print(f"{m:<10}{median[m]:>17.3f}{min(times[m]):>8.3f}{max(times[m]):>8.3f}{peaks[m] / 2**30:>24.3f}")
    print(f"sdpo / sigmoid: step time {median['sdpo'] / median['sigmoid']:.3f}x, "
          f"memory {peaks['sdpo'] / peaks['sigmoid']:.3f}x")


if __name__ == "__main__":
    main()
