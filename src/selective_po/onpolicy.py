"""On-policy preference pairs with verifiable answers: sample, verify, pair.

For each prompt the model samples several responses; a verifier (`verifiers.py`) marks each as
passing or failing; a prompt with at least one of each gives one pair, the first passing response
(chosen) against the first failing one (rejected), in sampling order. Responses that hit
`max_new_tokens` without ending are left out of both sides, so no pair teaches "stop early".

Prompts come from two deterministic generators: two-number arithmetic with an exact answer, and
IFEval-style requests (a short writing task plus one instruction whose checker `if-verifiable`
ships). The instructions used are those whose checkers need no downloaded NLTK data.

Sampling runs in fixed chunks of prompts. Each chunk is seeded from (seed, chunk index) alone and
written atomically as one JSON-lines file, so a killed build resumes where it stopped and gives the
same samples as an uninterrupted one. The settings are stored beside the chunks; a rerun with
other settings is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .models import generate_completions
from .files import atomic_write
from .progress import bar
from .token_values import end_token_ids
from .verifiers import verify

ARITHMETIC_TEMPLATES = (
    "What is {expr}?",
    "Calculate {expr}.",
    "Compute {expr} and give the result.",
    "What is {expr}? Explain briefly.",
)
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}

WRITING_TASKS = (
    "Write a short paragraph about {topic}.",
    "Describe {topic} in a few sentences.",
    "Give some advice about {topic}.",
    "Explain {topic} to a child.",
    "Write a short note to a friend about {topic}.",
)
TOPICS = (
    "the ocean", "autumn leaves", "a city at night", "learning to cook", "a rainy day", "bicycles",
    "the moon", "a visit to the library", "gardening", "friendship", "mountains", "a busy market",
    "trains", "the importance of sleep", "a favourite book", "coffee", "winter mornings", "the desert",
    "music lessons", "saving money", "a lost umbrella", "birds in spring", "a long walk", "robots",
    "the history of bread", "keeping a journal", "a small village", "the night sky", "recycling",
    "a school trip", "volcanoes", "playing chess", "a summer festival", "bees", "the first snow",
    "moving to a new house", "a lighthouse", "tea", "rivers", "a broken clock",
)  # fmt: skip
KEYWORDS = ("light", "water", "time", "happy", "green", "small", "friend", "morning", "quiet", "road")
END_PHRASES = ("Is there anything else I can help with?", "Thank you for reading.", "That is all.")


def _ifeval_instruction(rng: random.Random) -> tuple[str, dict]:
    """One instruction id and its arguments, drawn from the checkers that need no NLTK data."""
    relation = rng.choice(("less than", "at least"))
    choices = [
        ("punctuation:no_comma", {}),
        ("change_case:english_lowercase", {}),
        ("change_case:english_capital", {}),
        ("length_constraints:number_words", {"num_words": rng.choice((20, 40, 60, 80)), "relation": relation}),
        ("keywords:existence", {"keywords": rng.sample(KEYWORDS, 2)}),
        ("keywords:forbidden_words", {"forbidden_words": rng.sample(KEYWORDS, 2)}),
        ("keywords:frequency", {"keyword": rng.choice(KEYWORDS), "frequency": rng.choice((1, 2, 3)), "relation": relation}),
        ("keywords:letter_frequency", {"letter": rng.choice("aeiost"), "let_frequency": rng.choice((3, 5, 8)), "let_relation": relation}),
        ("detectable_content:postscript", {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}),
        ("detectable_format:title", {}),
        ("startend:end_checker", {"end_phrase": rng.choice(END_PHRASES)}),
        ("startend:quotation", {}),
        ("detectable_format:number_bullet_lists", {"num_bullets": rng.choice((2, 3, 4))}),
        ("length_constraints:number_paragraphs", {"num_paragraphs": rng.choice((2, 3))}),
        ("detectable_format:json_format", {}),
    ]  # fmt: skip
    return rng.choice(choices)


def ifeval_prompts(n: int, *, seed: int) -> list[dict]:
    """`n` distinct writing requests, each with one IFEval instruction whose checker decides the task."""
    from .verifiers import ifeval_checkers

    registry = ifeval_checkers()
    rng = random.Random(f"ifeval-{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        task = rng.choice(WRITING_TASKS).format(topic=rng.choice(TOPICS))
        instruction_id, kwargs = _ifeval_instruction(rng)
        key = (task, instruction_id, json.dumps(kwargs, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        # The checker writes the instruction's wording, so prompt and check always agree.
        description = registry[instruction_id](instruction_id).build_description(**kwargs)
        rows.append({
            "prompt": [{"role": "user", "content": f"{task} {description}"}],
            "task": "ifeval",
            "answer": None,
            "instruction_id_list": [instruction_id],
            "instruction_kwargs": json.dumps([kwargs]),
        })  # fmt: skip
    return rows


def arithmetic_prompts(n: int, *, seed: int) -> list[dict]:
    """`n` distinct problems: sums and differences of numbers up to 30, products up to 12 * 9.

    Small enough that a 135M model gets some right when sampling, so most prompts yield a pair.
    """
    rng = random.Random(f"arithmetic-{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        operation = rng.choice(("add", "sub", "mul"))
        if operation == "mul":
            a, b = rng.randint(2, 12), rng.randint(2, 9)
        else:
            a, b = rng.randint(1, 30), rng.randint(1, 30)
            if operation == "sub" and b > a:
                a, b = b, a
        if (operation, a, b) in seen:
            continue
        seen.add((operation, a, b))
        answer = {"add": a + b, "sub": a - b, "mul": a * b}[operation]
        expr = f"{a} {SYMBOLS[operation]} {b}"
        rows.append({
            "prompt": [{"role": "user", "content": rng.choice(ARITHMETIC_TEMPLATES).format(expr=expr)}],
            "task": "arithmetic",
            "answer": answer,
            "instruction_id_list": [],
            "instruction_kwargs": "[]",
        })  # fmt: skip
    return rows


@dataclass(frozen=True)
class SamplingSettings:
    """Everything that decides the samples; stored with the chunks so a resumed build cannot mix settings."""

    model: str
    samples_per_prompt: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    prompts_per_chunk: int = 8
    seed: int = 0
    prompts_sha256: str = ""


def prompts_digest(rows: list[dict]) -> str:
    payload = json.dumps([[r["prompt"], r["task"], r["answer"], r["instruction_kwargs"]] for r in rows], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _check_settings(work_dir: Path, settings: SamplingSettings) -> None:
    """Write the settings on first use; refuse a work dir made with other ones."""
    path = work_dir / "settings.json"
    wanted = asdict(settings)
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = {k: (stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{work_dir} holds samples made with other settings ({details}). Use another output "
                "directory, or delete this one to start over."
            )
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(wanted, indent=2).encode())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def _sample_chunk(model, tokenizer, rows: list[dict], settings: SamplingSettings, *, seed: int, progress=None) -> list[dict]:
    """Sample `samples_per_prompt` responses for each row, in one batched `generate` call.

    `progress(share)` follows the decoding steps of the call (see `generate_completions`).
    """
    torch.manual_seed(seed)  # generate draws from the global generator
    generated = generate_completions(
        model, tokenizer, [row["prompt"] for row in rows], do_sample=True, temperature=settings.temperature,
        top_p=settings.top_p, max_new_tokens=settings.max_new_tokens, num_return_sequences=settings.samples_per_prompt,
        progress=progress,
    )  # fmt: skip
    stop_ids = end_token_ids(model, tokenizer)
    complete = torch.isin(generated, torch.tensor(stop_ids)).any(dim=1).tolist()
    texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    records = []
    for i, row in enumerate(rows):
        span = slice(i * settings.samples_per_prompt, (i + 1) * settings.samples_per_prompt)
        responses = [text.strip() for text in texts[span]]
        records.append({
            "responses": responses,
            "complete": complete[span],
            "passed": [verify(text, row) for text in responses],
        })  # fmt: skip
    return records




def sample_and_verify(model, tokenizer, rows: list[dict], settings: SamplingSettings, *, work_dir: Path, first_chunk: int = 0) -> list[dict]:
    """Samples and verdicts for every row, resuming from the chunks already in `work_dir`.

    Chunk `i` draws with seed `settings.seed * 1_000_003 + first_chunk + i`: rows sampled later as a
    continuation of a split pass `first_chunk` = that split's chunk count, so no chunk seed repeats.
    Returns one record per row: `responses`, `complete` (ended before `max_new_tokens`), `passed`.
    """
    work_dir = Path(work_dir)
    _check_settings(work_dir, settings)
    size = settings.prompts_per_chunk
    records: list[dict] = []
    pairs = 0
    with bar(total=len(rows), desc="Sampling", unit="prompt") as progress:
        for index, start in enumerate(range(0, len(rows), size)):
            path = work_dir / f"chunk-{index:05d}.jsonl"
            chunk_rows = rows[start : start + size]
            if path.is_file():
                chunk = [json.loads(line) for line in path.read_text().splitlines()]
                progress.update(len(chunk_rows))
            else:
                advance = lambda share, n=len(chunk_rows): progress.update(share * n)  # noqa: E731
                seed = settings.seed * 1_000_003 + first_chunk + index
                chunk = _sample_chunk(model, tokenizer, chunk_rows, settings, seed=seed, progress=advance)
                _write_jsonl(path, chunk)
                progress.n = start + len(chunk_rows)  # whole prompts again: the token steps' shares do not add up exactly
            records.extend(chunk)
            pairs += sum(_pair_indices(record) is not None for record in chunk)
            progress.set_postfix(pairs=pairs)
    return records


def _pair_indices(record: dict) -> tuple[int, int] | None:
    """(chosen, rejected) sample indices: first complete pass against first complete fail with other text."""
    passing = [i for i, (ok, done) in enumerate(zip(record["passed"], record["complete"])) if ok and done]
    if not passing:
        return None
    chosen = passing[0]
    for i, (ok, done) in enumerate(zip(record["passed"], record["complete"])):
        if done and not ok and record["responses"][i] != record["responses"][chosen]:
            return chosen, i
    return None


def make_pairs(rows: list[dict], records: list[dict]) -> list[dict]:
    """Preference pairs in TRL's conversational format, one per prompt that has both outcomes."""
    pairs = []
    for row, record in zip(rows, records, strict=True):
        indices = _pair_indices(record)
        if indices is None:
            continue
        chosen, rejected = indices
        pairs.append({
            **row,
            "chosen": [{"role": "assistant", "content": record["responses"][chosen]}],
            "rejected": [{"role": "assistant", "content": record["responses"][rejected]}],
            "pass_rate": sum(record["passed"]) / len(record["passed"]),
        })  # fmt: skip
    return pairs


