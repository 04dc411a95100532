"""The noise floor of per-token log-probs by dtype, and what it does to the kept tokens.

    python benchmarks/noise_floor.py        # writes docs/results/noise_floor.json and .md

On the bundled model and the first 8 bundled arithmetic pairs, for float32, bfloat16 and float16
weights (`model_init_kwargs: {dtype: ...}`), each through the trainer's own code:

1. **Noise floor**: the same weights, the same tokens, values produced in different ways:
   - `stored_vs_live`: stored by the trainer's scoring pass in batches of 3 against the training
     forward in batches of 4, in the layout the trainer picks (one packed row per pair on CPU);
   - `alone_vs_batch`: each pair alone against inside its batch of 4;
   - `packed_vs_two_rows`: the packed shared-prompt row against the two-row forward;
   - `policy_vs_frozen_copy`: the policy against a frozen copy loaded from the same folder;
   - `vs_float64`: the log-probs against the same weights run in float64 (this dtype's rounding);
   - for bf16 and fp16, `alone_vs_batch` and `vs_float64` again with the LM head in float32 (TRL's
     `cast_lm_head_to_fp32`), which the trainer does not use: it shows how much of the floor the head makes.
   Each gives the largest |difference| over completion tokens, its 99th percentile and the share of
   tokens differing by more than 1e-5.
2. **Step 0 with stored values** (the README's promise: the policy equals its reference, so every
   token is kept): the kept share with the tie tolerance of the scores' dtype, and with 1e-5.
3. **Kept-set fidelity** on fixed weights with real score gaps: the policy is the bundled model, the
   reference the same model with every weight scaled by (1 + 0.05 e), e ~ N(0, 1) (seed 0). The kept
   mask at sdpo_threshold 0.6 is compared with the float64 kept mask, per token, binned by the
   token's float64 distance to its response's cut (the k-th score), with the tolerance of the dtype
   ("after") and with 1e-5 for every dtype ("before").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, load_preference_dataset
from selective_po.files import atomic_write
from selective_po.losses import select_sdpo_tokens
from selective_po.models import DEFAULT_MODEL, resolve_model_path
from selective_po.reference_scoring import forward_logps, load_frozen
from selective_po.selection import keep_counts, score_tie_tolerance

DTYPES = ("float32", "bfloat16", "float16")
OLD_TOLERANCE = 1e-5
GAP_BINS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, float("inf"))
THRESHOLD = 0.6


def trainer_for(dtype: str, work: Path, *, ref: str | None = None, share_prompt: bool | None = None, pairs: int = 8):
    args = SelectiveDPOConfig(
        output_dir=str(work / "out"), report_to="none", precompute_ref_log_probs=True, precompute_ref_batch_size=3,
        per_device_train_batch_size=4, ref_logps_cache_dir=str(work / "cache"), model_init_kwargs={"dtype": getattr(torch, dtype)},
        ref_model_name_or_path=ref, share_prompt=share_prompt, sdpo_threshold=THRESHOLD, disable_dropout=True,
        plot_curves=False, max_length=256,
    )  # fmt: skip
    return SelectiveDPOTrainer(model=DEFAULT_MODEL, args=args, train_dataset=load_preference_dataset("arithmetic", split="train").select(range(pairs)))


def batches(trainer, size: int = 4):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return [trainer._prepare_inputs(trainer.data_collator(rows[i : i + size])) for i in range(0, len(rows), size)]


@torch.no_grad()
def live(trainer, batch, *, layout: str | None = "trainer"):
    mask = trainer._shared_prompt_mask if layout == "trainer" else layout
    trainer.model.eval()
    return forward_logps(trainer.model, batch, shared_prompt_mask=mask).float(), batch["completion_mask"][:, 1:].bool()


def differences(pairs) -> dict:
    """Statistics of |a - b| over the masked tokens of `(a, b, mask)` tensors."""
    diff = torch.cat([(a.double() - b.double()).abs()[m] if m is not None else (a.double() - b.double()).abs() for a, b, m in pairs]).numpy()
    return {"tokens": int(diff.size), "max_abs": float(diff.max()), "p99_abs": float(np.quantile(diff, 0.99)),
            "share_above_1e-5": float((diff > 1e-5).mean())}  # fmt: skip


def alone_and_together(trainer, together: list) -> list:
    """`(alone, in its batch, None)` per response: each pair run alone against its row of `together`,
    the live `(logps, mask)` of the trainer's batches of 4, in order."""
    alone = [live(trainer, b) for b in batches(trainer, size=1)]
    out = []
    for index, (values, mask) in enumerate(together):
        half = values.size(0) // 2  # rows [chosen; rejected]
        for j in range(half):
            one, one_mask = alone[index * 4 + j]
            for side, row in ((0, j), (1, half + j)):
                out.append((one[side][one_mask[side]], values[row][mask[row]], None))
    return out


