"""The per-token noise bound (`selective_po.noise`) and the losses that use it, against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from reference import reference_noise_bound, reference_sdpo
from selective_po.losses import selective_dpo_loss, sepo_loss
from selective_po.noise import LOGP_EDGES, SAFETY_FACTOR, NoiseBound, bin_maxima, calibrate_from_layouts, logp_bins, one_pair_rows
from test_losses import make_inputs


def test_bins_follow_the_probability_edges():
    logps = torch.tensor([0.0, math.log(0.9995), math.log(0.995), math.log(0.5), math.log(0.2), -30.0, float("-inf")])
    assert logp_bins(logps).tolist() == [0, 0, 1, 4, 4, 8, 8]
    assert logp_bins(torch.tensor([LOGP_EDGES[2]])).item() == 3  # an edge belongs to the less likely bin


def test_the_bound_is_twice_the_running_maximum_and_looks_up_the_least_likely_log_prob():
    maxima = torch.tensor([1e-3, 0.0, 5e-3, 2e-3, 0.1, 0.0, 0.0, 0.0, 0.0])
    bound = NoiseBound.from_bin_maxima(maxima, source="test")
    expected = [SAFETY_FACTOR * v for v in (1e-3, 1e-3, 5e-3, 5e-3, 0.1, 0.1, 0.1, 0.1, 0.1)]
    assert bound.per_bin == pytest.approx(expected) and bound.largest() == pytest.approx(0.2)
    generator = torch.Generator().manual_seed(0)
    a, b = -torch.rand(3, 11, generator=generator) * 6, -torch.rand(3, 11, generator=generator) * 6
    torch.testing.assert_close(bound(a, b).double(), reference_noise_bound(bound.per_bin, LOGP_EDGES, a, b).double())
    assert NoiseBound.uniform(0.3, source="user")(a).eq(0.3).all()
    assert bound.widened(0.05, reason="bf16 store").per_bin[0] == 0.05


def test_bin_maxima_take_the_largest_difference_per_bin_over_real_tokens():
    first = torch.tensor([[math.log(0.9999), math.log(0.3), math.log(0.3), -20.0]])
    second = first + torch.tensor([[1e-4, 0.2, -0.3, 5.0]])
    mask = torch.tensor([[True, True, True, False]])  # the padded token's difference is ignored
    maxima = bin_maxima(first, second, mask)
    assert maxima[0] == pytest.approx(1e-4, rel=1e-3) and maxima[4] == pytest.approx(0.3, rel=1e-5)
    assert maxima.sum() == pytest.approx(1e-4 + 0.3, rel=1e-4)


def test_one_pair_rows_picks_a_pair_and_trims_its_padding():
    batch = {
        "input_ids": torch.arange(4 * 6).reshape(4, 6),
        "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 5 + [0], [1, 1, 0, 0, 0, 0]]),
        "completion_mask": torch.ones(4, 6, dtype=torch.long),
        "note": "kept as is",
    }
    pair = one_pair_rows(batch, 1)  # rows 1 and 3
    assert pair["input_ids"].tolist() == [[6, 7, 8], [18, 19, 20]] and pair["note"] == "kept as is"
    assert pair["attention_mask"].shape == (2, 3)


class _OneProcess:
    num_processes = 1


def test_calibration_measures_layout_differences_per_bin():
    """A forward whose values depend on the batch size (as kernels' summation order does) is measured as such."""
    generator = torch.Generator().manual_seed(0)
    table = -torch.rand(4, 9, generator=generator) * 5  # (2B, T): a fixed log-prob per position

    def forward(batch):
        rows = batch["input_ids"][:, 0] // 100  # row index encoded in the ids
        values = table[rows, : batch["input_ids"].size(1) - 1]  # (2B', T'-1)
        return values + (1e-3 if batch["input_ids"].size(0) == 2 else 0.0)  # "alone" layout: shifted by 1e-3

    ids = torch.arange(4)[:, None] * 100 + torch.arange(10)[None, :]
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 10, dtype=torch.long), "completion_mask": torch.ones(4, 10, dtype=torch.long)}
    bound = calibrate_from_layouts(forward, batch, accelerator=_OneProcess())
    seen = {int(i) for i in logp_bins(table).flatten()}
    for index, value in enumerate(bound.per_bin):
        if index >= min(seen):
            assert value == pytest.approx(SAFETY_FACTOR * 1e-3, rel=1e-3)
    assert "4 pairs" not in bound.source and "2 pairs" in bound.source


