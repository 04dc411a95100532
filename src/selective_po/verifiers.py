"""Verifiers: does a response do what its prompt asked? No judge model, only checks that can be run.

A verifier is `verify(response: str, row: dict) -> bool`. The row's `task` column picks it
(`VERIFIERS`); rows without one that carry an `answer` are arithmetic, as in the bundled data.

- `arithmetic`: the last integer in the response is `row["answer"]`.
- `ifeval`: every instruction in `row["instruction_id_list"]` passes its IFEval checker (the
  checkers of the PyPI package `if-verifiable`), with the arguments in `row["instruction_kwargs"]`
  (a JSON list of dicts, one per instruction, so rows with different instructions share a schema).
  Strict, prompt-level: the response as written, all instructions at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

Verifier = Callable[[str, dict], bool]


def arithmetic_verifier(response: str, row: dict) -> bool:
    """The last integer in the response is the true result (`row["answer"]`)."""
    numbers = re.findall(r"-?\d+", response)
    return bool(numbers) and int(numbers[-1]) == int(row["answer"])


def ifeval_checkers() -> dict:
    """IFEval's instruction registry from `if-verifiable`, with language detection made deterministic."""
    try:
        import langdetect
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as error:  # a declared dependency; only a broken install gets here
        raise ImportError(
            "The IFEval verifier needs the package `if-verifiable` (a dependency of selective-po): "
            "pip install 'if-verifiable==0.1.2'"
        ) from error
    # langdetect samples internally; unseeded, the lowercase/capital checks could flip between runs.
    langdetect.DetectorFactory.seed = 0
    return INSTRUCTION_DICT


def ifeval_instruction_results(response: str, row: dict) -> list[bool]:
    """Strict pass/fail of each instruction of `row`, in `row["instruction_id_list"]` order."""
    registry = ifeval_checkers()
    ids = list(row["instruction_id_list"])
    kwargs_list = row["instruction_kwargs"]
    kwargs_list = json.loads(kwargs_list) if isinstance(kwargs_list, str) else list(kwargs_list)
    if len(kwargs_list) != len(ids):
        raise ValueError(
            f"Row has {len(ids)} instruction ids but {len(kwargs_list)} instruction_kwargs entries; "
            "each instruction needs one dict of arguments (use {} for none)."
        )
    results = []
    for instruction_id, kwargs in zip(ids, kwargs_list):
        if instruction_id not in registry:
            raise ValueError(f"Unknown IFEval instruction {instruction_id!r}; known: {sorted(registry)}")
        checker = registry[instruction_id](instruction_id)
        checker.build_description(**{k: v for k, v in kwargs.items() if v is not None})
        results.append(bool(response.strip()) and bool(checker.check_following(response)))
    return results


def ifeval_verifier(response: str, row: dict) -> bool:
    """Every instruction of the row passes (IFEval's strict prompt-level criterion)."""
    return all(ifeval_instruction_results(response, row))


VERIFIERS: dict[str, Verifier] = {"arithmetic": arithmetic_verifier, "ifeval": ifeval_verifier}


def task_of(row: dict) -> str:
    """The row's task: its `task` column, or `arithmetic` for rows that only carry an `answer`."""
    task = row.get("task")
    if task is None and row.get("answer") is not None:
        return "arithmetic"
    if task not in VERIFIERS:
        raise ValueError(
            f"No verifier for task {task!r}; rows need a `task` column naming one of {sorted(VERIFIERS)} "
            "(or an `answer` column for arithmetic)."
        )
    return task


def verify(response: str, row: dict) -> bool:
    """Run the verifier the row's task names."""
    return VERIFIERS[task_of(row)](response, row)
