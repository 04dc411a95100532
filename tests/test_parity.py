"""Every TRL option has exactly one verdict per method, read from TRL itself, and each verdict is checked.

A field that a TRL release adds (to `DPOConfig`, `DPOTrainer.__init__`, or a `TrainingArguments`
field this package starts to read) fails `test_every_trl_option_has_one_verdict` until it is given one
in `src/selective_po/parity.py`; an option TRL drops fails it too, so the list cannot go stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer

from conftest import preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer, parity

ROOT = Path(__file__).resolve().parents[1]


def required_options() -> set[str]:
    return {name for names in parity.trl_sections().values() for name in names}


def test_every_trl_option_has_one_verdict():
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    declared = {f.name for f in dataclasses.fields(DPOConfig)} - base
    arguments = set(inspect.signature(DPOTrainer.__init__).parameters) - {"self"}
    assert {"beta", "label_smoothing", "loss_weights", "precompute_ref_log_probs"} <= declared  # read from TRL, not typed here
    assert {"ref_model", "peft_config", "quantization_config"} <= arguments
    required = required_options()
    assert declared | arguments <= required
    for method, verdicts in parity.METHODS.items():
        missing, stale = required - verdicts.keys(), verdicts.keys() - required
        assert not missing, f"{method}: TRL options without a verdict in parity.py: {sorted(missing)}"
        assert not stale, f"{method}: verdicts for options TRL (or this package) no longer has: {sorted(stale)}"


def test_the_training_arguments_scan_finds_what_the_code_reads():
    read = parity.training_arguments_read()
    # config.py sets these two defaults; the reference objects read the checkpointing kwargs
    assert {"bf16", "dataloader_pin_memory", "gradient_checkpointing_kwargs", "seed"} <= read
    assert "num_train_epochs" not in read


def test_every_test_a_verdict_names_exists():
    for method, verdicts in parity.METHODS.items():
        for name, verdict in verdicts.items():
            for reference in getattr(verdict, "tests", ()):
                path, _, test = reference.partition("::")
                test, _, param = test.partition("[")
                source = (ROOT / path).read_text()
                functions = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
                assert test in functions, f"{method} {name}: {reference} does not exist"
                if param:  # a parametrized case: its id must be one the test generates
                    assert param.rstrip("]") in ids_of(path, test), f"{method} {name}: {reference} is not a case of {test}"
            if isinstance(verdict, parity.Honoured):
                assert verdict.tests, f"{method} {name}: honoured with no test"
            if isinstance(verdict, parity.Refused):
                assert verdict.example or verdict.tests, f"{method} {name}: refused with no example and no test"


def ids_of(path: str, test: str) -> set[str]:
    import importlib

    module = importlib.import_module(Path(path).stem)
    marks = [m for m in getattr(getattr(module, test), "pytestmark", []) if m.name == "parametrize"]
    values, id_function = marks[0].args[1], marks[0].kwargs.get("ids")
    return {id_function(v) for v in values} if callable(id_function) else set(id_function or [])


BASE_FIELDS = {
    "Selective-DPO": (SelectiveDPOConfig, {}),
    "SePO": (SePOConfig, {"oracle_model_name_or_path": "oracle", "oracle_ref_model_name_or_path": "oracle-ref"}),
}


@pytest.mark.parametrize("method", list(parity.METHODS))
def test_every_refusal_at_config_time_names_the_field(tmp_path, method):
    config_class, base = BASE_FIELDS[method]
    refused = {name: v for name, v in parity.METHODS[method].items() if isinstance(v, parity.Refused) and v.example}
    assert refused
    for name, verdict in refused.items():
        with pytest.raises(ValueError, match=name) as error:
            config_class(output_dir=str(tmp_path), **base, **verdict.example)
        assert len(str(error.value)) > 60, str(error.value)  # says why and what to do, not just the name
        # ... and TRL's own DPOConfig accepts the same value: the refusal is ours, for this method.
        DPOConfig(output_dir=str(tmp_path), bf16=False, **({"loss_type": "robust"} if name == "label_smoothing" else {}),
                  **verdict.example)  # fmt: skip


# What the package reads or sets of TrainingArguments, each set to a value that is not its default.
NON_DEFAULT = {
    "bf16": False, "fp16": False, "dataloader_pin_memory": True, "use_cpu": True, "eval_strategy": "steps",
    "gradient_checkpointing_kwargs": {"use_reentrant": True}, "learning_rate": 3e-4, "logging_steps": 3,
    "lr_scheduler_type": "cosine", "max_steps": 7, "output_dir": "elsewhere", "per_device_eval_batch_size": 5,
    "per_device_train_batch_size": 3, "report_to": ["none"], "resume_from_checkpoint": "last", "save_strategy": "no",
    "seed": 11,
}  # fmt: skip


def test_a_value_a_user_sets_is_the_value_trl_sees():
    """Each TrainingArguments field the package touches keeps the user's value, exactly as DPOConfig keeps it."""
    fields = set(parity.trl_sections()["`TrainingArguments` fields selective-po reads or sets"])
    assert fields <= NON_DEFAULT.keys(), f"give these a non-default value here: {sorted(fields - NON_DEFAULT.keys())}"
    for values in (NON_DEFAULT, {**NON_DEFAULT, "dataloader_pin_memory": False, "use_cpu": False}):
        theirs, ours = DPOConfig(**values), SelectiveDPOConfig(**values)
        for name in fields:
            assert getattr(ours, name) == getattr(theirs, name), name


