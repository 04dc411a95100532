"""A launch that would silently run another engine, or fewer processes, than asked for stops at start-up."""

from __future__ import annotations

import sys

import pytest
from accelerate.utils import DistributedType

from selective_po import engines
from test_engines import accelerate, environment


class Seen:
    def __init__(self, distributed_type, processes):
        self.distributed_type, self.num_processes = distributed_type, processes


def test_fsdp_that_accelerate_turned_into_ddp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP was asked for .* accelerate runs MULTI_CPU: accelerate 1.15 enables FSDP only"):
        engines.check_engine(Seen(DistributedType.MULTI_CPU, 2))
    engines.check_engine(Seen(DistributedType.FSDP, 2))  # what was asked for: fine


@pytest.mark.parametrize(
    "launcher, expected",
    [
        (["python", "/v/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "selective_po", "train"], 2),
        ([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4", "train.py"], 4),
        (["python", "/v/bin/accelerate", "launch", "train.py"], None),  # no number asked for, no config file
        (["python", "train.py"], None),
    ],
)
def test_the_process_count_asked_of_accelerate_launch_is_read(monkeypatch, tmp_path, launcher, expected):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(engines, "_parent_command_line", lambda: launcher)
    monkeypatch.setattr("accelerate.commands.config.config_args.default_config_file", str(tmp_path / "none.yaml"))
    requested = engines.requested_processes()
    assert (requested[0] if requested else None) == expected
    if expected:
        with pytest.raises(ValueError, match=f"asked for {expected} processes .* started this one alone"):
            engines.check_engine(Seen(DistributedType.NO, 1))


def test_a_multi_cpu_config_that_starts_one_process_per_launch_is_refused(tmp_path, tiny_model_dir):
    """The layout of two machines written with `distributed_type: MULTI_CPU`: accelerate starts one process that
    would train alone. It stops, saying so and how to launch instead."""
    config = tmp_path / "multi_cpu.yaml"
    config.write_text(
        "distributed_type: MULTI_CPU\nnum_machines: 2\nnum_processes: 2\nmachine_rank: 0\n"
        "main_process_ip: 127.0.0.1\nmain_process_port: 29511\nuse_cpu: true\n"
    )
    result = accelerate(
        "--config_file", str(config), "-m", "selective_po", "train", "--model_name_or_path", tiny_model_dir,
        "--max_steps", "1", "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true",
        env=environment(), timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"asked for 2 processes (num_processes: 2 in {config})" in result.stderr and "--multi_gpu" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()

