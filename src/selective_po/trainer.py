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
import hashlib
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedModel, ProcessorMixin, ProgressCallback
from transformers.utils import logging
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from . import reference_cache, reference_scoring, spans
from .config import ORACLE_FREE_RULES, SelectiveDPOConfig, SePOConfig
from .data import check_preference_dataset
from .engines import check_engine
from .logprobs import compact_lm_head
from .metrics import dpo_metrics, selection_metrics
from .packing import mask_kind_for, share_prompt_problem, shared_prompt_forward
from .losses import SelectiveLossOutput, masked_sum, select_sdpo_tokens, selective_dpo_loss, sepo_keep_masks, sepo_loss
from .models import cache_dir, check_model_folder, check_same_vocabulary, file_digest_memo, resolve_model_path
from .plots import PlotCurvesCallback
from .progress import TickingProgressCallback
from .progress import bar as progress_bar
from .scoring import confidence_token_scores
from .selection import select_tokens

logger = logging.get_logger(__name__)

_NON_MODEL_KEYS = reference_scoring.NON_MODEL_KEYS
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
        for name in ("train_dataset", "eval_dataset"):  # clear errors before TRL tokenizes
            datasets_to_check = kwargs.get(name)
            if not isinstance(datasets_to_check, dict):
                datasets_to_check = {name: datasets_to_check}
            for key, dataset in datasets_to_check.items():
                if isinstance(dataset, Dataset) and "prompt_ids" not in dataset.column_names:
                    check_preference_dataset(dataset, source=key)
        load_kwargs = _load_kwargs(args)
        self._policy_path = None
        if isinstance(model, str):
            model = self._policy_path = resolve_model_path(model)
            check_model_folder(model, trust_remote_code=args.trust_remote_code, field="model")
            # TRL loads the policy, and its reference copy, with these.
            args.model_init_kwargs = load_kwargs
        # With stored per-token values the reference is loaded only if something is left to score.
        self._ref_path = None
        self.reference_stores: dict[str, Path] = {}
        if args.ref_model_name_or_path is not None:
            if ref_model is not None:
                raise ValueError(
                    "Both `ref_model` and `args.ref_model_name_or_path` were given; pass only one of them."
                )
            self._ref_path = resolve_model_path(args.ref_model_name_or_path)
            check_model_folder(self._ref_path, trust_remote_code=args.trust_remote_code, field="ref_model_name_or_path")
            self._check_reference_tokenizer(model, self._ref_path, args, kwargs.get("processing_class"))
            if not (args.precompute_ref_log_probs and args.uses_selection):
                ref_model = create_model_from_path(self._ref_path, **_reference_init_kwargs(args, model))
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:  # the same bars, redrawn every second
            self.add_callback(TickingProgressCallback)
        if args.plot_curves:
            self.add_callback(PlotCurvesCallback())
        if args.uses_selection and args.selection_rule == "spans":
            self.data_collator = spans.SelectionMaskCollator(self.data_collator, truncation_mode=args.truncation_mode)
        if self.precompute_ref_logps and args.uses_selection and self._stores_values:
            self.data_collator = reference_cache.PerTokenReferenceCollator(
                self.data_collator, columns=self._stored_columns, output_key=self._stored_batch_key
            )

    def create_accelerator_and_postprocess(self) -> None:
        """transformers' accelerator, refused if it is not the engine or process count the launch asked for.

        Also where `share_prompt` is settled: the model is loaded by now, and nothing has been scored yet.
        """
        super().create_accelerator_and_postprocess()
        check_engine(self.accelerator)
        self._shared_prompt_mask = self._resolve_share_prompt()

    def _resolve_share_prompt(self) -> str | None:
        """The attention-mask form of the shared-prompt forward, or `None` when pairs run as two rows."""
        if self.args.share_prompt is False or not self.args.uses_selection:
            return None
        if self.args.share_prompt is None and self.accelerator.device.type != "cpu":
            # Measured on an H200 (docs/performance.md): packed steps saved memory but were 0-8% slower than
            # two rows, so the default is two rows there; True still packs.
            return None
        model = self.model.get_base_model() if is_peft_model(self.model) else self.model
        prompt_learning = is_peft_model(self.model) and any(
            getattr(config, "is_prompt_learning", False) for config in self.model.peft_config.values()
        )  # fmt: skip
        problem = share_prompt_problem(
            model_config=model.config, truncation_mode=self.args.truncation_mode, padding_free=self.args.padding_free,
            extra_inputs=prompt_learning or getattr(self, "_is_vlm", False),
        )  # fmt: skip
        if problem is None:
            return mask_kind_for(model.config)
        if self.args.share_prompt:
            raise ValueError(f"share_prompt=True is not exact here: {problem}. Set share_prompt=False (or leave it unset).")
        return None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """TRL's `train`; `resume_from_checkpoint=True` resumes from the last *complete* checkpoint.

        transformers picks the highest-numbered `checkpoint-N` folder, even one that a `kill -9` left
        half-written; `trainer_state.json` is written last, so a folder without it is skipped, with a warning.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization, refusing rows TRL would drop in silence (prompt fills `max_length`)."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and isinstance(prepared, Dataset) and len(prepared) < len(dataset):
            from trl.data_utils import _tokenize

            first = ""
            if "prompt" in dataset.column_names:  # an implicit prompt is only split off inside TRL
                index = next((
                    i for i, row in enumerate(dataset)
                    if len(_tokenize(processing_class, row["prompt"], add_generation_prompt=isinstance(row["prompt"], list))["input_ids"])
                    >= args.max_length
                ), None)  # fmt: skip
                first = f" (the first is row {index})" if index is not None else ""
            raise ValueError(
                f"{len(dataset) - len(prepared)} of {len(dataset)} rows of the {dataset_name} dataset{first} have "
                f"prompts of max_length={args.max_length} tokens or more, so none of their response tokens would be "
                "trained on. Raise max_length, or shorten or remove those prompts."
            )
        if args.uses_selection and args.selection_rule == "spans":
            tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
            prepared = spans.add_selection_masks(prepared, tokenizer)
        return prepared

    @staticmethod
    def _check_reference_tokenizer(model, ref_path: str, args: SelectiveDPOConfig, processing_class, name=None) -> None:
        """Fail before any loading or tokenization if a reference-side model tokenizes differently."""
        name = name or args.ref_model_name_or_path
        if isinstance(processing_class, ProcessorMixin):
            processing_class = processing_class.tokenizer
        if processing_class is None:
            policy_path = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=args.trust_remote_code)
        try:
            reference_tokenizer = AutoTokenizer.from_pretrained(ref_path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Could not load a tokenizer from {name!r} to check that it shares the policy's vocabulary. Save the "
                "tokenizer next to the model's weights."
            ) from error
        if not args.map_across_tokenizers:
            check_same_vocabulary(processing_class, reference_tokenizer, reference_name=name)

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

    # Selective variants: loss_type -> method computing (loss output, rewards logged under TRL's names).
    _variants = {"sdpo": "_sdpo_step"}

    def _policy_forward(self, model, inputs: dict, score_mask: torch.Tensor | None = None):
        """The policy's forward with the fused LM head: `(outputs, logps (2B, T-1), mask (2B, T-1), kwargs, labels)`.

        Position `t` holds the log-prob of token `t + 1`, so the mask is the collator's completion
        mask shifted by one. `score_mask` `(2B, T-1)` limits the LM head to those completion positions
        (the others hold 0).
        """
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        if score_mask is not None:
            labels[:, 1:] = labels[:, 1:].masked_fill(~score_mask, -100)
        with compact_lm_head():
            if self._shared_prompt_mask is not None:  # one row per pair: the prompt once
                outputs = shared_prompt_forward(model, inputs, mask_kind=self._shared_prompt_mask, score_mask=score_mask)
            else:
                outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        shift_mask = completion_mask[:, 1:].bool()  # (2B, T-1)
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the real positions.
        policy_logps = outputs.log_probs[:, -shift_mask.size(1) :]  # (2B, T-1)
        return outputs, policy_logps, shift_mask, model_kwargs, labels

    def per_token_logps(self, model, inputs: dict) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One policy forward (with whatever grad mode is on) and the reference's log-probs (without).

        Args:
            model: The (possibly accelerate-wrapped) policy.
            inputs: A batch from TRL's preference collator, stacked as `[chosen; rejected]`.

        Returns:
            `(outputs, policy_logps, ref_logps, completion_mask)`: the policy's fused-head outputs
            and three `(2B, T-1)` tensors.
        """
        outputs, policy_logps, shift_mask, model_kwargs, labels = self._policy_forward(model, inputs)
        ref_logps = self._reference_per_token_logps(inputs, model_kwargs, labels)[:, -shift_mask.size(1) :]
        return outputs, policy_logps, ref_logps, shift_mask

    def _compute_loss(self, model, inputs, return_outputs):
        variant = self._variants.get(self.loss_types[0]) if len(self.loss_types) == 1 else None
        if variant is None:  # TRL's own losses, with the LM head projecting completion positions only
            with compact_lm_head():
                return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        score_mask = self._score_mask(inputs)
        outputs, policy_logps, shift_mask, model_kwargs, labels = self._policy_forward(model, inputs, score_mask)
        result, chosen_rewards, rejected_rewards = getattr(self, variant)(
            inputs, policy_logps, shift_mask, model_kwargs, labels, score_mask
        )
        self._check_finite_scores(result, *shift_mask.chunk(2, dim=0))
        loss = result.losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        self._log(mode, dpo_metrics(
            self.accelerator, outputs=outputs, per_token_logps=policy_logps.detach(),
            shift_mask=shift_mask if score_mask is None else score_mask,
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        ))  # fmt: skip
        self._log(mode, selection_metrics(self.accelerator, result, *shift_mask.chunk(2, dim=0)))

        if return_outputs:
            # Mirrors TRL (deprecated there): logits for `compute_metrics` need a plain forward.
            plain_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
            with torch.no_grad():
                outputs = model(**plain_kwargs, use_cache=False)
            return loss, outputs
        return loss

    # What selection ranks and where a non-finite value of it comes from, for the error that says so.
    _score_description = "Selective-DPO token scores (reference log-prob minus policy log-prob)"
    _score_remedy = (
        "The policy's or the reference's log-probs overflowed: lower learning_rate, train in float32 or bf16 rather "
        "than fp16, and check that the reference's weights are finite."
    )

    def _check_finite_scores(self, result: SelectiveLossOutput, chosen_mask, rejected_mask) -> None:
        """Raise if a score that selection ranked is NaN or inf: the top share of NaN is arbitrary tokens.

        Every process learns whether any process found one (one small all-reduce per step), so all of
        them stop with the same message rather than waiting for the failed one in the next collective.
        The offending row is looked up only on failure.
        """
        sides = (("chosen", result.chosen_scores, chosen_mask), ("rejected", result.rejected_scores, rejected_mask))
        bad = [~torch.isfinite(scores) & mask for _, scores, mask in sides]  # (B, T) each
        found = torch.stack([b.any() for b in bad]).any().to(torch.int32).reshape(1)
        if self.accelerator.num_processes > 1:
            found = self.accelerator.reduce(found, reduction="sum")
        if not found.item():
            return
        message = None
        if any(b.any() for b in bad):
            where = (
                f"training step {self.state.global_step + 1}" if self.model.training
                else f"evaluation after step {self.state.global_step}"
            )  # fmt: skip
            (side, scores, _), side_bad = next((side, b) for side, b in zip(sides, bad) if b.any())
            row, token = (int(i) for i in side_bad.nonzero()[0])
            message = (
                f"{self._score_description} are not finite at {where}: {side} response, row {row} of the batch, "
                f"position {token} is {scores[row, token].item()}"
            )
        messages = gather_object([message]) if self.accelerator.num_processes > 1 else [message]
        process, message = next((i, m) for i, m in enumerate(messages) if m is not None)
        on = f" on process {process}" if self.accelerator.num_processes > 1 else ""
        raise ValueError(f"{message}{on}. Selecting tokens by them would keep arbitrary tokens, so training stops. {self._score_remedy}")

    def _score_mask(self, inputs: dict) -> torch.Tensor | None:
        """Completion positions `(2B, T-1)` whose policy log-prob the loss uses, when known before the forward."""
        return None  # Selective-DPO's selection needs the policy's own log-probs: all of them

    def _sdpo_step(self, inputs, policy_logps, shift_mask, model_kwargs, labels, score_mask):
        """Selective-DPO on one batch; TRL's reward metrics use DPO's full-response rewards."""
        ref_logps = self._reference_per_token_logps(inputs, model_kwargs, labels)[:, -shift_mask.size(1) :]
        # TRL's collator stacks the batch as [chosen; rejected].
        chosen_logps, rejected_logps = policy_logps.chunk(2, dim=0)  # (B, T-1) each
        ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        given = self._given_keep(inputs, shift_mask) if self.args.selection_rule == "spans" else (None, None)
        result = selective_dpo_loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            threshold=self.args.sdpo_threshold,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            rule=self.args.selection_rule,
            generator=self._selection_generator(),
            count_rule=self.args.sdpo_count_rule,
            chosen_given=given[0],
            rejected_given=given[1],
        )
        with torch.no_grad():  # sums first, then the difference, in TRL's order
            logratios = masked_sum(policy_logps, shift_mask) - masked_sum(ref_logps, shift_mask)  # (2B,)
        chosen_rewards, rejected_rewards = (self.beta * logratios).chunk(2, dim=0)
        return result, chosen_rewards, rejected_rewards

    @staticmethod
    def _given_keep(inputs: dict, shift_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens the data names (`selection_rule="spans"`): `(chosen, rejected)`, each `(B, T-1)` bool."""
        if spans.BATCH_KEY not in inputs:
            raise ValueError("selection_rule='spans' needs batches from a trainer built with it (they carry the masks).")
        return inputs[spans.BATCH_KEY].to(shift_mask.device)[:, -shift_mask.size(1) :].chunk(2, dim=0)

    def _selection_generator(self) -> torch.Generator | None:
        """A generator for the `random` control, seeded by (seed, step, call within step, process).

        Derived from the step rather than carried along, so a resumed run draws the same tokens.
        """
        if self.args.selection_rule != "random":
            return None
        step = self.state.global_step
        if getattr(self, "_rng_step", None) != step:
            self._rng_step, self._rng_calls = step, 0
        self._rng_calls += 1
        key = f"{self.args.seed}:{step}:{self._rng_calls}:{self.accelerator.process_index}"
        return torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))

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
        return self._reference_forward(inputs, model_kwargs, labels)

    def _reference_forward(self, inputs: dict, model_kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
        """One live reference forward, `(2B, T-1)`: TRL's reference (ref_model, or PEFT's base model)."""
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}

        def forward(model):
            if self._shared_prompt_mask is not None:
                return shared_prompt_forward(model, inputs, mask_kind=self._shared_prompt_mask).log_probs
            return model(**ref_kwargs, labels=labels, fused_lm_head=True).log_probs

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), compact_lm_head():
            if self.ref_model is None and is_peft_model(self.model):
                # PEFT: the reference is the base model (adapter disabled) or an initial "ref" adapter copy.
                unwrapped = self.accelerator.unwrap_model(self.model)
                adapter = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=adapter):
                    return forward(self.model)
            if self.ref_model is None:
                raise ValueError("No reference model to run: precompute_ref_log_probs=False needs TRL's reference.")
            return forward(self.ref_model)

    # ----- stored per-token reference log-probs (precompute_ref_log_probs=True) -----

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        given = list(spans.MASK_COLUMNS) if self.args.selection_rule == "spans" else []
        self._signature_columns = list(dict.fromkeys(self._signature_columns + list(self._stored_columns) + given))

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Attach per-token reference log-probs to a tokenized dataset, scoring only what is not cached.

        TRL calls this from `__init__` (and `evaluate`) when `precompute_ref_log_probs=True`; its own
        version stores one sum per sequence, which selection cannot use.
        """
        if not self.args.uses_selection:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        if not self._stores_values:
            return dataset  # nothing to score: the selection needs no second model
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "precompute_ref_log_probs=True needs a map-style Dataset (its rows are scored and stored); got an "
                "IterableDataset. Materialize it, or set precompute_ref_log_probs=False."
            )
        # Every process must use one entry: under ZeRO-3 a module's hash differs per process (each holds a shard).
        components = [self._stored_value_components(dataset)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(components, from_process=0)
        store = reference_cache.ReferenceLogpsStore(
            self.args.ref_logps_cache_dir or cache_dir() / "ref_logps",
            components[0],
            n_rows=len(dataset),
            shard_size=REFERENCE_SHARD_ROWS,
            columns=self._stored_columns,
        )
        missing = reference_scoring.agreed_missing_shards(store, self.accelerator)
        if missing:
            scorer = self._load_scorer()
            reference_scoring.score_missing_shards(
                store,
                dataset,
                missing=missing,
                score_rows=scorer,
                batch_size=batch_size,
                accelerator=self.accelerator,
                description=self._stored_description,
                progress=lambda total: progress_bar(total=total, desc=f"Scoring {self._stored_description} ({name})", unit="pair"),
            )  # fmt: skip
            del scorer  # frees any model loaded only for scoring
        self.accelerator.wait_for_everyone()
        self.reference_stores[name] = store.path
        return reference_cache.attach_reference_logps(dataset, store)

    @property
    def _stores_values(self) -> bool:
        """Whether a second model scores the data before training (a reference's log-probs; SePO: oracle rewards)."""
        return True

    # Stored per-token values: dataset columns, batch key, and what the progress bar calls them.
    _stored_columns = (reference_cache.CHOSEN_COLUMN, reference_cache.REJECTED_COLUMN)
    _stored_batch_key = "ref_per_token_logps"
    _stored_description = "per-token reference log-probs"

    def _stored_value_components(self, dataset) -> dict:
        """Everything that changes the stored reference log-probs; the cache key is a hash of it."""
        if self._ref_path is not None:
            reference = self._files_identity(self._ref_path)
            dtype = str(_reference_init_kwargs(self.args, self.model).get("dtype", "float32"))
        elif self._policy_path is not None:  # the initial policy, identified by its files as any other model
            reference = self._files_identity(self._policy_path)
            dtype = str(_reference_init_kwargs(self.args, self._policy_path).get("dtype", "float32"))
        else:
            # A policy passed as a module: TRL hashed its weights before anything could change them.
            reference = "weights:" + self._precompute_model_hash
            dtype = str((self.ref_model or self.model).dtype)
        components = {**self._token_components(dataset), "reference": reference, "dtype": dtype.removeprefix("torch.")}
        return {**components, **self._mapping_components(self._ref_path)}

    def _mapping_components(self, other_path: str | None) -> dict:
        return reference_scoring.mapping_components(
            other_path, enabled=self.args.map_across_tokenizers, trust_remote_code=self.args.trust_remote_code
        )

    def _token_components(self, dataset) -> dict:
        components = reference_scoring.token_components(dataset, tokenizer=self._tokenizer, args=self.args)
        return {**components, "packing": "shared-prompt-v1"} if self._shared_prompt_mask is not None else components

    @staticmethod
    def _files_identity(name_or_path: str) -> str:
        return reference_scoring.files_identity(name_or_path, memo_path=file_digest_memo())

    @property
    def _policy_collator(self):
        """TRL's collator, without the wrappers that add stored values and selection masks."""
        collator = self.data_collator
        while hasattr(collator, "inner"):
            collator = collator.inner
        return collator

    def _load_scorer(self) -> reference_cache.RowScorer:
        """`rows -> per-token reference log-probs`, with the reference loaded (and engine-prepared) for scoring only."""
        if self.args.map_across_tokenizers:
            if self._ref_path is None:
                raise ValueError("map_across_tokenizers=True needs ref_model_name_or_path: the reference to map from.")
            reference = self._load_frozen(self._ref_path)
            return self._cross_tokenizer_scorer(self._ref_path, lambda sequences: self._sequence_logps(reference, sequences))
        reference = self._load_frozen(self._ref_path) if self._ref_path is not None else self._initial_policy_for_scoring()
        return reference_cache.collated_scorer(self._policy_collator, functools.partial(self._score_reference_batch, reference))

    def inference_model(self):
        """The policy, ready for no-grad forwards (held-out evaluation) under the run's engine.

        After training has prepared it, the engine's model. Before that: under DeepSpeed an inference
        engine over the policy (ZeRO-3 loaded its weights sharded), under FSDP the policy sharded in
        place, otherwise the policy itself.
        """
        from torch.distributed.tensor import DTensor
        from trl.models.utils import prepare_deepspeed, prepare_fsdp

        if self.is_deepspeed_enabled:
            if self.deepspeed is not None:  # the training engine
                return self.model_wrapped
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        if self.is_fsdp_enabled and not any(isinstance(p, DTensor) for p in self.model.parameters()):
            self.model = prepare_fsdp(self.model, self.accelerator)
        return self.model

    def _initial_policy_for_scoring(self):
        """The policy before training, ready for no-grad forwards under the run's engine.

        DeepSpeed: an inference engine over the policy itself, built once and reused (as TRL does).
        FSDP: a frozen copy loaded from the policy's files and sharded; the policy is sharded only when
        training starts, and a forward on it before then would run unsharded weights on every process.
        Otherwise the policy itself.
        """
        from trl.models.utils import prepare_deepspeed

        if self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        if self.is_fsdp_enabled:
            if self._policy_path is None:
                raise ValueError(
                    "Under FSDP, scoring the initial policy as the reference (precompute_ref_log_probs=True with no "
                    "ref_model_name_or_path) needs the policy as a path or hub id, so a frozen copy can be loaded and "
                    "sharded. Pass `model` as a path, or set ref_model_name_or_path to the policy's checkpoint."
                )
            return self._load_frozen(self._policy_path)
        return self.model

    def _cross_tokenizer_scorer(self, tokenizer_path: str, values_of: Callable) -> reference_cache.RowScorer:
        """Rows scored in the tokens of the model at `tokenizer_path`, the values moved onto the policy's."""
        return reference_scoring.cross_tokenizer_scorer(
            policy_tokenizer=self._tokenizer,
            other_tokenizer=AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=self.args.trust_remote_code),
            policy_collator=self._policy_collator,
            truncation_mode=self.args.truncation_mode,
            values_of=values_of,
        )

    def _sequence_logps(self, model, sequences: list[tuple[list[int], int]]) -> list[np.ndarray]:
        return reference_scoring.sequence_completion_logps(
            model, sequences, device=self.accelerator.device, context=self.compute_loss_context_manager
        )

    def _load_frozen(self, path: str):
        """A frozen model from `path`, with TRL's fused LM head, prepared for the run's engine."""
        return reference_scoring.load_frozen(
            path, accelerator=self.accelerator, init_kwargs=_reference_init_kwargs(self.args, self.model),
            disable_dropout=self.args.disable_dropout,
        )  # fmt: skip

    def _score_reference_batch(self, reference, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(log_probs, completion_mask)`, both `(2B, T-1)`, of one collated batch under the reference."""
        return reference_scoring.batch_logps(
            reference, batch, prepare_inputs=self._prepare_inputs, context=self.compute_loss_context_manager,
            shared_prompt_mask=self._shared_prompt_mask,
        )  # fmt: skip

    def _log(self, mode: str, logged: dict[str, float]) -> None:
        for name, value in logged.items():
            self._metrics[mode][name].append(value)


class SePOTrainer(SelectiveDPOTrainer):
    """Trainer for SePO: reference-free training on oracle-selected tokens.

    Takes a [`SePOConfig`]. Before training, the oracle and its reference score every response
    token of the data once (`log p_oracle - log p_oracle_ref`, stored and keyed like Selective-DPO's
    reference log-probs); training then runs only the policy. Everything else is TRL's.
    """

    _tag_names = ["trl", "selective-po", "sepo"]
    _name = "SePO"
    _paper = {
        "title": "Selective Preference Optimization via Token-Level Reward Function Estimation",
        "id": "2408.13518",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{yang2024selective,
                title   = {{Selective Preference Optimization via Token-Level Reward Function Estimation}},
                author  = {Kailai Yang and Zhiwei Liu and Qianqian Xie and Jimin Huang and Erxue Min and Sophia Ananiadou},
                year    = 2024,
                journal = {arXiv preprint arXiv:2408.13518},
            }"""),
    }
    _variants = {"sepo": "_sepo_step"}
    _stored_columns = ("oracle_chosen_token_rewards", "oracle_rejected_token_rewards")
    _stored_batch_key = "token_rewards"
    _stored_description = "oracle token rewards"
    _score_description = "SePO oracle token rewards (oracle log-prob minus oracle-reference log-prob)"
    _score_remedy = (
        "They come from the stored values in ref_logps_cache_dir: delete that entry to score them again, and check "
        "that the oracle's and its reference's weights are finite."
    )

    def __init__(self, model, args: SePOConfig | None = None, **kwargs):
        if not isinstance(args, SePOConfig):
            raise TypeError(f"SePOTrainer needs a SePOConfig (with the oracle's paths), got {type(args).__name__}.")
        if kwargs.get("ref_model") is not None:
            raise ValueError("SePO trains without a reference model; do not pass `ref_model`.")
        if isinstance(model, str):
            model = resolve_model_path(model)
        self._oracle_paths = {}
        oracle_fields = () if args.selection_rule in ORACLE_FREE_RULES else ("oracle_model_name_or_path", "oracle_ref_model_name_or_path")
        for field_name in oracle_fields:
            path = resolve_model_path(getattr(args, field_name))
            check_model_folder(path, trust_remote_code=args.trust_remote_code, field=field_name)
            self._check_reference_tokenizer(model, path, args, kwargs.get("processing_class"), name=getattr(args, field_name))
            self._oracle_paths[field_name] = path
        if args.map_across_tokenizers and oracle_fields:  # the oracle's rewards compare its tokens with its reference's
            oracle_tokenizers = [AutoTokenizer.from_pretrained(p, trust_remote_code=args.trust_remote_code) for p in self._oracle_paths.values()]
            check_same_vocabulary(*oracle_tokenizers, reference_name=args.oracle_ref_model_name_or_path)
        super().__init__(model, args=args, **kwargs)

    def _stored_value_components(self, dataset) -> dict:
        """Everything that changes the stored token rewards; the cache key is a hash of it."""
        dtype = str(_reference_init_kwargs(self.args, self.model).get("dtype", "float32"))
        return {
            **self._token_components(dataset),
            "kind": "sepo-token-rewards",
            "oracle": self._files_identity(self._oracle_paths["oracle_model_name_or_path"]),
            "oracle_ref": self._files_identity(self._oracle_paths["oracle_ref_model_name_or_path"]),
            "dtype": dtype.removeprefix("torch."),
            **self._mapping_components(self._oracle_paths["oracle_model_name_or_path"]),
        }

    def _load_scorer(self):
        """`rows -> token rewards`: the oracle and its reference, loaded (and engine-prepared) for scoring only."""
        oracle = self._load_frozen(self._oracle_paths["oracle_model_name_or_path"])
        oracle_ref = self._load_frozen(self._oracle_paths["oracle_ref_model_name_or_path"])
        if self.args.map_across_tokenizers:
            return self._cross_tokenizer_scorer(
                self._oracle_paths["oracle_model_name_or_path"],
                lambda sequences: [
                    a - b for a, b in zip(self._sequence_logps(oracle, sequences), self._sequence_logps(oracle_ref, sequences))
                ],
            )

        def token_rewards(batch):
            oracle_logps, mask = self._score_reference_batch(oracle, batch)
            ref_logps, _ = self._score_reference_batch(oracle_ref, batch)
            return oracle_logps.float() - ref_logps.float(), mask

        return reference_cache.collated_scorer(self._policy_collator, token_rewards)

    @property
    def _stores_values(self) -> bool:
        return self.args.selection_rule not in ORACLE_FREE_RULES

    def _score_mask(self, inputs: dict) -> torch.Tensor | None:
        """SePO's kept tokens `(2B, T-1)`: they follow from the stored oracle rewards alone (or the data's
        spans), so the policy's LM head projects only them. `confidence` needs every log-prob: None."""
        shift_mask = inputs["completion_mask"][:, 1:].bool()
        if self.args.selection_rule == "spans":
            return torch.cat(self._given_keep(inputs, shift_mask)) & shift_mask
        if self.args.selection_rule == "confidence":
            return None
        if self._stored_batch_key not in inputs:
            raise ValueError(
                "The batch carries no oracle token rewards. SePOTrainer scores them when it is built; pass the "
                "dataset as train_dataset / eval_dataset rather than to a later call."
            )
        token_rewards = inputs[self._stored_batch_key].to(shift_mask.device)[:, -shift_mask.size(1) :]
        chosen_rewards, rejected_rewards = token_rewards.chunk(2, dim=0)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        keep = sepo_keep_masks(
            chosen_rewards, rejected_rewards, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
            chosen_share=self.args.sepo_chosen_share, rejected_share=self.args.sepo_rejected_share,
            rule=self.args.selection_rule, generator=self._selection_generator(),
        )  # fmt: skip
        return torch.cat(keep)  # (2B, T-1)

    def _sepo_step(self, inputs, policy_logps, shift_mask, model_kwargs, labels, score_mask):
        """SePO on one batch: no reference forward; rewards logged are `u(y_w)` and `u(y_l)`.

        Without an oracle the ranked (and logged) scores are ConfPO's `1 - p` (`confidence`) or 1 on the
        tokens the data names (`spans`), and the kept tokens are chosen here from them."""
        chosen_logps, rejected_logps = policy_logps.chunk(2, dim=0)  # (B, T-1) each
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        rule = self.args.selection_rule
        if rule == "confidence":
            chosen_rewards, rejected_rewards = confidence_token_scores(chosen_logps), confidence_token_scores(rejected_logps)
            score_mask = torch.cat([
                select_tokens(scores, mask, keep_share=1.0, rule="confidence")
                for scores, mask in ((chosen_rewards, chosen_mask), (rejected_rewards, rejected_mask))
            ])  # fmt: skip
        elif rule == "spans":
            chosen_rewards, rejected_rewards = score_mask.float().chunk(2, dim=0)
        else:
            token_rewards = inputs[self._stored_batch_key].to(policy_logps.device)[:, -shift_mask.size(1) :]
            chosen_rewards, rejected_rewards = token_rewards.chunk(2, dim=0)
        result = sepo_loss(
            chosen_logps,
            rejected_logps,
            chosen_rewards,
            rejected_rewards,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            chosen_share=self.args.sepo_chosen_share,
            rejected_share=self.args.sepo_rejected_share,
            beta=self.beta,
            gamma=self.args.sepo_gamma,
            keep=score_mask.chunk(2, dim=0),
        )
        return result, result.chosen_rewards, result.rejected_rewards


def last_complete_checkpoint(output_dir: str) -> str:
    """The highest-numbered `checkpoint-N` in `output_dir` that holds `trainer_state.json` (written last)."""
    folders = sorted(
        (p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for folder in folders:
        if (folder / "trainer_state.json").is_file():
            return str(folder)
        logger.warning(f"Skipping {folder}: it has no trainer_state.json, so it was interrupted while being written.")
    raise ValueError(
        f"No complete checkpoint in {output_dir} to resume from ({len(folders)} checkpoint folders, none with "
        "trainer_state.json). Start without resume_from_checkpoint, or name a checkpoint folder."
    )


def _load_kwargs(args: SelectiveDPOConfig) -> dict:
    """`args.model_init_kwargs` plus the two settings every weight load here uses.

    Weights load only from safetensors (unpickling a `.bin` can run code), and code shipped with a
    model runs only when the config field `trust_remote_code` says so. `model_init_kwargs` may repeat
    either but not contradict it, so one field decides for the policy, reference, oracles and tokenizers.
    """
    kwargs = dict(args.model_init_kwargs or {})
    if kwargs.setdefault("use_safetensors", True) is not True:
        raise ValueError(
            f"model_init_kwargs sets use_safetensors={kwargs['use_safetensors']!r}: selective-po loads weights only "
            "from safetensors. Convert the checkpoint (see the error for a pickle-only folder) and drop that key."
        )
    if kwargs.setdefault("trust_remote_code", args.trust_remote_code) != args.trust_remote_code:
        raise ValueError(
            f"model_init_kwargs sets trust_remote_code={kwargs['trust_remote_code']!r} but the config field "
            f"trust_remote_code is {args.trust_remote_code!r}. Set the field (`--trust_remote_code`) and drop the key, "
            "so that one setting covers every model and tokenizer."
        )
    return kwargs


def _reference_init_kwargs(args: SelectiveDPOConfig, model) -> dict:
    """Keyword arguments for loading the reference, as TRL builds them for its own reference copy."""
    kwargs = _load_kwargs(args)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails under distributed training
    if not isinstance(model, str):
        kwargs.setdefault("dtype", model.dtype)
    return kwargs
