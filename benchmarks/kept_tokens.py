"""Where each trained model's held-out log-likelihood moved: on the tokens a fixed scorer keeps, or on the rest.

    python benchmarks/kept_tokens.py --grid outputs/onpolicy_cpu/main.yaml --seed 0 --pairs 60

`--grid` is a finished `selective-po compare` grid with a `dpo` row (the CPU preset of
`onpolicy_experiment.py`). The split is the one Selective-DPO with fixed scores trains on: the DPO model
of the same seed scores the start model's tokens (`sdpo_token_scores`, policy = start model, reference =
DPO model) and the top 40% of each response is kept (`top_share_mask`). For every trained model, per
held-out pair and side, it sums the change in token log-likelihood against the start model over the kept
tokens and over the other tokens, and gives the mean over pairs with a bootstrap 95% interval.

The end of the chosen response (its first end-of-turn token) gets its own column: a model that no
longer ends its answers rambles on to the token limit. So, for each model, the greedy completions of
the first `--generations` held-out arithmetic prompts (at the grid's `max_new_tokens`, as the grid
measures them) give the share that end before the limit and the share the verifier passes; the first
three are printed.

Responses are tokenized as TRL's DPO trainer does for conversational pairs: the prompt through the chat
template with the generation prompt, the completion as what the template of prompt + response adds.
Everything is written to `--output_json` (the table's rows and the completions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selective_po.compare import CompareConfig, load_held_out, run_dir
from selective_po.files import atomic_write
from selective_po.intervals import bootstrap_interval
from selective_po.models import generate_completions, resolve_model_path
from selective_po.progress import bar
from selective_po.scoring import sdpo_token_scores
from selective_po.selection import top_share_mask
from selective_po.verifiers import task_of, verify

SIDES = ("chosen", "rejected")


def completion_ids(tokenizer, row: dict, side: str) -> tuple[list[int], int]:
    """Token ids of prompt + response and the number of prompt tokens."""
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The chat template of prompt + response does not start with the prompt's; this split needs it.")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return full_ids, len(prompt_ids)


@torch.no_grad()
def response_logps(model, encoded: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """Per response, the `(n,)` float32 log-probs of its completion tokens, one sequence at a time (no padding)."""
    out = []
    for ids, prompt_len in encoded:
        ids_t = torch.tensor(ids)[None]
        logps = model(ids_t).logits[0, :-1].float().log_softmax(-1).gather(-1, ids_t[0, 1:, None])[:, 0]
        out.append(logps[prompt_len - 1 :])
    return out


def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, T)` values and the `(B, T)` bool mask of real entries."""
    width = max(len(r) for r in rows)
    values = torch.zeros(len(rows), width)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)], mask[i, : len(r)] = r, True
    return values, mask


def kept_and_other_changes(
    start: dict, scorer: dict, trained: dict, *, keep_share: float, ends: dict[str, list[int]]
) -> dict[str, dict[str, list[float]]]:
    """Per side, per pair: summed change (trained - start) over the scorer's kept tokens and over the rest, and
    the change at `ends[side]` (each response's end-of-turn position) with whether the scorer kept it."""
    out = {}
    (start_c, mask_c), (start_r, mask_r) = padded(start["chosen"]), padded(start["rejected"])
    chosen_scores, rejected_scores = sdpo_token_scores(start_c, start_r, padded(scorer["chosen"])[0], padded(scorer["rejected"])[0])
    for side, scores, start_v, mask in (("chosen", chosen_scores, start_c, mask_c), ("rejected", rejected_scores, start_r, mask_r)):
        keep = top_share_mask(scores, mask, keep_share=keep_share)
        change = padded(trained[side])[0] - start_v
        out[side] = {"kept": (change * keep).sum(-1).tolist(), "other": (change * (mask & ~keep)).sum(-1).tolist()}
        at = torch.tensor(ends[side])[:, None]
        out[side]["end"] = change.gather(-1, at)[:, 0].tolist()
        out[side]["end_kept"] = keep.gather(-1, at)[:, 0].float().tolist()
    return out


