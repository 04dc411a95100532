"""`SelectiveDPOTrainer`: TRL's `DPOTrainer` with the token-level methods of `methods.py` wired in.

Everything but the loss is TRL's: tokenization, collation, accelerate, DeepSpeed/FSDP, PEFT,
logging. Every other model a method reads (the reference: a path, a `ref_model` module, PEFT's base
model or `"ref"` adapter, the initial policy, a model of another tokenizer; SePO's oracle pair; the
fixed scorer; TGDPO's reward model; TIS-DPO's forward and reverse models) is one object from
`references.py`, which runs it live or scores it for storage through the same forward. Per batch the
trainer runs one policy forward with gradients, gathers every model's per-token values into
`TokenValues` and hands them to the method (`loss_type` picks it: `methods.method_for`), a
composition of a scorer, a weighting and a loss. Any other loss type goes to TRL unchanged.

Two things keep rounding noise from choosing tokens in any dtype. While the reference is the policy
itself (the initial policy before any update), its log-probs are the policy's own, detached, so every
score is exactly 0. Otherwise the scores' noise bound (`noise.py`) is measured on the first batch, and
a response with no score outside it keeps every token.

This overrides TRL's private `DPOTrainer._compute_loss` and mirrors its metric names; TRL is pinned
to 1.16.x in pyproject.toml, and `tests/test_trainer.py` compares this trainer against TRL's own
`sigmoid` loss, gradients and logged metrics so that a TRL upgrade that moves them fails loudly.
`docs/trl_parity.md` lists every TRL option with what it does here.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PreTrainedModel, ProcessorMixin, ProgressCallback, Trainer, TrainerCallback
from transformers.utils import logging
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id

from . import engines, methods, noise, references, spans
from .config import ORACLE_FREE_RULES, SelectiveDPOConfig, SePOConfig
from .data import check_preference_dataset, report_dropped_rows, swapped_preferences
from .logprobs import compact_lm_head
from .losses import weighted_sum
from .methods import kept_token_sums
from .metrics import check_finite_scores, step_metrics
from .models import check_model_folder, check_same_vocabulary, resolve_model_path
from .packing import resolve_share_prompt, shared_prompt_forward
from .plots import PlotCurvesCallback
from .progress import TickingProgressCallback
from .reference_cache import PerTokenReferenceCollator
from .reference_scoring import NON_MODEL_KEYS, forward_logps
from .selection import RandomControlSeeds, compute_dtypes
from .token_values import TokenValues, end_and_after, end_of_turn_mask, end_token_ids
from .weighting import length_desensitized_weights

logger = logging.get_logger(__name__)


SELECTIVE_DPO_PAPER = {
    "title": "Not All Preferences are What You Need for Post-Training: Selective Alignment Strategy for Preference Optimization",
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


class SelectiveDPOTrainer(DPOTrainer):
    """Trainer for Selective-DPO (and, unchanged, every TRL DPO loss).

    Takes the same arguments as `trl.DPOTrainer`, with a [`SelectiveDPOConfig`][selective_po.SelectiveDPOConfig] as `args`.
    `model` may also be an embedded name such as `"smollm2-135m-instruct"`, and
    `args.ref_model_name_or_path` loads the reference from a path instead of copying the policy.

    Example:
    ```python
    from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset

    dataset = load_preference_dataset("arithmetic", split="train")
    args = SelectiveDPOConfig(output_dir="sdpo", loss_type="sdpo", sdpo_threshold=0.6)
    SelectiveDPOTrainer(model="smollm2-135m-instruct", args=args, train_dataset=dataset).train()
    ```

    Attributes:
        mask_unimportant_tokens: `methods.kept_token_sums`: the policy's and the reference's log-probs `(B, T)` summed over each response's Selective-DPO-kept tokens, `(B,)` each, ready for TRL's DPO loss.
    """

    _tag_names = ["trl", "dpo", "selective-po"]
    _name = "Selective-DPO"
    _paper = SELECTIVE_DPO_PAPER
    mask_unimportant_tokens = staticmethod(kept_token_sums)

    def __init__(self, model, ref_model: PreTrainedModel | None = None, args: SelectiveDPOConfig | None = None, **kwargs):
        args = _selective_args(model, args)
        _check_datasets(kwargs, selective=args.uses_selection)
        kwargs = swapped_preferences(kwargs) if args.swap_chosen_rejected else kwargs
        self._policy_path = None
        if isinstance(model, str):
            model = self._policy_path = resolve_model_path(model)
            check_model_folder(model, trust_remote_code=args.trust_remote_code, field="model")
            args.model_init_kwargs = references.model_load_kwargs(args)  # TRL loads the policy, and its copy, with these
        quantization = kwargs.get("quantization_config")
        self._policy_quantization = {"quantization_config": quantization} if quantization is not None else {}
        self.reference_stores: dict[str, Path] = {}
        self.method = methods.method_for(args)  # None: TRL's own loss
        self.reference = self._build_reference(model, ref_model, args, kwargs)
        self.stored_models = references.build_stored_models(
            self, model, args, processing_class=kwargs.get("processing_class"), quantization_config=quantization
        )  # fmt: skip
        self._random_seeds = RandomControlSeeds(args.seed, args.process_index)
        # TRL refuses f-divergences with loss types it does not implement; the selective losses apply them themselves.
        f_divergence, args.f_divergence_type = args.f_divergence_type, args.f_divergence_type if self.method is None else "reverse_kl"
        try:
            super().__init__(model, ref_model=self.reference.trl_ref_model() if self.reference else None, args=args, **kwargs)
        finally:
            args.f_divergence_type = self.f_divergence_type = f_divergence
        for stored in self.value_models():
            stored.initial_scoring_done()
        # The scores' per-token noise bound: the user's, or measured on the first batch that ranks scores.
        self.noise_bound = noise.NoiseBound.uniform(args.score_tie_tolerance, source="score_tie_tolerance") if args.score_tie_tolerance is not None else None
        # Stored values made in a coarser dtype than the policy runs in carry noise that no live forward here shows.
        stored_dtypes = set().union(*(m.weight_dtypes() for m in self.value_models())) if not args.score_dtype else set()
        self._coarser_stored = noise.coarser_stored_dtypes(compute_dtypes(self.model, args), stored_dtypes)
        self._end_ids = end_token_ids(self.model, self._tokenizer)
        self._policy_updates = _PolicyUpdates()
        self.add_callback(self._policy_updates)
        if self.pop_callback(ProgressCallback) is not None:  # the same bars, redrawn every second
            self.add_callback(TickingProgressCallback)
        if args.plot_curves:
            self.add_callback(PlotCurvesCallback())
        if args.uses_selection and args.selection_rule == "spans":
            self.data_collator = spans.SelectionMaskCollator(self.data_collator, truncation_mode=args.truncation_mode)
        for stored in self.value_models():
            if self.precompute_ref_logps and args.uses_selection:
                self.data_collator = PerTokenReferenceCollator(self.data_collator, columns=stored.columns, output_key=stored.batch_key)

    def _build_reference(self, model, ref_model, args, kwargs) -> references.Reference | None:
        given = {key: kwargs.get(key) for key in ("peft_config", "processing_class", "quantization_config")}
        return references.build_reference(self, model, ref_model, args, **given)

    def value_models(self) -> list[references.Reference]:
        """Every model whose per-token values the method reads: the reference side, then the stored-only models."""
        return [m for m in (self.reference, *self.stored_models) if m is not None]

    def create_accelerator_and_postprocess(self) -> None:
        """transformers' accelerator, refused if not the engine or process count asked for; settles `share_prompt`."""
        super().create_accelerator_and_postprocess()
        engines.check_engine(self.accelerator)
        self._shared_prompt_mask = resolve_share_prompt(self)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """TRL's `train`; `resume_from_checkpoint=True` resumes from the last *complete* checkpoint, not a `kill -9`'s."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's `evaluate`; with stored values, the reference object scores new data (TRL refuses once a step has run)."""
        if eval_dataset is None or isinstance(eval_dataset, str) or not (self.precompute_ref_logps and self.args.uses_selection):
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        named = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        metrics = {}
        for name, dataset in named.items():
            _check_datasets({"eval_dataset": dataset}, selective=True)
            dataset = self._prepare_dataset(dataset, self.processing_class, self.args, name or "eval")
            dataset = self._precompute_ref_logps(dataset, name or "eval", batch_size)
            prefix = metric_key_prefix if name is None else f"{metric_key_prefix}_{name}"
            metrics.update(Trainer.evaluate(self, eval_dataset=dataset, ignore_keys=ignore_keys, metric_key_prefix=prefix))
        return metrics

    def inference_model(self):
        """The policy, ready for no-grad forwards under the run's engine (see `engines.inference_model`)."""
        return engines.inference_model(self)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's tokenization: rows whose prompt fills `max_length` are dropped as TRL drops them, in one line."""
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and isinstance(prepared, Dataset):
            report_dropped_rows(len(dataset), len(prepared), name=dataset_name, max_length=args.max_length)
        if args.uses_selection and args.selection_rule == "spans":
            tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
            prepared = spans.add_selection_masks(prepared, tokenizer)
        return prepared

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        stored = [column for model in self.value_models() for column in model.columns]
        given = list(spans.MASK_COLUMNS) if self.args.selection_rule == "spans" else []
        self._signature_columns = list(dict.fromkeys(self._signature_columns + stored + given))

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Per-token values stored for the selective losses (TRL's own stores one sum per sequence)."""
        if not self.args.uses_selection:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        for model in self.value_models():  # no reference: the selection needs no second model
            dataset = model.store(dataset, name=name, batch_size=batch_size)
        return dataset

    # ----- per-token values -----

    def per_token_logps(self, model, inputs: dict):
        """One policy forward (grad mode as set) and the reference's log-probs (without): `(outputs, policy_logps,
        ref_logps, completion_mask)`, the last three `(2B, T-1)`."""
        outputs, policy_logps, shift_mask = policy_forward(model, inputs, self._shared_prompt_mask)
        return outputs, policy_logps, self._reference_logps(inputs, policy_logps, shift_mask), shift_mask

    def reference_is_policy(self) -> bool:
        """Whether the reference computes exactly what the policy does now: it is the initial policy (or PEFT's base
        behind adapters that add nothing yet), no optimizer step has run (under gradient accumulation: every
        micro-batch of step 0), and no dropout makes the policy's forward random."""
        if self.reference is None or self.state.global_step > 0 or self._policy_updates.stepped:
            return False
        return self.reference.is_initial_policy() and not (self.model.training and _dropout_active(self.model))

    def _reference_logps(self, inputs: dict, policy_logps: torch.Tensor, shift_mask: torch.Tensor) -> torch.Tensor:
        """The reference's per-token log-probs `(2B, T-1)`. While it is the policy itself, the policy's own values,
        detached: every score is then exactly 0 in any dtype, and every token is kept, by construction."""
        if self.reference is None or self.reference.value_name != "reference":
            raise ValueError(f"{self.method.name} trains without a reference model, so there are no reference log-probs to "
                             "read. Measure its policy against a reference with `selective-po eval --ref_model ...`.")  # fmt: skip
        if self.reference_is_policy():
            return policy_logps.detach()
        return self.reference.values(inputs, shift_mask)

    def policy_scoring_logps(self, inputs: dict, policy_logps: torch.Tensor) -> torch.Tensor:
        """The policy's log-probs `(2B, T-1)` that ranked scores compare: the training forward's own, detached, or with
        `score_dtype="float32"` a no-grad forward in float32 (skipped while the reference is the policy: every score
        is then exactly 0 anyway)."""
        if self.args.score_dtype is None or self.reference_is_policy():
            return policy_logps.detach()
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            scoring = forward_logps(self.model, inputs, shared_prompt_mask=self._shared_prompt_mask, float32=True)
        return scoring[:, -policy_logps.size(1) :]

    def score_noise_bound(self, model, inputs: dict) -> noise.NoiseBound:
        """The run's per-token noise bound (`noise.py`): `score_tie_tolerance` when set, else measured once, on the
        first batch given here, by running its pairs again one at a time through `model` (no gradients)."""
        if self.noise_bound is None:
            def forward(batch):
                return forward_logps(model, batch, shared_prompt_mask=self._shared_prompt_mask, float32=self.args.score_dtype == "float32")

            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), self.compute_loss_context_manager():
                self.noise_bound = noise.run_bound(forward, inputs, accelerator=self.accelerator, coarser_stored=self._coarser_stored)
            logger.info(f"Score noise bound per log-prob bin (nats): {[f'{v:.2g}' for v in self.noise_bound.per_bin]}, {self.noise_bound.source}.")
        return self.noise_bound

    def token_values(self, inputs: dict) -> TokenValues:
        """The batch's `TokenValues` apart from the policy's log-probs: masks, the data's spans, the ends of the
        responses, every stored value, and the `random` control's generator."""
        shift_mask = inputs["completion_mask"][:, 1:].bool()  # (2B, T-1): position t scores token t + 1
        stored = {m.value_name: m.values(inputs, shift_mask).chunk(2) for m in self.value_models() if m.value_name != "reference"}
        given = spans.given_keep(inputs, shift_mask) if self.args.selection_rule == "spans" else None
        first_end = end_of_turn_mask(inputs["input_ids"][:, 1:], shift_mask, self._end_ids)  # (2B, T-1)
        end, end_turn = end_and_after(first_end, shift_mask).chunk(2), first_end.chunk(2)
        generator = self._random_seeds.generator(self.state.global_step) if self.args.selection_rule == "random" else None
        return TokenValues(mask=shift_mask.chunk(2), stored=stored, given=given, end=end, end_turn=end_turn, generator=generator)

    # ----- the loss -----

    def _compute_loss(self, model, inputs, return_outputs):
        if self.method is None:  # TRL's own losses, with the LM head projecting completion positions only
            with compact_lm_head():
                return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        if self.method.needs_noise_bound:
            self.score_noise_bound(model, inputs)
        values = self.token_values(inputs)  # SePO's kept tokens follow from stored values: the LM head projects only them
        weights = self.method.weights(values, self.noise_bound) if self.method.weights_before_forward else None
        score_mask = torch.cat(weights) & inputs["completion_mask"][:, 1:].bool() if weights is not None else None
        outputs, policy_logps, shift_mask = policy_forward(model, inputs, self._shared_prompt_mask, score_mask=score_mask,
                                                           aux_loss=self.aux_loss_enabled)  # fmt: skip
        result, chosen_rewards, rejected_rewards = self.method_step(inputs, policy_logps, shift_mask, values, weights)
        where = f"training step {self.state.global_step + 1}" if self.model.training else f"evaluation after step {self.state.global_step}"
        check_finite_scores(self.accelerator, result, *shift_mask.chunk(2, dim=0), where=where,
                            description=self.method.scorer.description, remedy=self.method.scorer.remedy)  # fmt: skip
        loss = result.losses.mean() * self.loss_weights[0]  # TRL's weight of a single loss type
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        logged = step_metrics(  # TRL's logps/* sum the tokens as its loss does (LD-DPO's weights with ld_alpha)
            self.accelerator, result, outputs=outputs, per_token_logps=policy_logps.detach() * self.response_weights(shift_mask), shift_mask=shift_mask,
            score_mask=score_mask, rewards=(chosen_rewards, rejected_rewards), aux_loss=self.aux_loss_enabled, end_turn=values.end_turn,
        )  # fmt: skip
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        for name, value in logged.items():
            self._metrics[mode][name].append(value)
        if return_outputs:  # mirrors TRL (deprecated there): logits for `compute_metrics` need a plain forward
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}, use_cache=False)
            return loss, outputs
        return loss

    def response_weights(self, shift_mask: torch.Tensor) -> torch.Tensor:
        """Each completion token's weight `(2B, T-1)` in TRL's full-response sums: the mask, or LD-DPO's with `ld_alpha`."""
        return shift_mask if self.args.ld_alpha is None else torch.cat(length_desensitized_weights(*shift_mask.chunk(2), alpha=self.args.ld_alpha))

    def method_step(self, inputs: dict, policy_logps: torch.Tensor, shift_mask: torch.Tensor, values: TokenValues | None = None,
                    weights=None):  # fmt: skip
        """The method on one batch: `(result, chosen_rewards, rejected_rewards)`, the rewards logged under TRL's names
        being DPO's full-response ones where the method has a reference (its own otherwise, e.g. SePO's `u`)."""
        values = self.token_values(inputs) if values is None else values
        values.policy = policy_logps.chunk(2)
        if self.reference is not None and self.reference.value_name == "reference":
            values.reference = self._reference_logps(inputs, policy_logps, shift_mask).chunk(2)
        if self.method.scorer.reads_policy:
            values.scoring = self.policy_scoring_logps(inputs, policy_logps).chunk(2)
        result = self.method(values, noise=self.noise_bound, weights=weights)
        if values.reference is None:
            return result, result.chosen_rewards, result.rejected_rewards
        with torch.no_grad():  # sums first, then the difference, in TRL's order
            weights = self.response_weights(shift_mask)
            logratios = weighted_sum(policy_logps, weights, shift_mask) - weighted_sum(torch.cat(values.reference), weights, shift_mask)  # (2B,)
        chosen_rewards, rejected_rewards = (self.beta * logratios).chunk(2, dim=0)
        return result, chosen_rewards, rejected_rewards


