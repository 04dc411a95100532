"""Verifiers: arithmetic answers and IFEval instructions (checkers from `if-verifiable`)."""

import json
import re

import pytest

from selective_po.onpolicy import arithmetic_prompts, ifeval_prompts
from selective_po.verifiers import arithmetic_verifier, ifeval_instruction_results, ifeval_verifier, task_of, verify


def ifeval_row(instruction_id: str, **kwargs) -> dict:
    return {"task": "ifeval", "instruction_id_list": [instruction_id], "instruction_kwargs": json.dumps([kwargs])}


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "passing", "failing"),
    [
        ("punctuation:no_comma", {}, "The sea is calm today.", "The sea, calm today, is blue."),
        ("change_case:english_lowercase", {}, "the sea is calm and the sky is very blue today.", "The sea is calm today."),
        ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Calm blue sea.", "The sea is very calm and blue today."),
        ("keywords:existence", {"keywords": ["light", "water"]}, "Light shines on the water.", "The sea is calm."),
        ("keywords:forbidden_words", {"forbidden_words": ["water"]}, "The sea is calm.", "The water is calm."),
        ("detectable_content:postscript", {"postscript_marker": "P.S."}, "The sea is calm.\nP.S. Bring a coat.", "The sea is calm."),
        ("startend:end_checker", {"end_phrase": "That is all."}, "The sea is calm. That is all.", "That is all. The sea is calm."),
        ("detectable_format:title", {}, "<<The Sea>>\nIt is calm.", "The Sea\nIt is calm."),
        ("detectable_format:json_format", {}, '{"sea": "calm"}', "The sea is calm."),
        ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* calm\n* blue", "* calm\n* blue\n* wide"),
    ],
)  # fmt: skip
def test_ifeval_checkers_pass_and_fail(instruction_id, kwargs, passing, failing):
    row = ifeval_row(instruction_id, **kwargs)
    assert ifeval_verifier(passing, row)
    assert not ifeval_verifier(failing, row)


def test_ifeval_needs_every_instruction():
    row = {
        "task": "ifeval",
        "instruction_id_list": ["punctuation:no_comma", "keywords:existence"],
        "instruction_kwargs": json.dumps([{}, {"keywords": ["sea"]}]),
    }
    assert ifeval_instruction_results("The sea is calm.", row) == [True, True]
    assert ifeval_instruction_results("The lake, calm.", row) == [False, False]
    assert ifeval_instruction_results("The sea, calm.", row) == [False, True]
    assert not ifeval_verifier("The sea, calm.", row)
    assert not ifeval_verifier("   ", row)  # an empty response follows no instruction


def test_ifeval_row_errors_name_the_problem():
    row = {"task": "ifeval", "instruction_id_list": ["punctuation:no_comma"], "instruction_kwargs": "[]"}
    with pytest.raises(ValueError, match="1 instruction ids but 0 instruction_kwargs"):
        ifeval_verifier("text", row)
    with pytest.raises(ValueError, match="Unknown IFEval instruction 'no:such'"):
        ifeval_verifier("text", ifeval_row("no:such"))


def test_task_dispatch():
    assert task_of({"answer": 3}) == "arithmetic"  # the bundled arithmetic data has no task column
    assert verify("1 + 2 = 3", {"answer": 3}) and not verify("1 + 2 = 4", {"answer": 3})
    assert verify("calm sea", ifeval_row("punctuation:no_comma"))
    with pytest.raises(ValueError, match="`task` column"):
        task_of({"prompt": "x"})
    with pytest.raises(ValueError, match="No verifier for task 'poetry'"):
        task_of({"task": "poetry", "answer": None})


def test_arithmetic_verifier_reads_the_last_integer():
    assert arithmetic_verifier("7 * 8 = 56", {"answer": 56})
    assert not arithmetic_verifier("7 * 8 = 56, and 56 - 1 = 55", {"answer": 56})
    assert arithmetic_verifier("5 - 9 = -4", {"answer": -4})


def test_arithmetic_prompts_are_distinct_right_and_seeded():
    rows = arithmetic_prompts(300, seed=1)
    assert rows == arithmetic_prompts(300, seed=1)
    assert rows != arithmetic_prompts(300, seed=2)
    problems = set()
    for row in rows:
        a, op, b = re.search(r"(\d+) ([-+*]) (\d+)", row["prompt"][0]["content"]).groups()
        assert row["answer"] == eval(f"{a} {op} {b}") >= 0
        problems.add((a, op, b))
    assert len(problems) == len(rows)


def test_ifeval_prompts_state_what_their_checker_checks():
    rows = ifeval_prompts(120, seed=0)
    assert rows == ifeval_prompts(120, seed=0)
    assert len({row["prompt"][0]["content"] for row in rows}) == len(rows)
    used = {row["instruction_id_list"][0] for row in rows}
    assert len(used) >= 10  # the generator draws from the whole list of instructions
    for row in rows:
        # The prompt ends with the checker's own description of the instruction, built from the stored kwargs.
        from selective_po.verifiers import ifeval_checkers

        (instruction_id,), (kwargs,) = row["instruction_id_list"], json.loads(row["instruction_kwargs"])
        description = ifeval_checkers()[instruction_id](instruction_id).build_description(**kwargs)
        assert row["prompt"][0]["content"].endswith(description)
