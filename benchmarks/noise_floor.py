"""The noise of per-token log-probs by dtype, and what selection does with it.

    python benchmarks/noise_floor.py        # writes docs/results/noise_floor.json and .md
    python benchmarks/noise_floor.py --markdown_only   # rewrites the .md from the committed JSON

On the bundled model and the first 8 bundled arithmetic pairs, for float32, bfloat16 and float16
weights (`model_init_kwargs: {dtype: ...}`), each through the trainer's own code:

1. **Noise**: the same weights, the same tokens, values produced in different ways:
   - `stored_vs_live`: stored by the trainer's scoring pass in batches of 3 against the training
     forward in batches of 4, in the layout the trainer picks (one packed row per pair on CPU);
   - `alone_vs_batch`: each pair alone against inside its batch of 4;
   - `packed_vs_two_rows`: the packed shared-prompt row against the two-row forward;
   - `policy_vs_frozen_copy`: the policy against a frozen copy loaded from the same folder;
   - `vs_float64`: the log-probs against the same weights run in float64 (this dtype's rounding);
   - for bf16 and fp16, `alone_vs_batch` and `vs_float64` again with the LM head in float32 (TRL's
     `cast_lm_head_to_fp32`), which the trainer does not use: it shows how much of the noise the head makes.
   Each gives the largest |difference| over completion tokens, its 99th percentile, its mean, and the
   share of tokens differing by more than 1e-5; `alone_vs_batch` and `vs_float64` also per bin of the
   token's probability. Beside them, the noise bound the trainer measured on its first batch.
2. **Step 0 with the default reference** (the policy is its own reference, so every token must be
   kept): the kept share through the trainer's step with stored values and live, and with stored values
   when the trainer is not told they are the policy's (only the row fallback then keeps them).
3. **Kept-set fidelity** on fixed weights with real score gaps: the policy is the bundled model, the
   reference the same model with every weight scaled by (1 + s e), e ~ N(0, 1) (seed 0), for a large
   and a small s. The kept mask at sdpo_threshold 0.6 (40% asked) through the trainer's step is
   compared with the float64 kept mask, per token; with the kept share, the share of responses that
   fell back whole, the share of cut decisions within the noise bound, and the same figures under the
   earlier rule (a tie band of 9e-5, 0.15 and 1.0 nats for float32, fp16 and bf16). bf16 and fp16 run
   again with `score_dtype="float32"` (the ranked scores from a no-grad float32 pass and float32 stored
   values), timed against the policy's own forward.
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
from selective_po.models import DEFAULT_MODEL, resolve_model_path
from selective_po.reference_scoring import forward_logps, load_frozen
from selective_po.noise import LOGP_EDGES, logp_bins
from selective_po.selection import top_share_mask
from selective_po.trainer import policy_forward

DTYPES = ("float32", "bfloat16", "float16")
# The earlier rule: one tie band per dtype, twice its worst layout difference.
OLD_BANDS = {"float32": 9e-5, "float16": 0.15, "bfloat16": 1.0}
PERTURBATIONS = (0.05, 0.005)  # a score gap well above bf16's noise, and one at or below it
THRESHOLD = 0.6


def trainer_for(dtype: str, work: Path, *, ref: str | None = None, share_prompt: bool | None = None, pairs: int = 8,
                precompute: bool = True, score_dtype: str | None = None, model: str = DEFAULT_MODEL):  # fmt: skip
    args = SelectiveDPOConfig(score_dtype=score_dtype,
        output_dir=str(work / "out"), report_to="none", precompute_ref_log_probs=precompute, precompute_ref_batch_size=3,
        per_device_train_batch_size=4, ref_logps_cache_dir=str(work / "cache"), model_init_kwargs={"dtype": getattr(torch, dtype)},
        ref_model_name_or_path=ref, share_prompt=share_prompt, sdpo_threshold=THRESHOLD, disable_dropout=True,
        plot_curves=False, max_length=256,
    )  # fmt: skip
    return SelectiveDPOTrainer(model=model, args=args, train_dataset=load_preference_dataset("arithmetic", split="train").select(range(pairs)))


def batches(trainer, size: int = 4):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return [trainer._prepare_inputs(trainer.data_collator(rows[i : i + size])) for i in range(0, len(rows), size)]


@torch.no_grad()
def live(trainer, batch, *, layout: str | None = "trainer"):
    mask = trainer._shared_prompt_mask if layout == "trainer" else layout
    trainer.model.eval()
    return forward_logps(trainer.model, batch, shared_prompt_mask=mask).float(), batch["completion_mask"][:, 1:].bool()


def differences(pairs, *, by_bin: bool = False) -> dict:
    """Statistics of |a - b| over the masked tokens of `(a, b, mask)` tensors; with `by_bin`, also per bin of
    `b`'s probability (`noise.LOGP_EDGES`)."""
    pick = lambda t, m: (t[m] if m is not None else t).double().flatten()  # noqa: E731
    diff = torch.cat([(pick(a, m) - pick(b, m)).abs() for a, b, m in pairs]).numpy()
    out = {"tokens": int(diff.size), "max_abs": float(diff.max()), "p99_abs": float(np.quantile(diff, 0.99)),
           "mean_abs": float(diff.mean()), "share_above_1e-5": float((diff > 1e-5).mean())}  # fmt: skip
    if by_bin:
        bins = torch.cat([logp_bins(pick(b, m).float()) for _, b, m in pairs]).numpy()
        out["bins"] = [{"tokens": int((bins == i).sum()), "max_abs": float(diff[bins == i].max()) if (bins == i).any() else None,
                        "p99_abs": float(np.quantile(diff[bins == i], 0.99)) if (bins == i).any() else None}
                       for i in range(len(LOGP_EDGES) + 1)]  # fmt: skip
    return out


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


