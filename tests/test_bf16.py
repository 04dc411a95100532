"""Selection in bf16 on CPU: the tie tolerance follows the dtype the log-probs are computed in, a token
is dropped only when the kept ones outscore it by more than the noise floor, and one bf16 step of
Selective-DPO (live and stored reference) and SePO matches the float64 reference on the same weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import build_model, preference_dataset
from reference import reference_keep, reference_sdpo, reference_sepo
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer, SePOConfig, SePOTrainer
from selective_po.selection import TIE_TOLERANCES, compute_dtypes, keep_counts, score_tie_tolerance, select_tokens
from test_selection import random_mask
from test_trainer import COMMON, one_batch_loss

BF16 = {"model_init_kwargs": {"dtype": torch.bfloat16}}


def cut_gap(scores: torch.Tensor, mask: torch.Tensor, keep_share: float) -> torch.Tensor:
    """Each token's distance (float64) to the k-th largest score of its row."""
    k = keep_counts(mask.sum(-1), keep_share)
    ranked = scores.double().masked_fill(~mask, float("-inf")).sort(-1, descending=True).values
    return (scores.double() - ranked.gather(-1, (k - 1).clamp(min=0)[:, None])).abs()


def check_fidelity(keep: torch.Tensor, true_keep: torch.Tensor, gap: torch.Tensor, mask: torch.Tensor, *, tolerance: float, error: float):
    """What the tie rule guarantees when every score is within `error` of its float64 value and
    `tolerance >= 2 * error`: every token float64 keeps is kept, and a token farther than
    `tolerance + 2 * error` from the cut is decided as float64 decides it."""
    assert tolerance >= 2 * error, (tolerance, error)
    assert not (true_keep & ~keep).any(), "a token float64 keeps was dropped"
    far = mask & (gap > tolerance + 2 * error)
    assert torch.equal(keep[far], true_keep[far])
    return far


@pytest.mark.parametrize("seed", range(4))
def test_noise_below_the_floor_never_drops_a_token_the_exact_scores_keep(seed):
    generator = torch.Generator().manual_seed(seed)
    floor = 0.3  # any bound on |computed - exact| per score
    mask = random_mask(6, 40, side="right", generator=generator)
    exact = torch.randn(6, 40, generator=generator, dtype=torch.float64) * 2
    exact[:, ::7] = exact[:, :1]  # exact ties
    noisy = exact + (torch.rand(6, 40, generator=generator, dtype=torch.float64) * 2 - 1) * floor
    true_keep = reference_keep(exact, mask, 0.6, tie_tolerance=0.0)
    keep = select_tokens(noisy.float(), mask, keep_share=0.4, tie_tolerance=2 * floor)
    far = check_fidelity(keep, true_keep, cut_gap(exact, mask, 0.4), mask, tolerance=2 * floor, error=floor)
    assert far.sum() > 0.3 * mask.sum() and (keep & mask).sum() < mask.sum()  # the check bites, selection still selects
    # With float32's tolerance the same noise decides the cut: tokens float64 keeps are dropped.
    tight = select_tokens(noisy.float(), mask, keep_share=0.4, tie_tolerance=score_tie_tolerance(torch.float32))
    assert (true_keep & ~tight).any()


def test_the_tie_tolerance_follows_the_compute_dtype(tmp_path, tiny_model_dir, tiny_tokenizer):
    assert score_tie_tolerance(torch.float32) < 1e-4 < score_tie_tolerance(torch.float16) < score_tie_tolerance(torch.bfloat16)
    model = build_model(tiny_tokenizer)
    assert compute_dtypes(model, SimpleNamespace(bf16=True, fp16=False)) == {torch.float32, torch.bfloat16}  # autocast
    assert compute_dtypes(model.to(torch.bfloat16), SimpleNamespace(bf16=False, fp16=False)) == {torch.bfloat16}

    def trainer(**fields):
        args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **fields})
        return SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset(4))

    assert trainer().tie_tolerance == TIE_TOLERANCES[torch.float32]
    assert trainer(**BF16).tie_tolerance == TIE_TOLERANCES[torch.bfloat16]
    assert trainer(**BF16, score_tie_tolerance=0.0).tie_tolerance == 0.0  # the user's value, as given
    with pytest.raises(ValueError, match="score_tie_tolerance=-1"):
        SelectiveDPOConfig(output_dir="unused", score_tie_tolerance=-1.0)


