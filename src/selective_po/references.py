"""The other models of a run: one object owns each model (or pair) whose per-token values a method reads.

Data flow: tokens -> **per-token values of the models besides the policy** (this module: a live
forward, or rows scored once and stored) -> `TokenValues` -> scorer -> weighting -> loss.

Whatever the reference is, the trainer builds one object for it (`build_reference`), and one for each
stored-only model a method reads (`build_stored_models`). The object
knows how its model is loaded and placed on the run's engine, runs the live forward, scores rows for
storage through the *same* forward, says what identifies its values in the cache key, and says when
it can no longer score new data. Live and stored values cannot disagree about which model, or which
state of it, they come from.

| the run gives | object | live forward | stored values | identified by |
| --- | --- | --- | --- | --- |
| `ref_model_name_or_path` | `PathReference` | loaded once, engine-prepared by TRL | loaded for scoring only, then freed | its files, dtype, quantization |
| a module as `ref_model` | `ModuleReference` | TRL's prepared module | that module, then freed | its weights (TRL's hash), dtype, quantization |
| a PEFT policy, no reference | `AdapterReference` | the policy with its adapter off, or TRL's `"ref"` copy | the same, at any time | the base model and the adapter state |
| nothing | `InitialPolicyReference` | TRL's frozen copy of the policy | the policy before its first step | the policy's files or weights |
| `map_across_tokenizers=True` | `CrossTokenizerReference` | none (stored only) | scored in its own tokens, moved onto the policy's | its files and the mapping |
| SePO's two oracle paths | `OraclePair` | none (stored only) | `log p_oracle - log p_oracle_ref` | both models' files |
| `scorer_model_name_or_path` | `ScorerModel` | none (stored only) | its log-probs | its files, dtype, quantization |
| `tgdpo_reward_model_name_or_path` | `RewardModel` | none (stored only) | its log-probs | its files, dtype, quantization |
| TIS-DPO's forward and reverse paths | `ContrastivePair` | none (stored only) | `log p_forward - log p_reverse` | both models' files |

A model that is stored-only is never kept in memory while training. TRL's own loss types get the
same reference model TRL would use; only the selective losses call these objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PretrainedConfig, ProcessorMixin
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from . import reference_cache, reference_scoring
from .engines import precompute_engine
from .models import cache_dir, check_model_folder, check_same_vocabulary, file_digest_memo, resolve_model_path
from .packing import packed_model_problem
from .progress import bar as progress_bar


class Run(Protocol):
    """What the objects here read from the run that uses them (a `SelectiveDPOTrainer` is one): its settings, the
    engine, the policy, TRL's reference module and collator, and where it records stored values."""

    args: Any
    accelerator: Any
    model: Any
    ref_model: Any
    data_collator: Any
    state: Any
    precompute_ref_logps: bool
    reference_stores: dict[str, Path]
    is_deepspeed_enabled: bool
    deepspeed: Any
    _shared_prompt_mask: str | None
    _tokenizer: Any
    _policy_path: str | None
    _policy_quantization: dict
    _precompute_model_hash: str

    def _prepare_inputs(self, inputs: dict) -> dict: ...

    def compute_loss_context_manager(self): ...

# Rows per stored shard of per-token values: the unit of resumption after an interruption.
REFERENCE_SHARD_ROWS = 256


# ---------------------------------------------------------------------------------------------
# How models load


def model_load_kwargs(args) -> dict:
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


def reference_load_kwargs(args, policy, quantization_config=None) -> dict:
    """Keyword arguments for loading a reference-side model, as TRL builds them for its own reference copy:
    the policy's load arguments and quantization, and for a policy passed as a module its dtype and attention."""
    kwargs = model_load_kwargs(args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # "auto" fails under distributed training
    if not isinstance(policy, str):
        kwargs.setdefault("dtype", policy.dtype)
        kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
    return kwargs


def check_tokenizer(policy, path: str, args, processing_class, *, name: str, mappable: bool = True) -> None:
    """Fail before any loading or tokenization if a reference-side model tokenizes differently."""
    if isinstance(processing_class, ProcessorMixin):
        processing_class = processing_class.tokenizer
    if processing_class is None:
        policy_path = policy if isinstance(policy, str) else get_config_model_id(policy.config)
        processing_class = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=args.trust_remote_code)
    try:
        other = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from {name!r} to check that it shares the policy's vocabulary. Save the "
            "tokenizer next to the model's weights."
        ) from error
    if not args.map_across_tokenizers:
        check_same_vocabulary(processing_class, other, reference_name=name, mappable=mappable)


