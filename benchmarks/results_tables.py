"""The tables of `docs/results.md` from an experiment's compare reports, so no figure is copied by hand.

    python benchmarks/results_tables.py docs/results/cpu_main.json docs/results/cpu_main-vs-sdpo-dpo-ref.json \
        docs/results/cpu_main-vs-sepo.json docs/results/cpu_main-vs-sdpo-fixed-scores.json

The first report is the grid against DPO; each further one is the same runs against another baseline
(`onpolicy_experiment.py` writes `<preset>_main-vs-<baseline>.json`). Prints, in markdown:

1. what the models generate and how they rank the held-out pairs: each metric's mean over seeds and
   items, and its paired difference to the first baseline with the 95% interval;
2. the likelihood changes: the held-out chosen and rejected responses' log-likelihood against the
   start model (nats), and the margin;
3. the seed spread: each seed's mean per metric, and the half-width of the paired intervals of the
   differences to the first baseline on rows with every seed. A difference smaller than that
   half-width cannot exclude 0 with these seeds and items: it is the smallest these rows resolve;
4. the verdicts: for each claim in `CLAIMS` whose two rows are in the reports, per metric, "holds"
   when the difference lies on the claimed side of 0, "does not" when on the other side, "cannot
   tell" otherwise, at a 5% family-wise error rate: Holm's adjustment over the claim's metrics (each
   claim is one family);
5. for every claim row, the interval the reports used before (the bootstrap over seeds and items)
   beside the one they use now (`selective_po.intervals.difference_summary`), so the change is visible.

    python benchmarks/results_tables.py --rebuild docs/results/cpu_main.json --runs docs/results/cpu_runs.json --every_run

recomputes a committed report (its summary, `.md` and `.png`) from a runs file with this version's
intervals. Each run's per-item results are kept once, in the runs file; a report keeps its summary,
the keys of its runs and the runs file's name and SHA-256 (a report that still holds its runs moves
them to the runs file first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

from selective_po.compare import markdown_report, plot_differences, report_caption, summarize
from selective_po.files import atomic_write
from selective_po.intervals import holm

LABELS = {
    "base": "start model (base)",
    "dpo": "DPO",
    "sdpo-init-ref": "Selective-DPO, start model as reference, k=40%",
    "sdpo-dpo-ref": "Selective-DPO, DPO model as reference, k=40%",
    "sdpo-fixed-scores": "Selective-DPO with fixed scores (ours), DPO scorer, k=40%",
    "confidence": "ConfPO (confidence)",
    "sepo": "SePO, DPO oracle, 30%",
    "sdpo-dpo-ref-random": "Selective-DPO, DPO reference, random 40%",
    "sepo-end-keep": "SePO, end-of-turn token kept on both sides",
    "sdpo-fixed-scores-end-keep": "fixed scores (ours), end-of-turn token kept on both sides",
    "sdpo-dpo-ref-k20": "Selective-DPO, DPO reference, k=20%",
    "sdpo-dpo-ref-k60": "Selective-DPO, DPO reference, k=60%",
    "sdpo-dpo-ref-k80": "Selective-DPO, DPO reference, k=80%",
    "sdpo-dpo-ref-k100": "Selective-DPO, DPO reference, k=100%",
    "sepo-random": "SePO, random 30%",
    "sepo-all": "SePO, every token",
    "tgdpo": "TGDPO, DPO model as reward model",
    "tisdpo": "TIS-DPO, DPO models on the pairs and on the swapped pairs",
    "dpo-reversed": "DPO on the swapped pairs (TIS-DPO's reverse model)",
}
BASELINE_LABELS = {"dpo": "DPO", "sdpo-dpo-ref": "Sel.-DPO, DPO ref.", "sepo": "SePO"}
GENERATION = ("greedy_accuracy_arithmetic", "ifeval_pass_rate", "answers_that_end", "likelihood_accuracy", "reward_accuracy")
HEADINGS = {
    "answers_that_end": "answers that end",
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
    *((f"Keeping {k}% of the tokens loses to keeping 40% (DPO reference)", f"sdpo-dpo-ref-k{k}", "sdpo-dpo-ref", -1, None)
      for k in (20, 60, 80, 100)),
    ("SePO on every token beats SePO on the oracle's 30%", "sepo-all", "sepo", +1, None),
    ("SePO's random 30% loses to the oracle's 30%", "sepo-random", "sepo", -1, None),
    ("SePO with the end-of-turn token kept on both sides beats DPO", "sepo-end-keep", "dpo", +1, None),
    ("Our variant (fixed scores) with the end-of-turn token kept on both sides beats DPO", "sdpo-fixed-scores-end-keep", "dpo", +1, None),
    ("SePO with the end-of-turn token kept on both sides beats SePO as published", "sepo-end-keep", "sepo", +1, None),
    ("Our variant with the end-of-turn token kept on both sides beats it as published", "sdpo-fixed-scores-end-keep", "sdpo-fixed-scores", +1, None),
    ("TGDPO beats DPO", "tgdpo", "dpo", +1, None),
    ("TIS-DPO beats DPO", "tisdpo", "dpo", +1, None),
)
PERCENT = {"greedy_accuracy_arithmetic", "ifeval_pass_rate", "answers_that_end", "likelihood_accuracy", "reward_accuracy"}
ALPHA = 0.05  # the family-wise error rate of each claim's verdicts


def value(metric: str, x: float) -> str:
    return (f"{100 * x:.1f}%" if metric in PERCENT else f"{x:+.3f}").replace("-", "−")


def difference(metric: str, cell: dict | None, interval: str = "difference_interval", *, bold: bool = True) -> str:
    """`+1.2 [-0.3, +2.5]` in points (or nats), with `**` when the interval excludes 0 (and `bold`); blank for the
    baseline."""
    if not cell or "difference" not in cell:
        return ""
    scale, digits = (100, 1) if metric in PERCENT else (1, 3)
    low, high = cell[interval]
    text = f"{scale * cell['difference']:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]".replace("-", "−")
    return f"**{text}**" if bold and (low > 0 or high < 0) else text


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
    """Each seed's mean per metric, one row per method with every seed (metrics as columns, so that the table stays
    as narrow as the others however many rows a grid has), and last the median half-width of the paired
    differences on those rows."""
    methods = report["summary"]["methods"]
    most = max(len(row["seeds"]) for row in methods.values())
    full = [m for m, row in methods.items() if len(row["seeds"]) == most and m not in ("base", report["baseline"])]
    lines = ["| method | " + " | ".join(HEADINGS[metric] for metric in metrics) + " |", "| --- |" + " --- |" * len(metrics)]
    for method in [report["baseline"], *full]:
        cells = [LABELS.get(method, method)]
        for metric in metrics:
            per_seed = methods[method].get(metric, {}).get("per_seed")
            cells.append(" / ".join(value(metric, x) for x in per_seed) if per_seed else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["smallest resolvable difference"]
    for metric in metrics:
        halves = [(methods[m][metric]["difference_interval"][1] - methods[m][metric]["difference_interval"][0]) / 2
                  for m in full if "difference" in methods[m].get(metric, {})]  # fmt: skip
        scale, unit = (100, " points") if metric in PERCENT else (1, " nats")
        cells.append(f"{scale * statistics.median(halves):.1f}{unit}" if halves else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_rows(reports: list[dict], metrics: tuple[str, ...]) -> list[tuple[str, str, dict, dict, int, float]]:
    """`(claim, metric, row, cell, sign, Holm-adjusted p)` for every claim and metric measured against the claim's
    baseline; each claim's metrics are one family."""
    by_baseline = {report["baseline"]: report["summary"]["methods"] for report in reports}
    rows = []
    for claim, method, baseline, sign, judged in CLAIMS:
        row = by_baseline.get(baseline, {}).get(method)
        if row is None:
            continue
        family = [m for m in judged or metrics if m in metrics and "difference" in row.get(m, {})]
        adjusted = holm([row[m]["p_value"] for m in family])
        rows += [(claim, metric, row, row[metric], sign, p) for metric, p in zip(family, adjusted)]
    return rows


