"""Selection in bf16 on CPU. Rounding noise must neither choose tokens nor inflate the kept share:

- where the reference is the policy itself (step 0 with the default reference), every score is exactly 0
  by construction and every token is kept, stored or live;
- a response whose scores all lie within the measured noise bound keeps every token (it carries no signal);
- every other response is ranked at float32 precision, keeps the share asked for, and decides every token
  far enough from its cut as float64 does.

The bounds below are derived in the docstrings from one fact: if every computed score lies within `e` of its
exact value, each order statistic of a response's scores (its cut among them) does too.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, preference_dataset
from reference import reference_keep, reference_keep_with_noise, reference_sepo, reference_uncertain
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer
from selective_po.selection import SCORE_TIE_TOLERANCE, keep_counts, select_tokens
from selective_po.trainer import policy_forward
from test_selection import random_mask
from test_trainer import COMMON, one_batch_loss

BF16 = {"model_init_kwargs": {"dtype": torch.bfloat16}}


def cut_gap(scores: torch.Tensor, mask: torch.Tensor, keep_share: float) -> torch.Tensor:
    """Each token's distance (float64) to the k-th largest score of its row."""
    k = keep_counts(mask.sum(-1), keep_share)
    ranked = scores.double().masked_fill(~mask, float("-inf")).sort(-1, descending=True).values
    return (scores.double() - ranked.gather(-1, (k - 1).clamp(min=0)[:, None])).abs()


def check_far_tokens(keep, true_keep, gap, mask, ranked_rows, *, error: float) -> torch.Tensor:
    """In a ranked row, a token more than `2 * error + SCORE_TIE_TOLERANCE` from the exact cut is decided as float64
    decides it: its computed score is within `error` of its exact one, and the computed cut within `error` of
    the exact cut. Returns the tokens checked."""
    far = mask & ranked_rows.unsqueeze(-1) & (gap > 2 * error + SCORE_TIE_TOLERANCE)
    assert torch.equal(keep[far], true_keep[far]), "noise decided a token far from the cut"
    return far


@pytest.mark.parametrize("seed", range(4))
def test_noise_within_the_bound_neither_picks_tokens_nor_inflates_the_share(seed):
    generator = torch.Generator().manual_seed(seed)
    error = 0.3  # any bound on |computed - exact| per score
    mask = random_mask(8, 40, side="right", generator=generator)
    exact = torch.randn(8, 40, generator=generator, dtype=torch.float64) * 3
    exact[::2] = 0.0  # policy == reference: no signal in these rows
    noisy = exact + (torch.rand(8, 40, generator=generator, dtype=torch.float64) * 2 - 1) * error
    bound = torch.full((8, 40), error)
    keep = select_tokens(noisy.float(), mask, keep_share=0.4, noise_bound=bound)
    assert torch.equal(keep, reference_keep_with_noise(noisy.float(), mask, 0.6, bound))
    assert torch.equal(keep[::2], mask[::2])  # every noise-only row keeps every token
    ranked = torch.zeros(8, dtype=torch.bool)
    ranked[1::2] = True
    far = check_far_tokens(keep, reference_keep(exact, mask, 0.6, tie_tolerance=0.0), cut_gap(exact, mask, 0.4), mask, ranked, error=error)
    assert far.sum() > 0.3 * mask[1::2].sum()  # the check bites
    # Ranked rows keep exactly the share asked for (continuous scores have no ties), however large the noise.
    assert torch.equal(keep[1::2].sum(-1), keep_counts(mask[1::2].sum(-1), 0.4))
    # The earlier rule, a tie band of twice the noise, kept every token within it: more than the share.
    banded = select_tokens(noisy.float(), mask, keep_share=0.4, tie_tolerance=2 * error)
    assert banded[1::2].sum() > keep[1::2].sum()


