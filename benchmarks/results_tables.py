"""The tables of `docs/results.md` from an experiment's compare reports, so no figure is copied by hand.

    python benchmarks/results_tables.py docs/results/cpu_main.json docs/results/cpu_main-vs-sdpo-dpo-ref.json

The first report is the grid against DPO; each further one is the same runs against another baseline
(`onpolicy_experiment.py` writes `<preset>_main-vs-<baseline>.json`). Prints, in markdown:

1. what the models generate and how they rank the held-out pairs: each metric's mean over seeds and
   items, and its paired difference to each baseline with the 95% interval;
2. the likelihood changes: the held-out chosen and rejected responses' log-likelihood against the
   start model (nats), and the margin;
3. the seed spread: each seed's mean per metric, and the half-width of the paired intervals of the
   differences to the first baseline on rows with every seed. A difference smaller than that
   half-width cannot exclude 0 with these seeds and items: it is the smallest these rows resolve;
4. the verdicts: for each claim in `CLAIMS` whose two rows are in the reports, per metric, "holds"
   when the paired interval lies on the claimed side of 0, "does not" when it lies on the other
   side, "cannot tell" when it holds 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

LABELS = {
    "base": "start model (base)",
    "dpo": "DPO",
    "sdpo-init-ref": "Selective-DPO, start model as reference, k=40%",
    "sdpo-dpo-ref": "Selective-DPO, DPO model as reference, k=40%",
    "sdpo-fixed-scores": "Selective-DPO with fixed scores (ours), DPO scorer, k=40%",
    "confidence": "ConfPO (confidence)",
    "sepo": "SePO, DPO oracle, 30%",
    "sdpo-dpo-ref-random": "Selective-DPO, DPO reference, random 40%",
}
BASELINE_LABELS = {"dpo": "DPO", "sdpo-dpo-ref": "Sel.-DPO, DPO ref.", "sepo": "SePO"}
GENERATION = ("greedy_accuracy_arithmetic", "ifeval_pass_rate", "likelihood_accuracy", "reward_accuracy")
HEADINGS = {
    "greedy_accuracy_arithmetic": "greedy arithmetic",
    "ifeval_pass_rate": "IFEval pass",
    "likelihood_accuracy": "likelihood acc.",
    "reward_accuracy": "reward acc.",
    "mean_margin": "margin",
    "chosen_logp_change": "chosen log-lik. change",
    "rejected_logp_change": "rejected log-lik. change",
}
# A claim is "<method> differs from <baseline> in the direction <sign>", judged on the given metrics (None: every
# measured one, generation first: the user's question is what the trained model generates).
CLAIMS = (
    ("Selective-DPO with a DPO-trained reference beats DPO", "sdpo-dpo-ref", "dpo", +1, None),
    ("A stronger reference selects better: the start model as reference loses to the DPO model", "sdpo-init-ref", "sdpo-dpo-ref", -1, None),
    ("Selected tokens beat random ones: random 40% loses to the scored 40% (DPO reference)", "sdpo-dpo-ref-random", "sdpo-dpo-ref", -1, None),
    ("SePO beats DPO", "sepo", "dpo", +1, None),
    ("ConfPO beats DPO", "confidence", "dpo", +1, None),
    ("Instruction following: Selective-DPO (DPO reference) lowers IFEval against DPO", "sdpo-dpo-ref", "dpo", -1, ("ifeval_pass_rate",)),
    ("Our variant (fixed scores) beats DPO", "sdpo-fixed-scores", "dpo", +1, None),
    ("Our variant (fixed scores) beats Selective-DPO with the DPO reference", "sdpo-fixed-scores", "sdpo-dpo-ref", +1, None),
)
PERCENT = {"greedy_accuracy_arithmetic", "ifeval_pass_rate", "likelihood_accuracy", "reward_accuracy"}


def value(metric: str, x: float) -> str:
    return (f"{100 * x:.1f}%" if metric in PERCENT else f"{x:+.3f}").replace("-", "−")


def difference(metric: str, cell: dict | None) -> str:
    """`+1.2 [-0.3, +2.5]` in points (or nats), with `**` when the interval excludes 0; blank for the baseline."""
    if not cell or "difference" not in cell:
        return ""
    scale, digits = (100, 1) if metric in PERCENT else (1, 3)
    low, high = cell["difference_interval"]
    text = f"{scale * cell['difference']:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]".replace("-", "−")
    return f"**{text}**" if low > 0 or high < 0 else text


def table(reports: list[dict], metrics: tuple[str, ...]) -> str:
    first = reports[0]["summary"]
    baselines = [report["baseline"] for report in reports]
    header = ["method", "seeds"]
    for metric in metrics:
        header += [HEADINGS[metric], *(f"vs {BASELINE_LABELS.get(b, b)}" for b in baselines)]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---", "---"] + ["---:", *["---"] * len(baselines)] * len(metrics)) + " |"]
    for method, row in first["methods"].items():
        cells = [LABELS.get(method, method), "–" if method == "base" else ",".join(map(str, row["seeds"]))]
        for metric in metrics:
            cells.append(value(metric, row[metric]["mean"]) if metric in row else "n/a")
            cells += [difference(metric, report["summary"]["methods"].get(method, {}).get(metric)) for report in reports]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_spread(report: dict, metrics: tuple[str, ...]) -> str:
    """Each seed's mean per metric, and the median half-width of the paired differences on rows with every seed."""
    methods = report["summary"]["methods"]
    most = max(len(row["seeds"]) for row in methods.values())
    full = [m for m, row in methods.items() if len(row["seeds"]) == most and m not in ("base", report["baseline"])]
    lines = ["| metric | " + " | ".join(LABELS.get(m, m) for m in [report["baseline"], *full]) + " | smallest resolvable difference |",
             "| --- | " + " | ".join(["---"] * (len(full) + 1)) + " | ---: |"]  # fmt: skip
    for metric in metrics:
        cells = [HEADINGS[metric]]
        for method in [report["baseline"], *full]:
            per_seed = methods[method][metric].get("per_seed")
            cells.append(" / ".join(value(metric, x) for x in per_seed) if per_seed else "n/a")
        halves = [(methods[m][metric]["difference_interval"][1] - methods[m][metric]["difference_interval"][0]) / 2 for m in full]
        scale, unit = (100, " points") if metric in PERCENT else (1, " nats")
        cells.append(f"{scale * statistics.median(halves):.1f}{unit}" if halves else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(interval: tuple[float, float], sign: int) -> str:
    """"holds" if the paired interval of (method - baseline) lies on the `sign` side of 0, "does not" if on the other."""
    low, high = interval
    if low > 0 or high < 0:
        return "holds" if (low > 0) == (sign > 0) else "does not"
    return "cannot tell"


def verdicts(reports: list[dict], metrics: tuple[str, ...]) -> str:
    """One row per claim and metric whose method is measured in the report against the claim's baseline."""
    by_baseline = {report["baseline"]: report["summary"]["methods"] for report in reports}
    lines = ["| claim | metric | seeds | difference [95% interval] | verdict |", "| --- | --- | --- | --- | --- |"]
    for claim, method, baseline, sign, judged in CLAIMS:
        row = by_baseline.get(baseline, {}).get(method)
        if row is None:
            continue
        for metric in (m for m in judged or metrics if m in metrics and "difference" in row.get(m, {})):
            cell = row[metric]
            seeds = ",".join(map(str, row["seeds"]))
            lines.append(f"| {claim} | {HEADINGS[metric]} | {seeds} | {difference(metric, cell)} | {verdict(cell['difference_interval'], sign)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="compare.json files of one grid: against DPO first, then other baselines")
    opts = parser.parse_args()
    reports = []
    for path in opts.reports:
        report = json.loads(Path(path).read_text())
        # The baseline is the one method without differences.
        report["baseline"] = next(m for m, row in report["summary"]["methods"].items()
                                  if all("difference" not in c for c in row.values() if isinstance(c, dict)))  # fmt: skip
        reports.append(report)
    measured = set(reports[0]["summary"]["metrics"])

    def present(*metrics: str) -> tuple[str, ...]:
        return tuple(m for m in metrics if m in measured)

    print("### What the models generate, and how they rank the held-out pairs\n")
    print(table(reports, present(*GENERATION)))
    print("\n### The likelihood changes (nats, against the start model)\n")
    print(table(reports, present("chosen_logp_change", "rejected_logp_change", "mean_margin")))
    print(f"\n### Seed spread (each seed's mean) and the smallest difference the rows resolve (vs {reports[0]['baseline']})\n")
    print(seed_spread(reports[0], present(*GENERATION, "chosen_logp_change", "rejected_logp_change")))
    print("\n### The claims, per metric: the paired interval of (row - baseline) and what it says\n")
    print(verdicts(reports, present(*GENERATION)))


if __name__ == "__main__":
    main()
