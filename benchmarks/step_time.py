"""Step time and peak memory of every training path, against TRL's DPOTrainer, in one process.

    python benchmarks/step_time.py                                  # bundled model and data, 4 pairs per step
    python benchmarks/step_time.py --shape chat --output_json out.json
    python benchmarks/step_time.py --methods sigmoid,sdpo-shared --profile sdpo-shared
    python benchmarks/step_time.py --model FOLDER --random_init --config_overrides num_hidden_layers=24,hidden_size=2048

Rows (`--methods` picks some):

| row | what it runs |
| --- | --- |
| `sigmoid` | TRL's own `DPOTrainer`, live reference (the baseline every ratio is against) |
| `full-logits-dpo` | DPO computed as the official Selective-DPO code and TRL before its fused head do: full logits at every position, then log-softmax and gather, for the policy and a live reference |
| `sdpo` | Selective-DPO, live reference, each pair as two rows |
| `sdpo-shared` | Selective-DPO, live reference, each pair as one row with its prompt once (`share_prompt`) |
| `sdpo-stored` | Selective-DPO reading per-token reference log-probs stored beforehand, two rows |
| `sdpo-stored-shared` | the same, prompt once |
| `sepo-stored` | SePO from stored oracle rewards, prompt once, LM head on the selected tokens only |

All trainers are built in one process on the same model and rows, and their steps alternate
(one step of each row in turn), so drift in machine load hits all alike. A step is what `Trainer`
does per optimizer step: forward and backward through `training_step`, then the optimizer step.
`--shape chat` makes the responses about 3x longer (the prompt about 20% of each row instead of
about 43%), as in chat preference data; `--shape long` makes rows of about 900 tokens, the prompt
about 30% of each, for GPUs, where short rows leave the step bound by kernel launches.

`--random_init` builds the model from the folder's `config.json` (with `--config_overrides`) and random
weights, and takes the tokenizer from the same folder: a step's time depends on the architecture and
the shapes, not on the weights' values (each row keeps a fixed share of tokens), so a larger
architecture can be timed on a machine that has only its config and tokenizer.

Peak memory: on CUDA, each row's own resident tensors (policy, reference, optimizer state) plus
the most its step allocates above what was resident when the step began (`max_memory_allocated`). On a CPU there is no
per-allocation counter and one process's resident set mixes all rows, so each row also runs alone
in a fresh subprocess (3 steps) and its peak resident set (`VmHWM`) is reported.

`--profile ROW` prints a `torch.profiler` table of the top operators over 3 steps of that row.
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
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer, load_preference_dataset
from selective_po.models import DEFAULT_MODEL, resolve_model_path
from selective_po.packing import prompt_token_share

METHODS = ("sigmoid", "full-logits-dpo", "sdpo", "sdpo-shared", "sdpo-stored", "sdpo-stored-shared", "sepo-stored")


class FullLogitsDPOTrainer(DPOTrainer):
    """DPO as the official Selective-DPO code (a TRL 0.20 fork) computes it: full `(B, T, V)` logits for every
    position of policy and reference, log-softmax, gather, masked sums, sigmoid loss."""

    def _compute_loss(self, model, inputs, return_outputs):
        mask = inputs["completion_mask"][:, 1:].bool()
        targets = inputs["input_ids"][:, 1:].unsqueeze(-1)

        def sequence_logps(m):
            logits = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
            return (logits[:, :-1].float().log_softmax(-1).gather(-1, targets).squeeze(-1) * mask).sum(-1)

        policy = sequence_logps(model)
        with torch.no_grad():
            reference = sequence_logps(self.ref_model)
        chosen, rejected = (policy - reference).chunk(2)
        return -F.logsigmoid(self.beta * (chosen - rejected)).mean()


def build_trainer(method: str, model, tokenizer, dataset, opts, output_dir: str, oracle_dirs: dict):
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=opts.batch_size, max_length=opts.max_length,
        learning_rate=1e-6, report_to="none", save_strategy="no", bf16=torch.cuda.is_available(), seed=opts.seed,
    )  # fmt: skip
    if method in ("sigmoid", "full-logits-dpo"):
        trainer_class = DPOTrainer if method == "sigmoid" else FullLogitsDPOTrainer
        return trainer_class(model=model, args=DPOConfig(loss_type="sigmoid", **common), train_dataset=dataset, processing_class=tokenizer)
    selective = dict(plot_curves=False, ref_logps_cache_dir=f"{output_dir}/cache", share_prompt="shared" in method)
    if method == "sepo-stored":
        args = SePOConfig(
            oracle_model_name_or_path=oracle_dirs["oracle"], oracle_ref_model_name_or_path=oracle_dirs["oracle_ref"],
            share_prompt=True, plot_curves=False, ref_logps_cache_dir=f"{output_dir}/cache", **common,
        )  # fmt: skip
        return SePOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    stored = {"precompute_ref_log_probs": True} if "stored" in method else {}
    args = SelectiveDPOConfig(loss_type="sdpo", sdpo_threshold=opts.threshold, **selective, **stored, **common)
    return SelectiveDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


# shape -> (times each prompt message is repeated, times each response message is repeated)
SHAPES = {"arithmetic": (1, 1), "chat": (1, 3), "long": (20, 12)}


def reshape(dataset, shape: str):
    """Longer rows by repeating each message's text: `chat` makes responses 3x as long (prompt about 20% of
    a row, as in chat preference data); `long` makes rows of about 900 tokens with the prompt about 30%."""
    prompt_times, response_times = SHAPES[shape]
    if (prompt_times, response_times) == (1, 1):
        return dataset

    def repeat(messages, times):
        return [{**m, "content": " ".join([m["content"]] * times)} for m in messages]

    def lengthen(row):
        return {"prompt": repeat(row["prompt"], prompt_times), **{side: repeat(row[side], response_times) for side in ("chosen", "rejected")}}

    return dataset.map(lengthen)


def parse_overrides(text: str | None) -> dict:
    """`key=value,key=value` -> config fields, values read as int, float or bool where they parse."""
    overrides = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--config_overrides: {item!r} is not key=value")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        overrides[key.strip()] = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    return overrides


def load(opts, tmpdir: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(opts.model)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if opts.random_init:
        config = AutoConfig.from_pretrained(path)
        for key, value in parse_overrides(opts.config_overrides).items():
            if not hasattr(config, key):
                raise SystemExit(f"--config_overrides: {type(config).__name__} has no field {key!r}")
            setattr(config, key, value)
        # Saved as a checkpoint, because TRL loads a live reference from the policy's path.
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(f"{tmpdir}/random_init")
        AutoTokenizer.from_pretrained(path).save_pretrained(f"{tmpdir}/random_init")
        path = f"{tmpdir}/random_init"
    elif opts.config_overrides:
        raise SystemExit("--config_overrides needs --random_init (a trained checkpoint's shapes are fixed)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    needed = (opts.warmup + opts.steps) * opts.batch_size
    data = load_preference_dataset(opts.dataset, split="train")
    data = data.select(range(min(needed, len(data))))
    return model, tokenizer, reshape(data, opts.shape)


def oracles(model, tokenizer, tmpdir: str) -> dict:
    """A SePO oracle pair: the model and a copy with a little noise, so rewards differ and 30% are really selected."""
    paths = {"oracle_ref": f"{tmpdir}/oracle_ref", "oracle": f"{tmpdir}/oracle"}
    model.save_pretrained(paths["oracle_ref"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in noisy.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 1e-3)
    noisy.save_pretrained(paths["oracle"])
    return paths


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


def build_all(opts, methods, tmpdir):
    model, tokenizer, data = load(opts, tmpdir)
    oracle_dirs = oracles(model, tokenizer, tmpdir) if "sepo-stored" in methods else {}
    trainers = {m: build_trainer(m, copy.deepcopy(model), tokenizer, data, opts, f"{tmpdir}/{m}", oracle_dirs) for m in methods}
    optimizers = {}
    for trainer in trainers.values():
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is bypassed here
    for method, trainer in trainers.items():
        optimizers[method] = trainer.create_optimizer()
    return trainers, optimizers


def resident_bytes(trainer, optimizer) -> int:
    """Bytes a row keeps on the GPU between steps: its policy, its reference (if any) and its optimizer state."""
    reference = getattr(trainer, "ref_model", None)
    tensors = list(trainer.model.parameters()) + (list(reference.parameters()) if reference is not None else [])
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def run(opts, methods, tmpdir):
    trainers, optimizers = build_all(opts, methods, tmpdir)
    batches = {m: fixed_batches(trainers[m], opts) for m in methods}
    first = batches[methods[0]]
    tokens = [int(b["attention_mask"].sum()) for b in first]
    share = statistics.mean(prompt_token_share(b) for b in first)
    times = {m: [] for m in methods}
    peaks = {m: 0 for m in methods}
    for i in range(len(tokens)):
        for method in methods:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            elapsed = timed_step(trainers[method], optimizers[method], batches[method][i])
            if torch.cuda.is_available():
                own = resident_bytes(trainers[method], optimizers[method])
                peaks[method] = max(peaks[method], own + torch.cuda.max_memory_allocated() - before)
            if i >= opts.warmup:
                times[method].append(elapsed)
            print(f"step {i:>3} {method:>18}: {elapsed:6.2f} s  ({tokens[i]} tokens)", file=sys.stderr, flush=True)
    parameters = sum(p.numel() for p in trainers[methods[0]].model.parameters())
    return times, peaks, tokens, share, parameters


def profile(opts, method, tmpdir) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainers, optimizers = build_all(opts, (method,), tmpdir)
    batches = fixed_batches(trainers[method], opts)
    timed_step(trainers[method], optimizers[method], batches[0])  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for batch in batches[1:4]:
            timed_step(trainers[method], optimizers[method], batch)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\nTop operators over 3 steps of {method} (by self time):")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def peak_rss_kib() -> int:
    """This process's peak resident set size, in KiB (`VmHWM`: its own address space, not a parent's)."""
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
    command += ["--model", opts.model, "--dataset", opts.dataset, "--batch_size", str(opts.batch_size), "--shape", opts.shape]
    command += ["--max_length", str(opts.max_length), "--threshold", str(opts.threshold)]
    if opts.random_init:
        command += ["--random_init", "--config_overrides", opts.config_overrides or ""]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"memory run of {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default="arithmetic")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="arithmetic", help="`chat`: 3x longer responses; `long`: ~900-token rows")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows; sigmoid is always run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random_init", action="store_true", help="random weights from the model folder's config (timing only)")
    parser.add_argument("--config_overrides", help="with --random_init: config fields to change, e.g. num_hidden_layers=24,hidden_size=2048")
    parser.add_argument("--profile", help="also print a torch.profiler table of this row")
    parser.add_argument("--output_json", help="write the figures here")
    parser.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.manual_seed(opts.seed)
    methods = tuple(dict.fromkeys(["sigmoid", *opts.methods.split(",")]))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(METHODS)}")

    with tempfile.TemporaryDirectory() as tmpdir:
        if opts.only:  # child process of the CPU memory measurement
            run(opts, (opts.only,), tmpdir)
            print(json.dumps({"peak_rss_gib": peak_rss_kib() / 2**20}))
            return
        times, peaks, tokens, share, parameters = run(opts, methods, tmpdir)
        if opts.profile:
            profile(opts, opts.profile, tmpdir)

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        memory_label = "peak allocated (GiB)"
    else:
        peaks = {m: peak_rss_alone(m, opts) * 2**30 for m in methods}
        memory_label = "peak RSS alone (GiB)"
    median = {m: statistics.median(times[m]) for m in methods}
    weights = f"random weights, {parameters / 1e6:.0f}M parameters" if opts.random_init else f"{parameters / 1e6:.0f}M parameters"
    print(f"\n{opts.model} ({weights}) on {device}; shape {opts.shape}: {opts.batch_size} pairs/step, median {statistics.median(tokens)} "
          f"tokens/step, prompt {share:.0%} of each row's tokens; {opts.steps} timed steps per row after {opts.warmup} "
          "warm-up, alternating")  # fmt: skip
    print(f"{'row':<20}{'median step (s)':>16}{'min':>8}{'max':>8}{memory_label:>23}   vs sigmoid")
    for m in methods:
        ratio = f"{median[m] / median['sigmoid']:.3f}x time, {(peaks[m] - peaks['sigmoid']) / 2**30:+.3f} GiB"
        print(f"{m:<20}{median[m]:>16.3f}{min(times[m]):>8.3f}{max(times[m]):>8.3f}{peaks[m] / 2**30:>23.3f}   {ratio}")
    if opts.output_json:
        result = {
            "device": device, "torch": torch.__version__, "model": opts.model, "shape": opts.shape,
            "weights": "random init (timing only)" if opts.random_init else "pretrained",
            "config_overrides": parse_overrides(opts.config_overrides),
            "parameters": parameters,
            "pairs_per_step": opts.batch_size, "median_tokens_per_step": statistics.median(tokens), "prompt_share": share,
            "timed_steps": opts.steps, "warmup_steps": opts.warmup, "memory": memory_label,
            "methods": {m: {"median_step_s": median[m], "min_step_s": min(times[m]), "max_step_s": max(times[m]),
                            "ratio_vs_sigmoid": median[m] / median["sigmoid"], "peak_memory_gib": peaks[m] / 2**30}
                        for m in methods},
        }  # fmt: skip
        Path(opts.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output_json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