def test_stored_values_of_a_coarser_dtype_widen_the_measured_bound(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A float32 policy ranks bf16 noise when its stored reference values were computed in bf16: a live forward here
    cannot show that noise, so the bound is at least twice bf16's largest measured layout difference."""
    from selective_po.noise import STORED_DTYPE_FLOORS

    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True,
                              ref_logps_cache_dir=str(tmp_path / "cache"), **COMMON)  # fmt: skip
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, ref_model=build_model(tiny_tokenizer, seed=3).to(torch.bfloat16),
                                  args=args, train_dataset=preference_dataset(4))  # fmt: skip
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    bound = trainer.score_noise_bound(trainer.model, batch)
    assert min(bound.per_bin) >= 2 * STORED_DTYPE_FLOORS[torch.bfloat16] and "bfloat16" in bound.source
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out2"), **COMMON)
    same = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(4))
    assert same.score_noise_bound(same.model, batch).largest() < 1e-3  # float32 throughout: measured alone


# ----- the trainer in bf16 -----


@pytest.fixture
def sharp_models(tmp_path, tiny_tokenizer):
    """A policy, a reference and an oracle pair whose logits are large enough for real score gaps of several nats."""
    from transformers import LlamaForCausalLM

    folders = {}
    for name, seed in (("policy", 0), ("ref", 1), ("oracle", 2), ("oracle_ref", 3)):
        config = build_model(tiny_tokenizer, seed=seed, hidden=64).config
        config.initializer_range = 0.2
        torch.manual_seed(seed)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / name)  # bf16 weights: float64 runs them exactly
        tiny_tokenizer.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    return folders


def float64_logps(folder: str, batch: dict) -> torch.Tensor:
    """`(2B, T-1)` per-token log-probs of the collated batch, the bf16 weights run in float64, two rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]


def bf16_step(trainer):
    """The trainer's loss on its first batch of 4 and its (2B, T-1) policy log-probs and mask."""
    loss, _, metrics = one_batch_loss(trainer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
    return loss, batch, policy, mask, metrics


@pytest.mark.parametrize("stored", [False, True], ids=["live", "stored"])
def test_the_first_step_with_the_default_reference_keeps_every_token_exactly(tmp_path, sharp_models, stored):
    """Policy and reference are the same function before the first update: the scores are exactly 0 in bf16."""
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=stored, precompute_ref_batch_size=3,
                              ref_logps_cache_dir=str(tmp_path / "c"), **{**COMMON, **BF16})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    assert trainer.reference_is_policy()
    loss, batch, policy, mask, metrics = bf16_step(trainer)
    assert metrics["selection/kept_share_chosen"] == 1.0 and metrics["selection/kept_share_rejected"] == 1.0
    assert metrics["selection/fallback_rows_chosen"] == 1.0 and metrics["selection/score_kept_chosen"] == 0.0
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)), rtol=0, atol=1e-6)  # DPO's loss at policy == reference
    # Without that knowledge, the stored (or live) reference differs from the policy by layout noise.
    ref = batch["ref_per_token_logps"] if stored else trainer.reference.logps(batch)
    trainer._policy_updates.stepped = True
    assert not trainer.reference_is_policy()
    if stored:
        assert (ref.float() - policy.float()).abs()[mask].max() > 0, "the layouts gave bitwise equal values: nothing to show"


def test_the_exact_tie_ends_with_the_first_update_and_needs_a_deterministic_forward(tmp_path, tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig

    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, logging_steps=1, **COMMON)
    first = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(4))
    assert first.reference_is_policy()
    first.train()
    assert not first.reference_is_policy() and first.state.log_history[0]["selection/kept_share_chosen"] == 1.0
    first.state.global_step = 0  # a second `train()` starts at step 0 with a policy that has moved
    assert not first.reference_is_policy()
    # With dropout kept, the training forward is random: the policy is not the (eval-mode) reference function.
    model = build_model(tiny_tokenizer)
    model.config.attention_dropout = 0.1
    model.save_pretrained(tmp_path / "dropout")
    tiny_tokenizer.save_pretrained(tmp_path / "dropout")
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "drop"), **{**COMMON, "disable_dropout": False})
    dropping = SelectiveDPOTrainer(model=str(tmp_path / "dropout"), args=args, train_dataset=preference_dataset(4))
    dropping.model.train()
    assert not dropping.reference_is_policy()
    dropping.model.eval()
    assert dropping.reference_is_policy()  # evaluation runs without dropout
    # PEFT: the base model is the policy only while the adapter adds nothing (LoRA's B = 0).
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "peft"), **COMMON)
    adapter = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(4), peft_config=lora)
    assert adapter.reference_is_policy()
    next(p for n, p in adapter.model.named_parameters() if "lora_B" in n).data[0, 0] = 1e-3
    assert not adapter.reference_is_policy()


