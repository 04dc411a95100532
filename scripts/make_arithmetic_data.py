"""Generate the bundled two-digit arithmetic preference dataset.

Each record pairs a short, correct step-by-step explanation ("chosen") with a copy
in which exactly ONE number is wrong ("rejected"): either an intermediate result
or the final answer. Because the two responses differ in a single known character
span, the data is a controlled test bed for token-selective preference methods:
the tokens that matter are known exactly.

Records use TRL's conversational preference format plus metadata columns
(see the README written next to the data). Generation is fully determined by
``--seed``, ``--n-train`` and ``--n-test``; rerunning gives byte-identical files.

Run from the repository root:

    python scripts/make_arithmetic_data.py
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 0
DEFAULT_N_TRAIN = 1000
DEFAULT_N_TEST = 200
DEFAULT_OUT = "src/selective_po/bundled/arithmetic"

OPERATIONS = ("add", "sub", "mul")
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
PROMPT_TEMPLATES = (
    "What is {expr}?",
    "Compute {expr}.",
    "Calculate {expr} step by step.",
    "Work out {expr} and explain briefly.",
)
ERROR_TYPES = ("intermediate", "final")

# Number of distinct problems per operation; addition counts a + b and b + a once.
_TWO_DIGIT = range(10, 100)
POOL_SIZES = {
    "add": len(_TWO_DIGIT) * (len(_TWO_DIGIT) + 1) // 2,
    "sub": len(_TWO_DIGIT) * (len(_TWO_DIGIT) - 1) // 2,
    "mul": len(_TWO_DIGIT) * len(range(2, 10)),
}


@dataclass(frozen=True)
class Result:
    """A computed number in an explanation: the only kind of number a rejected response may alter."""

    value: int
    final: bool = False


def true_result(operation: str, a: int, b: int) -> int:
    """Return the exact result of ``a <operation> b``."""
    if operation == "add":
        return a + b
    if operation == "sub":
        return a - b
    if operation == "mul":
        return a * b
    raise ValueError(f"Unknown operation {operation!r}; use one of {OPERATIONS}.")


def _add_parts(a: int, b: int) -> list:
    """Column addition: ones, then tens with the carry."""
    (a_tens, a_ones), (b_tens, b_ones) = divmod(a, 10), divmod(b, 10)
    ones = a_ones + b_ones
    carry = ones // 10
    parts = ["Add the ones: ", f"{a_ones} + {b_ones} = ", Result(ones)]
    if carry:
        parts.append(f", write {ones % 10} and carry {carry}. ")
        tens_expr = f"{a_tens} + {b_tens} + {carry}"
    else:
        parts.append(", no carry. ")
        tens_expr = f"{a_tens} + {b_tens}"
    parts += [f"Add the tens: {tens_expr} = ", Result(a_tens + b_tens + carry)]
    parts += [f". So {a} + {b} = ", Result(a + b, final=True), "."]
    return parts


def _sub_parts(a: int, b: int) -> list:
    """Column subtraction (a > b): ones, borrowing a ten when needed, then tens."""
    (a_tens, a_ones), (b_tens, b_ones) = divmod(a, 10), divmod(b, 10)
    if a_ones >= b_ones:
        parts = [f"Subtract the ones: {a_ones} - {b_ones} = ", Result(a_ones - b_ones)]
        parts += [f", no borrow. Subtract the tens: {a_tens} - {b_tens} = ", Result(a_tens - b_tens)]
    else:
        parts = [
            f"Subtract the ones: {a_ones} is less than {b_ones}, so borrow a ten: "
            f"{a_ones + 10} - {b_ones} = ",
            Result(a_ones + 10 - b_ones),
        ]
        parts += [f". Subtract the tens: {a_tens} - 1 - {b_tens} = ", Result(a_tens - 1 - b_tens)]
    parts += [f". So {a} - {b} = ", Result(a - b, final=True), "."]
    return parts


def _mul_parts(a: int, b: int) -> list:
    """Two-digit times one-digit: ones digit, then tens digit plus the carry."""
    a_tens, a_ones = divmod(a, 10)
    ones = a_ones * b
    carry = ones // 10
    parts = [f"Multiply the ones: {a_ones} * {b} = ", Result(ones)]
    parts += [f", write {ones % 10} and carry {carry}. " if carry else ", no carry. "]
    parts += [f"Multiply the tens: {a_tens} * {b} = ", Result(a_tens * b)]
    if carry:
        parts += [f", plus the carry {carry} gives ", Result(a_tens * b + carry)]
    parts += [f". So {a} * {b} = ", Result(a * b, final=True), "."]
    return parts


_EXPLAINERS = {"add": _add_parts, "sub": _sub_parts, "mul": _mul_parts}


def explanation_parts(operation: str, a: int, b: int) -> list:
    """Return the chosen explanation as text pieces and ``Result`` slots, in order."""
    if operation not in _EXPLAINERS:
        raise ValueError(f"Unknown operation {operation!r}; use one of {OPERATIONS}.")
    return _EXPLAINERS[operation](a, b)


def render(
    parts: list, *, replace_index: int | None = None, replacement: int | None = None
) -> tuple[str, list[int] | None]:
    """Join ``parts`` into text, optionally swapping one ``Result`` slot's value.

    Returns the text and the ``[start, end)`` span of the slot at ``replace_index``
    (``None`` when no index is given).
    """
    pieces: list[str] = []
    span = None
    offset = 0
    for index, part in enumerate(parts):
        if isinstance(part, Result):
            text = str(replacement if index == replace_index else part.value)
            if index == replace_index:
                span = [offset, offset + len(text)]
        else:
            text = part
        pieces.append(text)
        offset += len(text)
    return "".join(pieces), span


def wrong_value(rng: random.Random, value: int) -> int:
    """Pick a plausible wrong number: off by 1 or 2, or by 10 for values of two digits or more."""
    deltas = [-2, -1, 1, 2] + ([-10, 10] if value >= 10 else [])
    candidates = [value + d for d in deltas if value + d >= 0]
    return rng.choice(candidates)


def make_pair(rng: random.Random, *, operation: str, a: int, b: int) -> dict:
    """Build one preference record for ``a <operation> b``.

    ``rng`` decides the prompt wording, whether the rejected response breaks an
    intermediate result or the final answer, and the wrong value.
    """
    _check_operands(operation, a, b)
    parts = explanation_parts(operation, a, b)
    error_type = rng.choice(ERROR_TYPES)
    slots = [i for i, p in enumerate(parts) if isinstance(p, Result) and p.final == (error_type == "final")]
    index = rng.choice(slots)
    wrong = wrong_value(rng, parts[index].value)

    chosen, chosen_span = render(parts, replace_index=index, replacement=parts[index].value)
    rejected, rejected_span = render(parts, replace_index=index, replacement=wrong)
    prompt = rng.choice(PROMPT_TEMPLATES).format(expr=f"{a} {SYMBOLS[operation]} {b}")
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "operation": operation,
        "a": a,
        "b": b,
        "answer": true_result(operation, a, b),
        "error_type": error_type,
        "chosen_span": chosen_span,
        "rejected_span": rejected_span,
    }


def _check_operands(operation: str, a: int, b: int) -> None:
    """Reject operands outside the dataset's problem space, naming the bad one."""
    if operation not in OPERATIONS:
        raise ValueError(f"Unknown operation {operation!r}; use one of {OPERATIONS}.")
    if a not in _TWO_DIGIT:
        raise ValueError(f"a={a} must be a two-digit number (10..99).")
    b_range = range(2, 10) if operation == "mul" else _TWO_DIGIT
    if b not in b_range:
        raise ValueError(f"b={b} must be in {b_range.start}..{b_range.stop - 1} for {operation!r}.")
    if operation == "sub" and a <= b:
        raise ValueError(f"Subtraction needs a > b to keep results positive; got a={a}, b={b}.")


