"""`SelectiveDPOTrainer`: TRL's `DPOTrainer` with token-selective losses wired in.

Everything but the loss is TRL's: tokenization, collation, the reference model (a frozen copy of the
policy, an explicit one, or PEFT's disabled adapter), accelerate, DeepSpeed/FSDP, logging. For
`loss_type="sdpo"` the trainer runs one policy forward with gradients and one reference forward
without, as TRL does, but keeps the per-token log-probs instead of summing them and hands them to the
pure functions in `losses.py`. Any other loss type goes to TRL unchanged.

This overrides TRL's private `DPOTrainer._compute_loss` and mirrors its metric names; TRL is pinned
to 1.16.x in pyproject.toml, and `tests/test_trainer.py` compares this trainer against TRL's own
`sigmoid` loss, gradients and logged metrics so that a TRL upgrade that moves them fails loudly.
"""

from __future__ import annotations

import functools
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import is_peft_model, tqdm
from datasets import IterableDataset
from transformers import AutoTokenizer, PreTrainedModel, ProcessorMixin
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, get_config_model_id, use_adapter

from . import reference_cache
from .config import SelectiveDPOConfig
from .losses import SelectiveDPOOutput, masked_sum, select_sdpo_tokens, selective_dpo_loss
from .models import cache_dir, check_same_vocabulary, resolve_model_path

# Batch keys that the collators add for the loss, not for the model's forward.
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "ref_per_token_logps"}
# Rows per stored shard of reference log-probs: the unit of resumption after an interruption.
REFERENCE_SHARD_ROWS = 256


