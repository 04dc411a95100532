"""What each TRL option does under the selective losses: honoured, refused, or not applicable.

A TRL user switches by changing the config class; every other option must keep TRL's meaning, or be
refused when the config (or the trainer) is built, never silently changed. This module is the list,
one verdict per option and method:

- `Honoured`: it means what it means in TRL, and `tests` names the tests that check it (against TRL's
  own trainer where the selective loss has a TRL counterpart: Selective-DPO keeping every token is
  TRL's `sigmoid` loss);
- `Refused`: an error names the field and what to use instead; `example` is a config value that must
  fail when the config is built (`tests/test_parity.py` builds it), `tests` the tests of a refusal that
  happens when the trainer is built;
- `NotApplicable`: nothing reads it under this method, for the reason given.

`tests/test_parity.py` reads from TRL itself every field `DPOConfig` declares beyond
`transformers.TrainingArguments`, every argument of `DPOTrainer.__init__`, and every
`TrainingArguments` field this package's code reads or sets, and requires each to have exactly one
verdict per method. A field that a later TRL release adds fails that test until someone decides.
`docs/trl_parity.md` is this table, written by `python -m selective_po.parity docs/trl_parity.md`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Honoured:
    how: str
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    when: str
    instead: str
    example: dict | None = None  # config values refused when the config is built
    tests: tuple[str, ...] = ()  # tests of a refusal at trainer build time


@dataclass(frozen=True)
class NotApplicable:
    reason: str


Verdict = Honoured | Refused | NotApplicable

T = "tests/test_trl_options.py::"
STEP = T + "test_an_option_at_sdpo_threshold_zero_gives_trls_step"
KEPT = "tests/test_parity.py::test_a_value_a_user_sets_is_the_value_trl_sees"
REFERENCES = "tests/test_references.py::"

SELECTIVE_DPO: dict[str, Verdict] = {
    # ----- fields DPOConfig declares beyond TrainingArguments -----
    "activation_offloading": Honoured(
        "TRL's `training_step` wraps the selective loss's step as it wraps its own.",
        (T + "test_activation_offloading_wraps_our_step_as_it_wraps_trls",),
    ),
    "beta": Honoured(
        "DPO's temperature, on the sums over the kept tokens; with every token kept the step is TRL's.",
        ("tests/test_trainer.py::test_threshold_zero_reproduces_trl_sigmoid",),
    ),
    "dataset_num_proc": Honoured("TRL's tokenization runs with it.", (STEP + "[dataset_num_proc]",)),
    "disable_dropout": Honoured(
        "TRL disables dropout in the policy and a live reference; models loaded only to store values are loaded with it too.",
        (T + "test_disable_dropout_reaches_the_policy_and_every_reference",),
    ),
    "discopop_tau": NotApplicable("Only TRL's `discopop` loss reads it (with `loss_type='discopop'` it is TRL's)."),
    "f_alpha_divergence_coef": Honoured(
        "The alpha of `f_divergence_type='alpha_divergence'`, as in TRL.", (STEP + "[f_divergence_type,f_alpha_divergence_coef]",)
    ),
    "f_divergence_type": Honoured(
        "TRL's `f'(t)` of each response's log-ratio, here over the kept (or weighted) tokens; with every token kept the "
        "step is TRL's.",
        (STEP + "[f_divergence_type]", STEP + "[f_divergence_type,f_alpha_divergence_coef]"),
    ),
    "label_smoothing": Refused(
        "any value but 0: TRL's `sigmoid` loss, the one applied to the kept tokens, ignores it",
        "0, or one of TRL's loss types that read it (`robust`, `exo_pair`, `aot`, `aot_unpaired`)",
        example={"label_smoothing": 0.1}, tests=(T + "test_label_smoothing_is_refused_where_trls_sigmoid_ignores_it",),
    ),
    "ld_alpha": Honoured(
        "LD-DPO's weights, 1 up to the shorter response's length and `ld_alpha` past it, multiply each token's weight (a "
        "kept token past that length counts `ld_alpha`); with every token kept the step is TRL's.",
        (STEP + "[ld_alpha]",),
    ),
    "loss_type": Honoured(
        "`sdpo` is Selective-DPO; every TRL loss type runs TRL's own code, untouched. `sdpo` is not combined with others.",
        ("tests/test_trainer.py::test_other_trl_loss_types_are_untouched", "tests/test_config.py::test_sdpo_cannot_be_combined"),
    ),
    "loss_weights": Honoured(
        "A single entry scales the loss, as TRL scales a single loss type.",
        (STEP + "[loss_weights]", T + "test_a_single_loss_weight_scales_the_selective_losses"),
    ),
    "max_length": Honoured(
        "TRL's truncation; rows whose prompt alone fills it are dropped as TRL drops them, with one logged line.",
        (STEP + "[max_length]", T + "test_rows_whose_prompt_fills_max_length_are_dropped_as_trl_drops_them"),
    ),
    "model_init_kwargs": Honoured(
        "TRL loads the policy with them, and every reference-side model is loaded with them too. They may not turn "
        "`use_safetensors` off or contradict `trust_remote_code` (an error says so).",
        ("tests/test_model_loading.py::test_every_weight_load_uses_safetensors_and_no_remote_code",
         "tests/test_model_loading.py::test_model_init_kwargs_cannot_override_the_safe_defaults"),
    ),  # fmt: skip
    "pad_to_multiple_of": Honoured("TRL's collator pads with it.", (STEP + "[pad_to_multiple_of]",)),
    "pad_token": Honoured("Deprecated in TRL; sets the tokenizer's pad token as in TRL.", (STEP + "[pad_token]",)),
    "padding_free": Honoured("TRL 1.16 warns and pads instead; so does the selective loss.", (STEP + "[padding_free]",)),
    "precompute_ref_batch_size": Honoured(
        "The batch size of the scoring pass, for training and evaluation data.",
        (STEP + "[precompute_ref_log_probs,precompute_ref_batch_size]", T + "test_precompute_ref_batch_size_sets_the_scoring_batches"),
    ),
    "precompute_ref_log_probs": Honoured(
        "The reference scores the data once, before training, and is not kept in memory while training. It stores "
        "every token's log-prob (TRL stores one sum per response), from exactly the model a live run would use.",
        (STEP + "[precompute_ref_log_probs]", REFERENCES + "test_an_explicit_ref_model_is_what_is_stored_and_then_freed",
         REFERENCES + "test_peft_stores_the_base_model_with_the_adapter_off", REFERENCES + "test_stored_values_give_the_live_references_step",
         "tests/test_reference_cache.py::test_stored_values_reproduce_the_live_reference"),
    ),  # fmt: skip
    "ref_model_mixup_alpha": Honoured(
        "TRL's callback mixes the policy into the live reference that selection reads.",
        (T + "test_sync_ref_model_moves_the_live_reference_that_selection_reads",),
    ),
    "ref_model_sync_steps": Honoured(
        "As `ref_model_mixup_alpha`.", (T + "test_sync_ref_model_moves_the_live_reference_that_selection_reads",)
    ),
    "router_aux_loss_coef": Honoured(
        "A mixture of experts adds its load-balancing loss as in TRL; pairs then run as two rows, as TRL counts them.",
        (T + "test_a_mixture_of_experts_carries_trls_load_balancing_loss",
         T + "test_a_mixture_of_experts_without_the_auxiliary_loss_shares_the_prompt_exactly"),
    ),  # fmt: skip
    "sync_ref_model": Honoured(
        "TR-DPO's synced reference is the live reference that selection reads; TRL refuses it with stored values or PEFT.",
        (T + "test_sync_ref_model_moves_the_live_reference_that_selection_reads",),
    ),
    "truncation_mode": Honoured(
        "TRL's truncation; `keep_end` runs pairs as two rows (a shared prompt could be cut differently).",
        (STEP + "[truncation_mode,max_length]",),
    ),
    "trust_remote_code": Honoured(
        "For the policy and every reference-side model and tokenizer; off by default, as in TRL.",
        ("tests/test_model_loading.py::test_custom_code_is_not_run_without_trust_remote_code",
         "tests/test_model_loading.py::test_trust_remote_code_is_off_by_default"),
    ),  # fmt: skip
    "use_weighting": Refused(
        "`True`: WPO weighs each pair by means over every token of its responses, which no token selection or weighting "
        "changes", "`False`", example={"use_weighting": True},
    ),
    # ----- arguments of DPOTrainer.__init__ -----
    "model": Honoured(
        "A path, hub id, module or PeftModel, as in TRL; also an embedded name such as `smollm2-135m-instruct`.",
        ("tests/test_trainer.py::test_training_run_updates_parameters_and_logs_selection",
         REFERENCES + "test_a_pretrained_adapter_is_its_own_ref_adapter_and_keys_the_entry"),
    ),  # fmt: skip
    "ref_model": Honoured(
        "Run live as TRL runs it; with stored values it is the model scored, and is freed once they are stored.",
        ("tests/test_trainer.py::test_threshold_zero_reproduces_trl_sigmoid",
         REFERENCES + "test_an_explicit_ref_model_is_what_is_stored_and_then_freed",
         REFERENCES + "test_a_late_evaluate_that_cannot_be_scored_says_why"),
    ),  # fmt: skip
    "args": Honoured(
        "A `SelectiveDPOConfig`, TRL's `DPOConfig` with the selective fields; a plain `DPOConfig` is refused with the one-line conversion.",
        ("tests/test_trainer.py::test_plain_dpo_config_is_rejected_with_a_hint",),
    ),
    "data_collator": Honoured(
        "Makes the batches, and the batches the reference scores for storage.", (T + "test_trainer_arguments_pass_through",)
    ),
    "train_dataset": Honoured(
        "Every format TRL accepts: standard or conversational, implicit prompts, tool-call turns, typed content parts. "
        "Datasets with images are refused by the selective losses (TRL processes them in the collator, so nothing can be stored).",
        (T + "test_rows_trl_accepts_train_as_trl_trains_them", T + "test_a_vision_dataset_is_refused_by_the_selective_losses",
         "tests/test_data_rows.py::test_trainer_checks_before_tokenizing"),
    ),  # fmt: skip
    "eval_dataset": Honoured(
        "One dataset or a dict of them, at build time or passed to `evaluate()` later, where the reference scores "
        "new data whenever it still can (a path, PEFT's base model, SePO's oracles) and says why when it cannot.",
        (T + "test_trainer_arguments_pass_through", REFERENCES + "test_a_late_evaluate_under_peft_scores_the_new_data_with_the_adapter_off",
         REFERENCES + "test_a_late_evaluate_with_a_reference_path_loads_it_again",
         REFERENCES + "test_a_late_evaluate_that_cannot_be_scored_says_why"),
    ),  # fmt: skip
    "processing_class": Honoured(
        "Tokenizes the data; reference-side models must share its vocabulary (or set `map_across_tokenizers`).",
        ("tests/test_trainer.py::test_threshold_zero_reproduces_trl_sigmoid", "tests/test_trainer.py::test_reference_with_another_vocabulary_is_an_error"),
    ),  # fmt: skip
    "compute_metrics": Honoured("As in TRL (its extra forward for logits).", (T + "test_trainer_arguments_pass_through",)),
    "callbacks": Honoured("transformers' callbacks; they see the selection metrics too.", (T + "test_trainer_arguments_pass_through",)),
    "optimizers": Honoured("transformers' optimizer and scheduler.", (T + "test_trainer_arguments_pass_through",)),
    "quantization_config": Honoured(
        "TRL quantizes the policy; every reference-side model loaded from a path is quantized alike, and the "
        "quantization is part of the stored values' key. `selective-po train --load_in_4bit/--load_in_8bit` builds it as TRL's `dpo.py` does.",
        (T + "test_quantization_reaches_the_policy_and_the_reference_and_keys_the_values", T + "test_the_train_command_quantizes_as_trls_dpo_script"),
    ),  # fmt: skip
    "peft_config": Honoured(
        "The reference is the base model with the adapter off (or TRL's frozen `\"ref\"` copy of a pretrained adapter), "
        "live and stored, and the stored values are keyed by that adapter state.",
        ("tests/test_trainer.py::test_peft_reference_is_the_base_model_as_in_trl", REFERENCES + "test_peft_stores_the_base_model_with_the_adapter_off",
         REFERENCES + "test_a_pretrained_adapter_is_its_own_ref_adapter_and_keys_the_entry",
         REFERENCES + "test_stored_values_give_the_live_references_step"),
    ),  # fmt: skip
    # ----- TrainingArguments fields this package reads or sets -----
    "bf16": Honoured(
        "Changed default: on only with an accelerator (TRL turns it on everywhere, which a CPU-only machine cannot run); "
        "a value you set is kept. Part of the stored values' key.",
        ("tests/test_config.py::test_defaults_are_selective_dpo_on_cpu", KEPT),
    ),
    "fp16": Honoured("As in TRL; part of the stored values' key.", (KEPT, "tests/test_reference_cache.py::test_any_key_change_rescores")),
    "dataloader_pin_memory": Honoured(
        "Changed default: off on a CPU-only machine, where there is nothing to pin for; a value you set is kept.", (KEPT,)
    ),
    "use_cpu": Honoured("As in transformers; also makes the machine count as CPU-only for the two changed defaults.", (KEPT,)),
    "eval_strategy": Honoured(
        "As in TRL; `selective-po train` needs the test split only when it evaluates, as TRL's `dpo.py`.",
        (KEPT, "tests/test_cli.py::test_train_command_end_to_end"),
    ),
    "gradient_checkpointing_kwargs": Honoured(
        "As in TRL, and reference forwards of the policy itself turn checkpointing off around them, as TRL's do.",
        (STEP + "[gradient_checkpointing_kwargs]",),
    ),
    "output_dir": Honoured("As in TRL; `training_curves.png` is written there too.",
                           ("tests/test_trainer.py::test_training_run_updates_parameters_and_logs_selection",)),  # fmt: skip
    "per_device_eval_batch_size": Honoured(
        "As in TRL, and, as in TRL, the scoring batch size of evaluation data when `precompute_ref_batch_size` is unset.",
        (KEPT, REFERENCES + "test_a_late_evaluate_with_a_reference_path_loads_it_again"),
    ),
    "resume_from_checkpoint": Honoured(
        "As in transformers; `True` (CLI: `true`) resumes from the last checkpoint that was completely written.",
        ("tests/test_resume.py::test_kill_9_then_resume_reproduces_the_losses",),
    ),
    "seed": Honoured("As in transformers; it also seeds the `random` control's draws.", (KEPT, "tests/test_resume.py::test_kill_9_then_resume_reproduces_the_losses")),
    **{
        name: Honoured("As in transformers; only the `demo`, `eval` and `inspect` commands set their own value, for their own runs.", (KEPT,))
        for name in ("learning_rate", "logging_steps", "lr_scheduler_type", "max_steps", "per_device_train_batch_size",
                     "report_to", "save_strategy")  # fmt: skip
    },
}

_NO_REFERENCE = "SePO trains without a reference model"
SEPO: dict[str, Verdict] = {
    **SELECTIVE_DPO,
    "beta": Honoured(
        "SePO's scale of the length-normalized log-likelihood `u(y)` (defaults to 1.0 here).",
        ("tests/test_sepo_trainer.py::test_loss_is_sepo_on_the_policy_alone",),
    ),
    "loss_type": Honoured("`sepo` only; TRL's loss types run with `SelectiveDPOConfig`.", ("tests/test_cli.py::test_loss_type_picks_the_method",)),
    "precompute_ref_log_probs": Refused(
        "`False`: the oracle's token rewards are always stored once", "`True` (the default)", example={"precompute_ref_log_probs": False}
    ),
    "precompute_ref_batch_size": Honoured(
        "The batch size of the oracle pair's scoring pass.", (T + "test_precompute_ref_batch_size_sets_the_scoring_batches",)
    ),
    "sync_ref_model": Refused(f"`True`: {_NO_REFERENCE}", "`False`", example={"sync_ref_model": True}),
    "ref_model_mixup_alpha": NotApplicable(f"Only read with `sync_ref_model`, which is refused: {_NO_REFERENCE}."),
    "ref_model_sync_steps": NotApplicable(f"Only read with `sync_ref_model`, which is refused: {_NO_REFERENCE}."),
    "ref_model": Refused(
        f"any module: {_NO_REFERENCE}", "`oracle_model_name_or_path` and `oracle_ref_model_name_or_path`",
        tests=("tests/test_parity.py::test_sepo_refuses_a_reference_model",),
    ),
    "args": Honoured("A `SePOConfig`; any other config is refused.", ("tests/test_parity.py::test_sepo_refuses_a_reference_model",)),
    "peft_config": Honoured(
        "TRL's adapter on the policy; SePO needs no reference, so the adapter state plays no part in what is stored.",
        ("tests/test_parity.py::test_sepo_trains_an_adapter",),
    ),
    "quantization_config": Honoured(
        "TRL quantizes the policy, and the oracle pair is loaded quantized alike, with the quantization in the stored rewards' key.",
        ("tests/test_parity.py::test_sepo_trains_an_adapter",),
    ),
    "router_aux_loss_coef": Honoured(
        "A mixture of experts adds its load-balancing loss as in TRL; pairs then run as two rows.",
        (T + "test_a_mixture_of_experts_carries_trls_load_balancing_loss",),
    ),
    "label_smoothing": Refused(
        "any value but 0: SePO's loss has no label smoothing", "0", example={"label_smoothing": 0.1},
        tests=(T + "test_label_smoothing_is_refused_where_trls_sigmoid_ignores_it",),
    ),
    "f_divergence_type": Refused(
        f"anything but `reverse_kl`: {_NO_REFERENCE}, so its loss has no log-ratio to take an f-divergence of",
        "`reverse_kl`", example={"f_divergence_type": "js_divergence"},
    ),
    "f_alpha_divergence_coef": NotApplicable("Only read with `f_divergence_type='alpha_divergence'`, which is refused."),
    "ld_alpha": Refused(f"any value: {_NO_REFERENCE}, so it has no log-ratio to weight by length", "`None`",
                        example={"ld_alpha": 0.5}),
}

METHODS = {"Selective-DPO": SELECTIVE_DPO, "SePO": SEPO}

# Where TRL's own DPO tests, run against these classes, see another behaviour than TRL's: (case, TRL, here, test).
DIFFERENCES = (
    ("`precompute_ref_log_probs=True` with an `IterableDataset`",
     "refused: \"`precompute_ref_log_probs=True` is not supported with IterableDataset\"",
     "refused too, in other words: the per-token values are stored per row of a map-style `Dataset`; the error names "
     "the dataset and says to materialize it or to set `precompute_ref_log_probs=False`",
     "tests/test_parity.py::test_an_iterable_dataset_with_stored_values_is_refused_as_trl_refuses_it"),
    ("a non-finite score (e.g. an fp16 overflow)",
     "trains on: the loss becomes NaN and so do the weights",
     "stops at that step with an error naming the response, the position and the value, since the top share of NaN "
     "scores is arbitrary tokens",
     "tests/test_non_finite.py::test_non_finite_live_scores_stop_selective_dpo"),
)  # fmt: skip


def counts(verdicts: dict[str, Verdict]) -> dict[str, int]:
    kinds = {"honoured": Honoured, "refused": Refused, "not applicable": NotApplicable}
    return {name: sum(isinstance(v, kind) for v in verdicts.values()) for name, kind in kinds.items()}


def _cell(verdict: Verdict) -> str:
    if isinstance(verdict, Honoured):
        return f"honoured: {verdict.how}"
    if isinstance(verdict, Refused):
        return f"**refused** when {verdict.when}; use {verdict.instead}"
    return f"not applicable: {verdict.reason}"


def _checks(verdict: Verdict) -> list[str]:
    """The tests behind a verdict, for the table; a refused example value is built by the parity test."""
    entries = [f"`{test.removeprefix('tests/')}`" for test in getattr(verdict, "tests", ())]
    if isinstance(verdict, Refused) and verdict.example:
        values = ", ".join(f"{k}={v!r}" for k, v in verdict.example.items())
        entries.append(f"`test_parity.py::test_every_refusal_at_config_time_names_the_field` (`{values}`)")
    return entries


def markdown(sections: dict[str, list[str]]) -> str:
    """The table of every option and its verdict per method, grouped as `sections` (title -> option names)."""
    totals = {method: counts(verdicts) for method, verdicts in METHODS.items()}
    lines = [
        "# TRL options under the selective losses",
        "",
        "Every option of TRL's `DPOConfig` and `DPOTrainer`, and every `TrainingArguments` field selective-po reads or",
        "sets, keeps TRL's meaning (honoured), is refused with an error that names it and what to use instead, or is",
        "not read at all (not applicable). `tests/test_parity.py` reads the option lists from TRL itself and fails when",
        "TRL adds one that has no verdict here; every honoured option names the tests that check it, in a list under",
        "its table. This page is generated from `src/selective_po/parity.py` by",
        "`python -m selective_po.parity docs/trl_parity.md`.",
        "",
        "TRL's own loss types (`loss_type='sigmoid'`, `'ipo'`, ...) run TRL's code unchanged; the verdicts below are",
        "for `loss_type='sdpo'` (`SelectiveDPOConfig`) and `loss_type='sepo'` (`SePOConfig`). `loss_type='tgdpo'` and",
        "`'tisdpo'` (`SelectiveDPOConfig`) run through the same trainer path and config checks as `'sdpo'`, so",
        "Selective-DPO's verdicts are theirs; the tests named below run `'sdpo'`.",
        "",
        "| method | honoured | refused | not applicable |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {method} | {c['honoured']} | {c['refused']} | {c['not applicable']} |" for method, c in totals.items()],
    ]
    # The tests behind each verdict go in a list under each table rather than in a column of it: a fourth
    # column of long test names squeezed the option names until they broke mid-word.
    for title, names in sections.items():
        lines += ["", f"## {title}", "", "| option | Selective-DPO | SePO |", "| --- | --- | --- |"]
        checked_by = []
        for name in sorted(names):
            cells = [_cell(verdicts[name]).replace("|", "\\|") for verdicts in METHODS.values()]
            lines.append(f"| `{name}` | {cells[0]} | {'same' if cells[1] == cells[0] else cells[1]} |")
            checks = dict.fromkeys(entry for verdicts in METHODS.values() for entry in _checks(verdicts[name]))
            if checks:
                checked_by.append(f"- `{name}`: {', '.join(checks)}")
        if checked_by:
            lines += ["", "The tests that check each verdict, in `tests/`:", "", *checked_by]
    lines += ["", "## Where TRL's own DPO tests see another behaviour", "",
              "Run against these classes, TRL's own test file for its `DPOTrainer` meets two behaviours that differ on "
              "purpose:", "", "| case | TRL | selective-po |", "| --- | --- | --- |"]
    lines += [f"| {case} | {trl} | {ours} |" for case, trl, ours, _ in DIFFERENCES]
    lines += ["", "The tests that check them:", "", *[f"- {case}: `{test}`" for case, _, _, test in DIFFERENCES]]
    return "\n".join(lines) + "\n"


def trl_sections() -> dict[str, list[str]]:
    """The option names, read from TRL and from this package's code, grouped by where they come from."""
    import dataclasses
    import inspect

    from transformers import TrainingArguments
    from trl import DPOConfig, DPOTrainer

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {
        "Fields `DPOConfig` declares beyond `TrainingArguments`": sorted(f.name for f in dataclasses.fields(DPOConfig) if f.name not in base),
        "Arguments of `DPOTrainer`": [p for p in inspect.signature(DPOTrainer.__init__).parameters if p != "self"],
        "`TrainingArguments` fields selective-po reads or sets": sorted(training_arguments_read() & base),
    }  # fmt: skip


def training_arguments_read() -> set[str]:
    """Names of `TrainingArguments` fields that this package's modules read or set.

    Found in the source: attributes of a config object (`args.x`, `self.args.x`, `training_args.x`,
    `trainer.args.x`, and `self.x` inside `config.py`), and keyword arguments of the config classes.
    """
    import ast
    import dataclasses
    from pathlib import Path

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    found = set()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in fields:
                owner = node.value
                if (isinstance(owner, ast.Name) and owner.id in ("args", "training_args")) or (
                    isinstance(owner, ast.Attribute) and owner.attr == "args"
                ) or (path.name == "config.py" and isinstance(owner, ast.Name) and owner.id == "self"):
                    found.add(node.attr)
            elif isinstance(node, ast.Call):
                called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if called.endswith("Config"):
                    found.update(k.arg for k in node.keywords if k.arg in fields)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selective_po.parity", description="Write the TRL-parity table.")
    parser.add_argument("output", nargs="?", help="file to write (default: print it)")
    options = parser.parse_args(argv)
    text = markdown(trl_sections())
    if options.output:
        with open(options.output, "w") as handle:
            handle.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