def checked_path(name: str, *, field: str, policy, args, processing_class, mappable: bool = True) -> str:
    """A reference-side model name resolved to a loadable path, its folder and tokenizer checked."""
    path = resolve_model_path(name)
    folder = Path(path).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        # Its values would depend on a base model named inside, which the cache key cannot see.
        raise ValueError(
            f"{field}={name!r} is a PEFT adapter folder (adapter_config.json, no config.json). Merge the adapter into "
            "its base and save the whole model, e.g. `AutoPeftModelForCausalLM.from_pretrained(folder).merge_and_unload()"
            ".save_pretrained(merged)`, and name the merged folder."
        )
    check_model_folder(path, trust_remote_code=args.trust_remote_code, field=field)
    check_tokenizer(policy, path, args, processing_class, name=name, mappable=mappable)
    return path


# ---------------------------------------------------------------------------------------------
# What identifies a model's values


def _dtype_name(dtype) -> str:
    return str(dtype if dtype is not None else "float32").removeprefix("torch.")


def _quantization(config) -> dict:
    """The cache-key part for a quantized model (nothing for an unquantized one)."""
    if config is None:
        return {}
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"quantization": json.dumps(settings, sort_keys=True, default=str)}


def files_identity(path: str, init_kwargs: dict) -> dict:
    """A model loaded from `path` with `init_kwargs`: its files' content, the dtype and any quantization."""
    return {
        "reference": reference_scoring.files_identity(path, memo_path=file_digest_memo()),
        "dtype": _dtype_name(init_kwargs.get("dtype")),
        **_quantization(init_kwargs.get("quantization_config")),
    }


def module_identity(module, weights_hash: str) -> dict:
    return {
        "reference": "weights:" + weights_hash,
        "dtype": _dtype_name(module.dtype),
        **_quantization(getattr(module.config, "quantization_config", None)),
    }