TASK_PROMPTS = {"arithmetic": arithmetic_prompts, "ifeval": ifeval_prompts}


def split_prompts(
    counts: dict[str, int], *, test_share: float, seed: int, validation_share: float = 0.0, extra_test_prompts: int = 0
) -> dict[str, list[dict]]:
    """Distinct prompts per task: the first `test_share` of each task held out as "test", the next
    `validation_share` as "validation" (only when > 0; for tuning), the rest "train".

    `extra_test_prompts` > 0 adds a "test-extra" part: that many more prompts per task, the ones after the
    task's `count` in its stream, so they are new to every split and no prompt of a split moves. It grows
    a built dataset's held-out set; `build_onpolicy_dataset` appends it to "test"."""
    if not 0 < test_share < 1:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    if not 0 <= validation_share < 1 - test_share:
        raise ValueError(f"validation_share must be in [0, 1 - test_share), got {validation_share} (test_share {test_share})")
    if extra_test_prompts < 0:
        raise ValueError(f"extra_test_prompts must be 0 or more, got {extra_test_prompts}")
    splits = {"train": [], **({"validation": []} if validation_share else {}), "test": [], **({"test-extra": []} if extra_test_prompts else {})}
    for task, count in counts.items():
        if task not in TASK_PROMPTS:
            raise ValueError(f"Unknown task {task!r}; known: {sorted(TASK_PROMPTS)}")
        rows = TASK_PROMPTS[task](count + extra_test_prompts, seed=seed)  # a stream: its first `count` do not depend on the extra
        n_test, n_validation = round(count * test_share), round(count * validation_share)
        for i, row in enumerate(rows):
            row["prompt_id"] = f"{task}-{i:05d}"
        splits["test"] += rows[:n_test]
        if validation_share:
            splits["validation"] += rows[n_test : n_test + n_validation]
        splits["train"] += rows[n_test + n_validation : count]
        if extra_test_prompts:
            splits["test-extra"] += rows[count:]
    return splits