def test_a_bf16_selective_dpo_step_matches_float64(tmp_path, sharp_models):
    """With a reference that differs, one bf16 step against float64 on the same weights and batch. The rule is
    checked on the computed scores, the far tokens against float64, and the loss on the kept tokens bf16 chose
    against float64's loss on the same tokens (the sigmoid loss is beta-Lipschitz in the margin, and the margin
    sums at most `n_kept` log-ratio terms, each off by at most twice the log-probs' rounding)."""
    beta = 0.1
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), ref_model_name_or_path=sharp_models["ref"], beta=beta,
                              precompute_ref_log_probs=True, precompute_ref_batch_size=3, ref_logps_cache_dir=str(tmp_path / "c"),
                              **{**COMMON, **BF16})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    assert not trainer.reference_is_policy()
    loss, batch, policy, mask, metrics = bf16_step(trainer)
    assert trainer.model.dtype == torch.bfloat16 and trainer.noise_bound.largest() > 1e-3  # measured: bf16 noise
    with torch.no_grad():
        result, *_ = trainer.method_step(batch, policy, mask)
    p64, r64 = float64_logps(sharp_models["policy"], batch), float64_logps(sharp_models["ref"], batch)
    ref = batch["ref_per_token_logps"]
    cm, rm = mask.chunk(2)
    scores = (result.chosen_scores, result.rejected_scores)
    exact = ((r64 - p64).chunk(2)[0], (p64 - r64).chunk(2)[1])
    error = max((s.double() - e).abs()[m].max().item() for s, e, m in zip(scores, exact, (cm, rm)))
    for side, (s, e, m, keep, fallback, uncertain, lp, rp) in enumerate(zip(
            scores, exact, (cm, rm), (result.chosen_keep, result.rejected_keep), (result.chosen_fallback, result.rejected_fallback),
            (result.chosen_uncertain, result.rejected_uncertain), policy.chunk(2), ref.chunk(2))):  # fmt: skip
        bound = trainer.noise_bound(lp, rp)
        assert torch.equal(keep, reference_keep_with_noise(s, m, 0.6, bound))  # the rule, on the computed scores
        assert torch.equal(uncertain, reference_uncertain(s, m, keep, bound))
        ranked = m.any(-1) & ~fallback
        assert ranked.all(), "the sharp models' scores lie well outside bf16's noise: no response falls back"
        far = check_far_tokens(keep, reference_keep(e, m, 0.6, tie_tolerance=0.0), cut_gap(e, m, 0.4), m, ranked, error=error)
        assert far.sum() > 0.3 * m.sum()
    n_tokens = int(mask.sum())
    asked = int(keep_counts(cm.sum(-1), 0.4).sum() + keep_counts(rm.sum(-1), 0.4).sum())
    kept = int(result.chosen_keep.sum() + result.rejected_keep.sum())
    assert asked <= kept <= asked + 0.03 * n_tokens  # the share asked for, up to exact ties among bf16 scores
    with torch.no_grad():
        same_tokens = [((p - r) * k).sum(-1) for p, r, k in zip((p64.chunk(2)[0], p64.chunk(2)[1]), (r64.chunk(2)[0], r64.chunk(2)[1]),
                                                                (result.chosen_keep, result.rejected_keep))]  # fmt: skip
    losses64 = -torch.nn.functional.logsigmoid(beta * (same_tokens[0] - same_tokens[1]))
    logp_error = max((policy.double() - p64).abs()[mask].max().item(), (ref.double() - r64).abs()[mask].max().item())
    n_kept = result.chosen_keep.sum(-1) + result.rejected_keep.sum(-1)
    assert ((result.losses.double() - losses64).abs() <= beta * 2 * logp_error * n_kept + 1e-3).all()
    torch.testing.assert_close(loss.double(), result.losses.double().mean(), rtol=0, atol=1e-6)
    assert metrics["selection/fallback_rows_chosen"] == 0.0 and 0.0 <= metrics["selection/uncertain_share_chosen"] <= 1.0