def tensors_hash(module, keep) -> str:
    """sha256 over the state-dict entries whose names `keep` accepts, by name, dtype and value."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not keep(name):
            continue
        tensor = tensor.detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update((tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The objects


class Reference:
    """The model that per-token values come from, as one trainer uses it.

    Subclasses say which module runs (`_module`), in which state (`_state`), and how it is
    identified; the forward, the scorer for storage and the storing pass are shared, so stored values
    come from exactly what the live forward runs.
    """

    columns = (reference_cache.CHOSEN_COLUMN, reference_cache.REJECTED_COLUMN)  # stored dataset columns
    batch_key = "ref_per_token_logps"  # where the collator puts stored values in a batch
    value_name = "reference"  # what a method reads them as (`TokenValues.reference`, else a key of `TokenValues.stored`)
    description = "per-token reference log-probs"
    store_label = ""  # appended to the dataset's name in `trainer.reference_stores`

    def __init__(self, trainer: Run):
        self.trainer = trainer
        self._packing_checked = False

    def trl_ref_model(self):
        """What TRL's `DPOTrainer` gets as `ref_model` (it disables dropout, adds the fused head, prepares it)."""
        return None

    def identity(self) -> dict:
        """The parts of the cache key that say which model, in which state, made the values."""
        raise NotImplementedError

    def scoring_problem(self) -> str | None:
        """Why this reference cannot score new rows now, or `None` when it can."""
        return None

    def release(self) -> None:
        """Free what was loaded only to score rows for storage."""

    def initial_scoring_done(self) -> None:
        """Called once the datasets given to the trainer are stored; training needs nothing else from it."""

    def weight_dtypes(self) -> set[torch.dtype]:
        """The floating dtypes of the weights behind its values, where they are not the policy's."""
        return set()

    def is_initial_policy(self) -> bool:
        """Whether it computes exactly what the policy computed before its first optimizer step."""
        return False

    def model_configs(self) -> dict[str, object]:
        """The configs of the models behind its values that are not the policy, by name."""
        return {}

    def check_packable(self) -> None:
        """Raise if a model behind its values cannot run the shared-prompt rows that the policy's config allowed."""
        mask = self.trainer._shared_prompt_mask
        if mask is None or self._packing_checked:
            return
        for name, config in self.model_configs().items():
            problem = packed_model_problem(config, mask)
            if problem is not None:
                raise ValueError(f"{name!r} cannot run the pairs as shared-prompt rows, as the policy does: {problem}. "
                                 "Set share_prompt=False.")  # fmt: skip
        self._packing_checked = True

    def _module(self):
        raise NotImplementedError

    def _state(self):
        return contextlib.nullcontext()

    def logps(self, inputs: dict) -> torch.Tensor:
        """Per-token log-probs `(2B, T-1)` of a batch already on the device, without gradients."""
        trainer = self.trainer
        self.check_packable()
        with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
            with self._state():
                return reference_scoring.forward_logps(self._module(), inputs, shared_prompt_mask=trainer._shared_prompt_mask,
                                                       float32=trainer.args.score_dtype == "float32")  # fmt: skip

    def values(self, inputs: dict, shift_mask: torch.Tensor) -> torch.Tensor:
        """Its per-token values `(2B, T-1)` for a batch on the device: the stored ones the collator added, else (for a
        model that can run live, without stored values) a live forward."""
        if self.batch_key in inputs:
            return inputs[self.batch_key].to(shift_mask.device)[:, -shift_mask.size(1) :]
        if self.trainer.precompute_ref_logps or self.value_name != "reference":
            raise ValueError(
                f"The batch carries no {self.description}. The trainer stores them for the datasets it is given: pass "
                "the dataset as train_dataset / eval_dataset, or to evaluate()"
                + (", or set precompute_ref_log_probs=False to run the reference live." if self.value_name == "reference" else ".")
            )
        return self.logps(inputs)

    def row_scorer(self) -> reference_cache.RowScorer:
        """`rows -> (chosen values, rejected values)` for storage, through TRL's collator and `logps`."""
        trainer = self.trainer

        def forward(batch):
            batch = trainer._prepare_inputs(batch)
            with trainer.compute_loss_context_manager():  # autocast as in training
                return self.logps(batch), batch["completion_mask"][:, 1:].bool()

        return reference_cache.collated_scorer(policy_collator(trainer.data_collator), forward)

    def store(self, dataset, *, name: str, batch_size: int) -> Dataset:
        """The dataset with this reference's per-token values attached, scoring only what is not stored yet."""
        trainer = self.trainer
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"precompute_ref_log_probs=True needs a map-style Dataset (its rows are scored and stored); the {name} "
                "dataset is an IterableDataset. Materialize it, or set precompute_ref_log_probs=False."
            )
        # Every process must use one entry: under ZeRO-3 a module's hash differs per process (each holds a shard).
        components = [{**reference_scoring.token_components(dataset, trainer=trainer), **self.identity()}]
        if trainer.accelerator.num_processes > 1:
            broadcast_object_list(components, from_process=0)
        store = reference_cache.ReferenceLogpsStore(
            trainer.args.ref_logps_cache_dir or cache_dir() / "ref_logps", components[0], n_rows=len(dataset),
            shard_size=REFERENCE_SHARD_ROWS, columns=self.columns,
        )  # fmt: skip
        missing = reference_scoring.agreed_missing_shards(store, trainer.accelerator)
        if missing:
            problem = self.scoring_problem()
            if problem is not None:
                raise ValueError(f"Cannot store {self.description} for the {name} dataset: {problem}")
            reference_scoring.score_missing_shards(
                store, dataset, missing=missing, score_rows=self.row_scorer(), batch_size=batch_size,
                accelerator=trainer.accelerator, description=self.description,
                progress=lambda total: progress_bar(total=total, desc=f"Scoring {self.description} ({name})", unit="pair"),
            )  # fmt: skip
            self.release()
        trainer.accelerator.wait_for_everyone()
        trainer.reference_stores[name + self.store_label] = store.path
        return reference_cache.attach_reference_logps(dataset, store)