@pytest.mark.parametrize("threshold", [0.3, 0.6])
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (6, 10)])
@pytest.mark.parametrize("grid", [False, True])
def test_selective_dpo_with_a_noise_bound_matches_the_float64_reference(threshold, shape, grid):
    beta = 0.3
    pc, pr, rc, rr, cm, rm = make_inputs(*shape, side="right", seed=sum(shape) + int(threshold * 100), grid=grid)
    rc[::2], rr[::2] = pc[::2] + 1e-3, pr[::2] - 2e-3  # every other pair: scores inside a bound of 0.01 nats
    bound = NoiseBound(per_bin=(0.01,) * 4 + (0.02,) * 5, source="test")
    pc.requires_grad_(), pr.requires_grad_()
    out = selective_dpo_loss(pc, pr, rc, rr, chosen_mask=cm, rejected_mask=rm, threshold=threshold, beta=beta, noise=bound)
    out.losses.sum().backward()
    pc64, pr64 = pc.detach().double().requires_grad_(), pr.detach().double().requires_grad_()
    bounds = tuple(reference_noise_bound(bound.per_bin, LOGP_EDGES, p.detach(), r) for p, r in ((pc, rc), (pr, rr)))
    ref_losses, keep_c, keep_r = reference_sdpo(pc64, pr64, rc.double(), rr.double(), cm, rm, threshold=threshold, beta=beta, bounds=bounds)
    ref_losses.sum().backward()
    assert torch.equal(out.chosen_keep, keep_c) and torch.equal(out.rejected_keep, keep_r)
    torch.testing.assert_close(out.losses.double(), ref_losses.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-6)
    assert out.chosen_fallback[::2][cm[::2].any(-1)].all()  # the noise-only pairs fell back whole
    assert torch.equal(out.chosen_keep[::2], cm[::2].bool())


def test_sepo_rows_whose_rewards_all_lie_within_the_bound_keep_every_token():
    generator = torch.Generator().manual_seed(0)
    rewards_c, rewards_r = torch.randn(4, 12, generator=generator), torch.randn(4, 12, generator=generator)
    rewards_c[1] *= 1e-3
    mask = torch.ones(4, 12, dtype=torch.bool)
    policy = -torch.rand(4, 12, generator=generator)
    bound = NoiseBound.uniform(0.01, source="test")
    out = sepo_loss(policy, policy, rewards_c, rewards_r, chosen_mask=mask, rejected_mask=mask, noise=bound)
    plain = sepo_loss(policy, policy, rewards_c, rewards_r, chosen_mask=mask, rejected_mask=mask)
    assert out.chosen_keep[1].all() and out.chosen_fallback.tolist() == [False, True, False, False]
    assert torch.equal(out.chosen_keep[[0, 2, 3]], plain.chosen_keep[[0, 2, 3]]) and torch.equal(out.rejected_keep, plain.rejected_keep)


def test_a_batch_of_one_pair_is_measured_against_a_batch_of_two_copies():
    seen = []

    def forward(batch):
        seen.append(batch["input_ids"].size(0))
        return torch.full((batch["input_ids"].size(0), 5), -1.0) + (1e-2 if batch["input_ids"].size(0) == 4 else 0.0)

    batch = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.ones(2, 6), "completion_mask": torch.ones(2, 6)}
    bound = calibrate_from_layouts(forward, batch, accelerator=_OneProcess())
    assert seen == [2, 4] and bound.largest() == pytest.approx(SAFETY_FACTOR * 1e-2, rel=1e-3) and "1 pair," in bound.source
