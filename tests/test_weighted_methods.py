"""TGDPO and TIS-DPO against float64 re-derivations of their official code, values and gradients."""

import math

import pytest
import torch

from reference import python_rank_weights, reference_tgdpo, reference_tisdpo, reference_tisdpo_weights
from selective_po import tgdpo_loss, tisdpo_loss
from selective_po.scoring import round_like_python
from selective_po.token_values import end_of_sequence_mask
from selective_po.weighting import rank_range_weights
from test_selection import random_mask

SHAPES = [(1, 1), (3, 47), (6, 10)]


def draw(shape, generator, grid):
    if grid:  # coarse values: exact ties
        return -torch.randint(0, 12, shape, generator=generator).float() / 8
    return -torch.rand(shape, generator=generator) * 6


def inputs(shape, *, side, seed, grid, models=6):
    generator = torch.Generator().manual_seed(seed)
    values = [draw(shape, generator, grid) for _ in range(models)]
    masks = [random_mask(*shape, side=side, generator=generator) for _ in range(2)]
    return values, masks


def last_token(mask):
    """Each row's last completion token (the end-of-sequence token the official code appends)."""
    positions = torch.arange(mask.size(1)).expand_as(mask)
    return mask & (positions == torch.where(mask, positions, -1).amax(-1, keepdim=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["right", "left", "middle"])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
def test_tgdpo_matches_the_official_formula(shape, side, grid, alpha):
    beta = 0.3
    (pc, pr, rc, rr, mc, mr), (cm, rm) = inputs(shape, side=side, seed=sum(shape) + len(side) + int(10 * alpha), grid=grid)
    pc.requires_grad_(), pr.requires_grad_()
    out = tgdpo_loss(pc, pr, rc, rr, mc, mr, chosen_mask=cm, rejected_mask=rm, beta=beta, alpha=alpha)
    out.losses.sum().backward()
    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    expected = reference_tgdpo(pc64, pr64, rc.double(), rr.double(), mc.double(), mr.double(), cm, rm, beta=beta, alpha=alpha)
    expected.sum().backward()
    torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), pr64.grad, rtol=1e-5, atol=1e-6)
    assert (pc.grad[~cm] == 0).all() and (pr.grad[~rm] == 0).all()  # padding and prompt get no gradient


def test_tgdpo_with_alpha_zero_is_dpo_and_rewards_move_the_weights():
    (pc, pr, rc, rr, mc, mr), (cm, rm) = inputs((4, 9), side="right", seed=3, grid=False)
    plain = tgdpo_loss(pc, pr, rc, rr, mc, mr, chosen_mask=cm, rejected_mask=rm, beta=0.1, alpha=0.0)
    dpo = -torch.nn.functional.logsigmoid(0.1 * (((pc - rc) * cm).sum(-1) - ((pr - rr) * rm).sum(-1)))
    torch.testing.assert_close(plain.losses, dpo)
    guided = tgdpo_loss(pc, pr, rc, rr, mc, mr, chosen_mask=cm, rejected_mask=rm, beta=0.1, alpha=0.5)
    # A chosen token the reward model likes more than the reference weighs more than 1; a rejected one, less.
    r_c = mc - rc
    assert torch.equal(guided.chosen_weights[cm] > 1, r_c[cm] > 0)
    assert torch.equal(guided.rejected_weights[rm] < 1, (mr - rr)[rm] > 0)
    assert (guided.chosen_weights[~cm] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["right", "left", "middle"])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("decimals", [2, None])
def test_tisdpo_matches_the_official_weights_and_loss(shape, side, grid, decimals):
    beta = 0.2
    (pc, pr, rc, rr, fwd, rev), (cm, rm) = inputs(shape, side=side, seed=7 * sum(shape) + len(side), grid=grid)
    generator = torch.Generator().manual_seed(sum(shape))
    fwd_r, rev_r = draw(shape, generator, grid), draw(shape, generator, grid)
    end_c, end_r = last_token(cm), last_token(rm)
    pc.requires_grad_(), pr.requires_grad_()
    out = tisdpo_loss(pc, pr, rc, rr, fwd - rev, fwd_r - rev_r, chosen_mask=cm, rejected_mask=rm, chosen_end=end_c,
                      rejected_end=end_r, beta=beta, decimals=decimals)  # fmt: skip
    out.losses.sum().backward()
    w_c = reference_tisdpo_weights(fwd, rev, cm, end_c, chosen=True, decimals=decimals)
    w_r = reference_tisdpo_weights(fwd_r, rev_r, rm, end_r, chosen=False, decimals=decimals)
    torch.testing.assert_close(out.chosen_weights.double(), w_c, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rejected_weights.double(), w_r, rtol=0, atol=1e-6)
    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    expected = reference_tisdpo(pc64, pr64, rc.double(), rr.double(), w_c, w_r, cm, rm, beta=beta)
    expected.sum().backward()
    torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pr.grad.double(), pr64.grad, rtol=1e-5, atol=1e-6)
    assert (pc.grad[end_c] == 0).all()  # the end-of-sequence token weighs 0