def test_a_bf16_sepo_step_matches_float64(tmp_path, sharp_models):
    args = SePOConfig(output_dir=str(tmp_path / "out"), oracle_model_name_or_path=sharp_models["oracle"],
                      oracle_ref_model_name_or_path=sharp_models["oracle_ref"], ref_logps_cache_dir=str(tmp_path / "c"),
                      precompute_ref_batch_size=3, **{**COMMON, **BF16})  # fmt: skip
    trainer = SePOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    loss, batch, policy, mask, metrics = bf16_step(trainer)
    rewards = batch["token_rewards"].double()
    exact = float64_logps(sharp_models["oracle"], batch) - float64_logps(sharp_models["oracle_ref"], batch)
    error = (rewards - exact).abs()[mask].max().item()
    keep = torch.cat(trainer.method.weights(trainer.token_values(batch), trainer.noise_bound))
    cm, rm = mask.chunk(2)
    p64 = float64_logps(sharp_models["policy"], batch)
    _, keep_c, keep_r = reference_sepo(*p64.chunk(2), *exact.chunk(2), cm, rm, k_w=0.3, k_l=0.3, beta=1.0, gamma=0.0)
    # SePO keeps the highest-reward chosen and the lowest-reward rejected tokens: rank -reward on that side.
    ranked_scores = (rewards.chunk(2)[0], -rewards.chunk(2)[1])
    exact_scores = (exact.chunk(2)[0], -exact.chunk(2)[1])
    bound = torch.full_like(cm, trainer.noise_bound.largest(), dtype=torch.float32)
    for k, t, s, e, m in zip(keep.chunk(2), (keep_c, keep_r), ranked_scores, exact_scores, (cm, rm)):
        assert torch.equal(k, reference_keep_with_noise(s.float(), m, 0.7, bound))
        ranked = m.any(-1) & (s.abs() > bound).any(-1)
        assert ranked.all()
        far = check_far_tokens(k, t, cut_gap(e, m, 0.3), m, ranked, error=error)
        assert far.sum() > 0.3 * m.sum()
    # With the kept sets bf16 chose, u = beta * mean kept log-prob moves by at most the log-probs' rounding,
    # so the loss (1-Lipschitz in u_w - u_l) by at most twice that.
    keep_w, keep_l = keep.chunk(2)
    u = [(p * k).sum(-1) / k.sum(-1).clamp(min=1) for p, k in zip(p64.chunk(2), (keep_w, keep_l))]
    losses64_same_tokens = -torch.nn.functional.logsigmoid(u[0] - u[1])
    logp_error = (policy.double() - p64).abs()[keep].max().item()
    assert (loss.double() - losses64_same_tokens.mean()).abs() <= 2 * logp_error + 1e-6
    assert metrics["selection/fallback_rows_chosen"] == 0.0


# ----- training runs of 20 steps in bf16 -----


def recorded_run(trainer) -> list[tuple[dict, float, float]]:
    """Train, recording per step the logged metrics and the share asked for on each side (from that step's masks)."""
    asked = []
    step = trainer.method_step

    def recording(inputs, policy_logps, shift_mask, values=None, weights=None):
        chosen, rejected = shift_mask.chunk(2)
        asked.append(tuple(float(keep_counts(m.sum(-1), 0.4).sum() / m.sum()) for m in (chosen, rejected)))
        return step(inputs, policy_logps, shift_mask, values, weights)

    trainer.method_step = recording
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "selection/kept_share_chosen" in entry]
    assert len(logs) == len(asked) == trainer.args.max_steps
    return [(entry, *shares) for entry, shares in zip(logs, asked)]


