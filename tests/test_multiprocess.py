"""Two CPU processes give the losses and weights of one process with the same global batch.

`accelerate launch --cpu` starts a single process whatever `--num_processes` says (accelerate 1.15
sends `--cpu` to its simple launcher, which runs several processes only through `mpirun` with
`--mpirun_hostfile`). `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs
starts two processes through torchrun, and accelerate then picks its CPU backend (gloo); that is the
form tested here. Only score-based selection is compared: the `random` control draws per process.
Plain SGD keeps the weight comparison tight: Adam divides by the gradient's own size, which turns
float noise in near-zero gradients into visible weight differences.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_model, preference_dataset
from selective_po.cli import main

STEPS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("multiprocess")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_dataset().to_list()))
    oracles = {}
    for name, seed in (("oracle", 7), ("oracle_ref", 8)):
        oracles[name] = str(root / name)
        build_model(tiny_tokenizer, seed=seed).save_pretrained(oracles[name])
        tiny_tokenizer.save_pretrained(oracles[name])
    return root, str(data), oracles


@pytest.mark.parametrize("method", ["sdpo", "sepo"])
def test_two_processes_equal_one_with_the_same_global_batch(setup, tiny_model_dir, method):
    root, data, oracles = setup
    flags = [
        "--model_name_or_path", tiny_model_dir, "--dataset_name", data, "--max_steps", str(STEPS),
        "--optim", "sgd", "--learning_rate", "0.5", "--max_length", "64", "--logging_steps", "1", "--save_steps", str(STEPS),
        "--report_to", "none", "--plot_curves", "false", "--disable_dropout", "true", "--seed", "0",
        "--use_cpu", "true",
    ]  # fmt: skip
    if method == "sepo":
        flags += ["--loss_type", "sepo", "--oracle_model_name_or_path", oracles["oracle"],
                  "--oracle_ref_model_name_or_path", oracles["oracle_ref"]]  # fmt: skip
    one, two = root / f"{method}-1proc", root / f"{method}-2proc"

    assert main(["train", *flags, "--per_device_train_batch_size", "4", "--output_dir", str(one),
                 "--ref_logps_cache_dir", str(one / "cache")]) == 0  # fmt: skip
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "selective_po", "train", *flags, "--per_device_train_batch_size", "2", "--output_dir", str(two),
        "--ref_logps_cache_dir", str(two / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    state = json.loads((two / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 2 and state["log_history"][0]["epoch"] == 0.5  # 2 x 2 of 8 pairs per step
    losses_one, losses_two = logged_losses(one), logged_losses(two)
    assert len(losses_one) == len(losses_two) == STEPS
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(weights_one[k], start[k]) for k in start)  # training moved the weights
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6, msg=name)
    print(
        f"{method}: losses {losses_one}; max |2 proc - 1 proc| loss "
        f"{max(abs(a - b) for a, b in zip(losses_one, losses_two)):.3g}, weights "
        f"{max((weights_two[k] - weights_one[k]).abs().max().item() for k in weights_one):.3g}"
    )
