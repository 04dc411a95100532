"""Scoring a dataset once with frozen models: Selective-DPO's reference, SePO's oracle and its reference.

Data flow: tokens -> **per-token values of frozen models** (this module) -> stored shards
(`reference_cache.py`) -> the trainer's batches.

Every model here is frozen and runs without gradients, through the engine the run uses, as TRL
runs its own reference:

- DeepSpeed: an inference engine (`trl.models.utils.prepare_deepspeed`). Under ZeRO-3 the weights
  are sharded when they load, and a forward outside an engine fails on the empty shards;
- FSDP: the model sharded with the run's FSDP plugin (`trl.models.utils.prepare_fsdp`);
- DDP or one process: the plain model on this process's device.

Under ZeRO-3 and FSDP every forward is a collective, so every process must run the same number of
forwards. `score_missing_shards` assigns shards round-robin, and a process with fewer batches than
the busiest one runs forwards on a dummy batch whose results it drops. A problem on one process
(a non-finite value, an error in the scorer) is exchanged after every batch, so every process stops
with the same message instead of waiting forever in the next collective.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType, broadcast_object_list, extract_model_from_parallel, gather_object
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model

from .logprobs import compact_lm_head, run_in_float32
from .packing import shared_prompt_forward
from .reference_cache import ReferenceLogpsStore, RowScorer, ShardSpec, files_weights_hash, token_content_hash, tokenizer_hash

# Batch keys that the collators add for the loss, not for the model's forward.
NON_MODEL_KEYS = {
    "completion_mask", "ref_chosen_logps", "ref_rejected_logps", "ref_per_token_logps", "token_rewards",
    "scorer_per_token_logps", "selection_given",  # the fixed-scores and spans rules' per-token inputs
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# What the stored values depend on: the parts of their cache key


def token_components(dataset, *, trainer) -> dict:
    """The key parts that fix which tokens are scored and how: token ids, tokenizer, truncation, autocast, packing."""
    args = trainer.args
    components = {
        "tokens": token_content_hash(dataset),
        "tokenizer": tokenizer_hash(trainer._tokenizer),
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else "none",
    }
    if args.score_dtype is not None:  # computed apart from the run's dtype (absent otherwise: older keys stay valid)
        components["score_dtype"] = args.score_dtype
    return {**components, "packing": "shared-prompt-v1"} if trainer._shared_prompt_mask is not None else components


def mapping_components(other_path: str | None, *, enabled: bool, trust_remote_code: bool) -> dict:
    """Key parts for values moved across tokenizers: the rule's version and the other tokenizer."""
    if not enabled:
        return {}
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(other_path, trust_remote_code=trust_remote_code)
    return {"mapping": "char-offsets-v1", "other_tokenizer": tokenizer_hash(other)}