def verdict(cell: dict, sign: int, adjusted_p: float) -> str:
    """"holds" if the difference is on the `sign` side of 0 at the family's error rate, "does not" if on the other."""
    if adjusted_p > ALPHA:
        return "cannot tell"
    return "holds" if (cell["difference"] > 0) == (sign > 0) else "does not"


def verdicts(reports: list[dict], metrics: tuple[str, ...]) -> str:
    """One row per claim and metric whose method is measured in the report against the claim's baseline."""
    lines = ["| claim | metric | seeds | difference [95% interval] | p, Holm-adjusted | verdict |", "| --- | --- | --- | --- | ---: | --- |"]
    for claim, metric, row, cell, sign, p in claim_rows(reports, metrics):
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(f"| {claim} | {HEADINGS[metric]} | {seeds} | {difference(metric, cell, bold=False)} | {p:.3f} | {verdict(cell, sign, p)} |")
    return "\n".join(lines)


def interval_change(reports: list[dict], metrics: tuple[str, ...]) -> str:
    """Every claim row's interval before (the bootstrap over seeds and items) and now."""
    lines = ["| claim | metric | seeds | bootstrap over seeds and items (before) | now | how |", "| --- | --- | --- | --- | --- | --- |"]
    for claim, metric, row, cell, _, _ in claim_rows(reports, metrics):
        seeds = ",".join(map(str, row["seeds"]))
        lines.append(f"| {claim} | {HEADINGS[metric]} | {seeds} | {difference(metric, cell, 'bootstrap_interval')} | "
                     f"{difference(metric, cell)} | {cell['interval_method']} |")  # fmt: skip
    return "\n".join(lines)


# ----- rebuilding the committed reports from their runs -----