def kept_shares(trainer, *, live_reference: bool, told: bool = True) -> dict:
    """Kept share (chosen, rejected) over the trainer's batches through its own step, the policy's values live."""
    kept, total = np.zeros(2), np.zeros(2)
    for batch in batches(trainer):
        if live_reference:
            batch = {k: v for k, v in batch.items() if k != "ref_per_token_logps"}
        trainer.model.eval()
        with torch.no_grad():
            trainer.score_noise_bound(trainer.model, batch)
            _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
            if told:
                result, *_ = trainer.method_step(batch, policy, mask)
            else:  # the exact tie switched off: only the row fallback can keep every token
                with _not_told(trainer):
                    result, *_ = trainer.method_step(batch, policy, mask)
        for side, (keep, side_mask) in enumerate(zip((result.chosen_keep, result.rejected_keep), mask.chunk(2))):
            kept[side] += int(keep.sum())
            total[side] += int(side_mask.sum())
    return {"kept_share_chosen": kept[0] / total[0], "kept_share_rejected": kept[1] / total[1]}


class _not_told:
    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        self.trainer.reference_is_policy = lambda: False

    def __exit__(self, *exc):
        del self.trainer.reference_is_policy


def step0(dtype: str, work: Path) -> dict:
    """Step 0 with the default reference: every token must be kept, stored and live."""
    stored = trainer_for(dtype, work / f"step0-{dtype}")
    out = {"stored": kept_shares(stored, live_reference=False), "stored_fallback_only": kept_shares(stored, live_reference=False, told=False)}
    out["measured_bound"] = list(stored.noise_bound.per_bin)
    live_trainer = trainer_for(dtype, work / f"step0-live-{dtype}", precompute=False)
    out["live"] = kept_shares(live_trainer, live_reference=True)
    return out




def noise_floor(dtype: str, work: Path, float64_logps: list) -> dict:
    trainer = trainer_for(dtype, work / f"floor-{dtype}")
    layout = trainer._shared_prompt_mask
    found = {}
    stored = [(b["ref_per_token_logps"].float(), *live(trainer, b)) for b in batches(trainer)]
    found["stored_vs_live"] = differences([(s, lv, m) for s, lv, m in stored])
    found["alone_vs_batch"] = differences(alone_and_together(trainer, [(lv, m) for _, lv, m in stored]), by_bin=True)
    two_rows = [(live(trainer, b, layout=None)[0], lv, m) for b, (_, lv, m) in zip(batches(trainer), stored)]
    found["packed_vs_two_rows" if layout else "two_rows_vs_two_rows"] = differences(two_rows)
    frozen = load_frozen(trainer._policy_path, accelerator=trainer.accelerator, init_kwargs=trainer.args.model_init_kwargs,
                         disable_dropout=True)  # fmt: skip
    with torch.no_grad():
        copies = [(forward_logps(frozen, b, shared_prompt_mask=layout).float(), lv, m) for b, (_, lv, m) in zip(batches(trainer), stored)]
    found["policy_vs_frozen_copy"] = differences(copies)
    if float64_logps:
        found["vs_float64"] = differences([(lv, f, m) for f, (_, lv, m) in zip(float64_logps, stored)], by_bin=True)
    if dtype != "float32":  # the LM head in float32 (TRL's `cast_lm_head_to_fp32`), the body in this dtype
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(trainer.model, cast_lm_head_to_fp32=True)
        head = [live(trainer, b) for b in batches(trainer)]
        found["alone_vs_batch_fp32_head"] = differences(alone_and_together(trainer, head))
        found["vs_float64_fp32_head"] = differences([(lv, f, m) for f, (lv, m) in zip(float64_logps, head)])
    return found


