"""SePO end to end on the bundled model: DPO-train an oracle, score token rewards once, train SePO.

    python benchmarks/sepo_recipe.py                                   # trains the oracle too (~15 min, 2 CPU cores)
    python benchmarks/sepo_recipe.py --oracle outputs/reference_recipe/dpo   # reuse a DPO model as the oracle

1. Oracle: TRL's DPO from the base model on the training pairs (skipped with --oracle).
2. Token rewards `log p_oracle - log p_base` for every response token, scored once and stored.
3. SePO from the base model, keeping 30% of tokens per response (highest reward in chosen, lowest
   in rejected), and the same with the random-selection control (the same number of tokens,
   drawn uniformly). Both read the same stored rewards.
Every model is scored on held-out pairs with the base model as reference, as in
`reference_recipe.py`, so the rows of both scripts compare. One seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reference_recipe import heldout, print_results, train

from selective_po import SePOConfig, SePOTrainer, load_preference_dataset
from selective_po.models import DEFAULT_MODEL, resolve_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--oracle", help="an existing DPO-trained oracle (trained from --model); default: train one")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--train_pairs", type=int, default=160)
    parser.add_argument("--eval_pairs", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=1.0, help="SePO's beta (DPO oracle uses 0.1)")
    parser.add_argument("--share", type=float, default=0.3, help="k_w = k_l")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/sepo_recipe")
    opts = parser.parse_args()

    base = resolve_model_path(opts.model)
    splits = load_preference_dataset("arithmetic")
    train_data = splits["train"].shuffle(seed=opts.seed).select(range(opts.train_pairs))
    eval_data = splits["test"].select(range(opts.eval_pairs))

    runs = {}
    oracle = opts.oracle
    if oracle is None:
        oracle, runs["DPO (the oracle)"] = train("oracle-dpo", base, train_data, opts, loss_type="sigmoid")
    paths = {"base model": base, "DPO (the oracle)": oracle}
    for rule, label in (("scores", f"SePO, {opts.share:.0%} by oracle reward"), ("random", f"SePO, {opts.share:.0%} random (control)")):
        paths[label], runs[label] = train(
            f"sepo-{rule}", base, train_data, opts, config_class=SePOConfig, trainer_class=SePOTrainer,
            oracle_model_name_or_path=oracle, oracle_ref_model_name_or_path=base, sepo_chosen_share=opts.share,
            sepo_rejected_share=opts.share, beta=opts.beta, selection_rule=rule,
        )  # fmt: skip
    results = {name: {**runs.get(name, {}), **heldout(path, base, eval_data, opts)} for name, path in paths.items()}

    print_results(results, f"{opts.model}: {opts.train_pairs} training pairs, {opts.steps} steps x {opts.batch_size} "
                  f"pairs, lr {opts.learning_rate}, SePO beta {opts.beta}; {opts.eval_pairs} held-out pairs")
    Path(opts.output_dir).mkdir(parents=True, exist_ok=True)
    Path(opts.output_dir, "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