def files_identity(name_or_path: str, *, memo_path: Path | None) -> str:
    """A model's identity by the content of its weight files (a hub id by the files it resolves to).

    The same on every process, whatever the engine does to the loaded weights.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    return "files:" + files_weights_hash(path, memo_path=memo_path)


# ---------------------------------------------------------------------------------------------
# Frozen models, placed for the run's engine


def prepare_for_inference(model, accelerator):
    """`model` ready for no-grad forwards under the run's engine (see the module docstring)."""
    from trl.models.utils import prepare_deepspeed, prepare_fsdp

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return prepare_deepspeed(model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return prepare_fsdp(model, accelerator)
    return model.to(accelerator.device).eval()


def load_frozen(path: str, *, accelerator, init_kwargs: dict, disable_dropout: bool):
    """A frozen model from `path` with TRL's fused LM head, prepared for the run's engine."""
    model = create_model_from_path(path, **init_kwargs)
    model.eval()
    model.requires_grad_(False)
    if disable_dropout:
        disable_dropout_in_model(model)
    add_fused_lm_head(model)  # before any wrapping, as TRL requires
    return prepare_for_inference(model, accelerator)


# ---------------------------------------------------------------------------------------------
# Forwards


def forward_logps(model, inputs: dict, *, shared_prompt_mask: str | None = None, float32: bool = False) -> torch.Tensor:
    """Per-token log-probs `(2B, T-1)` of a batch already on the device, through TRL's fused LM head.

    The one forward every reference-side model runs, live and for storage (gradients and autocast
    are the caller's), and the policy's scoring passes. Position `t` holds the log-prob of token
    `t + 1`; only completion positions are projected (`compact_lm_head`), the others hold 0.

    Args:
        inputs: A batch from TRL's preference collator, `[chosen; rejected]` rows.
        shared_prompt_mask: Run each pair as one packed row with this mask form (`packing.py`); `None`: two rows.
        float32: Compute in float32 whatever the weights' dtype and autocast (`logprobs.run_in_float32`).
    """
    if float32:
        module = extract_model_from_parallel(model)  # the module itself: DDP or DeepSpeed add nothing to a no-grad pass
        return run_in_float32(module, lambda m: forward_logps(m, inputs, shared_prompt_mask=shared_prompt_mask))
    shift_mask = inputs["completion_mask"][:, 1:]
    with compact_lm_head():
        if shared_prompt_mask is not None:
            log_probs = shared_prompt_forward(model, inputs, mask_kind=shared_prompt_mask).log_probs
        else:
            model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            log_probs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the real positions.
    return log_probs[:, -shift_mask.size(1) :]


@torch.no_grad()
def sequence_completion_logps(
    model, sequences: list[tuple[list[int], int]], *, device, context: Callable[[], AbstractContextManager]
) -> list[np.ndarray]:
    """Per-token log-probs of each sequence's completion (tokens from `start` on) under `model`.

    Args:
        sequences: `(token ids, start)` per sequence, in another model's own tokens.
    """
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, start) in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
    with context(), compact_lm_head():
        log_probs = model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device),
            fused_lm_head=True, use_cache=False,
        ).log_probs.float().cpu()  # fmt: skip
    return [log_probs[i, start - 1 : len(ids) - 1].numpy() for i, (ids, start) in enumerate(sequences)]


def response_text(response, *, row: int, side: str) -> str:
    """The text of a conversational response's last message, which cross-tokenizer values are mapped through."""
    if not isinstance(response, list):
        raise ValueError("map_across_tokenizers=True needs conversational data (lists of messages).")
    content = response[-1]["content"]
    if not isinstance(content, str):
        raise ValueError(
            "map_across_tokenizers=True needs each response to end in text, since values move between tokenizers "
            f"through its characters: row {row} of the batch, {side} response, ends with content {content!r:.80}."
        )
    return content