def perturbed_reference(path: Path, scale: float) -> str:
    return saved_copy(resolve_model_path(DEFAULT_MODEL), path, scale=scale)


def saved_copy(source: str, path: Path, *, scale: float = 0.0, rounded_to: str | None = None) -> str:
    """`source`'s weights (float32) times (1 + scale e), e ~ N(0, 1) (seed 0), optionally rounded to a dtype and back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").is_file():  # made for an earlier scale (the rounded policy is the same for every one)
        return str(path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if scale:
                parameter.mul_(1 + scale * torch.randn(parameter.shape, generator=generator))
            if rounded_to:
                parameter.copy_(parameter.to(getattr(torch, rounded_to)).float())
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return str(path)


def step_results(trainer, seconds: dict | None = None) -> list:
    """Per batch: the trainer's step on it (policy live, reference stored) and its completion mask. `seconds` gathers
    the time of the policy's forward and, with `score_dtype`, of the float32 scoring pass (no gradients for either)."""
    out = []
    for batch in batches(trainer):
        trainer.model.eval()
        with torch.no_grad():
            trainer.score_noise_bound(trainer.model, batch)
            start = time.perf_counter()
            _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
            forward = time.perf_counter() - start
            result, *_ = trainer.method_step(batch, policy, mask)
            if seconds is not None:
                start = time.perf_counter()
                trainer.policy_scoring_logps(batch, policy)
                seconds.setdefault("policy_forward", []).append(forward)
                seconds.setdefault("scoring_pass", []).append(time.perf_counter() - start)
        out.append((result, mask.chunk(2)))
    return out


def variants(dtypes) -> list[tuple[str, str, str | None]]:
    """`(label, weights' dtype, score_dtype)`: each dtype as it runs, then the coarse ones with float32 scores."""
    return [(d, d, None) for d in dtypes] + [(f"{d} + float32 scores", d, "float32") for d in dtypes if d != "float32"]


def float64_scores(work: Path, *, policy: str, ref: str) -> list:
    """Per batch, float64's `(chosen, rejected)` scores of these two models."""
    truth = step_results(trainer_for("float64", work, ref=ref, model=policy))
    return [(r.chosen_scores.double(), r.rejected_scores.double()) for r, _ in truth]