class FrozenModel:
    """A model from a path, loaded on first use for no-grad forwards (TRL's fused head, the run's engine)."""

    def __init__(self, trainer: Run, path: str, init_kwargs: dict):
        self.trainer, self.path, self.init_kwargs = trainer, path, init_kwargs
        self._loaded = None

    def module(self):
        if self._loaded is None:
            self._loaded = reference_scoring.load_frozen(
                self.path, accelerator=self.trainer.accelerator, init_kwargs=self.init_kwargs,
                disable_dropout=self.trainer.args.disable_dropout,
            )  # fmt: skip
        return self._loaded

    def release(self) -> None:
        self._loaded = None

    def config(self):
        """The loaded model's config (loading it if needed), under whatever engine wraps it."""
        return self.trainer.accelerator.unwrap_model(self.module()).config

    def identity(self) -> dict:
        return files_identity(self.path, self.init_kwargs)

    def weight_dtypes(self) -> set[torch.dtype]:
        """The dtype its weights load in: `init_kwargs`' dtype (TRL's default float32), or the checkpoint's own for `auto`."""
        dtype = self.init_kwargs.get("dtype", "float32")
        if dtype is None or dtype == "auto":
            saved = PretrainedConfig.get_config_dict(self.path)[0]
            dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"
        return {dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))}


class PathReference(Reference):
    """`ref_model_name_or_path`: loaded once for a live reference, or only while scoring for stored values."""

    def __init__(self, trainer, path: str, *, init_kwargs: dict, live: bool):
        super().__init__(trainer)
        self.frozen, self.live = FrozenModel(trainer, path, init_kwargs), live

    def trl_ref_model(self):
        return create_model_from_path(self.frozen.path, **self.frozen.init_kwargs) if self.live else None

    def _module(self):
        return self.trainer.ref_model if self.live else self.frozen.module()

    def model_configs(self) -> dict[str, object]:
        if self.live:
            return {self.frozen.path: self.trainer.accelerator.unwrap_model(self.trainer.ref_model).config}
        return {self.frozen.path: self.frozen.config()}

    def identity(self) -> dict:
        return self.frozen.identity()

    def weight_dtypes(self) -> set[torch.dtype]:
        return self.frozen.weight_dtypes()

    def release(self) -> None:
        self.frozen.release()


class ScorerModel(PathReference):
    """`scorer_model_name_or_path` (`selection_rule="scorer"`): its per-token log-probs are stored beside the
    reference's, in columns of their own, and with them fix the kept tokens before training."""

    columns = ("scorer_chosen_token_logps", "scorer_rejected_token_logps")
    batch_key = "scorer_per_token_logps"
    value_name = "scorer"
    description = "per-token scorer log-probs"
    store_label = "/scorer"

    def __init__(self, trainer, path: str, *, init_kwargs: dict):
        super().__init__(trainer, path, init_kwargs=init_kwargs, live=False)

    def initial_scoring_done(self) -> None:
        self.frozen.release()


class RewardModel(ScorerModel):
    """TGDPO's `tgdpo_reward_model_name_or_path`: its per-token log-probs, stored once (the official code runs it
    on every step), give the token rewards against the reference."""

    columns = ("reward_model_chosen_token_logps", "reward_model_rejected_token_logps")
    batch_key = "reward_model_per_token_logps"
    value_name = "reward_model"
    description = "per-token reward-model log-probs"
    store_label = "/reward_model"


class ModuleReference(Reference):
    """A module passed as `ref_model`: TRL prepares it; with stored values it is freed once they are stored."""

    def __init__(self, trainer, module):
        super().__init__(trainer)
        self.given, self.freed = module, False
        self._described = module_identity(module, "")  # dtype and quantization, known before TRL wraps it
        self._dtypes = {p.dtype for p in module.parameters() if p.dtype.is_floating_point}
        self._config = module.config

    def trl_ref_model(self):
        return self.given

    def weight_dtypes(self) -> set[torch.dtype]:
        return self._dtypes  # the module is freed once its values are stored

    def model_configs(self) -> dict[str, object]:
        return {"ref_model": self._config}

    def _module(self):
        return self.trainer.ref_model

    def identity(self) -> dict:
        # TRL hashed the module's weights before any engine sharded them.
        return {**self._described, "reference": "weights:" + self.trainer._precompute_model_hash}

    def initial_scoring_done(self) -> None:
        if self.trainer.precompute_ref_logps and self.trainer.args.uses_selection:  # TRL's own losses keep it, as in TRL
            self.trainer.ref_model = self.given = None
            self.freed = True

    def scoring_problem(self) -> str | None:
        if self.freed:
            return (
                "the ref_model passed to the trainer was freed once the values of the datasets given when it was built "
                "were stored, so nothing is left to score new rows with. Pass this dataset as eval_dataset when building "
                "the trainer, or give the reference as ref_model_name_or_path, which is loaded again whenever it is needed."
            )
        return None


