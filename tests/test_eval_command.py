"""`selective-po eval` and the judge-free measurements behind it."""

import json

import numpy as np
import pytest

from conftest import build_tokenizer
from selective_po.cli import main
from selective_po.evaluation import span_token_mask
from selective_po.verifiers import arithmetic_verifier


def test_span_token_mask_marks_tokens_overlapping_the_span():
    tokenizer = build_tokenizer()
    content = "So 47 + 38 = 85."
    ids = tokenizer.apply_chat_template([{"role": "assistant", "content": content}], return_dict=True)["input_ids"]
    mask = span_token_mask(tokenizer, ids, content, (13, 15))  # "85"
    pieces = [tokenizer.decode([i]) for i in ids]
    marked = "".join(p for p, m in zip(pieces, mask) if m)
    assert "85" in marked and "47" not in marked and "38" not in marked
    assert mask.dtype == bool and len(mask) == len(ids)


def test_arithmetic_verifier_reads_the_last_number():
    assert arithmetic_verifier("7 + 8 = 15, carry 1. So 47 + 38 = 85.", {"answer": 85})
    assert not arithmetic_verifier("So 47 + 38 = 84.", {"answer": 85})
    assert not arithmetic_verifier("I cannot say.", {"answer": 85})


def test_eval_command_writes_every_measurement(tmp_path, tiny_model_dir):
    out = tmp_path / "eval.json"
    status = main(
        ["eval", "--model", tiny_model_dir, "--ref_model", tiny_model_dir, "--pairs", "6", "--batch_size", "4",
         "--max_new_tokens", "4", "--output_json", str(out)]
    )  # fmt: skip
    assert status == 0
    results = json.loads(out.read_text())
    assert results["pairs"] == 6
    assert results["reward_accuracy"] == 0.0 and results["mean_margin"] == 0.0  # the model is its own reference
    for key in ("span_top1_chosen", "span_recall_at_k_rejected", "greedy_accuracy_arithmetic", "likelihood_accuracy"):
        assert 0.0 <= results[key] <= 1.0, key
    # policy == reference: every score ties, so every span measure is exactly what random scores give
    for side in ("chosen", "rejected"):
        assert results[f"span_auroc_{side}"] == 0.5
        for name in ("span_top1", "span_recall_at_k"):
            assert results[f"{name}_{side}"] == pytest.approx(results[f"{name}_{side}_random"]), (name, side)
        assert results[f"span_recall_at_k_{side}_responses"] == 6
    assert np.isclose(results["greedy_accuracy_arithmetic"], 0.0)  # an untrained tiny model knows no arithmetic
    assert results["task_prompts"] == 6  # the pairs' own prompts, as the bundled data has no prompt file


def test_eval_reports_ifeval_pass_rate_from_a_prompt_file(tmp_path, tiny_model_dir, monkeypatch):
    from selective_po import evaluation
    from selective_po.onpolicy import arithmetic_prompts, ifeval_prompts

    prompts = tmp_path / "prompts.jsonl"
    rows = ifeval_prompts(3, seed=0) + arithmetic_prompts(2, seed=0)
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Fix what "the model" says, so the rates are known: the right answer to both arithmetic prompts, and one
    # IFEval response that fails every instruction used here (empty text follows no instruction).
    said = ["calm sea", "Calm sea, P.S.", "", str(rows[3]["answer"]), str(rows[4]["answer"])]
    ended = [True, False, True, True, False]
    monkeypatch.setattr(evaluation, "greedy_generations",
                        lambda model, tokenizer, task_rows, **_: evaluation.GreedyAnswers(said[: len(task_rows)], ended[: len(task_rows)]))  # fmt: skip
    out = tmp_path / "eval.json"
    main(["eval", "--model", tiny_model_dir, "--ref_model", tiny_model_dir, "--pairs", "2", "--task_prompts", str(prompts),
          "--output_json", str(out)])  # fmt: skip
    results = json.loads(out.read_text())
    assert results["task_prompts"] == 5
    assert results["greedy_accuracy_arithmetic"] == 1.0  # prompts 3 and 4 answered with their own answer
    expected = [evaluation.verify(said[i], rows[i]) for i in range(3)]
    assert expected[2] is False
    assert results["ifeval_pass_rate"] == pytest.approx(sum(expected) / 3)
    assert results["answers_that_end"] == pytest.approx(3 / 5)


def test_balanced_task_rows_takes_the_first_rows_of_each_task():
    from selective_po.evaluation import balanced_task_rows
    from selective_po.onpolicy import arithmetic_prompts, ifeval_prompts

    rows = arithmetic_prompts(5, seed=0) + ifeval_prompts(3, seed=0)
    assert balanced_task_rows(rows, 4) == rows[:2] + rows[5:7]
    assert balanced_task_rows(rows, 0) == rows


def test_an_answer_ends_when_it_emits_any_end_of_turn_id(tiny_model_dir, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selective_po import evaluation

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]  # a second end id, as Llama 3 has
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generated = torch.tensor([[40, eos, pad, pad], [40, 41, 42, 43], [40, 7, pad, pad], [eos, pad, pad, pad]])
    monkeypatch.setattr(evaluation, "generate_completions", lambda model, tokenizer, chats, **_: generated[: len(chats)])
    rows = [{"prompt": [{"role": "user", "content": "Hi"}]}] * 4
    answers = evaluation.greedy_generations(model, tokenizer, rows, batch_size=4, max_new_tokens=4)
    assert answers.ended == [True, False, True, True]