def noise_floor(dtype: str, work: Path, float64_logps: list) -> tuple[dict, dict]:
    trainer = trainer_for(dtype, work / f"floor-{dtype}")
    layout = trainer._shared_prompt_mask
    found, step0 = {}, {}
    stored = [(b["ref_per_token_logps"].float(), *live(trainer, b)) for b in batches(trainer)]
    found["stored_vs_live"] = differences([(s, lv, m) for s, lv, m in stored])
    found["alone_vs_batch"] = differences(alone_and_together(trainer, [(lv, m) for _, lv, m in stored]))
    two_rows = [(live(trainer, b, layout=None)[0], lv, m) for b, (_, lv, m) in zip(batches(trainer), stored)]
    found["packed_vs_two_rows" if layout else "two_rows_vs_two_rows"] = differences(two_rows)
    frozen = load_frozen(trainer._policy_path, accelerator=trainer.accelerator, init_kwargs=trainer.args.model_init_kwargs,
                         disable_dropout=True)  # fmt: skip
    with torch.no_grad():
        copies = [(forward_logps(frozen, b, shared_prompt_mask=layout).float(), lv, m) for b, (_, lv, m) in zip(batches(trainer), stored)]
    found["policy_vs_frozen_copy"] = differences(copies)
    if float64_logps:
        found["vs_float64"] = differences([(f, lv, m) for f, (_, lv, m) in zip(float64_logps, stored)])
    if dtype != "float32":  # the LM head in float32 (TRL's `cast_lm_head_to_fp32`), the body in this dtype
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(trainer.model, cast_lm_head_to_fp32=True)
        head = [live(trainer, b) for b in batches(trainer)]
        found["alone_vs_batch_fp32_head"] = differences(alone_and_together(trainer, head))
        found["vs_float64_fp32_head"] = differences([(f, lv, m) for f, (lv, m) in zip(float64_logps, head)])
    found["floor"] = max(v["max_abs"] for k, v in found.items() if not k.endswith("fp32_head"))  # the head the trainer runs
    # Step 0: the policy is its own (stored) reference.
    for name, tolerance in (("dtype_tolerance", score_tie_tolerance(getattr(torch, dtype))), ("old_tolerance", OLD_TOLERANCE)):
        kept, total = [0, 0], [0, 0]
        for s, lv, m in stored:
            chosen, rejected = m.chunk(2)
            *_, keep_c, keep_r = select_sdpo_tokens(*lv.chunk(2), *s.chunk(2), chosen_mask=chosen, rejected_mask=rejected,
                                                    threshold=THRESHOLD, tie_tolerance=tolerance)  # fmt: skip
            for side, (keep, mask) in enumerate(((keep_c, chosen), (keep_r, rejected))):
                kept[side] += int(keep.sum())
                total[side] += int(mask.sum())
        step0[name] = {"tolerance": tolerance, "kept_share_chosen": kept[0] / total[0], "kept_share_rejected": kept[1] / total[1]}
    return found, step0


def perturbed_reference(path: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return str(path)


def scores_and_masks(trainer):
    """Per batch: chosen and rejected scores (float64) and completion masks, policy live and reference stored."""
    out = []
    for batch in batches(trainer):
        policy, mask = live(trainer, batch)
        ref = batch["ref_per_token_logps"].double()
        chosen, rejected = mask.chunk(2)
        scores = ((ref - policy.double()).chunk(2)[0], (policy.double() - ref).chunk(2)[1])
        out.append((scores, (chosen, rejected)))
    return out


def kept(scores: torch.Tensor, mask: torch.Tensor, tolerance: float) -> torch.Tensor:
    from selective_po.selection import top_share_mask

    return top_share_mask(scores.float(), mask, keep_share=1 - THRESHOLD, tie_tolerance=tolerance)


def cut_distance(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each token's float64 distance to the k-th largest score of its response."""
    k = keep_counts(mask.sum(-1), 1 - THRESHOLD)
    ranked = scores.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))
    return (scores - kth).abs()


def fidelity(work: Path, dtypes) -> dict:
    ref = perturbed_reference(work / "perturbed")
    truth = scores_and_masks(trainer_for("float64", work / "fid-float64", ref=ref))
    table = {}
    for dtype in dtypes:
        measured = scores_and_masks(trainer_for(dtype, work / f"fid-{dtype}", ref=ref))
        errors = [(scores[side] - true_scores[side]).abs()[masks[side]] for (true_scores, masks), (scores, _) in zip(truth, measured) for side in (0, 1)]
        rows = {"score_error_vs_float64": float(torch.cat(errors).max())}
        for name, tolerance in (("before", OLD_TOLERANCE), ("after", score_tie_tolerance(getattr(torch, dtype)))):
            bins = np.zeros((len(GAP_BINS) - 1, 4), dtype=np.int64)  # tokens, flips, kept only here, dropped only here
            for (true_scores, masks), (scores, _) in zip(truth, measured):
                for side in (0, 1):
                    mask = masks[side]
                    true_keep = kept(true_scores[side], mask, 0.0)
                    keep = kept(scores[side], mask, tolerance)
                    gap = cut_distance(true_scores[side], mask)[mask].numpy()
                    extra, missing = (keep & ~true_keep)[mask].numpy(), (true_keep & ~keep)[mask].numpy()
                    where = np.digitize(gap, GAP_BINS[1:-1])
                    for b in range(len(GAP_BINS) - 1):
                        chosen = where == b
                        bins[b] += [chosen.sum(), (extra | missing)[chosen].sum(), extra[chosen].sum(), missing[chosen].sum()]
            rows[name] = {
                "tolerance": tolerance,
                "agreement": 1 - bins[:, 1].sum() / bins[:, 0].sum(),
                "bins": [{"gap_from": GAP_BINS[b], "gap_to": GAP_BINS[b + 1], "tokens": int(t), "flips": int(f),
                          "kept_only_here": int(e), "dropped_only_here": int(d)} for b, (t, f, e, d) in enumerate(bins)],
            }  # fmt: skip
        table[dtype] = rows
    return table


