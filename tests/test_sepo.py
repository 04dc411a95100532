"""SePO's loss and the selection controls, against float64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

from reference import reference_keep_count, reference_sepo
from selective_po.losses import selective_dpo_loss, sepo_loss
from selective_po.selection import random_share_mask, select_tokens
from test_losses import make_inputs


@pytest.mark.parametrize("k_w, k_l", [(0.3, 0.3), (0.1, 0.5), (1.0, 1.0), (0.45, 0.2)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (5, 12)])
@pytest.mark.parametrize("grid", [False, True])
def test_sepo_matches_reference(k_w, k_l, shape, grid):
    beta, gamma = 2.0, 0.3
    pc, pr, reward_c, reward_r, cm, rm = make_inputs(*shape, side="left", seed=sum(shape) + int(k_w * 100), grid=grid)
    pc.requires_grad_(), pr.requires_grad_()
    out = sepo_loss(pc, pr, reward_c, reward_r, chosen_mask=cm, rejected_mask=rm, chosen_share=k_w, rejected_share=k_l, beta=beta, gamma=gamma)
    out.losses.sum().backward()

    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    ref_losses, keep_c, keep_r = reference_sepo(
        pc64, pr64, reward_c.double(), reward_r.double(), cm, rm, k_w=k_w, k_l=k_l, beta=beta, gamma=gamma
    )
    ref_losses.sum().backward()
    assert torch.equal(out.chosen_keep, keep_c) and torch.equal(out.rejected_keep, keep_r)
    torch.testing.assert_close(out.losses.double(), ref_losses.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), pr64.grad, rtol=1e-5, atol=1e-6)


def test_sepo_keeps_high_reward_chosen_and_low_reward_rejected():
    reward = torch.tensor([[0.5, -2.0, 3.0, 1.0, -1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    logps = -torch.rand(1, 5)
    out = sepo_loss(logps, logps, reward, reward, chosen_mask=mask, rejected_mask=mask, chosen_share=0.4, rejected_share=0.4)
    assert out.chosen_keep.tolist() == [[False, False, True, True, False]]  # rewards 3.0 and 1.0
    assert out.rejected_keep.tolist() == [[False, True, False, False, True]]  # rewards -2.0 and -1.0


def test_sepo_with_every_token_is_simpo_form():
    pc, pr, rc, rr, cm, rm = make_inputs(4, 9, side="right", seed=2)
    out = sepo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, rule="all", beta=2.5, gamma=0.5)
    mean = lambda x, m: (x * m).sum(-1) / m.sum(-1).clamp(min=1)  # noqa: E731
    torch.testing.assert_close(out.losses, -F.logsigmoid(2.5 * mean(pc, cm) - 2.5 * mean(pr, rm) - 0.5))


def test_sepo_empty_responses_are_finite():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    logps = torch.full((2, 3), float("nan"), requires_grad=True)
    out = sepo_loss(logps, logps, torch.zeros(2, 3), torch.zeros(2, 3), chosen_mask=empty, rejected_mask=empty)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log(2)))
    out.losses.sum().backward()
    assert (logps.grad == 0).all()


@pytest.mark.parametrize("share", [0.1, 0.3, 0.4, 0.7])
def test_random_control_keeps_the_same_number_of_tokens_seeded(share):
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 23, generator=generator) > 0.3
    first = random_share_mask(mask, keep_share=share, generator=torch.Generator().manual_seed(5))
    again = random_share_mask(mask, keep_share=share, generator=torch.Generator().manual_seed(5))
    other = random_share_mask(mask, keep_share=share, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not (first & ~mask).any()
    assert first.sum(-1).tolist() == [reference_keep_count(int(n), 1 - share) for n in mask.sum(-1)]
    assert not torch.equal(first, other)


def test_random_control_is_uniform_over_positions():
    """Every completion position is picked about equally often: the draw ignores position and score."""
    mask = torch.ones(2000, 10, dtype=torch.bool)
    picks = random_share_mask(mask, keep_share=0.3, generator=torch.Generator().manual_seed(0)).float().mean(0)
    assert torch.allclose(picks, torch.full((10,), 0.3), atol=0.03), picks


def test_controls_in_selective_dpo():
    pc, pr, rc, rr, cm, rm = make_inputs(3, 15, side="right", seed=9)
    every = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.6, beta=0.1, rule="all")
    dpo = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.0, beta=0.1)
    torch.testing.assert_close(every.losses, dpo.losses)  # "all" is plain DPO, whatever the threshold
    scored = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.6, beta=0.1)
    rand = selective_dpo_loss(
        pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=0.6, beta=0.1, rule="random",
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert torch.equal(rand.chosen_keep.sum(-1), scored.chosen_keep.sum(-1))  # continuous scores: no ties
    assert not torch.equal(rand.chosen_keep, scored.chosen_keep)


def test_unknown_rule_and_unseeded_random_are_errors():
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="Unknown selection rule 'best'"):
        select_tokens(torch.zeros(1, 3), mask, keep_share=0.5, rule="best")
    with pytest.raises(ValueError, match="seeded"):
        select_tokens(torch.zeros(1, 3), mask, keep_share=0.5, rule="random")
