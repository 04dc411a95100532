"""selection_rule='spans': the loss uses exactly the response tokens the data names."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from conftest import preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.methods import Method
from selective_po.spans import BATCH_KEY, MASK_COLUMNS, SelectionMaskCollator
from test_trainer import COMMON, one_batch_loss


def with_answer_spans(dataset):
    """`chosen_spans` / `rejected_spans`: the last number of each response (the answer), as character spans."""

    def last_number(text: str) -> list[list[int]]:
        end = max(i for i, c in enumerate(text) if c.isdigit()) + 1
        start = end
        while start > 0 and text[start - 1].isdigit():
            start -= 1
        return [[start, end]]

    return dataset.map(lambda row: {f"{side}_spans": last_number(row[side][-1]["content"]) for side in ("chosen", "rejected")})


def spans_trainer(tmp_path, model, dataset, **options):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), selection_rule="spans", bf16=False, **{**COMMON, **options})
    return SelectiveDPOTrainer(model=model, args=args, train_dataset=dataset)


@pytest.mark.parametrize("stored", [False, True])
def test_the_loss_keeps_exactly_the_tokens_of_the_spans(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch, stored):
    dataset = with_answer_spans(preference_dataset(4))
    options = {"precompute_ref_log_probs": True, "ref_logps_cache_dir": str(tmp_path / "cache")} if stored else {}
    trainer = spans_trainer(tmp_path, tiny_model_dir, dataset, **options)
    seen = {}
    original = Method.__call__
    monkeypatch.setattr(Method, "__call__", lambda self, *a, **k: seen.setdefault("out", original(self, *a, **k)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    one_batch_loss(trainer)

    targets = batch["input_ids"][:, 1:]  # the token each shifted position scores
    keep = torch.cat([seen["out"].chosen_keep, seen["out"].rejected_keep]).cpu()
    for r in range(8):
        side, i = ("chosen", "rejected")[r // 4], r % 4
        row = trainer.train_dataset[i]
        kept_text = tiny_tokenizer.decode(targets[r][keep[r]].tolist())
        (start, end), content = row[f"{side}_spans"][0], row[side][-1]["content"]
        assert content[start:end] in kept_text, (side, i, kept_text)
        assert 0 < int(keep[r].sum()) == sum(row[MASK_COLUMNS[r // 4]]) < len(row[f"{side}_ids"])


def test_a_mask_of_every_token_equals_the_all_control(tmp_path, tiny_model_dir):
    dataset = preference_dataset(4)
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "all"), selection_rule="all", bf16=False, **COMMON)
    control = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=dataset)
    for side in ("chosen", "rejected"):  # one 1 per token, as the trainer tokenizes the response
        dataset = dataset.add_column(f"{side}_token_mask", [[1] * len(row[f"{side}_ids"]) for row in control.train_dataset])
    every = spans_trainer(tmp_path / "spans", tiny_model_dir, dataset)
    (loss, grads, _), (control_loss, control_grads, _) = one_batch_loss(every), one_batch_loss(control)
    torch.testing.assert_close(loss, control_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], control_grads[name], msg=name)


@pytest.mark.parametrize("mode, given", [("keep_start", [[0, 0, 0, 1]]), ("keep_end", [[0, 1, 0, 1]])])
def test_masks_are_cut_as_truncated_rows_are(mode, given):
    example = {"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22, 23, 24], "rejected_ids": [31, 32, 33, 34]}
    example |= {MASK_COLUMNS[0]: [0, 1, 0, 1], MASK_COLUMNS[1]: [1, 1, 1, 1]}
    collator = SelectionMaskCollator(DataCollatorForPreference(pad_token_id=0, max_length=5, truncation_mode=mode), truncation_mode=mode)
    batch = collator([example])
    # keep_start keeps [11 12 13 21 22]: 22 is the second completion token (kept); keep_end keeps [13 21 22 23 24].
    assert batch[BATCH_KEY][:1].int().tolist() == given
    assert not (batch[BATCH_KEY] & ~batch["completion_mask"][:, 1:].bool()).any()


def test_bad_span_columns_are_named(tmp_path, tiny_model_dir):
    dataset = preference_dataset(2)
    with pytest.raises(ValueError, match="has none of the column pairs 'chosen_spans'/'rejected_spans'"):
        spans_trainer(tmp_path, tiny_model_dir, dataset)
    both = with_answer_spans(dataset).map(lambda row: {"chosen_span": [0, 1], "rejected_span": [0, 1]})
    with pytest.raises(ValueError, match="more than one of"):
        spans_trainer(tmp_path, tiny_model_dir, both)
    outside = dataset.map(lambda row: {"chosen_spans": [[0, 500]], "rejected_spans": []})
    with pytest.raises(ValueError, match=r"Row 0: the chosen span \[0, 500\) does not lie inside"):
        spans_trainer(tmp_path, tiny_model_dir, outside)
    short = dataset.map(lambda row: {"chosen_token_mask": [1, 0], "rejected_token_mask": [1]})
    with pytest.raises(ValueError, match="Row 0: 'chosen_token_mask' has 2 entries for the .* tokens the chosen response has"):
        spans_trainer(tmp_path, tiny_model_dir, short)


def test_the_inspector_marks_exactly_the_given_tokens(tmp_path, tiny_model_dir):
    from selective_po.cli import main
    from selective_po.evaluation import selected_tokens

    trainer = spans_trainer(tmp_path, tiny_model_dir, with_answer_spans(preference_dataset(3)))
    for row, sides in selected_tokens(trainer, threshold=0.6, rows=trainer.train_dataset, rule="spans"):
        for (side, (ids, _, keep)), column in zip(sides.items(), MASK_COLUMNS):
            assert ids == row[f"{side}_ids"] and keep.astype(int).tolist() == row[column]
    page = tmp_path / "spans.html"  # the bundled arithmetic pairs carry chosen_span / rejected_span
    argv = ["inspect", "--model", tiny_model_dir, "--ref_model", tiny_model_dir, "--pairs", "2", "--selection_rule", "spans"]
    assert main([*argv, "--output", str(page)]) == 0
    assert "kept tokens: spans" in page.read_text()
