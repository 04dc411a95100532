"""Step time of the official Selective-DPO code and of ours, in lock-step on one machine.

    python benchmarks/official_lockstep.py --official_python /path/to/official-venv/bin/python

The official implementation (github.com/Dongzhijin/SDPO) is a fork of TRL 0.20 that runs on
transformers 4.53; it cannot share a process with TRL 1.16. So two worker processes, one per
implementation, each build their trainers on the bundled model and the same rows, and take strict
turns of one optimizer step each (`training_step` plus the optimizer step): machine noise hits both
alike, and only one of them computes at any time. The official worker imports nothing of ours.

Rows: the official code's `sigmoid` and `sdpo` (live reference); ours: TRL 1.16's `sigmoid`, the
`full-logits-dpo` stand-in for the official code that `step_time.py` uses, and Selective-DPO with a
live reference, prompt shared (`sdpo-shared`) or not (`sdpo`).

An environment for the official code, beside this project's (`.venv`):

    python3 -m venv /tmp/official/venv
    /tmp/official/venv/bin/pip install "transformers==4.53.3" accelerate datasets torch==2.13.0
    git clone https://github.com/Dongzhijin/SDPO /tmp/official/SDPO
    /tmp/official/venv/bin/pip install --no-deps /tmp/official/SDPO/trl
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

OFFICIAL_ROWS = ("sigmoid", "sdpo")
OUR_ROWS = ("sigmoid", "full-logits-dpo", "sdpo", "sdpo-shared")


def serve(trainers: dict, batches: dict, step) -> None:
    """Answer `STEP <row> <i>` with `TIME <seconds> <tokens>` until `QUIT`."""
    print("READY", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "QUIT":
            return
        row, i = command[1], int(command[2])
        batch = batches[row][i]
        seconds = step(trainers[row], batch)
        print(f"TIME {seconds:.6f} {batch_tokens(batch)}", flush=True)


def batch_tokens(batch: dict) -> int:
    """Real tokens of a step's rows: TRL 1.16 collates `[prompt; response]` rows, TRL 0.20 the parts."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(2 * batch["prompt_attention_mask"].sum() + batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