CAPTION = re.compile(r"^(?P<model>\S+) on `(?P<dataset>[^`]+)` \((?P<train_split>\w+) trains, (?P<eval_split>\w+) is held out\); "
                     r"every model measured against (?P<reference>\S+) with beta (?P<eval_beta>[\d.]+)\.")  # fmt: skip


def baseline_of(summary: dict) -> str:
    """The one method without differences."""
    return next(m for m, row in summary["methods"].items() if all("difference" not in c for c in row.values() if isinstance(c, dict)))


def rebuild(reports: list[Path], runs_path: Path, *, resamples: int, every_run: bool) -> None:
    """Recompute each report from `runs_path` (moving any runs a report still holds there first), writing its
    summary with its run keys and the runs file's digest, its `.md` and its `.png`."""
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    loaded = {path: json.loads(path.read_text()) for path in reports}
    for report in loaded.values():
        if isinstance(report.get("runs"), dict):
            for key, run in report["runs"].items():
                if key in runs and runs[key]["per_item"] != run["per_item"]:
                    raise ValueError(f"{key} differs between {runs_path} and a report that holds it: not merging.")
                runs.setdefault(key, run)
    data = json.dumps(runs, separators=(",", ":")).encode()
    atomic_write(runs_path, data)
    digest = hashlib.sha256(data).hexdigest()
    for path, report in loaded.items():
        own = set(runs) if every_run else set(report["runs"] if isinstance(report.get("runs"), dict) else report["run_keys"])
        keys = [key for key in runs if key in own]  # the runs file's order: the grid's, new rows last
        head = CAPTION.match(path.with_suffix(".md").read_text())
        if head is None:
            raise ValueError(f"{path.with_suffix('.md')} does not start with a compare report's caption.")
        config = SimpleNamespace(**{**head.groupdict(), "eval_beta": float(head["eval_beta"])}, baseline=baseline_of(report["summary"]))
        summary = summarize(config, {key: runs[key] for key in keys}, resamples=resamples)
        atomic_write(path.with_suffix(".md"), markdown_report(config, summary, caption=report_caption(config)).encode())
        plot_differences(config, summary, path.with_suffix(".png"))
        atomic_write(path, json.dumps({"summary": summary, "runs_file": runs_path.name, "runs_sha256": digest, "run_keys": keys}, indent=1).encode())
        print(f"{path}: {len(keys)} runs, baseline {config.baseline}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="compare.json files of one grid: against DPO first, then other baselines")
    parser.add_argument("--rebuild", action="store_true", help="recompute these reports from --runs instead of printing tables")
    parser.add_argument("--runs", type=Path, help="with --rebuild: the runs file (created or extended)")
    parser.add_argument("--every_run", action="store_true", help="with --rebuild: every run in the runs file, not only the report's own")
    parser.add_argument("--resamples", type=int, default=4000)
    opts = parser.parse_args()
    if opts.rebuild:
        if opts.runs is None:
            parser.error("--rebuild needs --runs")
        rebuild([Path(p) for p in opts.reports], opts.runs, resamples=opts.resamples, every_run=opts.every_run)
        return
    reports = []
    for path in opts.reports:
        report = json.loads(Path(path).read_text())
        report["baseline"] = baseline_of(report["summary"])
        reports.append(report)
    measured = set(reports[0]["summary"]["metrics"])

    def present(*metrics: str) -> tuple[str, ...]:
        return tuple(m for m in metrics if m in measured)

    # Against the first baseline only, so that each table fits a page; the claims below use the others.
    against = BASELINE_LABELS.get(reports[0]["baseline"], reports[0]["baseline"])
    sections = (
        (f"What the models generate (vs {against})", present("greedy_accuracy_arithmetic", "ifeval_pass_rate", "answers_that_end")),
        (f"How they rank the held-out pairs (vs {against})", present("likelihood_accuracy", "reward_accuracy")),
        (f"The likelihood changes (nats, against the start model; vs {against})", present("chosen_logp_change", "rejected_logp_change", "mean_margin")),
    )
    for title, metrics in sections:
        if metrics:  # a grid without greedy answers has no first table
            print(f"### {title}\n\n{table(reports[:1], metrics)}\n")
    print(f"### Seed spread (each seed's mean) and the smallest difference the rows resolve (vs {against})\n")
    print(seed_spread(reports[0], present(*GENERATION, "chosen_logp_change", "rejected_logp_change")))
    print("\n### The claims, metric by metric\n")
    print(f"Each claim as the paired difference of two rows, per metric, judged at a {ALPHA:.0%} family-wise error rate over "
          "the claim's metrics (Holm's adjusted p-value).\n")
    print(verdicts(reports, present(*GENERATION)))
    print("\n### The claims' intervals, before and now\n")
    print("The bootstrap over seeds and items these pages used before, and the interval they use now.\n")
    print(interval_change(reports, present(*GENERATION)))


if __name__ == "__main__":
    main()