class _PolicyState(Reference):
    """A reference that is the policy itself in another state (its initial weights, or its adapter off)."""

    def _policy_module(self):
        """The policy for a no-grad forward: under DeepSpeed before training, TRL's inference engine over it."""
        trainer = self.trainer
        if trainer.is_deepspeed_enabled and trainer.deepspeed is None:
            return precompute_engine(trainer)
        return trainer.model

    def _base_identity(self, weights_hash) -> dict:
        """The policy's identity: its files when it was loaded from a path, else `weights_hash()` of the module."""
        trainer = self.trainer
        if trainer._policy_path is not None:
            return files_identity(trainer._policy_path, model_load_kwargs(trainer.args) | trainer._policy_quantization)
        return module_identity(trainer.accelerator.unwrap_model(trainer.model), weights_hash())


class InitialPolicyReference(_PolicyState):
    """No reference given: TRL's frozen copy of the policy when live; the policy before its first step when stored."""

    def is_initial_policy(self) -> bool:
        return True

    def _module(self):
        return self.trainer.ref_model if self.trainer.ref_model is not None else self._policy_module()

    def identity(self) -> dict:
        # A policy passed as a module: TRL hashed its weights (or its frozen copy's) before any engine sharded them.
        return self._base_identity(lambda: self.trainer._precompute_model_hash)

    def scoring_problem(self) -> str | None:
        steps = self.trainer.state.global_step
        if self.trainer.ref_model is None and steps > 0:
            return (
                f"the reference is the initial policy, which no longer exists after {steps} training step"
                f"{'s' if steps != 1 else ''}. Pass this dataset as eval_dataset when building the trainer (it is "
                "scored before training), or set ref_model_name_or_path to the policy's starting checkpoint."
            )
        return None


class AdapterReference(_PolicyState):
    """A PEFT policy with no reference: the base model with the adapter disabled, or TRL's frozen `"ref"` copy
    of a pretrained adapter. Either is available at any time, during or after training."""

    _identity = None  # computed on first use

    def is_initial_policy(self) -> bool:
        # Checked when asked (before the first optimizer step only): a script may set the adapter's weights after
        # building the trainer.
        return self._adapter() is None and adapters_are_noops(self._peft_model())

    def _adapter(self) -> str | None:
        return "ref" if "ref" in self._peft_model().peft_config else None

    def _peft_model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _state(self):
        return use_adapter(self._peft_model(), adapter_name=self._adapter())

    def _module(self):
        return self._policy_module()

    def identity(self) -> dict:
        if self._identity is None:  # the base and a "ref" adapter are frozen: hash their weights once
            self._identity = self._adapter_identity()
        return self._identity

    def _adapter_identity(self) -> dict:
        model, adapter = self._peft_model(), self._adapter()
        adapter_tags = tuple(f".{name}." for name in model.peft_config)
        base = self._base_identity(lambda: tensors_hash(model, lambda name: not any(tag in name for tag in adapter_tags)))
        if adapter is None:
            return {**base, "adapter": "disabled"}
        return {**base, "adapter": "ref:" + tensors_hash(model, lambda name: ".ref." in name)}