def first_end(ids: list[int], prompt_len: int, end_id: int) -> int:
    """Index, among the completion tokens, of the first end-of-turn token."""
    completion = ids[prompt_len:]
    if end_id not in completion:
        raise ValueError(f"A response has no end-of-turn token (id {end_id}) after the chat template; nothing to measure there.")
    return completion.index(end_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="outputs/onpolicy_cpu/main.yaml", help="the grid's YAML (as `compare` reads it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=60, help="held-out pairs, evenly spaced over the split (0: all)")
    parser.add_argument("--keep_share", type=float, default=0.4, help="share the scorer keeps (the variant's 40%)")
    parser.add_argument("--methods", nargs="+", default=["dpo", "sdpo-dpo-ref", "sdpo-fixed-scores", "sepo", "sdpo-dpo-ref-random"])
    parser.add_argument("--generations", type=int, default=3, help="greedy completions shown per model")
    parser.add_argument("--output_json", default="docs/results/kept_tokens.json")
    opts = parser.parse_args()

    config = CompareConfig.from_yaml(opts.grid)
    pairs, prompts = load_held_out(config)
    step = max(1, len(pairs) // opts.pairs) if opts.pairs else 1
    rows = [pairs[i] for i in range(0, len(pairs), step)][: opts.pairs or None]
    arithmetic = [p for p in prompts if task_of(p) == "arithmetic"][: opts.generations]
    start_path = resolve_model_path(config.model)
    paths = {"start": start_path, **{m: str(run_dir(config, m, opts.seed) / "model") for m in opts.methods}}
    missing = [m for m, p in paths.items() if not Path(p).is_dir()]
    if missing:
        raise SystemExit(f"No trained model for {missing} at seed {opts.seed} in {config.output_dir}; run the grid first.")
    tokenizer = AutoTokenizer.from_pretrained(start_path)
    encoded = {side: [completion_ids(tokenizer, row, side) for row in rows] for side in SIDES}
    ends = {side: [first_end(ids, n, tokenizer.eos_token_id) for ids, n in encoded[side]] for side in SIDES}

    logps, completions = {}, {}
    with bar(total=len(paths), desc="Models", unit="model") as progress:
        for name, path in paths.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            logps[name] = {side: response_logps(model, encoded[side]) for side in SIDES}
            completions[name] = []
            for start in range(0, len(arithmetic), 16):
                chunk = arithmetic[start : start + 16]
                generated = generate_completions(model, tokenizer, [p["prompt"] for p in chunk], do_sample=False, max_new_tokens=config.max_new_tokens)
                for ids, prompt in zip(generated.tolist(), chunk):
                    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    completions[name].append({"text": text, "correct": verify(text, prompt), "ended": tokenizer.eos_token_id in ids})
            del model
            progress.update(1)

    table = {}
    for name in opts.methods:
        changes = kept_and_other_changes(logps["start"], logps["dpo"], logps[name], keep_share=opts.keep_share, ends=ends)
        table[name] = {side: {part: {"mean": sum(v) / len(v), "interval": bootstrap_interval(v)} for part, v in parts.items()}
                       for side, parts in changes.items()}  # fmt: skip

    print(f"Change in held-out log-likelihood against the start model, nats per response, {len(rows)} pairs, seed {opts.seed};")
    print(f"kept = the top {opts.keep_share:.0%} by the DPO model's Selective-DPO score of the start model.\n")
    def shown(cell: dict, digits: int = 1) -> str:
        return f"{cell['mean']:+.{digits}f} [{cell['interval'][0]:+.{digits}f}, {cell['interval'][1]:+.{digits}f}]".replace("-", "−")

    n = len(arithmetic)
    print("| model | chosen, kept | chosen, other | chosen, end-of-turn token | rejected, kept | rejected, other | rejected, end-of-turn "
          f"token | greedy answers that end ({n} prompts) | correct |\n| --- |" + " ---: |" * 8)  # fmt: skip
    for name in ["start", *opts.methods]:
        cells = [""] * 6
        if name in table:
            cells = [shown(table[name][side][part], 2 if part == "end" else 1) for side in SIDES for part in ("kept", "other", "end")]
        done = completions[name]
        cells += [f"{sum(c['ended'] for c in done)}/{n}", f"{sum(c['correct'] for c in done)}/{n}"] if n else ["", ""]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if table:
        shares = next(iter(table.values()))
        print(f"\nThe end-of-turn token is among the kept {opts.keep_share:.0%} in {100 * shares['chosen']['end_kept']['mean']:.0f}% of the "
              f"chosen responses and {100 * shares['rejected']['end_kept']['mean']:.0f}% of the rejected ones.")  # fmt: skip
    for name, done in completions.items():
        for item in done[:3]:
            print(f"\n[{name}, {'correct' if item['correct'] else 'wrong'}, {'ends' if item['ended'] else 'runs to the limit'}] {item['text'][:300]!r}")
    report = {"grid": opts.grid, "seed": opts.seed, "pairs": len(rows), "keep_share": opts.keep_share, "changes": table, "completions": completions}
    atomic_write(Path(opts.output_json), json.dumps(report, indent=1).encode())


if __name__ == "__main__":
    main()
