"""kill -9 during training, then `resume_from_checkpoint=True` in a fresh process: the losses logged
after the resume equal those of an uninterrupted run, and a checkpoint the kill left half-written is
not picked up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback

from conftest import build_model, preference_dataset

MAX_STEPS, SAVE_STEPS, KILL_WHILE_SAVING = 6, 2, 4  # checkpoint-2 complete, checkpoint-4 half-written


class LossLog(TrainerCallback):
    """Appends each logged loss to a JSON-lines file as it is logged, so a killed run keeps its lines."""

    def __init__(self, path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, "loss": logs["loss"]}) + "\n")


def train(variant: str, output_dir: str, model_dir: str, oracle_dirs: dict, *, kill: bool, resume: bool) -> None:
    """A 6-step run on 8 pairs (two pairs per step, so it crosses an epoch boundary)."""
    from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer

    common = dict(
        output_dir=output_dir, max_steps=MAX_STEPS, save_steps=SAVE_STEPS, logging_steps=1, learning_rate=5e-3,
        per_device_train_batch_size=2, max_length=64, disable_dropout=True, seed=0, report_to="none",
        plot_curves=False, save_only_model=False,
    )  # fmt: skip
    if variant == "sepo":
        args = SePOConfig(
            oracle_model_name_or_path=oracle_dirs["oracle"], oracle_ref_model_name_or_path=oracle_dirs["oracle_ref"],
            ref_logps_cache_dir=str(Path(output_dir).parent / "cache"), **common,
        )  # fmt: skip
        trainer_class = SePOTrainer
    else:
        args = SelectiveDPOConfig(selection_rule="random" if variant == "sdpo-random" else "scores", **common)
        trainer_class = SelectiveDPOTrainer
    trainer = trainer_class(model=model_dir, args=args, train_dataset=preference_dataset())
    trainer.add_callback(LossLog(Path(output_dir) / "losses.jsonl"))
    if kill:  # SIGKILL in the middle of writing checkpoint-4: weights and optimizer written, state not yet
        original = Trainer._save_rng_state

        def save_then_die(self, output_dir):
            if self.state.global_step == KILL_WHILE_SAVING:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, output_dir)

        Trainer._save_rng_state = save_then_die
    trainer.train(resume_from_checkpoint=True if resume else None)


def read_losses(output_dir) -> dict[int, float]:
    lines = (Path(output_dir) / "losses.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume-models")
    oracles = {}
    for name, seed in (("oracle", 7), ("oracle_ref", 8)):
        oracles[name] = str(root / name)
        build_model(tiny_tokenizer, seed=seed).save_pretrained(oracles[name])
        tiny_tokenizer.save_pretrained(oracles[name])
    return tiny_model_dir, oracles


@pytest.mark.parametrize("variant", ["sdpo", "sdpo-random", "sepo"])
def test_kill_9_then_resume_reproduces_the_losses(tmp_path, model_dirs, variant):
    model_dir, oracles = model_dirs
    clean = str(tmp_path / "clean" / "out")
    train(variant, clean, model_dir, oracles, kill=False, resume=False)
    expected = read_losses(clean)
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))

    interrupted = str(tmp_path / "interrupted" / "out")
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_resume; "
        f"test_resume.train({variant!r}, {interrupted!r}, {model_dir!r}, {oracles!r}, kill=sys.argv[1] == 'kill', "
        "resume=sys.argv[1] == 'resume')"
    )
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = Path(interrupted)
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    assert (checkpoints / "checkpoint-4" / "model.safetensors").is_file()  # the kill came mid-save
    assert not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()
    before_kill = read_losses(interrupted)
    assert sorted(before_kill) == [1, 2, 3, 4]

    resumed = subprocess.run([sys.executable, "-c", code, "resume"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping" in resumed.stderr and "checkpoint-4" in resumed.stderr
    lines = (checkpoints / "losses.jsonl").read_text().splitlines()
    after_resume = {e["step"]: e["loss"] for e in map(json.loads, lines[len(before_kill):])}
    assert sorted(after_resume) == [3, 4, 5, 6]  # from checkpoint-2, not the half-written checkpoint-4
    for step, loss in {**before_kill, **after_resume}.items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-8), step
    assert len({round(loss, 6) for loss in expected.values()}) == MAX_STEPS  # the steps really differ
    from safetensors.torch import load_file

    final, clean_final = (load_file(Path(d) / "checkpoint-6" / "model.safetensors") for d in (interrupted, clean))
    assert all(torch.equal(final[name], clean_final[name]) for name in clean_final)
    print(f"{variant}: max |resumed - uninterrupted| loss = {max(abs(after_resume[s] - expected[s]) for s in after_resume):.3g}")