def written_records(output_dir: Path, split: str, rows: list[dict], settings: dict) -> list[dict] | None:
    """The records of `rows` from a finished build's `samples-{split}.jsonl` (a folder whose `work/` chunks
    are gone, as in a bundled dataset), or None when it lacks any of them. Raises when the folder was
    built with other sampling settings or holds other prompts under the same ids."""
    path, stats_path = output_dir / f"samples-{split}.jsonl", output_dir / "stats.json"
    if not (path.is_file() and stats_path.is_file()):
        return None
    stored = json.loads(stats_path.read_text())["settings"]
    changed = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
    if changed:
        details = ", ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ValueError(f"{output_dir} was built with other settings ({details}); use another --output_dir or the same settings.")
    by_id = {row["prompt_id"]: row for row in map(json.loads, path.read_text().splitlines())}
    if not all(row["prompt_id"] in by_id for row in rows):
        return None
    records = []
    for row in rows:
        written = by_id[row["prompt_id"]]
        if any(written[key] != row[key] for key in ("prompt", "task", "answer", "instruction_kwargs")):
            raise ValueError(f"{path}: prompt {row['prompt_id']} differs from the one these settings make; use another --output_dir.")
        records.append({key: written[key] for key in ("responses", "complete", "passed")})
    return records


def build_onpolicy_dataset(
    model, tokenizer, *, model_name: str, output_dir: str | Path, counts: dict[str, int], test_share: float = 0.25,
    validation_share: float = 0.0, settings: dict | None = None, extra_test_prompts: int = 0,
) -> dict[str, dict]:
    """Sample, verify and pair for every prompt; write `{train,validation,test}.jsonl` (pairs; validation only
    when `validation_share` > 0), `{validation,test}_prompts.jsonl` (every held-out prompt, for greedy
    accuracy) and `samples-{split}.jsonl` (every sample and verdict).

    Returns per-split statistics (with `extra_prompts`/`extra_pairs` per task of "test" when
    `extra_test_prompts` grew it; see `split_prompts`). Resumes from `output_dir/work/`, and takes the
    samples of prompts that `output_dir` already holds from its `samples-*.jsonl`, so a finished (or
    bundled) dataset grows by sampling only its new prompts.
    """
    output_dir = Path(output_dir)
    settings = dict(settings or {})
    seed = settings.get("seed", 0)
    splits = split_prompts(counts, test_share=test_share, validation_share=validation_share, seed=seed, extra_test_prompts=extra_test_prompts)
    extra = splits.pop("test-extra", [])
    stats = {}

    def records_of(part: str, rows: list[dict], *, written_in: str, first_chunk: int = 0) -> list[dict]:
        records = written_records(output_dir, written_in, rows, {"model": model_name, **settings})
        if records is None:
            sampling = SamplingSettings(model=model_name, **settings, prompts_sha256=prompts_digest(rows))
            records = sample_and_verify(model, tokenizer, rows, sampling, work_dir=output_dir / "work" / part, first_chunk=first_chunk)
        return records

    for split, rows in splits.items():
        records = records_of(split, rows, written_in=split)
        if split == "test" and extra:
            chunks = math.ceil(len(rows) / settings.get("prompts_per_chunk", SamplingSettings.prompts_per_chunk))
            extra_records = records_of("test-extra", extra, written_in="test", first_chunk=chunks)
            extra_pairs = make_pairs(extra, extra_records)
            rows, records = rows + extra, records + extra_records
        pairs = make_pairs(rows, records)
        _write_jsonl(output_dir / f"{split}.jsonl", pairs)
        _write_jsonl(output_dir / f"samples-{split}.jsonl", [{**row, **record} for row, record in zip(rows, records)])
        if split != "train":
            _write_jsonl(output_dir / f"{split}_prompts.jsonl", rows)
        stats[split] = split_statistics(rows, records, pairs)
        if split == "test" and extra:
            for task, row in stats[split].items():
                row["extra_prompts"] = sum(r["task"] == task for r in extra)
                row["extra_pairs"] = sum(p["task"] == task for p in extra_pairs)
    return stats


