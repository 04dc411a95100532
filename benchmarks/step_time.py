"""Step time and peak memory: TRL's DPOTrainer against SelectiveDPOTrainer, live and stored reference.

    python benchmarks/step_time.py                      # bundled model and data, 4 pairs per step
    python benchmarks/step_time.py --steps 20 --batch_size 8

Methods: `sigmoid` (TRL's DPO, live reference), `sdpo` (Selective-DPO, live reference) and
`sdpo-stored` (Selective-DPO reading per-token reference log-probs scored once beforehand, with no
reference model in memory). All trainers are built in one process on the same model and data, and
their steps alternate (sigmoid, sdpo, sdpo-stored, sigmoid, ...) on the same rows, so drift in
machine load hits all alike. A step is what `Trainer` does per optimizer step: forward and backward through
`training_step`, then the optimizer step.

Peak memory: on CUDA, `max_memory_allocated` around each method's steps in this process. On a CPU
there is no per-allocation counter, and one process's resident set mixes all methods, so each
method also runs alone in a fresh subprocess (3 steps) and its peak resident set size (`VmHWM`) is
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
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.models import DEFAULT_MODEL, resolve_model_path

METHODS = ("sigmoid", "sdpo", "sdpo-stored")


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
    stored = dict(precompute_ref_log_probs=True, ref_logps_cache_dir=f"{output_dir}/cache") if method == "sdpo-stored" else {}
    args = SelectiveDPOConfig(loss_type="sdpo", sdpo_threshold=opts.threshold, **stored, **common)
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
    """Collated batches of the trainer's rows, in order (the same rows for every method)."""
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
    batches = {m: fixed_batches(trainers[m], opts) for m in methods}
    tokens = [int(b["attention_mask"].sum()) for b in batches[methods[0]]]
    times = {m: [] for m in methods}
    peaks = {m: 0 for m in methods}
    for i in range(len(tokens)):
        for method in methods:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            elapsed = timed_step(trainers[method], optimizers[method], batches[method][i])
            if torch.cuda.is_available():
                peaks[method] = max(peaks[method], torch.cuda.max_memory_allocated())
            if i >= opts.warmup:
                times[method].append(elapsed)
            print(f"step {i:>3} {method:>12}: {elapsed:6.2f} s  ({tokens[i]} tokens)", file=sys.stderr, flush=True)
    return times, peaks, tokens


@torch.no_grad()
def scoring_throughput(opts, tmpdir) -> tuple[float, float, int]:
    """(scoring tokens/s, forward-only tokens/s, tokens) of the initial policy as reference, same rows."""
    from selective_po import reference_cache
    from selective_po.trainer import REFERENCE_SHARD_ROWS

    model, tokenizer, data = load(opts)
    trainer = build_trainer("sdpo", model, tokenizer, data, opts, f"{tmpdir}/scoring")
    trainer.model.eval()
    rows = trainer.train_dataset
    store = reference_cache.ReferenceLogpsStore(f"{tmpdir}/scoring-cache", {"benchmark": 1}, n_rows=len(rows), shard_size=REFERENCE_SHARD_ROWS)
    batch_size = opts.scoring_batch_size
    start = time.perf_counter()
    forward = lambda batch: trainer._score_reference_batch(trainer.model, batch)  # noqa: E731
    score_rows = reference_cache.collated_scorer(trainer.data_collator, forward)
    reference_cache.score_missing_shards(store, rows, score_rows=score_rows, batch_size=batch_size)
    scoring = time.perf_counter() - start

    batches = [trainer.data_collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))]) for i in range(0, len(rows), batch_size)]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    start = time.perf_counter()
    for batch in batches:
        batch = trainer._prepare_inputs(batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True, use_cache=False)
    forward = time.perf_counter() - start
    return n_tokens / scoring, n_tokens / forward, n_tokens


def peak_rss_kib() -> int:
    """This process's peak resident set size, in KiB.

    Linux keeps `ru_maxrss` across `exec`, so a child started from a large parent would report the
    parent's size; `VmHWM` belongs to the process's own address space and starts afresh.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_alone(method: str, opts) -> float:
    """Peak resident set size (GiB) of a fresh process that runs only `method`."""
    command = [sys.executable, __file__, "--only", method, "--steps", str(min(opts.steps, 3)), "--warmup", "1"]
    command += ["--model", opts.model, "--dataset", opts.dataset, "--batch_size", str(opts.batch_size)]
    command += ["--max_length", str(opts.max_length), "--threshold", str(opts.threshold)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if opts.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(opts.malloc_mmap_threshold)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
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
    parser.add_argument("--scoring_batch_size", type=int, default=8, help="pairs per forward when scoring")
    parser.add_argument(
        "--malloc_mmap_threshold", type=int, default=0,
        help="for the CPU memory runs only: fix glibc's mmap threshold (e.g. 65536) so freed blocks go back to the "
        "OS and the resident set follows live memory; 0 keeps glibc's defaults",
    )  # fmt: skip
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.manual_seed(opts.seed)

    import tempfile

    with tempfile.TemporaryDirectory() as tmpdir:
        if opts.only:  # child process of the CPU memory measurement
            run(opts, (opts.only,), tmpdir)
            print(json.dumps({"peak_rss_gib": peak_rss_kib() / 2**20}))
            return
        times, peaks, tokens = run(opts, METHODS, tmpdir)
        scoring_tps, forward_tps, scored_tokens = scoring_throughput(opts, tmpdir)

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        peaks = {m: peak_rss_alone(m, opts) * 2**30 for m in METHODS}
        memory_label = "peak RSS alone (GiB)"
        if opts.malloc_mmap_threshold:
            memory_label = f"peak RSS, mmap>={opts.malloc_mmap_threshold}"
    else:
        memory_label = "peak allocated (GiB)"
    median = {m: statistics.median(times[m]) for m in METHODS}
    print(f"\n{opts.model} on {device}; {opts.batch_size} pairs/step, median {statistics.median(tokens)} tokens/step; "
          f"{opts.steps} timed steps per method after {opts.warmup} warm-up, alternating")
    print(f"{'method':<14}{'median step (s)':>16}{'min':>8}{'max':>8}{memory_label:>23}   vs sigmoid")
    for m in METHODS:
        ratio = f"{median[m] / median['sigmoid']:.3f}x time, {(peaks[m] - peaks['sigmoid']) / 2**30:+.3f} GiB"
        print(f"{m:<14}{median[m]:>16.3f}{min(times[m]):>8.3f}{max(times[m]):>8.3f}{peaks[m] / 2**30:>23.3f}   {ratio}")
    weights = sum(p.numel() * p.element_size() for p in load(opts)[0].parameters())
    print(f"reference weights: {weights / 2**30:.3f} GiB")
    print(f"scoring ({scored_tokens} tokens, {opts.scoring_batch_size} pairs/forward): {scoring_tps:.0f} tokens/s; "
          f"forward only, same batches: {forward_tps:.0f} tokens/s ({scoring_tps / forward_tps:.2f}x)")


if __name__ == "__main__":
    main()