def cross_tokenizer_scorer(
    *,
    policy_tokenizer,
    other_tokenizer,
    policy_collator: Callable[[list[dict]], dict],
    truncation_mode: str,
    values_of: Callable[[list[tuple[list[int], int]]], list[np.ndarray]],
) -> RowScorer:
    """Score rows in another tokenizer's tokens and move the values onto the policy's tokens.

    `values_of(sequences)` returns one array of per-token values per `(token ids, start)` sequence
    of the other tokenization (e.g. `sequence_completion_logps` of one model, or a difference of
    two). Values move by character offsets (`alignment.py`).
    """
    from trl.data_utils import _tokenize, common_prefix_length

    from .alignment import completion_offsets, map_completion_values

    def score_rows(rows: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        counts = policy_collator(rows)["completion_mask"][:, 1:].sum(dim=1).tolist()  # scored per row
        sequences, contents, policy_ids = [], [], []
        for side in ("chosen", "rejected"):
            for index, row in enumerate(rows):
                contents.append(response_text(row[side], row=index, side=side))
                prompt_ids = _tokenize(other_tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
                full_ids = _tokenize(other_tokenizer, row["prompt"] + row[side])["input_ids"]
                sequences.append((full_ids, common_prefix_length(prompt_ids, full_ids)))
                policy_ids.append(row[f"{side}_ids"])
        values = values_of(sequences)
        mapped = []
        for (full_ids, start), content, ids, n, value in zip(sequences, contents, policy_ids, counts, values):
            moved = map_completion_values(
                completion_offsets(other_tokenizer, full_ids[start:]), value, completion_offsets(policy_tokenizer, ids), content
            )
            # The collator keeps the first completion tokens (keep_start) or the last ones (keep_end).
            mapped.append(moved[:n] if truncation_mode == "keep_start" else moved[len(moved) - n :])
        return mapped[: len(rows)], mapped[len(rows) :]

    return score_rows


# ---------------------------------------------------------------------------------------------
# The scoring pass


def agreed_missing_shards(store: ReferenceLogpsStore, accelerator) -> list[ShardSpec]:
    """The shards to score, as the main process sees them, given to every process.

    One process checks (and reports damage once); all then work from the same list, so their
    shares of the work, and so their numbers of forwards, are known to each other.
    """
    missing = [store.missing_shards() if accelerator is None or accelerator.is_main_process else None]
    if accelerator is not None and accelerator.num_processes > 1:
        broadcast_object_list(missing, from_process=0)
    return missing[0]


def shard_plans(missing: list[ShardSpec], *, batch_size: int, world_size: int) -> list[list[tuple[ShardSpec, int, int]]]:
    """Per process, its batches `(shard, start, stop)`: shard `i` goes to process `i % world_size`."""
    return [
        [(shard, start, min(start + batch_size, shard.stop)) for shard in missing if shard.index % world_size == rank
         for start in range(shard.start, shard.stop, batch_size)]
        for rank in range(world_size)
    ]  # fmt: skip


def score_missing_shards(
    store: ReferenceLogpsStore,
    dataset,
    *,
    missing: list[ShardSpec],
    score_rows: RowScorer,
    batch_size: int,
    accelerator=None,
    description: str = "per-token values",
    progress: Callable[[int], object] | None = None,
    on_shard_written: Callable[[ShardSpec], None] | None = None,
) -> int:
    """Score and write this process's share of `missing`; return how many shards it wrote.

    Shard `i` belongs to process `i % world_size`. Every process runs as many forwards as the busiest
    one (dummy batches, results dropped), and after each one the processes exchange any problem, so
    an error on one stops all of them with its message.

    Args:
        store: Where the shards go.
        dataset: TRL's tokenized dataset (`prompt_ids`, `chosen_ids`, `rejected_ids`), row-aligned with `store`.
        missing: The shards to score, the same list on every process (`agreed_missing_shards`).
        score_rows: `rows -> (chosen values, rejected values)`, one array per row, one value per
            completion position the trainer scores.
        batch_size: Pairs per call of `score_rows`.
        accelerator: The run's accelerator; `None` for one process.
        description: What the values are, for error messages.
        progress: `total_pairs -> bar`, advanced by each batch of pairs scored.
        on_shard_written: Called after each shard is safely on disk.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    plans = shard_plans(missing, batch_size=batch_size, world_size=world)
    mine, steps = plans[rank], max((len(plan) for plan in plans), default=0)
    bar = progress(sum(stop - start for _, start, stop in mine)) if progress is not None else None
    pending: dict[int, tuple[list, list]] = {}
    written = 0
    for step in range(steps):
        real = step < len(mine)
        shard, start, stop = mine[step] if real else (None, 0, min(1, len(dataset)))  # a dummy: row 0, dropped
        problem, values = None, None
        try:
            values = score_rows([dict(row) for row in dataset.select(range(start, stop))])
            if real:
                problem = _non_finite(values, first_row=start, description=description)
        except Exception as error:  # shared below, so the other processes stop too
            problem = f"{type(error).__name__}: {error}"
        problems = gather_object([problem]) if world > 1 else [problem]
        failed = next((p for p in problems if p is not None), None)
        if failed is not None:
            raise ValueError(f"Scoring {description} stopped: {failed}" if world == 1 else
                             f"Scoring {description} stopped on process {problems.index(failed)} of {world}: {failed}")  # fmt: skip
        if not real:
            continue
        chosen, rejected = pending.setdefault(shard.index, ([], []))
        chosen += values[0]
        rejected += values[1]
        if bar is not None:
            bar.update(stop - start)
        if stop == shard.stop:
            store.write_shard(shard, *pending.pop(shard.index))
            written += 1
            if on_shard_written is not None:
                on_shard_written(shard)
    if bar is not None:
        bar.close()
    return written


def _non_finite(values: tuple[list[np.ndarray], list[np.ndarray]], *, first_row: int, description: str) -> str | None:
    """A message naming the first non-finite value of a batch (dataset row, side, token), or None."""
    for side, rows in zip(("chosen", "rejected"), values):
        for offset, row_values in enumerate(rows):
            bad = np.flatnonzero(~np.isfinite(row_values))
            if bad.size:
                return (
                    f"{description} are not finite for dataset row {first_row + offset}, {side} response, token "
                    f"{int(bad[0])} ({row_values[bad[0]]}). Nothing was stored for that row's shard; check that the "
                    "model's weights are finite and that it runs in float32 or bf16 rather than fp16."
                )
    return None