def split_statistics(rows: list[dict], records: list[dict], pairs: list[dict]) -> dict[str, dict]:
    """Per task: prompts, samples, share passing, share complete, pairs."""
    out = {}
    for task in sorted({row["task"] for row in rows}):
        mine = [rec for row, rec in zip(rows, records) if row["task"] == task]
        samples = sum(len(rec["passed"]) for rec in mine)
        out[task] = {
            "prompts": len(mine),
            "samples": samples,
            "pass_rate": sum(sum(rec["passed"]) for rec in mine) / samples,
            "complete_rate": sum(sum(rec["complete"]) for rec in mine) / samples,
            "pairs": sum(p["task"] == task for p in pairs),
        }
    return out


def render_readme(stats: dict[str, dict], *, settings: dict, command: str) -> str:
    """The data card of a built dataset: how it was made and what it holds."""
    lines = [
        "# On-policy preference pairs with verifiable answers",
        "",
        f"Built by `selective-po build-pairs` from `{settings['model']}` itself: every response was sampled from the",
        "model, so the pairs are on-policy for it. Regenerate (resumable; the same settings give the same samples on",
        "the same machine and library versions) with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "For each prompt the model sampled "
        f"{settings['samples_per_prompt']} responses (temperature {settings['temperature']}, top-p {settings['top_p']}, "
        f"at most {settings['max_new_tokens']} new tokens, seed {settings['seed']}). Each response was checked by the",
        "verifier of the prompt's task; a prompt with at least one passing and one failing response gave one pair:",
        "the first passing response (chosen) against the first failing one (rejected), in sampling order. Responses",
        "cut off at the token limit were left out of both sides.",
        "",
        "- `arithmetic`: sums and differences of numbers up to 30, products up to 12 * 9; a response passes when",
        "  its last integer is the answer.",
        "- `ifeval`: a short writing request plus one IFEval instruction, worded by the instruction's own checker",
        "  from `if-verifiable`; a response passes when that checker accepts it (strict).",
        "",
        "| split | task | prompts | samples | samples passing | samples complete | pairs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split, tasks in stats.items():
        for task, s in tasks.items():
            lines.append(
                f"| {split} | {task} | {s['prompts']} | {s['samples']} | {s['pass_rate']:.1%} | {s['complete_rate']:.1%} | {s['pairs']} |"
            )
    grown = {task: s for task, s in stats.get("test", {}).items() if s.get("extra_prompts")}
    if grown:
        lines += [
            "",
            "The test split was grown after it was built (`--extra_test_prompts`): of its rows above, "
            + " and ".join(f"{s['extra_prompts']} {task} prompts ({s['extra_pairs']} pairs)" for task, s in grown.items())
            + " are the prompts that follow each task's first ones in its stream, new to every split.",
        ]
    lines += [
        "",
        "## Files",
        "",
        f"- {', '.join(f'`{split}.jsonl`' for split in stats)}: the pairs, in TRL's conversational format (`prompt`, `chosen`, `rejected`),",
        "  with `task`, `answer` (arithmetic), `instruction_id_list` and `instruction_kwargs` (IFEval, a JSON list of",
        "  argument dicts), `prompt_id` and `pass_rate` (the share of the prompt's samples that passed).",
        f"- {', '.join(f'`{split}_prompts.jsonl`' for split in stats if split != 'train')}: every held-out prompt, with or "
        "without a pair, for greedy accuracy and IFEval pass rate (`selective-po eval` reads it).",
        f"- {', '.join(f'`samples-{split}.jsonl`' for split in stats)}: every prompt with all its samples and their verdicts.",
        "- `stats.json`: the settings and the table above.",
    ]
    return "\n".join(lines) + "\n"