def adapters_are_noops(peft_model) -> bool:
    """True only when every adapter provably adds nothing yet: LoRA (no DoRA) with every `lora_B` exactly zero, as
    PEFT initializes it. Anything else (other tuners, trained or sharded weights it cannot read) is not known to be."""
    if any(config.peft_type != "LORA" or getattr(config, "use_dora", False) for config in peft_model.peft_config.values()):
        return False
    from torch.distributed.tensor import DTensor

    factors = [p for name, p in peft_model.named_parameters() if "lora_B" in name or "lora_embedding_B" in name]
    # ZeRO-3 and FSDP shards: this process cannot read the values without a collective.
    if not factors or any(hasattr(p, "ds_numel") or isinstance(p, DTensor) or p.numel() == 0 for p in factors):
        return False
    with torch.no_grad():
        return not any(bool(p.detach().ne(0).any()) for p in factors)


class CrossTokenizerReference(Reference):
    """A reference of another tokenizer: it scores each response in its own tokens, and the values move onto the
    policy's tokens through character offsets (`alignment.py`). Stored values only."""

    def __init__(self, trainer, path: str, *, init_kwargs: dict):
        super().__init__(trainer)
        self.frozen = FrozenModel(trainer, path, init_kwargs)

    def logps(self, inputs):
        raise ValueError("A reference with another tokenizer runs only through stored values (precompute_ref_log_probs=True).")

    def row_scorer(self):
        model = self.frozen.module()
        return cross_tokenizer_scorer(self.trainer, self.frozen.path, lambda sequences: sequence_logps(self.trainer, model, sequences))

    def identity(self) -> dict:
        return {**self.frozen.identity(), **mapping_identity(self.trainer, self.frozen.path)}

    def weight_dtypes(self) -> set[torch.dtype]:
        return self.frozen.weight_dtypes()

    def release(self) -> None:
        self.frozen.release()


class OraclePair(Reference):
    """SePO's oracle and the model it was trained from: stored token rewards `log p_oracle - log p_oracle_ref`."""

    columns = ("oracle_chosen_token_rewards", "oracle_rejected_token_rewards")
    batch_key = "token_rewards"
    value_name = "oracle"
    description = "oracle token rewards"
    kind = "sepo-token-rewards"  # in the cache key: the same two models give the same values whatever reads them

    def __init__(self, trainer, oracle: str, oracle_ref: str, *, init_kwargs: dict):
        super().__init__(trainer)
        self.oracle, self.oracle_ref = FrozenModel(trainer, oracle, init_kwargs), FrozenModel(trainer, oracle_ref, init_kwargs)

    def logps(self, inputs: dict) -> torch.Tensor:
        """Token rewards `(2B, T-1)` of a batch on the device: the oracle's log-probs minus its reference's, in float32."""
        self.check_packable()
        mask, float32 = self.trainer._shared_prompt_mask, self.trainer.args.score_dtype == "float32"
        with torch.no_grad():
            oracle = reference_scoring.forward_logps(self.oracle.module(), inputs, shared_prompt_mask=mask, float32=float32)
            oracle_ref = reference_scoring.forward_logps(self.oracle_ref.module(), inputs, shared_prompt_mask=mask, float32=float32)
        return oracle.float() - oracle_ref.float()

    def row_scorer(self):
        if not self.trainer.args.map_across_tokenizers:
            return super().row_scorer()
        trainer, oracle, oracle_ref = self.trainer, self.oracle.module(), self.oracle_ref.module()

        def rewards(sequences):
            return [a - b for a, b in zip(sequence_logps(trainer, oracle, sequences), sequence_logps(trainer, oracle_ref, sequences))]

        return cross_tokenizer_scorer(trainer, self.oracle.path, rewards)

    def identity(self) -> dict:
        oracle, oracle_ref = self.oracle.identity(), self.oracle_ref.identity()
        quantized = {key: value for key, value in oracle.items() if key == "quantization"}
        return {"kind": self.kind, "oracle": oracle["reference"], "oracle_ref": oracle_ref["reference"],
                "dtype": oracle["dtype"], **quantized, **mapping_identity(self.trainer, self.oracle.path)}  # fmt: skip

    def weight_dtypes(self) -> set[torch.dtype]:
        return self.oracle.weight_dtypes() | self.oracle_ref.weight_dtypes()

    def model_configs(self) -> dict[str, object]:
        return {self.oracle.path: self.oracle.config(), self.oracle_ref.path: self.oracle_ref.config()}

    def release(self) -> None:
        self.oracle.release()
        self.oracle_ref.release()