def test_the_tie_tolerance_covers_stored_values_made_in_another_dtype(tmp_path, tiny_model_dir, tiny_tokenizer):
    """A float32 policy whose stored reference or scorer values were computed in bf16 ranks bf16 noise: it gets
    bf16's tolerance, from a `ref_model` module (freed once stored) or a checkpoint loaded with `dtype: auto`."""
    bf16_dir = tmp_path / "bf16"
    build_model(tiny_tokenizer, seed=3).to(torch.bfloat16).save_pretrained(bf16_dir)
    tiny_tokenizer.save_pretrained(bf16_dir)

    def trainer(ref_model=None, **fields):
        args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True,
                                  ref_logps_cache_dir=str(tmp_path / "cache"), **{**COMMON, **fields})  # fmt: skip
        return SelectiveDPOTrainer(model=tiny_model_dir, ref_model=ref_model, args=args, train_dataset=preference_dataset(4))

    module = trainer(ref_model=build_model(tiny_tokenizer, seed=3).to(torch.bfloat16))
    assert module.ref_model is None and module.tie_tolerance == TIE_TOLERANCES[torch.bfloat16]
    auto = {"model_init_kwargs": {"dtype": "auto"}}  # the policy's checkpoint is float32, the others' bf16
    assert trainer(ref_model_name_or_path=str(bf16_dir), **auto).tie_tolerance == TIE_TOLERANCES[torch.bfloat16]
    scorer = trainer(selection_rule="scorer", scorer_model_name_or_path=str(bf16_dir), **auto)
    assert scorer.tie_tolerance == TIE_TOLERANCES[torch.bfloat16]
    # TRL's default dtype loads every checkpoint in float32, whatever it was saved in
    assert trainer(ref_model_name_or_path=str(bf16_dir)).tie_tolerance == TIE_TOLERANCES[torch.float32]


# ----- one bf16 step against the float64 reference, same weights and batch -----


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
        _, policy, mask = trainer._policy_forward(trainer.model, batch)
    return loss, batch, policy, mask, metrics


def loss_bound(beta: float, error: float, n_tokens: torch.Tensor) -> torch.Tensor:
    """|loss - float64 loss| per pair when each kept log-ratio term is off by at most `error`: the sigmoid
    loss is beta-Lipschitz in the margin, and the margin sums at most `n_tokens` such terms."""
    return beta * error * n_tokens


