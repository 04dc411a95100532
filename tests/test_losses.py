"""Scores and the Selective-DPO loss against the float64 reference, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference import reference_sdpo
from selective_po import SelectiveDPOTrainer, sdpo_token_scores, selective_dpo_loss
from test_selection import random_mask


def make_inputs(batch, length, *, side, seed, grid=False):
    generator = torch.Generator().manual_seed(seed)
    if grid:  # coarse values: exact ties in the scores
        draw = lambda: -torch.randint(0, 12, (batch, length), generator=generator).float() / 8  # noqa: E731
    else:
        draw = lambda: -torch.rand(batch, length, generator=generator) * 6  # noqa: E731
    pc, pr, rc, rr = draw(), draw(), draw(), draw()
    chosen_mask = random_mask(batch, length, side=side, generator=generator)
    rejected_mask = random_mask(batch, length, side=side, generator=generator)
    return pc, pr, rc, rr, chosen_mask, rejected_mask


def test_scores_follow_the_paper_signs_and_carry_no_gradient():
    pc = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    pr = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    rc, rr = torch.tensor([[-1.5, -1.0]]), torch.tensor([[-1.0, -1.0]])
    chosen, rejected = sdpo_token_scores(pc, pr, rc, rr)
    assert chosen.tolist() == [[-0.5, 1.0]]  # ref - policy
    assert rejected.tolist() == [[0.5, -2.0]]  # policy - ref
    assert not chosen.requires_grad and not rejected.requires_grad


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (6, 10)])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("grid", [False, True])
def test_loss_and_gradients_match_reference(threshold, shape, side, grid):
    beta, label_smoothing = 0.3, 0.1
    pc, pr, rc, rr, cm, rm = make_inputs(*shape, side=side, seed=sum(shape) + int(threshold * 100), grid=grid)
    pc.requires_grad_(), pr.requires_grad_()
    out = selective_dpo_loss(
        pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=threshold, beta=beta, label_smoothing=label_smoothing
    )
    out.losses.sum().backward()

    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    ref_losses, keep_c, keep_r = reference_sdpo(
        pc64, pr64, rc.double(), rr.double(), cm, rm, threshold=threshold, beta=beta, label_smoothing=label_smoothing
    )
    ref_losses.sum().backward()

    assert torch.equal(out.chosen_keep, keep_c) and torch.equal(out.rejected_keep, keep_r)
    torch.testing.assert_close(out.losses.double(), ref_losses.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), pr64.grad, rtol=1e-5, atol=1e-6)
    # Dropped and padded tokens get exactly no gradient.
    assert (pc.grad[~out.chosen_keep] == 0).all() and (pr.grad[~out.rejected_keep] == 0).all()


def test_threshold_zero_is_plain_dpo():
    pc, pr, rc, rr, cm, rm = make_inputs(4, 11, side="right", seed=3)
    out = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.0, beta=0.1)
    total = lambda x, m: (x * m).sum(-1)  # noqa: E731
    logits = 0.1 * ((total(pc, cm) - total(rc, cm)) - (total(pr, rm) - total(rr, rm)))
    torch.testing.assert_close(out.losses, -F.logsigmoid(logits))
    assert torch.equal(out.chosen_keep, cm) and torch.equal(out.rejected_keep, rm)


def test_identical_policy_and_reference_keep_everything():
    pc, pr, _, _, cm, rm = make_inputs(3, 8, side="left", seed=5)
    out = selective_dpo_loss(pc, pr, pc.clone(), pr.clone(), chosen_mask=cm, rejected_mask=rm, threshold=0.9, beta=0.1)
    assert torch.equal(out.chosen_keep, cm) and torch.equal(out.rejected_keep, rm)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)))


def test_empty_completions_give_log2_and_no_nan():
    pc = torch.full((2, 4), -float("inf"), requires_grad=True)  # padded positions may hold anything
    pr = torch.full((2, 4), float("nan"), requires_grad=True)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    out = selective_dpo_loss(pc, pr, pc.detach(), pr.detach(), chosen_mask=empty, rejected_mask=empty, threshold=0.6, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)))
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and (pc.grad == 0).all() and (pr.grad == 0).all()


def test_one_side_empty_is_finite():
    pc, pr, rc, rr, cm, rm = make_inputs(2, 5, side="right", seed=7)
    rm = torch.zeros_like(rm)
    out = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.5, beta=0.1)
    assert torch.isfinite(out.losses).all()
    assert (out.rejected_rewards == 0).all()


def test_bf16_inputs_are_scored_in_float32():
    pc, pr, rc, rr, cm, rm = make_inputs(2, 9, side="right", seed=11)
    out = selective_dpo_loss(
        pc.bfloat16(), pr.bfloat16(), rc.bfloat16(), rr.bfloat16(), chosen_mask=cm, rejected_mask=rm, threshold=0.6, beta=0.1
    )
    assert out.chosen_scores.dtype == torch.float32 and out.losses.dtype == torch.bfloat16


@pytest.mark.parametrize("threshold", [0.0, 0.6])
def test_mask_unimportant_tokens_returns_kept_sums(threshold):
    pc, pr, rc, rr, cm, rm = make_inputs(3, 7, side="right", seed=13)
    sums = SelectiveDPOTrainer.mask_unimportant_tokens(pc, pr, rc, rr, threshold, chosen_mask=cm, rejected_mask=rm)
    out = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=threshold, beta=1.0)
    expected = (out.chosen_logps, out.rejected_logps, out.ref_chosen_logps, out.ref_rejected_logps)
    for got, want in zip(sums, expected):
        assert got.shape == (3,)
        torch.testing.assert_close(got, want)


def test_mask_unimportant_tokens_without_masks_uses_every_position():
    pc, pr, rc, rr, *_ = make_inputs(2, 5, side="right", seed=17)
    chosen, rejected, ref_chosen, ref_rejected = SelectiveDPOTrainer.mask_unimportant_tokens(pc, pr, rc, rr, 0.0)
    torch.testing.assert_close(chosen, pc.sum(-1))
    torch.testing.assert_close(ref_rejected, rr.sum(-1))
    # top 40% of 5 tokens = 2 per row
    chosen, *_ = SelectiveDPOTrainer.mask_unimportant_tokens(pc, pr, rc, rr, 0.6)
    top2 = (rc - pc).topk(2, dim=-1).indices
    torch.testing.assert_close(chosen, pc.gather(-1, top2).sum(-1))


@pytest.mark.parametrize("threshold", [0.0, 0.6, 0.95])
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (5, 9)])
@pytest.mark.parametrize("grid", [False, True])
def test_fixed_scores_match_reference_and_ignore_the_policy(threshold, shape, grid):
    """rule='scorer': the kept tokens follow from the scorer and the reference alone, so two policies
    keep the same tokens; loss and gradients as the float64 reference."""
    beta = 0.2
    pc, pr, rc, rr, cm, rm = make_inputs(*shape, side="right", seed=7 + sum(shape), grid=grid)
    sc, sr, *_ = make_inputs(*shape, side="right", seed=11 + sum(shape), grid=grid)
    pc.requires_grad_(), pr.requires_grad_()
    fixed = dict(chosen_mask=cm, rejected_mask=rm, threshold=threshold, beta=beta, rule="scorer", scorer_chosen_logps=sc, scorer_rejected_logps=sr)
    out = selective_dpo_loss(pc, pr, rc, rr, **fixed)
    out.losses.sum().backward()
    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    ref_losses, keep_c, keep_r = reference_sdpo(
        pc64, pr64, rc.double(), rr.double(), cm, rm, threshold=threshold, beta=beta, scorer=(sc.double(), sr.double())
    )
    ref_losses.sum().backward()
    assert torch.equal(out.chosen_keep, keep_c) and torch.equal(out.rejected_keep, keep_r)
    torch.testing.assert_close(out.losses.double(), ref_losses.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), pr64.grad, rtol=1e-5, atol=1e-6)
    other = selective_dpo_loss(pc.detach() - 3.0 * torch.rand_like(pc), pr.detach(), rc, rr, **fixed)
    assert torch.equal(other.chosen_keep, out.chosen_keep) and torch.equal(other.rejected_keep, out.rejected_keep)
    torch.testing.assert_close(out.chosen_scores, (sc - rc).float())  # the scorer raised these chosen tokens
    torch.testing.assert_close(out.rejected_scores, (rr - sr).float())  # and lowered these rejected ones


def test_fixed_scores_need_the_scorer():
    pc, pr, rc, rr, cm, rm = make_inputs(2, 5, side="right", seed=1)
    with pytest.raises(ValueError, match="scorer's per-token log-probs"):
        selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.6, beta=0.1, rule="scorer")