def test_sepo_refuses_a_reference_model(tmp_path, tiny_tokenizer, tiny_model_dir):
    from conftest import build_model

    args = SePOConfig(output_dir=str(tmp_path), selection_rule="confidence", report_to="none")
    with pytest.raises(ValueError, match="SePO trains without a reference model; do not pass `ref_model`"):
        SePOTrainer(model=tiny_model_dir, ref_model=build_model(tiny_tokenizer), args=args, train_dataset=preference_dataset(2))
    with pytest.raises(TypeError, match="SePOTrainer needs a SePOConfig"):
        SePOTrainer(model=tiny_model_dir, args=SelectiveDPOConfig(output_dir=str(tmp_path)), train_dataset=preference_dataset(2))


def test_sepo_trains_an_adapter(tmp_path, tiny_tokenizer, bitsandbytes):
    """SePO with a LoRA adapter on a 4-bit policy (QLoRA), the oracle pair loaded 4-bit alike and keyed by it."""
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from conftest import saved_model
    from test_trainer import COMMON, one_batch_loss

    # 64 wide: bitsandbytes' CPU kernels pack 4-bit weights in blocks of 64 values
    paths = [saved_model(tmp_path / name, tiny_tokenizer, seed=seed, hidden=64) for name, seed in (("policy", 0), ("oracle", 7), ("oracle_ref", 8))]
    args = SePOConfig(output_dir=str(tmp_path / "out"), oracle_model_name_or_path=paths[1], oracle_ref_model_name_or_path=paths[2],
                      ref_logps_cache_dir=str(tmp_path / "cache"), **COMMON)  # fmt: skip
    trainer = SePOTrainer(
        model=paths[0], args=args, train_dataset=preference_dataset(4), peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )  # fmt: skip
    assert trainer.model.get_base_model().is_loaded_in_4bit and trainer.reference.oracle.module().is_loaded_in_4bit
    assert "load_in_4bit" in trainer.reference.identity()["quantization"]
    loss, grads, _ = one_batch_loss(trainer)
    assert torch.isfinite(loss) and grads and all("lora" in name for name in grads)


def test_the_docs_table_is_generated_from_the_lists(tmp_path):
    written = tmp_path / "trl_parity.md"
    parity.main([str(written)])  # what `python -m selective_po.parity docs/trl_parity.md` runs
    assert (ROOT / "docs" / "trl_parity.md").read_text() == written.read_text(), (
        "docs/trl_parity.md is out of date: run `python -m selective_po.parity docs/trl_parity.md`"
    )
    assert "docs/trl_parity.md" in (ROOT / "README.md").read_text()


def test_an_iterable_dataset_with_stored_values_is_refused_as_trl_refuses_it(tmp_path, tiny_model_dir):
    """Both refuse; ours names the dataset and the two ways out."""
    from trl import DPOTrainer

    streamed = preference_dataset().to_iterable_dataset()
    common = dict(report_to="none", max_steps=2, per_device_train_batch_size=2, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="not supported with IterableDataset"):
        DPOTrainer(model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, **common),
                   train_dataset=streamed)  # fmt: skip
    with pytest.raises(ValueError, match="train dataset is an IterableDataset. Materialize it, or set precompute_ref_log_probs=False"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=SelectiveDPOConfig(output_dir=str(tmp_path / "ours"), **common),
                            train_dataset=streamed)  # fmt: skip


def test_every_difference_names_a_test_that_exists():
    for *_, reference in parity.DIFFERENCES:
        path, _, test = reference.partition("::")
        functions = {n.name for n in ast.walk(ast.parse((ROOT / path).read_text())) if isinstance(n, ast.FunctionDef)}
        assert test in functions, reference