@pytest.mark.parametrize("stored", [False, True], ids=["live", "stored"])
def test_a_bf16_selective_dpo_step_matches_float64(tmp_path, sharp_models, stored):
    beta = 0.1
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), ref_model_name_or_path=sharp_models["ref"], beta=beta,
                              precompute_ref_log_probs=stored, precompute_ref_batch_size=3, ref_logps_cache_dir=str(tmp_path / "c"),
                              **{**COMMON, **BF16})  # fmt: skip
    trainer = SelectiveDPOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    loss, batch, policy, mask, metrics = bf16_step(trainer)
    assert policy.dtype == torch.bfloat16 or trainer.model.dtype == torch.bfloat16
    with torch.no_grad():
        result, *_ = trainer._sdpo_step(batch, policy, mask, None)
    p64, r64 = float64_logps(sharp_models["policy"], batch), float64_logps(sharp_models["ref"], batch)
    cm, rm = mask.chunk(2)
    losses64, keep_c, keep_r = reference_sdpo(*p64.chunk(2), *r64.chunk(2), cm, rm, threshold=0.6, beta=beta)
    ref = batch["ref_per_token_logps"] if stored else trainer.reference.logps(batch)
    scores = torch.cat([(ref - policy).float().chunk(2)[0], (policy - ref).float().chunk(2)[1]])
    exact = torch.cat([(r64 - p64).chunk(2)[0], (p64 - r64).chunk(2)[1]])
    error = (scores.double() - exact).abs()[mask].max().item()
    tolerance = trainer.tie_tolerance
    assert error <= tolerance / 2, f"the tiny model's bf16 score error {error:.3f} exceeds the CPU floor {tolerance / 2}"
    far = [check_fidelity(keep, true_keep, cut_gap(exact_side, side_mask, 0.4), side_mask, tolerance=tolerance, error=error)
           for keep, true_keep, exact_side, side_mask in ((result.chosen_keep, keep_c, exact.chunk(2)[0], cm),
                                                          (result.rejected_keep, keep_r, exact.chunk(2)[1], rm))]  # fmt: skip
    assert sum(int(f.sum()) for f in far) > 0 and (~result.chosen_keep & cm).any()  # the check bites
    # Per pair, the margin differs by the kept terms' rounding and by the tokens only bf16 keeps.
    logp_error = max((policy.double() - p64).abs()[mask].max().item(), (ref.double() - r64).abs()[mask].max().item())
    extra = [((keep & ~true_keep) * exact_side.abs()).sum(-1) for keep, true_keep, exact_side in
             ((result.chosen_keep, keep_c, exact.chunk(2)[0]), (result.rejected_keep, keep_r, exact.chunk(2)[1]))]  # fmt: skip
    n_kept = result.chosen_keep.sum(-1) + result.rejected_keep.sum(-1)
    bound = loss_bound(beta, 2 * logp_error, n_kept) + beta * (extra[0] + extra[1])
    assert ((result.losses.double() - losses64).abs() <= bound + 1e-3).all()
    torch.testing.assert_close(loss.double(), result.losses.double().mean(), rtol=0, atol=1e-6)
    assert 0.0 <= metrics["selection/tied_share_chosen"] <= 1.0


def test_a_bf16_sepo_step_matches_float64(tmp_path, sharp_models):
    args = SePOConfig(output_dir=str(tmp_path / "out"), oracle_model_name_or_path=sharp_models["oracle"],
                      oracle_ref_model_name_or_path=sharp_models["oracle_ref"], ref_logps_cache_dir=str(tmp_path / "c"),
                      precompute_ref_batch_size=3, **{**COMMON, **BF16})  # fmt: skip
    trainer = SePOTrainer(model=sharp_models["policy"], args=args, train_dataset=preference_dataset())
    loss, batch, policy, mask, _ = bf16_step(trainer)
    rewards = batch["token_rewards"].double()
    exact = float64_logps(sharp_models["oracle"], batch) - float64_logps(sharp_models["oracle_ref"], batch)
    error = (rewards - exact).abs()[mask].max().item()
    tolerance = trainer.tie_tolerance
    keep = trainer._score_mask(batch)
    cm, rm = mask.chunk(2)
    p64 = float64_logps(sharp_models["policy"], batch)
    losses64, keep_c, keep_r = reference_sepo(*p64.chunk(2), *exact.chunk(2), cm, rm, k_w=0.3, k_l=0.3, beta=1.0, gamma=0.0)
    # SePO keeps the highest-reward chosen and the lowest-reward rejected tokens: rank -reward on that side.
    ranked = (exact.chunk(2)[0], -exact.chunk(2)[1])
    far = [check_fidelity(k, t, cut_gap(r, m, 0.3), m, tolerance=tolerance, error=error)
           for k, t, r, m in zip(keep.chunk(2), (keep_c, keep_r), ranked, (cm, rm))]  # fmt: skip
    assert sum(int(f.sum()) for f in far) > 0
    # With the kept sets bf16 chose, u = beta * mean kept log-prob moves by at most the log-probs' rounding,
    # so the loss (1-Lipschitz in u_w - u_l) by at most twice that.
    keep_w, keep_l = keep.chunk(2)
    u = [(p * k).sum(-1) / k.sum(-1).clamp(min=1) for p, k in zip(p64.chunk(2), (keep_w, keep_l))]
    losses64_same_tokens = -torch.nn.functional.logsigmoid(u[0] - u[1])
    logp_error = (policy.double() - p64).abs()[keep].max().item()
    assert (loss.double() - losses64_same_tokens.mean()).abs() <= 2 * logp_error + 1e-6
    assert losses64.shape == losses64_same_tokens.shape
