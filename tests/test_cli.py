"""The `selective-po` command line: YAML + flag parsing, and `train` end to end on a tiny model."""

from pathlib import Path

import pytest
import yaml

from selective_po.cli import main, parse_train_args

EXAMPLES = Path(__file__).parent.parent / "examples"


def write_yaml(path, **values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml",
        model_name_or_path="some/model",
        dataset_name="data.jsonl",
        sdpo_threshold=0.5,
        beta=0.2,
        learning_rate=3e-6,
        output_dir=str(tmp_path / "out"),
    )
    script, training, model = parse_train_args(["--config", config, "--sdpo_threshold", "0.7", "--bf16", "false"])
    assert training.sdpo_threshold == 0.7  # flag wins
    assert training.beta == 0.2 and training.learning_rate == 3e-6  # from YAML
    assert training.loss_type == ["sdpo"] and training.bf16 is False
    assert model.model_name_or_path == "some/model" and script.dataset_name == "data.jsonl"


def test_defaults_are_the_bundled_model_and_data(tmp_path):
    script, training, model = parse_train_args(["--output_dir", str(tmp_path)])
    assert model.model_name_or_path == "smollm2-135m-instruct" and script.dataset_name == "arithmetic"


def test_bad_value_in_yaml_names_the_field(tmp_path):
    config = write_yaml(tmp_path / "bad.yaml", sdpo_threshold=1.2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sdpo_threshold=1.2"):
        parse_train_args(["--config", config])


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse_and_open_with_their_command(example, tmp_path):
    first_line = example.read_text().splitlines()[0]
    assert first_line.startswith("# selective-po ") or first_line.startswith("# accelerate launch "), first_line
    assert f"--config examples/{example.name}" in first_line, first_line
    if first_line.startswith("# selective-po compare "):  # a grid: every method's fields make a valid config
        from selective_po.compare import CompareConfig, training_args

        grid = CompareConfig.from_yaml(example, output_dir=str(tmp_path))
        for method in grid.methods:
            for seed in method.seeds:
                assert training_args(grid, method, seed, base="start-model").seed == seed
        return
    # bf16 is overridden so the GPU example parses on this CPU-only machine too.
    _, training, _ = parse_train_args(["--config", str(example), "--output_dir", str(tmp_path), "--bf16", "false"])
    assert training.loss_type in (["sdpo"], ["sigmoid"], ["sepo"], ["tgdpo"], ["tisdpo"])


def test_train_command_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    status = main(
        [
            "train",
            "--model_name_or_path", tiny_model_dir,
            "--dataset_name", "arithmetic",
            "--max_steps", "2",
            "--per_device_train_batch_size", "2",
            "--max_length", "96",
            "--logging_steps", "1",
            "--report_to", "none",
            "--save_strategy", "no",
            "--output_dir", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_loss_type_picks_the_method(tmp_path):
    from selective_po import SePOConfig, SelectiveDPOConfig

    config = write_yaml(
        tmp_path / "sepo.yaml", loss_type="sepo", oracle_model_name_or_path="o", oracle_ref_model_name_or_path="r",
        output_dir=str(tmp_path),
    )  # fmt: skip
    _, training, _ = parse_train_args(["--config", config, "--sepo_chosen_share", "0.2"])
    assert type(training) is SePOConfig and training.sepo_chosen_share == 0.2 and training.beta == 1.0
    _, training, _ = parse_train_args(["--output_dir", str(tmp_path), "--loss_type", "sdpo"])
    assert type(training) is SelectiveDPOConfig


def test_sepo_train_command_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "sepo"
    flags = [
        "train", "--loss_type", "sepo", "--model_name_or_path", tiny_model_dir,
        "--oracle_model_name_or_path", tiny_model_dir, "--oracle_ref_model_name_or_path", tiny_model_dir,
        "--dataset_name", "arithmetic", "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--max_length", "96", "--report_to", "none", "--save_strategy", "no",
        "--ref_logps_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
    ]  # fmt: skip
    assert main(flags) == 0
    assert (out / "model.safetensors").is_file()