def fidelity(work: Path, dtypes, scale: float) -> dict:
    ref = perturbed_reference(work / f"perturbed-{scale}", scale)
    truth = step_results(trainer_for("float64", work / f"fid-float64-{scale}", ref=ref))
    true_scores = [(r.chosen_scores.double(), r.rejected_scores.double()) for r, _ in truth]
    # Loading weights in bf16 or fp16 rounds them: a model of its own, whose exact scores float64 gives on the
    # rounded weights. Agreement with those separates the dtype's arithmetic from its rounding of the weights.
    policy = resolve_model_path(DEFAULT_MODEL)
    same_weights = {d: float64_scores(work / f"fid-float64-{d}-{scale}", policy=saved_copy(policy, work / f"policy-{d}", rounded_to=d),
                                      ref=saved_copy(ref, work / f"ref-{d}-{scale}", rounded_to=d))
                    for d in dtypes if d != "float32"}  # fmt: skip
    gaps = torch.cat([s[m].abs() for scores, (_, masks) in zip(true_scores, truth) for s, m in zip(scores, masks)]).numpy()
    table = {"median_abs_score": float(np.median(gaps)), "p90_abs_score": float(np.quantile(gaps, 0.9))}
    for label, dtype, score_dtype in variants(dtypes):
        trainer = trainer_for(dtype, work / f"fid-{label.replace(' ', '')}-{scale}", ref=ref, score_dtype=score_dtype)
        seconds = {} if score_dtype else None
        measured = step_results(trainer, seconds)
        counts = {"tokens": 0, "agree": 0, "agree_same_weights": 0, "kept": 0, "old_agree": 0, "old_kept": 0, "rows": 0,
                  "fallback": 0, "ranked": 0, "uncertain": 0}  # fmt: skip
        errors, errors_same_weights = [], []
        for (result, masks), scores64, rounded64 in zip(measured, true_scores, same_weights.get(dtype, true_scores)):
            sides = ((result.chosen_scores, result.chosen_keep, result.chosen_fallback, result.chosen_uncertain),
                     (result.rejected_scores, result.rejected_keep, result.rejected_fallback, result.rejected_uncertain))  # fmt: skip
            for (scores, keep, fallback, uncertain), score64, rounded, mask in zip(sides, scores64, rounded64, masks):
                true_keep = top_share_mask(score64, mask, keep_share=1 - THRESHOLD)
                counts["agree_same_weights"] += int((keep == top_share_mask(rounded, mask, keep_share=1 - THRESHOLD))[mask].sum())
                errors_same_weights.append((scores.double() - rounded).abs()[mask])
                old_keep = top_share_mask(scores.float(), mask, keep_share=1 - THRESHOLD, tie_tolerance=OLD_BANDS[dtype])
                errors.append((scores.double() - score64).abs()[mask])
                counts["tokens"] += int(mask.sum())
                counts["agree"] += int((keep == true_keep)[mask].sum())
                counts["kept"] += int(keep.sum())
                counts["old_agree"] += int((old_keep == true_keep)[mask].sum())
                counts["old_kept"] += int(old_keep.sum())
                counts["rows"] += int(mask.any(-1).sum())
                counts["fallback"] += int(fallback.sum())
                counts["ranked"] += int((mask & ~fallback[:, None]).sum())
                counts["uncertain"] += int(uncertain.sum())
        n = counts["tokens"]
        table[label] = {
            "score_error_vs_float64_max": float(torch.cat(errors).max()),
            "score_error_vs_float64_same_weights_max": float(torch.cat(errors_same_weights).max()),
            "agreement_same_weights": counts["agree_same_weights"] / n,
            "noise_bound": list(trainer.noise_bound.per_bin),
            "agreement": counts["agree"] / n, "kept_share": counts["kept"] / n,
            "fallback_rows": counts["fallback"] / counts["rows"],
            "uncertain_share": counts["uncertain"] / max(counts["ranked"], 1),
            "earlier_rule": {"band": OLD_BANDS[dtype], "agreement": counts["old_agree"] / n, "kept_share": counts["old_kept"] / n},
        }  # fmt: skip
        if seconds:  # per batch of 4 pairs, the first (warm-up) batch left out
            table[label]["seconds_per_batch"] = {k: float(np.mean(v[1:] or v)) for k, v in seconds.items()}
        print(f"fidelity s={scale} {label}", json.dumps(table[label]), flush=True)
    return table


def bin_labels() -> list[str]:
    edges = [1.0] + [float(np.exp(e)) for e in LOGP_EDGES] + [0.0]
    return [f"p in ({edges[i + 1]:.4g}, {edges[i]:.4g}]" if i else f"p > {edges[1]:.4g}" for i in range(len(edges) - 1)]


def mode_label(mode: str) -> str:
    """`alone_vs_batch_fp32_head` -> `alone vs batch, fp32 head`: headers a browser can wrap."""
    return mode.replace("_fp32_head", ", fp32 head").replace("_", " ")


