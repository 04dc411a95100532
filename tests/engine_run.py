"""Several training and scoring paths in one process group, for `tests/test_engines.py`.

Run as `python engine_run.py SETUP OUT` (one process) or under `accelerate launch` (any engine). It
builds each path's trainer on the tiny models in SETUP, trains with SGD on one global batch of 4
pairs per step, and rank 0 writes OUT/results.json: per path the logged losses and gradient norms,
the cache entries of stored values, the held-out evaluation, and what the engine really is (its
type and, for the sharding engines, the local size of one weight against its full size).

With `--fsdp-on-cpu`, accelerate's state treats the CPU process group as FSDP (accelerate 1.15 would
silently run DDP there); the sharded weights it reports prove FSDP really ran. `KILL_AFTER_SHARD=N`
kills process 1 with SIGKILL once it has written N shards; `NAN_ON_PROCESS=R` makes process R's
reference return a NaN; `ENGINE_PATHS=a,b` runs only those paths.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

GLOBAL_PAIRS = 4
STEPS = 3


def patch_accelerate_for_fsdp_on_cpu() -> None:
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            from accelerate.utils import FullyShardedDataParallelPlugin

            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()

    state.AcceleratorState.__init__ = init


def sharding(trainer) -> dict:
    """The engine and, for one weight, its local element count on this process against the full count."""
    import torch

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if n.endswith("q_proj.weight"))
    full = int(torch.Size(getattr(param, "ds_shape", None) or param.shape).numel())
    if hasattr(param, "ds_tensor"):  # DeepSpeed ZeRO-3
        local = int(param.ds_tensor.numel())
    elif hasattr(param, "to_local"):  # FSDP2 DTensor
        local = int(param.to_local().numel())
    else:
        local = int(param.numel())
    return {"distributed_type": str(trainer.accelerator.distributed_type.value), "wrapper": type(model).__name__,
            "param": name, "local_numel": local, "full_numel": full}  # fmt: skip


def main(setup: Path, out: Path) -> None:
    from datasets import Dataset

    from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer
    from selective_po import reference_cache
    from selective_po import references as trainer_module
    from selective_po.evaluation import evaluate_preferences

    trainer_module.REFERENCE_SHARD_ROWS = 3  # 8 rows in shards of 3, 3, 2: the processes get unequal work
    if os.environ.get("KILL_AFTER_SHARD"):
        original_write = reference_cache.ReferenceLogpsStore.write_shard
        written = []

        def write_then_maybe_die(self, shard, *args):
            original_write(self, shard, *args)
            written.append(shard.index)
            if int(os.environ.get("RANK", "0")) == 1 and len(written) == int(os.environ["KILL_AFTER_SHARD"]):
                os.kill(os.getpid(), signal.SIGKILL)

        reference_cache.ReferenceLogpsStore.write_shard = write_then_maybe_die

    if os.environ.get("NAN_ON_PROCESS") == os.environ.get("RANK", "0"):  # this process's reference gives a NaN
        from selective_po import reference_scoring

        original_logps = reference_scoring.forward_logps

        def with_a_nan(model, inputs, **kwargs):
            mask = inputs["completion_mask"][:, 1:].bool()
            return original_logps(model, inputs, **kwargs).masked_fill(mask.cumsum(-1) == 2, float("nan"))  # the second completion token

        reference_scoring.forward_logps = with_a_nan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = [json.loads(line) for line in (setup / "pairs.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    only = os.environ.get("ENGINE_PATHS", "").split(",") if os.environ.get("ENGINE_PATHS") else None
    common = dict(
        max_steps=STEPS, per_device_train_batch_size=GLOBAL_PAIRS // world, per_device_eval_batch_size=2, optim="sgd", optim_args="momentum=0.9",
        learning_rate=0.5, lr_scheduler_type="constant", max_length=64, logging_steps=1, report_to="none",
        save_strategy="no", plot_curves=False, disable_dropout=True, seed=0, use_cpu=True, precompute_ref_batch_size=2,
        ref_logps_cache_dir=str(out / "cache"),
    )  # fmt: skip
    stored = {"precompute_ref_log_probs": True}
    paths = {
        "sdpo-live": (SelectiveDPOTrainer, SelectiveDPOConfig, {}),
        "sdpo-stored-larger-ref": (SelectiveDPOTrainer, SelectiveDPOConfig,
                                   {"ref_model_name_or_path": str(setup / "larger_ref"), **stored}),
        "sdpo-stored-initial": (SelectiveDPOTrainer, SelectiveDPOConfig, stored),
        "sdpo-stored-other-tokenizer": (SelectiveDPOTrainer, SelectiveDPOConfig,
                                        {"ref_model_name_or_path": str(setup / "other_ref"), "map_across_tokenizers": True, **stored}),
        "sepo": (SePOTrainer, SePOConfig, {"oracle_model_name_or_path": str(setup / "oracle"),
                                           "oracle_ref_model_name_or_path": str(setup / "oracle_ref")}),
    }  # fmt: skip
    results = {}
    for name, (trainer_class, config_class, fields) in paths.items():
        if only is not None and name not in only:
            continue
        args = config_class(output_dir=str(out / name), **common, **fields)
        trainer = trainer_class(model=str(setup / "policy"), args=args, train_dataset=dataset, eval_dataset=dataset)
        trainer.train()
        history = trainer.state.log_history
        results[name] = {
            "losses": [e["loss"] for e in history if "loss" in e],
            "grad_norms": [e["grad_norm"] for e in history if "grad_norm" in e],
            "stores": {split: str(path) for split, path in trainer.reference_stores.items()},
            "evaluation": evaluate_preferences(trainer).summary() if name == "sdpo-live" else None,
            "engine": sharding(trainer),
        }
        if name == "sdpo-live":
            trainer.save_model(str(out / name / "final"))
        del trainer
    if only is None or "resume" in only:
        results["resume"] = resume(SelectiveDPOTrainer, SelectiveDPOConfig, setup, out, common, dataset)
    if only is None or "eval-untrained" in only:
        args = SelectiveDPOConfig(output_dir=str(out / "eval-untrained"), **common)
        trainer = SelectiveDPOTrainer(model=str(setup / "policy"), args=args, train_dataset=dataset, eval_dataset=dataset)
        results["eval-untrained"] = {"evaluation": evaluate_preferences(trainer).summary(), "engine": sharding(trainer)}
        del trainer
    import torch.distributed as dist

    from selective_po.engines import end_process_group

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    # Not a plain destroy_process_group() and return: the gloo group outlives it, and a normal exit then
    # aborts now and then ("terminate called without an active exception"); see end_process_group.
    end_process_group()


def resume(trainer_class, config_class, setup: Path, out: Path, common: dict, dataset) -> dict:
    """Train 2 steps and save a checkpoint, then resume from it in a new trainer to step 3: its losses and gradient
    norms must be those of an uninterrupted run (the `sdpo-live` path); step 3 needs the restored SGD momentum."""
    folder = out / "resume"
    first = config_class(output_dir=str(folder), **{**common, "max_steps": STEPS - 1, "save_strategy": "steps", "save_steps": STEPS - 1})
    trainer_class(model=str(setup / "policy"), args=first, train_dataset=dataset).train()
    second = config_class(output_dir=str(folder), **common)
    trainer = trainer_class(model=str(setup / "policy"), args=second, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=True)
    history = trainer.state.log_history
    return {"losses": [e["loss"] for e in history if "loss" in e], "grad_norms": [e["grad_norm"] for e in history if "grad_norm" in e],
            "engine": sharding(trainer)}  # fmt: skip


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--fsdp-on-cpu"]
    if "--fsdp-on-cpu" in sys.argv:
        patch_accelerate_for_fsdp_on_cpu()
    main(Path(arguments[0]), Path(arguments[1]))