class SePOTrainer(SelectiveDPOTrainer):
    """Trainer for SePO: reference-free training on oracle-selected tokens.

    Takes a [`SePOConfig`][selective_po.SePOConfig]. Before training, the oracle and its reference score every response
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
    def __init__(self, model, args: SePOConfig | None = None, **kwargs):
        if not isinstance(args, SePOConfig):
            raise TypeError(f"SePOTrainer needs a SePOConfig (with the oracle's paths), got {type(args).__name__}.")
        if kwargs.get("ref_model") is not None:
            raise ValueError("SePO trains without a reference model; do not pass `ref_model`.")
        super().__init__(model, args=args, **kwargs)

    def _build_reference(self, model, ref_model, args, kwargs) -> references.OraclePair | None:
        """The oracle pair, or nothing for the rules that need no second model."""
        if args.selection_rule in ORACLE_FREE_RULES:
            return None
        paths = [
            references.checked_path(getattr(args, field), field=field, policy=model, args=args, processing_class=kwargs.get("processing_class"))
            for field in ("oracle_model_name_or_path", "oracle_ref_model_name_or_path")
        ]  # fmt: skip
        if args.map_across_tokenizers:  # the oracle's rewards compare its tokens with its reference's
            from transformers import AutoTokenizer

            tokenizers = [AutoTokenizer.from_pretrained(p, trust_remote_code=args.trust_remote_code) for p in paths]
            check_same_vocabulary(*tokenizers, reference_name=args.oracle_ref_model_name_or_path)
        init_kwargs = references.reference_load_kwargs(args, model, kwargs.get("quantization_config"))
        return references.OraclePair(self, *paths, init_kwargs=init_kwargs)


class _PolicyUpdates(TrainerCallback):
    """Remembers whether an optimizer step has changed the policy since the trainer was built (a second `train()`
    starts again at step 0 with a policy that is no longer its initial self)."""

    stepped = False

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.stepped = True


def policy_forward(model, inputs: dict, shared_prompt_mask: str | None, *, score_mask: torch.Tensor | None = None,
                   aux_loss: bool = False):  # fmt: skip
    """The policy's forward with the fused LM head: `(outputs, logps (2B, T-1), mask (2B, T-1))`.

    Position `t` holds the log-prob of token `t + 1`, so the mask is the collator's completion mask shifted by
    one. `score_mask` `(2B, T-1)` limits the LM head to those completion positions (the others hold 0).
    `aux_loss`: a mixture-of-experts model also returns its load-balancing loss.
    """
    completion_mask = inputs["completion_mask"]
    shift_mask = completion_mask[:, 1:].bool()  # (2B, T-1)
    with compact_lm_head():
        if shared_prompt_mask is not None:  # one row per pair: the prompt once
            outputs = shared_prompt_forward(model, inputs, mask_kind=shared_prompt_mask, score_mask=score_mask)
        else:
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            if score_mask is not None:
                labels[:, 1:] = labels[:, 1:].masked_fill(~score_mask, -100)
            model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
            if aux_loss:
                model_kwargs["output_router_logits"] = True
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
    # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the real positions.
    return outputs, outputs.log_probs[:, -shift_mask.size(1) :], shift_mask


def _selective_args(model, args: SelectiveDPOConfig | None) -> SelectiveDPOConfig:
    """`args`, or TRL's default config for `model` when None; any config but a `SelectiveDPOConfig` is refused."""
    if args is None:
        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return SelectiveDPOConfig(output_dir=f"{name.split('/')[-1]}-SelectiveDPO")
    if not isinstance(args, SelectiveDPOConfig):
        raise TypeError(
            f"SelectiveDPOTrainer needs a SelectiveDPOConfig, got {type(args).__name__}. Build it with "
            "`SelectiveDPOConfig(**your_dpo_config.to_dict())` or switch the class in your script."
        )
    return args


def _dropout_active(model) -> bool:
    """Whether a training forward of `model` is random: a dropout module or an attention dropout above 0."""
    return any(
        (isinstance(module, torch.nn.Dropout) and module.p > 0) or float(getattr(module, "attention_dropout", 0.0) or 0.0) > 0
        for module in model.modules()
    )  # fmt: skip


def _check_datasets(kwargs: dict, *, selective: bool) -> None:
    """Clear errors for the datasets given, before TRL tokenizes anything."""
    for name in ("train_dataset", "eval_dataset"):
        given = kwargs.get(name)
        for key, dataset in (given if isinstance(given, dict) else {name: given}).items():
            if not isinstance(dataset, Dataset) or "prompt_ids" in dataset.column_names:
                continue
            if selective and {"image", "images"} & set(dataset.column_names):
                raise ValueError(
                    f"The {key} has images ({', '.join(sorted({'image', 'images'} & set(dataset.column_names)))} "
                    "column): TRL processes vision data in the collator, on the fly, so no per-token values can be "
                    "stored for it and the shared-prompt and span paths do not apply; the selective losses do not "
                    "support it yet. Train it with one of TRL's loss types (e.g. loss_type='sigmoid')."
                )
            check_preference_dataset(dataset, source=key)


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