def floors(noise: dict, table: dict) -> dict:
    """Per dtype: the floor (the largest log-prob difference or score error seen) and whether the dtype's
    tie tolerance is at least twice it, which is what keeps every token float64 keeps (module docstring)."""
    out = {}
    for dtype, found in noise.items():
        floor = max(found["floor"], table.get(dtype, {}).get("score_error_vs_float64", 0.0))
        tolerance = score_tie_tolerance(getattr(torch, dtype))
        out[dtype] = {"floor": floor, "tolerance": tolerance, "tolerance_covers_twice_the_floor": tolerance >= 2 * floor}
    return out


def markdown(result: dict) -> str:
    lines = ["# Noise floor of per-token log-probs, and kept-set fidelity", "", f"Command: `{result['command']}` ({result['seconds']:.0f} s).", "",
             "## Noise floor: max |difference| of per-token log-probs (nats), same weights and tokens", "",
             "`score error` is the largest |score - float64 score| of the fidelity run below; `floor` the largest of all;",
             "the tie tolerance must be at least twice the floor.", "",
             "| dtype | " + " | ".join(result["modes"]) + " | score error | floor | tie tolerance |", "| --- |" + " ---: |" * (len(result["modes"]) + 3)]  # fmt: skip
    for dtype, found in result["noise_floor"].items():
        cells = [f"{found[m]['max_abs']:.2e}" if m in found else "–" for m in result["modes"]]
        floor = result["floors"][dtype]
        error = result["fidelity"].get(dtype, {}).get("score_error_vs_float64")
        lines.append(f"| {dtype} | " + " | ".join(cells) + f" | {error:.2e} | {floor['floor']:.2e} | {floor['tolerance']:g} |")
    lines += ["", "## Step 0 with stored values: share of tokens kept (chosen / rejected)", "", "| dtype | tie tolerance of the dtype | 1e-5 |", "| --- | --- | --- |"]
    for dtype, step0 in result["step0"].items():
        new, old = step0["dtype_tolerance"], step0["old_tolerance"]
        lines.append(f"| {dtype} | {new['kept_share_chosen']:.1%} / {new['kept_share_rejected']:.1%} | "
                     f"{old['kept_share_chosen']:.1%} / {old['kept_share_rejected']:.1%} |")  # fmt: skip
    lines += ["", "## Kept-set fidelity against float64 (sdpo_threshold 0.6, perturbed reference)", "",
              "Flips per bin of the token's float64 distance to its response's cut; `+` kept only in this dtype, `-` dropped only in it.", "",
              "| dtype | tolerance | agreement | " + " | ".join(f"[{b['gap_from']:g}, {b['gap_to']:g})" for b in next(iter(result["fidelity"].values()))["after"]["bins"]) + " |",
              "| --- | --- | ---: |" + " ---: |" * (len(GAP_BINS) - 1)]  # fmt: skip
    for dtype, rows in result["fidelity"].items():
        for name in ("before", "after"):
            row = rows[name]
            cells = [f"{b['flips']}/{b['tokens']} (+{b['kept_only_here']} -{b['dropped_only_here']})" for b in row["bins"]]
            lines.append(f"| {dtype} | {row['tolerance']:g} ({name}) | {row['agreement']:.2%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="docs/results/noise_floor.json")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    opts = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = trainer_for("float64", work / "f64")
        float64 = [live(reference, b)[0] for b in batches(reference)]
        del reference
        found, step0 = {}, {}
        for dtype in opts.dtypes:
            found[dtype], step0[dtype] = noise_floor(dtype, work, float64)
            print(dtype, json.dumps(found[dtype]), json.dumps(step0[dtype]), flush=True)
        table = fidelity(work, opts.dtypes)
    modes = list(dict.fromkeys(m for values in found.values() for m in values if m != "floor"))
    command = "python benchmarks/noise_floor.py" + ("" if opts.dtypes == list(DTYPES) else " --dtypes " + " ".join(opts.dtypes))
    result = {"command": command, "seconds": time.perf_counter() - start, "model": DEFAULT_MODEL, "pairs": 8, "modes": modes,
              "noise_floor": found, "floors": floors(found, table), "step0": step0, "fidelity": table}  # fmt: skip
    output = Path(opts.output)
    atomic_write(output, json.dumps(result, indent=1).encode())
    atomic_write(output.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