def official_worker(opts) -> None:
    """The official code: its TRL 0.20 fork's `DPOTrainer` with `loss_type` `sigmoid` or `sdpo`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(opts.rows).read_text().splitlines()]
    # The converted model's tokenizer_config names transformers 5's `TokenizersBackend`, unknown to 4.53; the files
    # (tokenizer.json, chat template, special tokens) are the same fast tokenizer.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(opts.model_path)
    trainers, batches = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in OFFICIAL_ROWS:
            model = AutoModelForCausalLM.from_pretrained(opts.model_path, torch_dtype=torch.float32)
            args = DPOConfig(
                output_dir=f"{tmp}/{row}", loss_type=row, sdpo_threshold=opts.threshold, per_device_train_batch_size=opts.batch_size,
                max_length=opts.max_length, learning_rate=1e-6, report_to="none", save_strategy="no", bf16=False, seed=opts.seed,
            )  # fmt: skip
            trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1
            trainer.create_optimizer()
            tokenized = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
            batches[row] = [trainer.data_collator(tokenized[i : i + opts.batch_size]) for i in range(0, len(tokenized), opts.batch_size)]
            trainers[row] = trainer

        def step(trainer, batch):
            start = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        serve(trainers, batches, step)


def our_worker(opts) -> None:
    """Ours, built exactly as `step_time.py` builds its rows."""
    sys.path.insert(0, str(Path(__file__).parent))
    import step_time

    settings = argparse.Namespace(
        model=opts.model, dataset="arithmetic", shape="arithmetic", batch_size=opts.batch_size, max_length=opts.max_length,
        threshold=opts.threshold, seed=opts.seed, warmup=opts.warmup, steps=opts.steps,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainers, optimizers = step_time.build_all(settings, OUR_ROWS, tmp)
        batches = {row: step_time.fixed_batches(trainers[row], settings) for row in OUR_ROWS}

        def step(trainer, batch):
            row = next(r for r, t in trainers.items() if t is trainer)
            return step_time.timed_step(trainer, optimizers[row], batch)

        serve(trainers, batches, step)


class Worker:
    def __init__(self, name: str, python: str, argv: list[str], log: Path):
        self.name = name
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [python, __file__, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )  # fmt: skip
        self.expect("READY")

    def expect(self, word: str) -> list[str]:
        while True:  # libraries print to stdout too (DeepSpeed's accelerator notice): skip to the answer
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.name} worker stopped (see {self.log.name})")
            if line.startswith(word):
                return line.split()[1:]
            self.log.write(line)

    def step(self, row: str, i: int) -> tuple[float, int]:
        self.process.stdin.write(f"STEP {row} {i}\n")
        self.process.stdin.flush()
        seconds, tokens = self.expect("TIME")
        return float(seconds), int(tokens)

    def close(self) -> None:
        self.process.stdin.write("QUIT\n")
        self.process.stdin.close()
        self.process.wait()
        self.log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_python", help="the Python of an environment with the official code (see above)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logs", default=".", help="folder for the workers' stderr")
    parser.add_argument("--output_json")
    parser.add_argument("--worker", choices=("official", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker == "official":
        return official_worker(opts)
    if opts.worker == "ours":
        return our_worker(opts)
    if not opts.official_python:
        parser.error("--official_python is required: the interpreter of the official code's environment (see --help)")

    from selective_po import load_preference_dataset
    from selective_po.models import resolve_model_path

    needed = (opts.warmup + opts.steps) * opts.batch_size
    rows = load_preference_dataset("arithmetic", split="train").select(range(needed)).select_columns(["prompt", "chosen", "rejected"])
    logs = Path(opts.logs)
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        common = ["--model", opts.model, "--batch_size", str(opts.batch_size), "--max_length", str(opts.max_length),
                  "--threshold", str(opts.threshold), "--seed", str(opts.seed), "--steps", str(opts.steps), "--warmup", str(opts.warmup)]  # fmt: skip
        official = Worker("official", opts.official_python, ["--worker", "official", "--model_path", resolve_model_path(opts.model),
                                                              "--rows", str(rows_file), *common], logs / "official_worker.log")  # fmt: skip
        ours = Worker("ours", sys.executable, ["--worker", "ours", *common], logs / "our_worker.log")
        plan = [(official, row) for row in OFFICIAL_ROWS] + [(ours, row) for row in OUR_ROWS]
        times: dict[str, list[float]] = {}
        tokens: dict[str, list[int]] = {}
        for i in range(opts.warmup + opts.steps):
            for worker, row in plan:
                name = f"{worker.name}/{row}"
                seconds, n = worker.step(row, i)
                print(f"step {i:>3} {name:>20}: {seconds:6.2f} s  ({n} tokens)", flush=True)
                if i >= opts.warmup:
                    times.setdefault(name, []).append(seconds)
                    tokens.setdefault(name, []).append(n)
        official.close()
        ours.close()
    base = statistics.median(times["ours/sigmoid"])
    print(f"\n{opts.steps} timed steps per row after {opts.warmup} warm-up, one step of each row in turn")
    print(f"{'row':<22}{'median step (s)':>16}{'min':>8}{'max':>8}{'tokens/step':>13}   vs TRL 1.16 sigmoid")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<22}{median:>16.3f}{min(values):>8.3f}{max(values):>8.3f}{statistics.median(tokens[name]):>13.0f}   {median / base:.3f}x")
    if opts.output_json:
        result = {name: {"median_step_s": statistics.median(v), "min_step_s": min(v), "max_step_s": max(v),
                         "ratio_vs_trl_sigmoid": statistics.median(v) / base, "median_tokens": statistics.median(tokens[name])}
                  for name, v in times.items()}  # fmt: skip
        Path(opts.output_json).write_text(json.dumps({"steps": opts.steps, "warmup": opts.warmup, "rows": result}, indent=2))


if __name__ == "__main__":
    main()
