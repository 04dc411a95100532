"""Model loading is safe by default: weights only from safetensors, no code from a model folder unless
`trust_remote_code=True`, and one config field decides for every load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from selective_po import SelectiveDPOConfig, SePOConfig
from selective_po.cli import parse_train_args
from selective_po.references import reference_load_kwargs
from test_reference_cache import make
from test_sepo_trainer import make as make_sepo


def test_trust_remote_code_is_off_by_default(tmp_path):
    for config_class in (SelectiveDPOConfig, SePOConfig):
        assert config_class.__dataclass_fields__["trust_remote_code"].default is False
    _, training, _ = parse_train_args(["--output_dir", str(tmp_path)])
    assert training.trust_remote_code is False
    kwargs = reference_load_kwargs(SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none"), "some/model")
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True


@pytest.fixture
def weight_loads(monkeypatch):
    """Every `from_pretrained` of model weights, as (path, kwargs)."""
    calls = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        calls.append((str(path), kwargs))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("setup", ["live-reference-path", "trl-reference-copy", "sepo-oracles"])
def test_every_weight_load_uses_safetensors_and_no_remote_code(tmp_path, tiny_model_dir, ref_dir, oracle_dirs, weight_loads, setup):
    if setup == "live-reference-path":
        make(tmp_path, tiny_model_dir, ref=ref_dir, precompute=False)
        expected = {tiny_model_dir, ref_dir}
    elif setup == "trl-reference-copy":
        make(tmp_path, tiny_model_dir, precompute=False)
        expected = {tiny_model_dir}  # loaded twice: the policy and TRL's frozen copy
        assert len(weight_loads) == 2
    else:
        make_sepo(tmp_path, tiny_model_dir, oracle_dirs)
        expected = {tiny_model_dir, *oracle_dirs.values()}
    assert {path for path, _ in weight_loads} == expected
    for path, kwargs in weight_loads:
        assert kwargs.get("use_safetensors") is True and kwargs.get("trust_remote_code") is False, (path, kwargs)


@pytest.fixture
def pickle_only_dir(tmp_path, tiny_model_dir):
    path = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, path)
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return str(path)


@pytest.mark.parametrize("role", ["model", "ref_model_name_or_path"])
def test_a_pickle_only_folder_is_refused(tmp_path, tiny_model_dir, pickle_only_dir, role, weight_loads):
    model, ref = (pickle_only_dir, None) if role == "model" else (tiny_model_dir, pickle_only_dir)
    with pytest.raises(ValueError) as error:
        make(tmp_path, model, ref=ref, precompute=False)
    message = str(error.value)
    assert f"{role}={pickle_only_dir!r}" in message and "pytorch_model.bin" in message
    assert "Convert them to safetensors" in message
    assert weight_loads == []  # refused before anything was loaded


def test_model_init_kwargs_cannot_override_the_safe_defaults(tmp_path, tiny_model_dir):
    for key, value, message in (
        ("use_safetensors", False, "loads weights only from safetensors"),
        ("trust_remote_code", True, "but the config field trust_remote_code is False"),
    ):
        with pytest.raises(ValueError, match=message):
            make(tmp_path, tiny_model_dir, precompute=False, model_init_kwargs={key: value})


def custom_code_dir(tmp_path, tiny_model_dir, model_type: str) -> tuple[str, Path]:
    """A model folder whose config.json points at code that would leave a marker file if it ran."""
    path, marker = tmp_path / f"custom-{model_type}", tmp_path / f"ran-{model_type}"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class CustomConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return str(path), marker


def test_custom_code_is_not_run_without_trust_remote_code(tmp_path, tiny_model_dir):
    path, marker = custom_code_dir(tmp_path, tiny_model_dir, "custom_llama")
    with pytest.raises(ValueError) as error:
        make(tmp_path, path, precompute=False)
    message = str(error.value)
    assert str(Path(path) / "config.json") in message and "custom.CustomModel" in message
    assert "trust_remote_code=True" in message
    assert not marker.exists()


def test_custom_code_for_a_known_model_type_loads_the_built_in_class(tmp_path, tiny_model_dir):
    path, marker = custom_code_dir(tmp_path, tiny_model_dir, "llama")
    trainer = make(tmp_path, path, precompute=False)
    assert type(trainer.model).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_a_gguf_cut_into_chunk_packages_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    import hashlib

    from selective_po import models

    chunks = [b"GGUF" + bytes(range(7)), bytes(range(7, 20)), b"tail"]
    for i, chunk in enumerate(chunks):
        package = tmp_path / f"chunk_pkg{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"model.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = tuple(models.GGUFPart(f"chunk-pkg{i}", "1.0", f"chunk_pkg{i}", f"chunk_pkg{i}/data/model.gguf.part{i:02d}") for i in range(3))
    whole = b"".join(chunks)
    spec = models.EmbeddedModel(parts=parts, sha256=hashlib.sha256(whole).hexdigest())
    work = tmp_path / "work"
    work.mkdir()
    assert models._locate_gguf(spec, work).read_bytes() == whole  # installed packages: nothing fetched
    shuffled = models.EmbeddedModel(parts=parts[::-1], sha256=spec.sha256)
    with pytest.raises(RuntimeError, match="has sha256 .*, not " + spec.sha256 + ": a part is damaged or of another version"):
        models._locate_gguf(shuffled, work)