def test_a_bf16_run_keeps_the_share_asked_for_with_a_reference_that_differs(tmp_path, sharp_models):
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), ref_model_name_or_path=sharp_models["ref"], max_steps=20,
                              logging_steps=1, learning_rate=1e-3, precompute_ref_log_probs=True,
                              ref_logps_cache_dir=str(tmp_path / "c"), **{**COMMON, **BF16})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    for entry, asked_chosen, asked_rejected in recorded_run(trainer):
        if entry["selection/fallback_rows_chosen"] == 0.0:  # every response carries signal
            assert abs(entry["selection/kept_share_chosen"] - asked_chosen) <= 0.03, entry
        if entry["selection/fallback_rows_rejected"] == 0.0:
            assert abs(entry["selection/kept_share_rejected"] - asked_rejected) <= 0.03, entry
        assert entry["selection/fallback_rows_chosen"] + entry["selection/fallback_rows_rejected"] <= 0.25, entry


def test_a_bf16_run_with_the_default_reference_keeps_everything_at_step_0_only(tmp_path, sharp_models):
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), max_steps=20, logging_steps=1, learning_rate=3e-3,
                              precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "c"), **{**COMMON, **BF16})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    run = recorded_run(trainer)
    assert run[0][0]["selection/kept_share_chosen"] == 1.0 and run[0][0]["selection/kept_share_rejected"] == 1.0
    # Once the policy moves, rows carry signal and keep the share asked for.
    late = [(entry, asked) for entry, asked, _ in run[10:] if entry["selection/fallback_rows_chosen"] == 0.0]
    assert late, "the policy never left its reference by more than the noise bound"
    assert all(abs(entry["selection/kept_share_chosen"] - asked) <= 0.03 for entry, asked in late)


def test_a_float32_scoring_pass_ranks_a_bf16_run_as_float32_does(tmp_path, sharp_models):
    """`score_dtype="float32"`: the ranked scores are float32 log-probs of the bf16 weights (stored reference values
    and a no-grad policy pass), so they lie within float32 rounding of float64 and every token more than twice that
    from its cut is decided as float64 decides it; the loss still uses the bf16 training forward."""
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), ref_model_name_or_path=sharp_models["ref"], score_dtype="float32",
                              precompute_ref_log_probs=True, precompute_ref_batch_size=3, ref_logps_cache_dir=str(tmp_path / "c"),
                              **{**COMMON, **BF16})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    loss, batch, policy, mask, metrics = bf16_step(trainer)
    assert trainer.model.dtype == torch.bfloat16 and trainer.noise_bound.largest() < 1e-3  # measured in float32
    with torch.no_grad():
        result, *_ = trainer.method_step(batch, policy, mask)
    p64, r64 = float64_logps(sharp_models["policy"], batch), float64_logps(sharp_models["ref"], batch)
    assert (batch["ref_per_token_logps"].double() - r64).abs()[mask].max() < 1e-4  # stored in float32
    assert (policy.double() - p64).abs()[mask].max() > 1e-2  # the training forward is bf16
    cm, rm = mask.chunk(2)
    scores = (result.chosen_scores, result.rejected_scores)
    exact = ((r64 - p64).chunk(2)[0], (p64 - r64).chunk(2)[1])
    error = max((s.double() - e).abs()[m].max().item() for s, e, m in zip(scores, exact, (cm, rm)))
    assert error < 1e-4
    for s, e, m, keep in zip(scores, exact, (cm, rm), (result.chosen_keep, result.rejected_keep)):
        far = check_far_tokens(keep, reference_keep(e, m, 0.6, tie_tolerance=0.0), cut_gap(e, m, 0.4), m, m.any(-1), error=error)
        assert far.sum() >= m.sum() - 2 * m.any(-1).sum()  # all but the cut and a neighbour per response
    # The loss is DPO's on the training forward's (bf16) log-probs of the kept tokens.
    torch.testing.assert_close(result.chosen_logps, (policy.chunk(2)[0] * result.chosen_keep).sum(-1), rtol=0, atol=1e-4)
    torch.testing.assert_close(loss.double(), result.losses.double().mean(), rtol=0, atol=1e-6)
    assert metrics["selection/fallback_rows_chosen"] == 0.0
