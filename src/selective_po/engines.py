"""The distributed engine a run really got, checked when the trainer starts.

accelerate 1.15 can run another engine than the one asked for without saying so:

- FSDP asked for on CPU processes (`ACCELERATE_USE_FSDP=true`, `use_cpu`): accelerate enables FSDP
  only for GPU process groups and runs DDP instead;
- several processes asked for, but started one at a time: with `distributed_type: MULTI_CPU` (or
  `--cpu`), `accelerate launch` starts a single process per launch unless it goes through torchrun
  (`--multi_gpu`), and each one then trains alone on the whole batch.

Either way the run would finish with results of another setup. `check_engine` stops it at start-up
with the fix instead. `end_process_group` ends a launched process without the abort a normal exit risks.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from accelerate.utils import DistributedType

LAUNCH_FIX = (
    "On machines without GPUs accelerate starts several processes only through torchrun: add --multi_gpu to "
    "`accelerate launch` (it picks the CPU backend, gloo, when there is no GPU), as in examples/accelerate/ddp.yaml and "
    "two_machines.yaml."
)


def check_engine(accelerator) -> None:
    """Raise if the engine or the number of processes is not what the launch asked for."""
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"FSDP was asked for (ACCELERATE_USE_FSDP=true) but accelerate runs {accelerator.distributed_type.value}: "
            "accelerate 1.15 enables FSDP only for GPU processes and otherwise falls back to DDP without saying so. "
            "On CPU processes use DeepSpeed (examples/accelerate/zero2.yaml or zero3.yaml) or DDP "
            "(examples/accelerate/ddp.yaml); on GPUs, leave use_cpu unset."
        )
    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if wants_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true) but accelerate runs "
            f"{accelerator.distributed_type.value}. Check that deepspeed is installed (`pip install deepspeed`)."
        )
    requested = requested_processes()
    if requested is not None and requested[0] > 1 and accelerator.num_processes == 1:
        count, source = requested
        raise ValueError(
            f"`accelerate launch` was asked for {count} processes ({source}) but started this one alone (world size 1), "
            f"so it would train on its own as if no other process existed. {LAUNCH_FIX}"
        )


def end_process_group() -> None:
    """Wait for every process, destroy the process group and end this process (exit status 0) without
    interpreter finalization, after running the `atexit` hooks and flushing output. Without a process group,
    return.

    A normal exit can abort with "terminate called without an active exception" (SIGABRT): once a model was
    wrapped in DDP, torch 2.13 keeps the gloo group and its worker threads alive after `destroy_process_group()`.
    A worker that drops a finished collective's last tensors takes the GIL to free their Python objects; if
    that happens during `Py_Finalize`, CPython ends the thread with `pthread_exit`, whose unwinding through
    torch's noexcept tensor release calls `std::terminate`. Whether it does depends on how late the worker
    gets the CPU; `os._exit` leaves no finalization for it to run into.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def requested_processes() -> tuple[int, str] | None:
    """`(processes, where that number comes from)` asked of the `accelerate launch` that started this
    process without torchrun, read from its command line and config file; `None` when not so launched."""
    if os.environ.get("WORLD_SIZE") is not None:  # started by torchrun or another launcher that sets the world
        return None
    argv = _parent_command_line()
    if argv is None:
        return None
    # `.../bin/accelerate launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i + 2 for i in range(len(argv) - 1) if (Path(argv[i]).name, argv[i + 1]) in
              (("accelerate", "launch"), ("-m", "accelerate.commands.launch"))]  # fmt: skip
    if not starts:
        return None
    index = starts[0] - 2
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    args, _ = launch_command_parser().parse_known_args(argv[index + 2 :])
    if args.num_processes is not None:
        return args.num_processes, f"--num_processes {args.num_processes}"
    config_file = args.config_file or (default_config_file if Path(default_config_file).is_file() else None)
    if config_file is None:
        return None
    config = load_config_from_file(config_file)
    processes = getattr(config, "num_processes", None)
    return (processes, f"num_processes: {processes} in {config_file}") if processes else None


def _parent_command_line() -> list[str] | None:
    """The parent process's argv (Linux `/proc`); `None` where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    return argv or None


def inference_model(trainer):
    """The policy, ready for no-grad forwards (held-out evaluation) under the run's engine.

    After training has prepared it, the engine's model. Before that: under DeepSpeed an inference
    engine over the policy (ZeRO-3 loaded its weights sharded), under FSDP the policy sharded in
    place, otherwise the policy itself.
    """
    from torch.distributed.tensor import DTensor
    from trl.models.utils import prepare_fsdp

    if trainer.is_deepspeed_enabled:
        return trainer.model_wrapped if trainer.deepspeed is not None else precompute_engine(trainer)
    if trainer.is_fsdp_enabled and not any(isinstance(p, DTensor) for p in trainer.model.parameters()):
        trainer.model = prepare_fsdp(trainer.model, trainer.accelerator)
    return trainer.model


def precompute_engine(trainer):
    """TRL's DeepSpeed inference engine over the policy, built once and reused (as TRL's own precompute does)."""
    from trl.models.utils import prepare_deepspeed

    if trainer._precompute_engine is None:
        trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
    return trainer._precompute_engine