class ContrastivePair(OraclePair):
    """TIS-DPO's two models, DPO-trained on the data and on the data with chosen and rejected swapped: stored
    contrastive scores `log p_forward - log p_reverse`, in float32 as the official code computes them."""

    columns = ("contrastive_chosen_token_scores", "contrastive_rejected_token_scores")
    batch_key = "contrastive_token_scores"
    value_name = "contrastive"
    description = "TIS-DPO contrastive token scores"
    store_label = "/contrastive"
    kind = "tisdpo-contrastive"

    def initial_scoring_done(self) -> None:
        self.release()


def build_stored_models(trainer, policy, args, *, processing_class, quantization_config) -> list[Reference]:
    """The models whose per-token values a method reads besides the reference's, stored once before training: the
    fixed-score variant's scorer, TGDPO's reward model, TIS-DPO's forward and reverse models."""
    if not args.uses_selection:
        return []
    load = reference_load_kwargs(args, policy, quantization_config)

    def path(field: str) -> str:
        return checked_path(getattr(args, field), field=field, policy=policy, args=args, processing_class=processing_class,
                            mappable=False)  # fmt: skip

    models = []
    if args.selection_rule == "scorer":
        models.append(ScorerModel(trainer, path("scorer_model_name_or_path"), init_kwargs=load))
    if args.loss_type == ["tgdpo"]:
        models.append(RewardModel(trainer, path("tgdpo_reward_model_name_or_path"), init_kwargs=load))
    if args.loss_type == ["tisdpo"]:
        forward, reverse = path("tisdpo_forward_model_name_or_path"), path("tisdpo_reverse_model_name_or_path")
        models.append(ContrastivePair(trainer, forward, reverse, init_kwargs=load))
    return models


def build_reference(trainer, policy, ref_model, args, *, peft_config, processing_class, quantization_config) -> Reference:
    """The reference object for a Selective-DPO run (or for TRL's own losses: what TRL gets as `ref_model`)."""
    if args.ref_model_name_or_path is not None:
        if ref_model is not None:
            raise ValueError("Both `ref_model` and `args.ref_model_name_or_path` were given; pass only one of them.")
        path = checked_path(args.ref_model_name_or_path, field="ref_model_name_or_path", policy=policy, args=args,
                            processing_class=processing_class)  # fmt: skip
        init_kwargs = reference_load_kwargs(args, policy, quantization_config)
        if args.map_across_tokenizers:
            return CrossTokenizerReference(trainer, path, init_kwargs=init_kwargs)
        return PathReference(trainer, path, init_kwargs=init_kwargs, live=not (args.precompute_ref_log_probs and args.uses_selection))
    if args.map_across_tokenizers:
        raise ValueError(
            "map_across_tokenizers=True needs ref_model_name_or_path: the reference of another tokenizer to map from "
            f"({'a ref_model module cannot be re-tokenized' if ref_model is not None else 'none was given'})."
        )
    if ref_model is not None:
        return ModuleReference(trainer, ref_model)
    if peft_config is not None or (not isinstance(policy, str) and is_peft_model(policy)):
        return AdapterReference(trainer)
    return InitialPolicyReference(trainer)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def policy_collator(collator):
    """TRL's collator, without the wrappers that add stored values and selection masks."""
    while hasattr(collator, "inner"):
        collator = collator.inner
    return collator


def sequence_logps(trainer, model, sequences):
    return reference_scoring.sequence_completion_logps(
        model, sequences, device=trainer.accelerator.device, context=trainer.compute_loss_context_manager
    )


def cross_tokenizer_scorer(trainer, other_path: str, values_of) -> reference_cache.RowScorer:
    return reference_scoring.cross_tokenizer_scorer(
        policy_tokenizer=trainer._tokenizer,
        other_tokenizer=AutoTokenizer.from_pretrained(other_path, trust_remote_code=trainer.args.trust_remote_code),
        policy_collator=policy_collator(trainer.data_collator),
        truncation_mode=trainer.args.truncation_mode,
        values_of=values_of,
    )


def mapping_identity(trainer, other_path: str) -> dict:
    return reference_scoring.mapping_components(
        other_path, enabled=trainer.args.map_across_tokenizers, trust_remote_code=trainer.args.trust_remote_code
    )