def sample_operands(rng: random.Random, operation: str) -> tuple[int, int]:
    """Draw random operands for ``operation`` within the dataset's problem space."""
    if operation == "mul":
        return rng.randint(10, 99), rng.randint(2, 9)
    if operation == "sub":
        a, b = sorted(rng.sample(_TWO_DIGIT, 2), reverse=True)
        return a, b
    return rng.randint(10, 99), rng.randint(10, 99)


def problem_key(operation: str, a: int, b: int) -> tuple[str, int, int]:
    """Identify a problem; addition is commutative, so 38 + 47 counts as 47 + 38."""
    if operation == "add":
        a, b = max(a, b), min(a, b)
    return operation, a, b


def make_splits(seed: int, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Generate disjoint train and test records with no repeated problem anywhere.

    Operations are balanced (equal counts up to one) and shuffled, so each split
    gets a similar mix.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1.")
    rng = random.Random(seed)
    total = n_train + n_test
    operations = [OPERATIONS[i % len(OPERATIONS)] for i in range(total)]
    _check_capacity(Counter(operations), total)
    rng.shuffle(operations)
    seen: set[tuple[str, int, int]] = set()
    records: list[dict] = []
    for operation in operations:
        # Redraw operands (not the operation) on a repeat to keep the balance exact.
        a, b = sample_operands(rng, operation)
        while problem_key(operation, a, b) in seen:
            a, b = sample_operands(rng, operation)
        seen.add(problem_key(operation, a, b))
        records.append(make_pair(rng, operation=operation, a=a, b=b))
    return records[:n_train], records[n_train:]


def _check_capacity(counts: Counter, total: int) -> None:
    """Fail early if some operation would need more unique problems than exist."""
    for operation, count in counts.items():
        if count > POOL_SIZES[operation]:
            raise ValueError(
                f"n_train + n_test = {total} needs {count} unique {operation!r} problems but only "
                f"{POOL_SIZES[operation]} exist; ask for fewer records."
            )


def regenerate_command(*, seed: int, n_train: int, n_test: int, out: str) -> str:
    """The exact command line that reproduces a generated folder."""
    return f"python scripts/make_arithmetic_data.py --seed {seed} --n-train {n_train} --n-test {n_test} --out {out}"


def render_readme(*, train: list[dict], test: list[dict], command: str) -> str:
    """Describe the data, its fields, license and how to regenerate it."""
    counts = Counter(r["operation"] for r in train + test)
    errors = Counter(r["error_type"] for r in train + test)
    example = json.dumps(train[0], indent=2)
    return f"""# Two-digit arithmetic preference data

Small, synthetic preference dataset for testing token-selective preference
optimization. Each prompt asks for a two-digit arithmetic result. The chosen
response is a short, correct step-by-step explanation. The rejected response is
the same text with exactly one number changed: an intermediate result
(`error_type` "intermediate") or the final answer (`error_type` "final"). The
two responses therefore differ in one contiguous character span, given by the
span fields below.

- Operations: addition of two two-digit numbers (`add`), subtraction of a smaller
  two-digit number from a larger one (`sub`), a two-digit number times a
  one-digit number 2..9 (`mul`).
- Wrong numbers are off by 1, 2 or 10, never negative, never equal to the right one.
- No problem appears twice, within or across splits (a + b and b + a count as one).

| split | records |
|-------|---------|
| train | {len(train)} |
| test  | {len(test)} |

Operations over both splits: add {counts['add']}, sub {counts['sub']}, mul {counts['mul']}.
Error types over both splits: intermediate {errors['intermediate']}, final {errors['final']}.

## Files

- `train.jsonl`, `test.jsonl`: one JSON object per line.

## Fields

TRL's conversational preference format:

- `prompt`: list with one `{{"role": "user", "content": ...}}` message.
- `chosen`: list with one `{{"role": "assistant", "content": ...}}` message, the correct explanation.
- `rejected`: list with one assistant message, the explanation with one wrong number.

Metadata:

- `operation`: "add", "sub" or "mul".
- `a`, `b`: the operands (ints), in the order they appear in the prompt.
- `answer`: the true result (int).
- `error_type`: "intermediate" or "final": which number the rejected response breaks.
- `chosen_span`, `rejected_span`: `[start, end)` character offsets of the differing
  number within the chosen and rejected assistant `content` respectively. Outside
  these spans the two texts are identical.

## Example

```json
{example}
```

## License

Apache-2.0. Generated by the selective-po project; no third-party data.

## Regenerate

From the repository root:

```
{command}
```

The output is deterministic: rerunning the command gives byte-identical files.
"""


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line with a fixed newline so output is byte-stable."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def write_dataset(out: Path, *, seed: int, n_train: int, n_test: int, command: str) -> None:
    """Generate the splits and write ``train.jsonl``, ``test.jsonl`` and ``README.md`` to ``out``."""
    train, test = make_splits(seed, n_train, n_test)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    readme = render_readme(train=train, test=test, command=command)
    (out / "README.md").write_text(readme, encoding="utf-8", newline="\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults reproduce the bundled dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="train records (default: %(default)s)")
    parser.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="test records (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate the dataset into ``--out``."""
    args = parse_args(argv)
    command = regenerate_command(seed=args.seed, n_train=args.n_train, n_test=args.n_test, out=args.out)
    write_dataset(Path(args.out), seed=args.seed, n_train=args.n_train, n_test=args.n_test, command=command)
    print(f"Wrote {args.n_train} train and {args.n_test} test records to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
