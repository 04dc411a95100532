"""`SelectiveDPOTrainer`: TRL's `DPOTrainer` with token-selective losses wired in.

Everything but the loss is TRL's: tokenization, collation, accelerate, DeepSpeed/FSDP, PEFT,
logging. The reference side (a path, a `ref_model` module, PEFT's base model or `"ref"` adapter, the
initial policy, a model of another tokenizer, SePO's oracle pair) is one object from
`references.py`, which runs it live and scores it for storage through the same forward. For
`loss_type="sdpo"` the trainer runs one policy forward with gradients and the reference's per-token
log-probs without, and hands them to the pure functions in `losses.py`. Any other loss type goes
to TRL unchanged.

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

from . import engines, noise, references, spans
from .config import ORACLE_FREE_RULES, SelectiveDPOConfig, SePOConfig
from .data import check_preference_dataset, report_dropped_rows
from .logprobs import compact_lm_head
from .losses import kept_token_sums, masked_sum, selective_dpo_loss, sepo_keep_masks, sepo_loss
from .metrics import check_finite_scores, dpo_metrics, selection_metrics
from .models import check_model_folder, check_same_vocabulary, resolve_model_path
from .packing import resolve_share_prompt, shared_prompt_forward
from .plots import PlotCurvesCallback
from .progress import TickingProgressCallback
from .reference_cache import PerTokenReferenceCollator
from .reference_scoring import NON_MODEL_KEYS, forward_logps
from .scoring import confidence_token_scores
from .selection import RandomControlSeeds, compute_dtypes, select_tokens

logger = logging.get_logger(__name__)


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
    # Selective variants: loss_type -> method computing (loss output, rewards logged under TRL's names).
    _variants = {"sdpo": "_sdpo_step"}
    # What selection ranks and where a non-finite value of it comes from, for the error that says so.
    _score_description = "Selective-DPO token scores (reference log-prob minus policy log-prob)"
    _score_remedy = (
        "The policy's or the reference's log-probs overflowed: lower learning_rate, train in float32 or bf16 rather "
        "than fp16, and check that the reference's weights are finite."
    )
    mask_unimportant_tokens = staticmethod(kept_token_sums)

    def __init__(self, model, ref_model: PreTrainedModel | None = None, args: SelectiveDPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = SelectiveDPOConfig(output_dir=f"{name.split('/')[-1]}-SelectiveDPO")
        elif not isinstance(args, SelectiveDPOConfig):
            raise TypeError(
                f"SelectiveDPOTrainer needs a SelectiveDPOConfig, got {type(args).__name__}. Build it with "
                "`SelectiveDPOConfig(**your_dpo_config.to_dict())` or switch the class in your script."
            )
        _check_datasets(kwargs, selective=args.uses_selection)
        self._policy_path = None
        if isinstance(model, str):
            model = self._policy_path = resolve_model_path(model)
            check_model_folder(model, trust_remote_code=args.trust_remote_code, field="model")
            args.model_init_kwargs = references.model_load_kwargs(args)  # TRL loads the policy, and its copy, with these
        quantization = kwargs.get("quantization_config")
        self._policy_quantization = {"quantization_config": quantization} if quantization is not None else {}
        self.reference_stores: dict[str, Path] = {}
        self.reference = self._build_reference(model, ref_model, args, kwargs)
        self.scorer = references.build_scorer(
            self, model, args, processing_class=kwargs.get("processing_class"), quantization_config=quantization
        )  # fmt: skip
        if self.scorer is not None:  # the fixed scores come from stored values only
            self._score_description = "fixed token scores (scorer log-prob minus reference log-prob)"
            self._score_remedy = "The scorer's or the reference's stored log-probs are not finite: check both models' weights."
        self._random_seeds = RandomControlSeeds(args.seed, args.process_index)
        super().__init__(model, ref_model=self.reference.trl_ref_model() if self.reference else None, args=args, **kwargs)
        for stored in (self.reference, self.scorer):
            if stored is not None:
                stored.initial_scoring_done()
        self.noise_bound = None  # the scores' per-token noise bound: measured on the first batch that ranks scores
        if args.score_tie_tolerance is not None:
            self.noise_bound = noise.NoiseBound.uniform(args.score_tie_tolerance, source="score_tie_tolerance")
        # Stored values made in a coarser dtype than the policy runs in carry noise that no live forward here shows
        # (with score_dtype="float32" every ranked value is computed in float32).
        self._coarser_stored = set() if args.score_dtype else noise.coarser_stored_dtypes(
            compute_dtypes(self.model, args), set().union(*(m.weight_dtypes() for m in (self.reference, self.scorer) if m is not None))
        )  # fmt: skip
        self._policy_updates = _PolicyUpdates()
        self.add_callback(self._policy_updates)
        if self.pop_callback(ProgressCallback) is not None:  # the same bars, redrawn every second
            self.add_callback(TickingProgressCallback)
        if args.plot_curves:
            self.add_callback(PlotCurvesCallback())
        if args.uses_selection and args.selection_rule == "spans":
            self.data_collator = spans.SelectionMaskCollator(self.data_collator, truncation_mode=args.truncation_mode)
        for stored in (self.reference, self.scorer):
            if self.precompute_ref_logps and args.uses_selection and stored is not None:
                self.data_collator = PerTokenReferenceCollator(self.data_collator, columns=stored.columns, output_key=stored.batch_key)

    def _build_reference(self, model, ref_model, args, kwargs) -> references.Reference | None:
        return references.build_reference(
            self, model, ref_model, args, peft_config=kwargs.get("peft_config"),
            processing_class=kwargs.get("processing_class"), quantization_config=kwargs.get("quantization_config"),
        )  # fmt: skip

    def create_accelerator_and_postprocess(self) -> None:
        """transformers' accelerator, refused if it is not the engine or process count the launch asked for.

        Also where `share_prompt` is settled: the model is loaded by now, and nothing has been scored yet.
        """
        super().create_accelerator_and_postprocess()
        engines.check_engine(self.accelerator)
        self._shared_prompt_mask = resolve_share_prompt(self)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """TRL's `train`; `resume_from_checkpoint=True` resumes from the last *complete* checkpoint.

        transformers picks the highest-numbered `checkpoint-N` folder, even one that a `kill -9` left
        half-written; `trainer_state.json` is written last, so a folder without it is skipped, with a warning.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """TRL's `evaluate`. With stored values, data passed here is scored by the reference object, which
        refuses only what it cannot score any more (TRL refuses any new data once a step has run and no
        `ref_model` is kept, even where a reference path or PEFT's base model could score it)."""
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
        stored = [column for model in (self.reference, self.scorer) if model is not None for column in model.columns]
        given = list(spans.MASK_COLUMNS) if self.args.selection_rule == "spans" else []
        self._signature_columns = list(dict.fromkeys(self._signature_columns + stored + given))

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Per-token values stored for the selective losses (TRL's own stores one sum per sequence)."""
        if not self.args.uses_selection:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        for model in (self.reference, self.scorer):  # no reference: the selection needs no second model
            if model is not None:
                dataset = model.store(dataset, name=name, batch_size=batch_size)
        return dataset

    # ----- the loss -----

    def _policy_forward(self, model, inputs: dict, score_mask: torch.Tensor | None = None):
        """The policy's forward with the fused LM head: `(outputs, logps (2B, T-1), mask (2B, T-1))`.

        Position `t` holds the log-prob of token `t + 1`, so the mask is the collator's completion
        mask shifted by one. `score_mask` `(2B, T-1)` limits the LM head to those completion positions
        (the others hold 0).
        """
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:].bool()  # (2B, T-1)
        with compact_lm_head():
            if self._shared_prompt_mask is not None:  # one row per pair: the prompt once
                outputs = shared_prompt_forward(model, inputs, mask_kind=self._shared_prompt_mask, score_mask=score_mask)
            else:
                labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
                if score_mask is not None:
                    labels[:, 1:] = labels[:, 1:].masked_fill(~score_mask, -100)
                model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
                if self.aux_loss_enabled:  # MoE: the model returns its load-balancing loss
                    model_kwargs["output_router_logits"] = True
                outputs = model(**model_kwargs, labels=labels, fused_lm_head=True, use_cache=False)
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the real positions.
        return outputs, outputs.log_probs[:, -shift_mask.size(1) :], shift_mask

    def per_token_logps(self, model, inputs: dict) -> tuple[object, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One policy forward (with whatever grad mode is on) and the reference's log-probs (without).

        Returns `(outputs, policy_logps, ref_logps, completion_mask)`: the policy's fused-head outputs
        and three `(2B, T-1)` tensors.
        """
        outputs, policy_logps, shift_mask = self._policy_forward(model, inputs)
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
        if self.reference_is_policy():
            return policy_logps.detach()
        return self._reference_per_token_logps(inputs, shift_mask)

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

            context = disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)
            with torch.no_grad(), context, self.compute_loss_context_manager():
                bound = noise.calibrate_from_layouts(forward, inputs, accelerator=self.accelerator)
            for dtype in sorted(self._coarser_stored, key=str):
                bound = bound.widened(2 * noise.STORED_DTYPE_FLOORS[dtype], reason=f"stored values computed in {dtype}")
            self.noise_bound = bound
            logger.info(f"Score noise bound per log-prob bin (nats): {[f'{v:.2g}' for v in bound.per_bin]}, {bound.source}.")
        return self.noise_bound

    def _reference_per_token_logps(self, inputs: dict, shift_mask: torch.Tensor) -> torch.Tensor:
        """The reference's per-token log-probs `(2B, T-1)`: stored ones if the batch has them, else a live forward."""
        key = self.reference.batch_key
        if key in inputs:
            return inputs[key].to(shift_mask.device)[:, -shift_mask.size(1) :]
        if self.precompute_ref_logps:
            raise ValueError(
                "precompute_ref_log_probs=True but the batch carries no per-token reference log-probs. Pass the dataset "
                "as train_dataset / eval_dataset, or to evaluate(), so they are scored, or set "
                "precompute_ref_log_probs=False to run the reference live."
            )
        return self.reference.logps(inputs)

    def _scorer_per_token_logps(self, inputs: dict, shift_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scorer's stored per-token log-probs, `(B, T-1)` chosen and rejected; `(None, None)` without a scorer."""
        if self.scorer is None:
            return None, None
        # Stored for every dataset the trainer scores (`_precompute_ref_logps`), so never run live.
        return inputs[self.scorer.batch_key].to(shift_mask.device)[:, -shift_mask.size(1) :].chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        variant = self._variants.get(self.loss_types[0]) if len(self.loss_types) == 1 else None
        if variant is None:  # TRL's own losses, with the LM head projecting completion positions only
            with compact_lm_head():
                return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        if self.args.selection_rule in ("scores", "scorer"):  # the rules that rank scores made of log-probs
            self.score_noise_bound(model, inputs)
        score_mask = self._score_mask(inputs)
        outputs, policy_logps, shift_mask = self._policy_forward(model, inputs, score_mask)
        result, chosen_rewards, rejected_rewards = getattr(self, variant)(inputs, policy_logps, shift_mask, score_mask)
        where = f"training step {self.state.global_step + 1}" if self.model.training else f"evaluation after step {self.state.global_step}"
        check_finite_scores(self.accelerator, result, *shift_mask.chunk(2, dim=0), where=where,
                            description=self._score_description, remedy=self._score_remedy)  # fmt: skip
        loss = result.losses.mean() * self.loss_weights[0]  # TRL's weight of a single loss type
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        if mode == "train":
            self._total_train_tokens += self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        logged = dpo_metrics(
            self.accelerator, outputs=outputs, per_token_logps=policy_logps.detach(),
            shift_mask=shift_mask if score_mask is None else score_mask,
            chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        )  # fmt: skip
        for name, value in {**logged, **selection_metrics(self.accelerator, result, *shift_mask.chunk(2, dim=0))}.items():
            self._metrics[mode][name].append(value)
        if return_outputs:  # mirrors TRL (deprecated there): logits for `compute_metrics` need a plain forward
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}, use_cache=False)
            return loss, outputs
        return loss

    def _score_mask(self, inputs: dict) -> torch.Tensor | None:
        """Completion positions `(2B, T-1)` whose policy log-prob the loss uses, when known before the forward."""
        return None  # Selective-DPO's selection needs the policy's own log-probs: all of them

    def _selection_generator(self) -> torch.Generator | None:
        """The `random` control's generator for this call (`selection.RandomControlSeeds`)."""
        return self._random_seeds.generator(self.state.global_step) if self.args.selection_rule == "random" else None

    def _sdpo_step(self, inputs, policy_logps, shift_mask, score_mask):
        """Selective-DPO on one batch; TRL's reward metrics use DPO's full-response rewards."""
        ref_logps = self._reference_logps(inputs, policy_logps, shift_mask)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)  # TRL's collator stacks [chosen; rejected]
        given = spans.given_keep(inputs, shift_mask) if self.args.selection_rule == "spans" else (None, None)
        scorer = self._scorer_per_token_logps(inputs, shift_mask)
        ranks_policy = self.args.selection_rule in ("scores", "confidence")  # rules whose scores use the policy's log-probs
        scoring = self.policy_scoring_logps(inputs, policy_logps).chunk(2, dim=0) if ranks_policy else (None, None)
        result = selective_dpo_loss(
            *policy_logps.chunk(2, dim=0), *ref_logps.chunk(2, dim=0), chosen_mask=chosen_mask, rejected_mask=rejected_mask,
            threshold=self.args.sdpo_threshold, beta=self.beta, rule=self.args.selection_rule,
            generator=self._selection_generator(), count_rule=self.args.sdpo_count_rule,
            chosen_given=given[0], rejected_given=given[1], scorer_chosen_logps=scorer[0], scorer_rejected_logps=scorer[1],
            scoring_chosen_logps=scoring[0], scoring_rejected_logps=scoring[1], noise=self.noise_bound,
        )  # fmt: skip
        with torch.no_grad():  # sums first, then the difference, in TRL's order
            logratios = masked_sum(policy_logps, shift_mask) - masked_sum(ref_logps, shift_mask)  # (2B,)
        chosen_rewards, rejected_rewards = (self.beta * logratios).chunk(2, dim=0)
        return result, chosen_rewards, rejected_rewards


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

    def _reference_per_token_logps(self, inputs: dict, shift_mask: torch.Tensor) -> torch.Tensor:
        raise ValueError("SePO trains without a reference model, so there are no reference log-probs to read. Measure "
                         "a SePO run against a reference with `selective-po eval --ref_model ...`.")  # fmt: skip

    def _score_mask(self, inputs: dict) -> torch.Tensor | None:
        """SePO's kept tokens `(2B, T-1)`: they follow from the stored oracle rewards alone (or the data's
        spans), so the policy's LM head projects only them. `confidence` needs every log-prob: None."""
        shift_mask = inputs["completion_mask"][:, 1:].bool()
        if self.args.selection_rule == "spans":
            return torch.cat(spans.given_keep(inputs, shift_mask)) & shift_mask
        if self.args.selection_rule == "confidence":
            return None
        if self.reference.batch_key not in inputs:
            raise ValueError(
                "The batch carries no oracle token rewards. SePOTrainer scores them for the datasets it is given; pass "
                "the dataset as train_dataset / eval_dataset, or to evaluate()."
            )
        chosen_rewards, rejected_rewards = inputs[self.reference.batch_key].to(shift_mask.device)[:, -shift_mask.size(1) :].chunk(2)
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        keep = sepo_keep_masks(
            chosen_rewards, rejected_rewards, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
            chosen_share=self.args.sepo_chosen_share, rejected_share=self.args.sepo_rejected_share,
            rule=self.args.selection_rule, generator=self._selection_generator(), noise=self.noise_bound,
        )  # fmt: skip
        return torch.cat(keep)  # (2B, T-1)

    def _sepo_step(self, inputs, policy_logps, shift_mask, score_mask):
        """SePO on one batch: no reference forward; rewards logged are `u(y_w)` and `u(y_l)`.

        Without an oracle the ranked (and logged) scores are ConfPO's `1 - p` (`confidence`) or 1 on the
        tokens the data names (`spans`), and the kept tokens are chosen here from them."""
        chosen_logps, rejected_logps = policy_logps.chunk(2, dim=0)  # (B, T-1) each
        chosen_mask, rejected_mask = shift_mask.chunk(2, dim=0)
        rule = self.args.selection_rule
        if rule == "confidence":
            scoring = self.policy_scoring_logps(inputs, policy_logps).chunk(2, dim=0)
            chosen_rewards, rejected_rewards = confidence_token_scores(scoring[0]), confidence_token_scores(scoring[1])
            score_mask = torch.cat([
                select_tokens(scores, mask, keep_share=1.0, rule="confidence")
                for scores, mask in ((chosen_rewards, chosen_mask), (rejected_rewards, rejected_mask))
            ])  # fmt: skip
        elif rule == "spans":
            chosen_rewards, rejected_rewards = score_mask.float().chunk(2, dim=0)
        else:
            chosen_rewards, rejected_rewards = inputs[self.reference.batch_key].to(policy_logps.device)[:, -shift_mask.size(1) :].chunk(2)
        result = sepo_loss(
            chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, chosen_mask=chosen_mask,
            rejected_mask=rejected_mask, chosen_share=self.args.sepo_chosen_share,
            rejected_share=self.args.sepo_rejected_share, beta=self.beta, gamma=self.args.sepo_gamma,
            keep=score_mask.chunk(2, dim=0), noise=self.noise_bound,
        )  # fmt: skip
        return result, result.chosen_rewards, result.rejected_rewards


class _PolicyUpdates(TrainerCallback):
    """Remembers whether an optimizer step has changed the policy since the trainer was built (a second `train()`
    starts again at step 0 with a policy that is no longer its initial self)."""

    stepped = False

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.stepped = True


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