class SelectiveDPOTrainer(DPOTrainer):
    """Trainer for Selective-DPO (and, unchanged, every TRL DPO loss).

    Takes the same arguments as [`~trl.DPOTrainer`], with a [`SelectiveDPOConfig`] as `args`.
    `model` may also be an embedded name such as `"smollm2-135m-instruct"`, and
    `args.ref_model_name_or_path` loads the reference from a path instead of copying the policy.

    Example:
    ```python
    from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset

    dataset = load_preference_dataset("arithmetic", split="train")
    args = SelectiveDPOConfig(output_dir="sdpo", loss_type="sdpo", sdpo_threshold=0.6)
    SelectiveDPOTrainer(model="smollm2-135m-instruct", args=args, train_dataset=dataset).train()
    ```
    """

    _tag_names = ["trl", "dpo", "selective-po"]
    _name = "Selective-DPO"
    _paper = {
        "title": "Not All Preferences are What You Need for Post-Training: Selective Alignment Strategy for "
        "Preference Optimization",
        "id": "2507.07725",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{dong2025selective,
                title   = {{Not All Preferences are What You Need for Post-Training: Selective Alignment Strategy for Preference Optimization}},
                author  = {Zhijin Dong},
                year    = 2025,
                journal = {arXiv preprint arXiv:2507.07725},
            }"""),
    }

    def __init__(self, model, ref_model: PreTrainedModel | None = None, args: SelectiveDPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SelectiveDPOConfig(output_dir=f"{name.split('/')[-1]}-SelectiveDPO")
        elif not isinstance(args, SelectiveDPOConfig):
            raise TypeError(
                f"SelectiveDPOTrainer needs a SelectiveDPOConfig, got {type(args).__name__}. Build it with "
                "`SelectiveDPOConfig(**your_dpo_config.to_dict())` or switch the class in your script."
            )
        if isinstance(model, str):
            model = resolve_model_path(model)
        # With stored per-token values the reference is loaded only if something is left to score.
        self._ref_path = None
        self.reference_stores: dict[str, Path] = {}
        if args.ref_model_name_or_path is not None:
            if ref_model is not None:
                raise ValueError(
                    "Both `ref_model` and `args.ref_model_name_or_path` were given; pass only one of them."
                )
            self._ref_path = resolve_model_path(args.ref_model_name_or_path)
            self._check_reference_tokenizer(model, self._ref_path, args, kwargs.get("processing_class"))
            if not (args.precompute_ref_log_probs and args.uses_selection):
                ref_model = create_model_from_path(self._ref_path, **_reference_init_kwargs(args, model))
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        if self.precompute_ref_logps and args.uses_selection:
            self.data_collator = reference_cache.PerTokenReferenceCollator(self.data_collator)

    @staticmethod
    def _check_reference_tokenizer(model, ref_path: str, args: SelectiveDPOConfig, processing_class) -> None:
        """Fail before any loading or tokenization if the reference tokenizes differently."""
        if isinstance(processing_class, ProcessorMixin):
            processing_class = processing_class.tokenizer
        if processing_class is None:
            policy_path = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=args.trust_remote_code)
        try:
            reference_tokenizer = AutoTokenizer.from_pretrained(ref_path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load a tokenizer from the reference {args.ref_model_name_or_path!r} to check that it "
                "shares the policy's vocabulary. Save the tokenizer next to the reference weights."
            ) from error
        check_same_vocabulary(processing_class, reference_tokenizer, reference_name=args.ref_model_name_or_path)

    @staticmethod
    def mask_unimportant_tokens(
        chosen_per_token_logps: torch.Tensor,
        rejected_per_token_logps: torch.Tensor,
        ref_chosen_per_token_logps: torch.Tensor,
        ref_rejected_per_token_logps: torch.Tensor,
        threshold: float = 0.6,
        *,
        chosen_mask: torch.Tensor | None = None,
        rejected_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sum each response's log-probs over its selected tokens only.

        Args:
            chosen_per_token_logps, rejected_per_token_logps: Shape `(B, T)`, policy log-probs.
            ref_chosen_per_token_logps, ref_rejected_per_token_logps: Shape `(B, T)`, reference log-probs.
            threshold: `sdpo_threshold` `q`; the top `1 - q` share of each response's tokens is kept.
            chosen_mask, rejected_mask: Shape `(B, T)`, bool; `None` means every position is a real token.

        Returns:
            `(chosen, rejected, ref_chosen, ref_rejected)`, each `(B,)`: log-probs summed over kept tokens.
        """
        if chosen_mask is None:
            chosen_mask = torch.ones_like(chosen_per_token_logps, dtype=torch.bool)
        if rejected_mask is None:
            rejected_mask = torch.ones_like(rejected_per_token_logps, dtype=torch.bool)
        *_, chosen_keep, rejected_keep = select_sdpo_tokens(
            chosen_per_token_logps,
            rejected_per_token_logps,
            ref_chosen_per_token_logps,
            ref_rejected_per_token_logps,
            chosen_mask=chosen_mask.bool(),
            rejected_mask=rejected_mask.bool(),
            threshold=threshold,
        )
        return (
            masked_sum(chosen_per_token_logps, chosen_keep),
            masked_sum(rejected_per_token_logps, rejected_keep),
            masked_sum(ref_chosen_per_token_logps, chosen_keep),
            masked_sum(ref_rejected_per_token_logps, rejected_keep),
        )

    def _selective_loss_fn(self) -> Callable[..., SelectiveDPOOutput] | None:
        """The selective loss for this run, or None when TRL computes the loss."""
        losses = {"sdpo": lambda **kw: selective_dpo_loss(threshold=self.args.sdpo_threshold, **kw)}
        return losses.get(self.loss_types[0]) if len(self.loss_types) == 1 else None

    def per_token_logps(self, model, inputs: dict) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One policy forward (with whatever grad mode is on) and one reference forward (without).

        Args:
            model: The (possibly accelerate-wrapped) policy.
            inputs: A batch from TRL's preference collator, stacked as `[chosen; rejected]`.

        Returns:
            `(outputs, policy_logps, ref_logps, completion_mask)`: the policy's fused-head outputs
            and three `(2B, T-1)` tensors. Position `t` holds the log-prob of token `t + 1`, so the
            mask is the collator's completion mask shifted by one.
        """
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:].bool()  # (2B, T-1)
        seq_len = shift_mask.size(1)
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the real positions.
        policy_logps = outputs.log_probs[:, -seq_len:]  # (2B, T-1)
        ref_logps = self._reference_per_token_logps(inputs, model_kwargs, labels)[:, -seq_len:]  # (2B, T-1)
        return outputs, policy_logps, ref_logps, shift_mask

    def _compute_loss(self, model, inputs, return_outputs):
        loss_fn = self._selective_loss_fn()
        if loss_fn is None:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        outputs, per_token_logps, ref_per_token_logps, shift_mask = self.per_token_logps(model, inputs)

        # TRL's collator stacks the batch as [chosen; rejected].
        chosen_logps, rejected_logps = per_token_logps.chunk(2, dim=0)  # (B, T-1) each
        ref_chosen_logps, ref_rejected_logps = ref_per_token_logps.chunk(2, dim=0)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        result = loss_fn(
            policy_chosen_logps=chosen_logps,
            policy_rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        loss = result.losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_trl_metrics(mode, inputs, outputs, per_token_logps.detach(), ref_per_token_logps, shift_mask)
        self._log_selection_metrics(mode, result, chosen_mask, rejected_mask)

        if return_outputs:
            # Mirrors TRL (deprecated there): logits for `compute_metrics` need a plain forward.
            model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            with torch.no_grad():
                outputs = model(**model_kwargs, use_cache=False)
            return loss, outputs
        return loss

    def _reference_per_token_logps(self, inputs: dict, model_kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Per-token reference log-probs `(2B, T-1)`: stored ones if the batch has them, else a forward."""
        if "ref_per_token_logps" in inputs:
            return inputs["ref_per_token_logps"].to(labels.device)
        if self.precompute_ref_logps:
            raise ValueError(
                "precompute_ref_log_probs=True but the batch carries no per-token reference log-probs. Build the "
                "trainer with this dataset (train_dataset / eval_dataset) so they are scored, or set "
                "precompute_ref_log_probs=False to run the reference live."
            )
        return self._reference_forward(model_kwargs, labels)

    def _reference_forward(self, model_kwargs: dict, labels: torch.Tensor, reference=None) -> torch.Tensor:
        """One reference forward, `(2B, T-1)`: `reference`, else TRL's (ref_model, PEFT base, initial policy)."""
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        reference = reference if reference is not None else self.ref_model
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if reference is None and is_peft_model(self.model):
                # PEFT: the reference is the base model (adapter disabled) or an initial "ref" adapter copy.
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter):
                    return self.model(**ref_kwargs, labels=labels, fused_lm_head=True).log_probs
            # No reference kept while precomputing: before training the policy is the reference.
            reference = reference if reference is not None else self.model
            return reference(**ref_kwargs, labels=labels, fused_lm_head=True).log_probs

    # ----- stored per-token reference log-probs (precompute_ref_log_probs=True) -----

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [reference_cache.CHOSEN_COLUMN, reference_cache.REJECTED_COLUMN]
        self._signature_columns = list(dict.fromkeys(self._signature_columns + extra))

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Attach per-token reference log-probs to a tokenized dataset, scoring only what is not cached.

        TRL calls this from `__init__` (and `evaluate`) when `precompute_ref_log_probs=True`; its own
        version stores one sum per sequence, which selection cannot use.
        """
        if not self.args.uses_selection:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "precompute_ref_log_probs=True needs a map-style Dataset (its rows are scored and stored); got an "
                "IterableDataset. Materialize it, or set precompute_ref_log_probs=False."
            )
        store = reference_cache.ReferenceLogpsStore(
            self.args.ref_logps_cache_dir or cache_dir() / "ref_logps",
            self._reference_cache_components(dataset),
            n_rows=len(dataset),
            shard_size=REFERENCE_SHARD_ROWS,
        )
        if store.missing_shards():
            reference = self._load_scoring_reference()
            collator = getattr(self.data_collator, "inner", self.data_collator)
            reference_cache.score_missing_shards(
                store,
                dataset,
                collator=collator,
                forward=functools.partial(self._score_reference_batch, reference),
                batch_size=batch_size,
                rank=self.accelerator.process_index,
                world_size=self.accelerator.num_processes,
                progress=functools.partial(
                    tqdm, desc=f"Scoring per-token reference log-probs ({name})", unit="shard",
                    disable=bool(os.environ.get("TQDM_DISABLE")),
                ),
            )  # fmt: skip
            del reference
        self.accelerator.wait_for_everyone()
        self.reference_stores[name] = store.path
        return reference_cache.attach_reference_logps(dataset, store)

    def _reference_cache_components(self, dataset) -> dict:
        """Everything that changes the stored values; the cache key is a hash of it."""
        if self._ref_path is not None:
            path = Path(self._ref_path)
            if not path.is_dir():  # a hub id: identify it by the files it resolves to
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(self._ref_path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
            reference = "files:" + reference_cache.files_weights_hash(path, memo_path=cache_dir() / "file_hashes.json")
            dtype = str(_reference_init_kwargs(self.args, self.model).get("dtype", "float32"))
        else:
            # TRL hashed the reference's weights (or the initial policy's) before anything could change them.
            reference = "weights:" + self._precompute_model_hash
            dtype = str((self.ref_model or self.model).dtype)
        return {
            "tokens": reference_cache.token_content_hash(dataset),
            "tokenizer": reference_cache.tokenizer_hash(self._tokenizer),
            "reference": reference,
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            "dtype": dtype.removeprefix("torch."),
            "autocast": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "none",
        }

    def _load_scoring_reference(self):
        """The reference from `ref_model_name_or_path`, loaded for scoring only (None: TRL's reference)."""
        if self._ref_path is None:
            return None
        reference = create_model_from_path(self._ref_path, **_reference_init_kwargs(self.args, self.model))
        reference.to(self.accelerator.device).eval()
        if self.args.disable_dropout:
            disable_dropout_in_model(reference)
        add_fused_lm_head(reference)
        return reference

    @torch.no_grad()
    def _score_reference_batch(self, reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log_probs, completion_mask)`, both `(2B, T-1)`, of one collated batch under the reference."""
        batch = self._prepare_inputs(batch)
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        shift_mask = batch["completion_mask"][:, 1:].bool()
        # Autocast as in training, where the reference runs inside the Trainer's loss context.
        with self.compute_loss_context_manager():
            log_probs = self._reference_forward(model_kwargs, labels, reference=reference)
        return log_probs[:, -shift_mask.size(1) :], shift_mask

    def _log_trl_metrics(self, mode, inputs, outputs, per_token_logps, ref_per_token_logps, shift_mask):
        """Log what TRL's DPOTrainer logs, under the same names and with the same definitions.

        `rewards/*` and `logps/*` are DPO's, over every response token, so curves compare with a
        plain DPO run. The selective loss sees only kept tokens; its margin is
        `selection/rewards_margin_kept`, which reads low by design: selection picks the tokens where
        the policy is furthest behind (chosen) or ahead (rejected) of the reference.
        """
        gather_sum = lambda t: self.accelerator.gather_for_metrics(t).sum()  # noqa: E731
        seq_len = shift_mask.size(1)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)

        tokens = gather_sum(shift_mask.sum())
        entropy = gather_sum((outputs.entropy[:, -seq_len:].detach() * shift_mask).sum())
        self._metrics[mode]["entropy"].append((entropy / tokens).item() if tokens > 0 else 0.0)

        if mode == "train":
            self._total_train_tokens += gather_sum(inputs["attention_mask"].sum()).item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
        for side, logits, mask in (("chosen", chosen_logits, chosen_mask), ("rejected", rejected_logits, rejected_mask)):
            total, count = gather_sum(logits[mask].sum()).item(), gather_sum(mask.sum()).item()
            self._metrics[mode][f"logits/{side}"].append(total / count if count > 0 else 0.0)

        chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
        correct, count = gather_sum((chosen_top1 & chosen_mask).sum()), gather_sum(chosen_mask.sum())
        self._metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen_logps, rejected_logps = masked_sum(per_token_logps, shift_mask).chunk(2, dim=0)
        ref_chosen_logps, ref_rejected_logps = masked_sum(ref_per_token_logps, shift_mask).chunk(2, dim=0)
        chosen_rewards = self.accelerator.gather(self.beta * (chosen_logps - ref_chosen_logps))
        rejected_rewards = self.accelerator.gather(self.beta * (rejected_logps - ref_rejected_logps))
        self._metrics[mode]["rewards/chosen"].append(chosen_rewards.mean().item())
        self._metrics[mode]["rewards/rejected"].append(rejected_rewards.mean().item())
        self._metrics[mode]["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
        self._metrics[mode]["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        self._metrics[mode]["logps/chosen"].append(self.accelerator.gather(chosen_logps).mean().item())
        self._metrics[mode]["logps/rejected"].append(self.accelerator.gather(rejected_logps).mean().item())

    def _log_selection_metrics(self, mode, result: SelectiveDPOOutput, chosen_mask, rejected_mask) -> None:
        """Share of completion tokens kept, mean score of kept and dropped tokens, and the loss's margin."""
        gather_sum = lambda t: self.accelerator.gather_for_metrics(t).sum().item()  # noqa: E731
        margins = self.accelerator.gather(result.chosen_rewards - result.rejected_rewards)
        self._metrics[mode]["selection/rewards_margin_kept"].append(margins.mean().item())
        sides = (
            ("chosen", result.chosen_scores, result.chosen_keep, chosen_mask),
            ("rejected", result.rejected_scores, result.rejected_keep, rejected_mask),
        )
        for side, scores, keep, mask in sides:
            dropped = mask & ~keep
            n_tokens, n_kept, n_dropped = gather_sum(mask.sum()), gather_sum(keep.sum()), gather_sum(dropped.sum())
            kept_score = gather_sum(masked_sum(scores, keep).sum())
            dropped_score = gather_sum(masked_sum(scores, dropped).sum())
            if n_tokens > 0:
                self._metrics[mode][f"selection/kept_share_{side}"].append(n_kept / n_tokens)
            # An empty set has no mean; logging 0 would read as a real score.
            if n_kept > 0:
                self._metrics[mode][f"selection/score_kept_{side}"].append(kept_score / n_kept)
            if n_dropped > 0:
                self._metrics[mode][f"selection/score_dropped_{side}"].append(dropped_score / n_dropped)


def _reference_init_kwargs(args: SelectiveDPOConfig, model) -> dict:
    """Keyword arguments for loading the reference, as TRL builds them for its own reference copy."""
    kwargs = dict(args.model_init_kwargs or {})
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails under distributed training
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if not isinstance(model, str):
        kwargs.setdefault("dtype", model.dtype)
    return kwargs