def test_tisdpo_edge_rows_are_finite():
    """An empty response, one that is only its end token, and one with a single text token (weight 1.0)."""
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, False]])
    end = torch.tensor([[False, False, False], [True, False, False], [False, True, False]])
    logps = -torch.rand(3, 3)
    out = tisdpo_loss(logps, logps, logps * 2, logps * 2, logps, logps, chosen_mask=mask, rejected_mask=mask,
                      chosen_end=end, rejected_end=end, beta=0.1)  # fmt: skip
    assert torch.isfinite(out.losses).all()
    assert out.chosen_weights.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    torch.testing.assert_close(out.losses[:2], torch.full((2,), math.log(2)))


def test_rank_weights_break_ties_by_position_like_a_stable_sort():
    scores = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.3]])
    weights = rank_range_weights(scores, torch.ones_like(scores, dtype=torch.bool), low=0.7, high=1.3)
    torch.testing.assert_close(weights[0].double(), torch.tensor(python_rank_weights(scores[0].tolist()), dtype=torch.float64))
    assert weights[0, 1] < weights[0, 3] < weights[0, 4] < weights[0, 0] < weights[0, 2]


def test_rounding_is_pythons():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(20000, generator=generator) * 3, torch.tensor([0.125, 0.375, -0.125, 2.675, 1.005, 0.005, -0.015])])
    values = values.float()  # the official code rounds float32 differences
    expected = torch.tensor([round(float(v), 2) for v in values], dtype=torch.float64)
    assert torch.equal(round_like_python(values, 2), expected)


def test_end_of_sequence_mask():
    ids = torch.tensor([[5, 2, 9, 0], [5, 6, 7, 8], [0, 0, 0, 0], [2, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    end = end_of_sequence_mask(ids, mask, [2])
    assert end.tolist() == [
        [False, True, True, False],  # the end token and the chat template's token after it
        [False, False, True, False],  # truncated: no end token, so the last token (as the official code's [0])
        [False, False, False, False],
        [True, True, True, True],
    ]


def test_a_new_composition_is_a_few_lines():
    """The docs' example: DPO's loss on the tokens SePO's oracle picks, from the same parts."""
    from selective_po.losses import WeightedDPO
    from selective_po.methods import Method
    from selective_po.scoring import OracleReward
    from selective_po.token_values import TokenValues
    from selective_po.weighting import TopShare

    (pc, pr, rc, rr, oc, orr), (cm, rm) = inputs((3, 12), side="right", seed=5, grid=False)
    method = Method("DPO on oracle-picked tokens", OracleReward(), TopShare(0.3, 0.3), WeightedDPO(beta=0.1))
    out = method(TokenValues(mask=(cm, rm), policy=(pc, pr), reference=(rc, rr), stored={"oracle": (oc, orr)}))
    oracle_only = TokenValues(mask=(cm, rm), stored={"oracle": (oc, orr)})
    sepo_keep = TopShare(0.3, 0.3)(OracleReward()(oracle_only), oracle_only)
    assert torch.equal(out.chosen_keep, sepo_keep[0]) and torch.equal(out.rejected_keep, sepo_keep[1])
    expected = -torch.nn.functional.logsigmoid(0.1 * (((pc - rc) * out.chosen_keep).sum(-1) - ((pr - rr) * out.rejected_keep).sum(-1)))
    torch.testing.assert_close(out.losses, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_length_desensitized_weights_match_ld_dpo(shape, side):
    from reference import reference_ld_weights
    from selective_po.weighting import length_desensitized_weights

    _, (cm, rm) = inputs(shape, side=side, seed=sum(shape), grid=False, models=0)
    got = length_desensitized_weights(cm, rm, alpha=0.3)
    want = reference_ld_weights(cm, rm, 0.3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w)


@pytest.mark.parametrize("kind, alpha", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
                                         ("alpha_divergence", 0.3), ("alpha_divergence", 1.7)])  # fmt: skip
def test_f_divergence_scores_match_their_definitions(kind, alpha):
    from reference import reference_f_divergence
    from selective_po.losses import f_divergence_scores

    logratios = torch.linspace(-6, 6, 25, dtype=torch.float64)
    expected = torch.tensor([reference_f_divergence(v, kind, alpha) for v in logratios.tolist()], dtype=torch.float64)
    # TRL takes the alpha-divergence's exponential in float32 whatever the dtype: float32 precision there.
    tolerance = dict(rtol=1e-6, atol=1e-6) if kind == "alpha_divergence" else {}
    torch.testing.assert_close(f_divergence_scores(logratios, kind, alpha), expected, **tolerance)
