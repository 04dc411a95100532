"""How well each token scorer finds the tokens that carry the preference, on pairs whose differing span is known.

    python benchmarks/selection_quality.py --grid outputs/compare_arithmetic --seeds 0 1

`--grid` is a `selective-po compare` output folder trained on the bundled arithmetic pairs (it needs
its `dpo` runs, and `sdpo` runs trained with the start model as reference). On the held-out arithmetic
pairs, whose `chosen_span`/`rejected_span` mark the only text that differs, every scorer is measured
by `selection_quality.span_selection_quality` (token AUROC, top-1 in span, recall at the kept share),
per side, with bootstrap 95% intervals over responses and the value of random scores beside it:

- Selective-DPO's scores with a DPO-trained reference, policy = start model. SePO's oracle reward
  (log p_oracle - log p_ref, with the DPO model as oracle and the start model as its reference) is this
  score on chosen tokens and its negative on rejected ones, and SePO keeps the highest-reward chosen and
  lowest-reward rejected tokens: the same ranking, so the same AUROC and top-1.
- Selective-DPO's scores with the start model as reference, policy = the model Selective-DPO trained
  that way (at step 0 every score is 0, so the end of training is where this scorer is defined).
- ConfPO's confidence (1 - p under the start model): no reference at all.

Each (scorer, seed) is written to `--output_dir/<scorer>-seed<N>.json` as it finishes, so a stopped
run resumes; the table goes to `--output_md` and everything to `--output_json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import numpy as np

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.evaluation import span_responses
from selective_po.files import atomic_write
from selective_po.models import DEFAULT_MODEL, resolve_model_path
from selective_po.progress import bar
from selective_po.selection_quality import span_selection_quality

MEASURES = {"span_auroc": "AUROC", "span_top1": "top-1 in span", "span_recall_at_k": "recall at k"}


def scorers(grid: Path, base: str, seeds: list[int]) -> list[dict]:
    """(name, policy, reference, rule) for every measurement, seed by seed."""
    out = [{"name": "confidence-start", "label": "ConfPO confidence, start model", "seed": None, "policy": base, "reference": base,
            "rule": "confidence"}]  # fmt: skip
    for seed in seeds:
        dpo, sdpo = grid / "dpo" / f"seed{seed}" / "model", grid / "sdpo" / f"seed{seed}" / "model"
        out.append({"name": f"dpo-reference-seed{seed}", "label": "Selective-DPO, DPO-trained reference (= SePO oracle ranking)",
                    "seed": seed, "policy": base, "reference": str(dpo), "rule": "scores"})  # fmt: skip
        out.append({"name": f"initial-reference-seed{seed}", "label": "Selective-DPO, initial reference (policy after Selective-DPO)",
                    "seed": seed, "policy": str(sdpo), "reference": base, "rule": "scores"})  # fmt: skip
    for scorer in out:
        for role in ("policy", "reference"):
            if scorer[role] != base and not Path(scorer[role]).is_dir():
                raise FileNotFoundError(f"{scorer['name']}: {role} model {scorer[role]} is missing; train the grid first.")
    return out


def measure(scorer: dict, rows, *, keep_share: float, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = SelectiveDPOConfig(
            output_dir=tmp, ref_model_name_or_path=scorer["reference"], precompute_ref_log_probs=True,
            precompute_ref_batch_size=batch_size, per_device_eval_batch_size=batch_size, report_to="none",
        )  # fmt: skip
        trainer = SelectiveDPOTrainer(model=scorer["policy"], args=args, train_dataset=rows, eval_dataset=rows)
        responses = span_responses(trainer, threshold=1 - keep_share, batch_size=batch_size, rule=scorer["rule"])
    del trainer
    gc.collect()
    return span_selection_quality(responses, keep_share=keep_share)


def table(measured: list[dict], keep_share: float) -> str:
    """Per scorer: each measure and side as mean over seeds [lowest, highest interval end over seeds]; random below."""
    lines = [
        f"| scorer | seeds | side | AUROC | top-1 in span | recall at {keep_share:.0%} |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    labels = list(dict.fromkeys(m["label"] for m in measured))
    for label in labels + ["random scores"]:
        # Random scores' values depend only on the spans' tokens, the same for every scorer: take the first's.
        mine = [m for m in measured if m["label"] == label] or measured[:1]
        seeds = ",".join(str(m["seed"]) for m in mine if m["seed"] is not None) or "-"
        for side in ("chosen", "rejected"):
            cells = []
            for key in MEASURES:
                values = [m["quality"][f"{key}_{side}" + ("_random" if label == "random scores" else "")] for m in mine]
                if label == "random scores":
                    cells.append(f"{np.mean(values):.3f}")
                else:
                    low = min(m["quality"][f"{key}_{side}_low"] for m in mine)
                    high = max(m["quality"][f"{key}_{side}_high"] for m in mine)
                    cells.append(f"{np.mean(values):.3f} [{low:.3f}, {high:.3f}]")
            lines.append(f"| {label} | {seeds if label != 'random scores' else '-'} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, help="a compare output folder trained on the arithmetic pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the grid's start model")
    parser.add_argument("--pairs", type=int, default=200, help="held-out arithmetic pairs (0: all)")
    parser.add_argument("--keep_share", type=float, default=0.4, help="share kept, for recall at k")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output_dir", default="outputs/selection_quality")
    parser.add_argument("--output_json", default="docs/results/selection_quality.json")
    parser.add_argument("--output_md", default="docs/results/selection_quality.md")
    opts = parser.parse_args()
    base = resolve_model_path(opts.model)
    rows = load_preference_dataset("arithmetic", split="test")
    if opts.pairs:
        rows = rows.select(range(min(opts.pairs, len(rows))))
    todo = scorers(Path(opts.grid), base, opts.seeds)
    measured = []
    with bar(total=len(todo), desc="Scorers", unit="scorer") as progress:
        for scorer in todo:
            path = Path(opts.output_dir) / f"{scorer['name']}.json"
            if not path.is_file():
                progress.set_postfix_str(scorer["name"])
                quality = measure(scorer, rows, keep_share=opts.keep_share, batch_size=opts.batch_size)
                atomic_write(path, json.dumps({**scorer, "pairs": len(rows), "quality": quality}, indent=1).encode())
            measured.append(json.loads(path.read_text()))
            progress.update(1)
    atomic_write(Path(opts.output_json), json.dumps(measured, indent=1).encode())
    atomic_write(Path(opts.output_md), table(measured, opts.keep_share).encode())
    print(Path(opts.output_md).read_text())


if __name__ == "__main__":
    main()
