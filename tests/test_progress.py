"""Long steps show progress that moves: generation reports every decoding step, bars redraw on their own."""

from __future__ import annotations

import io
import time

import pytest
import torch

from conftest import build_model, preference_dataset
from selective_po import progress
from selective_po.models import generate_completions


def test_generation_reports_each_step_and_samples_the_same(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    chats = [row["prompt"] for row in preference_dataset(3).to_list()]
    shares = []
    kwargs = dict(do_sample=True, max_new_tokens=6, num_return_sequences=2)
    torch.manual_seed(0)
    with_progress = generate_completions(model, tiny_tokenizer, chats, progress=shares.append, **kwargs)
    torch.manual_seed(0)
    without = generate_completions(model, tiny_tokenizer, chats, **kwargs)
    assert torch.equal(with_progress, without)  # reporting leaves the scores, and so the samples, alone
    assert len(shares) >= 2 and sum(shares) == pytest.approx(1.0)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_redraws_while_nothing_is_updated(monkeypatch):
    monkeypatch.setattr(progress, "quiet", lambda: False)
    out = Terminal()
    bar = progress.Bar(total=3, desc="waiting", file=out, tick=0.1, mininterval=0)
    time.sleep(0.6)
    bar.close()
    assert out.getvalue().count("waiting") >= 4  # the first draw, then redraws with a moving clock


def test_timed_stages_never_run_ahead_of_the_work(monkeypatch):
    monkeypatch.setattr(progress, "quiet", lambda: False)
    with progress.TimedStages("Converting", {"a": 0.2, "b": 5.0}) as stages:
        stages.bar.fp = io.StringIO()
        stages.start("a")
        time.sleep(0.8)  # longer than stage a was expected to take
        assert stages.bar.n < 0.2
        stages.start("b")
        assert stages.bar.n == pytest.approx(0.2)
    assert stages.bar.n == stages.bar.total


def test_the_trainer_uses_the_redrawing_bars(tmp_path, tiny_model_dir):
    from transformers import ProgressCallback

    from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer

    args = SelectiveDPOConfig(output_dir=str(tmp_path), report_to="none", disable_tqdm=False)
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    bars = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
    assert [type(cb) for cb in bars] == [progress.TickingProgressCallback]


def test_a_bar_in_a_log_file_draws_only_on_updates(monkeypatch):
    monkeypatch.setattr(progress, "quiet", lambda: False)
    out = io.StringIO()
    bar = progress.Bar(total=3, desc="waiting", file=out, tick=0.1, mininterval=0)
    time.sleep(0.4)
    bar.close()
    assert out.getvalue().count("waiting") <= 2  # drawn when opened and when closed