def markdown(result: dict) -> str:
    # Each table keeps to a few columns so that it fits the docs page without scrolling sideways.
    dtypes = list(result["noise"])
    lines = ["# Noise of per-token log-probs, and what selection does with it", "", f"Command: `{result['command']}` ({result['seconds']:.0f} s).", "",
             "## Noise: |difference| of per-token log-probs (nats), same weights and tokens", "",
             "Largest difference over the completion tokens of 8 pairs; the mean in brackets.", "",
             "| values compared | " + " | ".join(dtypes) + " |", "| --- |" + " ---: |" * len(dtypes)]  # fmt: skip
    for mode in result["modes"]:
        cells = [f"{found[mode]['max_abs']:.2e} ({found[mode]['mean_abs']:.1e})" if mode in found else "–" for found in result["noise"].values()]
        lines.append(f"| {mode_label(mode)} | " + " | ".join(cells) + " |")
    lines += ["", "## By the token's probability", "",
              "Largest `alone_vs_batch` difference per probability bin (tokens in the bin), and the bound the trainer measured",
              "on its first batch of 4 pairs (twice the largest difference in the bin or any likelier one).", "",
              "| token probability | " + " | ".join(f"{d}: layouts | {d}: bound" for d in dtypes) + " |",
              "| --- |" + " ---: |" * (2 * len(dtypes))]  # fmt: skip
    for i, label in enumerate(bin_labels()):
        cells = []
        for dtype, found in result["noise"].items():
            b = found["alone_vs_batch"]["bins"][i]
            cells += [f"{b['max_abs']:.1e} ({b['tokens']})" if b["max_abs"] is not None else "– (0)",
                      f"{result['step0'][dtype]['measured_bound'][i]:.1e}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Step 0 with the default reference: share of tokens kept (chosen / rejected)", "",
              "| dtype | stored values | live | stored, row fallback only |", "| --- | --- | --- | --- |"]
    fmt = lambda d: f"{d['kept_share_chosen']:.1%} / {d['kept_share_rejected']:.1%}"  # noqa: E731
    for dtype, found in result["step0"].items():
        lines.append(f"| {dtype} | {fmt(found['stored'])} | {fmt(found['live'])} | {fmt(found['stored_fallback_only'])} |")
    lines += ["", "## A reference that differs: agreement with float64 and kept share (40% asked)", "",
              "The reference is the bundled model with every weight scaled by (1 + s e). Agreement: share of tokens whose",
              "keep/drop decision matches float64's on the float32 weights; same weights: matches float64's on the weights",
              "rounded to the dtype, as loading them in it does (the arithmetic's share of the disagreement). Fallback: share of",
              "responses that kept every token. Uncertain: share of the ranked responses' tokens whose decision lay within the",
              "noise bound. The one-band rule keeps every token within a tie band per dtype (9e-5, 0.15, 1.0 nats for float32,",
              "fp16, bf16) of each response's cut."]  # fmt: skip
    for scale, rows in result["fidelity"].items():
        lines += ["", f"### s = {scale}: median / p90 |score| {rows['median_abs_score']:.3f} / {rows['p90_abs_score']:.3f} nats (float64)", "",
                  "| weights | agreement | same weights | kept share | fallback rows | uncertain | one band: agreement | one band: kept share |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for label, _, score_dtype in variants(result["dtypes"]):
            row = rows[label]
            earlier = "– | –" if score_dtype else f"{row['earlier_rule']['agreement']:.2%} | {row['earlier_rule']['kept_share']:.1%}"
            lines.append(f"| {label} | {row['agreement']:.2%} | {row['agreement_same_weights']:.2%} | {row['kept_share']:.1%} | "
                         f"{row['fallback_rows']:.1%} | {row['uncertain_share']:.1%} | {earlier} |")  # fmt: skip
    timed = [(scale, label, rows[label]["seconds_per_batch"]) for scale, rows in result["fidelity"].items()
             for label, _, score_dtype in variants(result["dtypes"]) if score_dtype]  # fmt: skip
    if timed:
        lines += ["", "## What the float32 scoring pass costs (`score_dtype=\"float32\"`)", "",
                  "Seconds per batch of 4 pairs on this CPU, no gradients, the first batch left out: the policy's forward in",
                  "its own dtype beside the extra float32 pass. A training step adds the backward to the first, not to the",
                  "second. On CPU, bf16 and fp16 matmuls are slower than float32 ones, so the pass here costs less than",
                  "the forward; on a GPU, where they are the fast ones, expect the opposite (not measured here).", "",
                  "| s | weights | policy forward (s) | float32 scoring pass (s) |", "| --- | --- | ---: | ---: |"]  # fmt: skip
        for scale, label, seconds in timed:
            lines.append(f"| {scale} | {label.split(' ')[0]} | {seconds['policy_forward']:.2f} | {seconds['scoring_pass']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="docs/results/noise_floor.json")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--markdown_only", action="store_true", help="rewrite the .md from the JSON at --output; measure nothing")
    opts = parser.parse_args()
    if opts.markdown_only:
        output = Path(opts.output)
        atomic_write(output.with_suffix(".md"), markdown(json.loads(output.read_text())).encode())
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reference = trainer_for("float64", work / "f64")
        float64 = [live(reference, b)[0] for b in batches(reference)]
        del reference
        found, zero = {}, {}
        for dtype in opts.dtypes:
            found[dtype], zero[dtype] = noise_floor(dtype, work, float64), step0(dtype, work)
            print(dtype, json.dumps(found[dtype]), json.dumps(zero[dtype]), flush=True)
        table = {str(scale): fidelity(work, opts.dtypes, scale) for scale in PERTURBATIONS}
    modes = list(dict.fromkeys(m for values in found.values() for m in values))
    command = "python benchmarks/noise_floor.py" + ("" if opts.dtypes == list(DTYPES) else " --dtypes " + " ".join(opts.dtypes))
    result = {"command": command, "seconds": time.perf_counter() - start, "model": DEFAULT_MODEL, "pairs": 8, "modes": modes,
              "dtypes": opts.dtypes, "noise": found, "step0": zero, "fidelity": table}  # fmt: skip
    output = Path(opts.output)
    atomic_write(output, json.dumps(result, indent=1).encode())
    atomic_write(output.with_suffix(".md"), markdown(result).encode())
    print(markdown(result))


if __name__ == "__main__":
    main()
