"""Selection against the float64 reference: odd shapes, padding sides, ties, empty rows."""

import pytest
import torch

from reference import reference_keep, reference_keep_count
from selective_po.selection import keep_counts, top_share_mask

THRESHOLDS = [0.0, 0.1, 0.25, 0.5, 0.6, 0.7, 0.9, 0.99]


def random_mask(batch, length, *, side, generator):
    """Completion masks with random lengths (zero and full included), padded on `side`."""
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    lengths[0], lengths[-1] = 0, length  # always one empty and one full row
    positions = torch.arange(length)
    if side == "right":
        return positions < lengths[:, None]
    if side == "left":
        return positions >= (length - lengths)[:, None]
    # prompt then completion then padding: the completion sits in the middle of the row
    start = torch.randint(0, length + 1, (batch,), generator=generator).clamp(max=length - lengths)
    return (positions >= start[:, None]) & (positions < (start + lengths)[:, None])


def case_seed(shape: tuple[int, int], threshold: float, side: str) -> int:
    """A fixed seed per grid case (`hash()` of a string changes per process)."""
    return 1000 * sum(shape) + 10 * THRESHOLDS.index(threshold) + len(side)


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (5, 13), (7, 2)])
@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_matches_reference_with_ties(threshold, shape, side):
    generator = torch.Generator().manual_seed(case_seed(shape, threshold, side))
    mask = random_mask(*shape, side=side, generator=generator)
    # Scores on a coarse grid: many exact ties, including at the selection boundary.
    scores = torch.randint(-3, 4, shape, generator=generator).float() / 4
    scores[~mask] = torch.randn(int((~mask).sum()), generator=generator) * 100  # garbage outside the mask
    keep = top_share_mask(scores, mask, keep_share=1 - threshold)
    torch.testing.assert_close(keep, reference_keep(scores, mask, threshold))
    assert not (keep & ~mask).any()


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_continuous_scores_keep_exactly_k(threshold):
    generator = torch.Generator().manual_seed(0)
    mask = random_mask(6, 31, side="right", generator=generator)
    scores = torch.randn(6, 31, generator=generator)
    keep = top_share_mask(scores, mask, keep_share=1 - threshold)
    expected = [reference_keep_count(int(n), threshold) for n in mask.sum(-1)]
    assert keep.sum(-1).tolist() == expected
    torch.testing.assert_close(keep, reference_keep(scores, mask, threshold))


def test_all_equal_scores_keep_every_token():
    mask = random_mask(4, 9, side="left", generator=torch.Generator().manual_seed(1))
    keep = top_share_mask(torch.zeros(4, 9), mask, keep_share=0.1)
    assert torch.equal(keep, mask)


def test_one_token_and_empty_rows():
    mask = torch.tensor([[False, True, False], [False, False, False]])
    keep = top_share_mask(torch.tensor([[5.0, -2.0, 9.0], [1.0, 2.0, 3.0]]), mask, keep_share=0.01)
    assert keep.tolist() == [[False, True, False], [False, False, False]]


def test_keep_counts_round_up_without_float_noise():
    """0.4 * 10 is 4.000000000000001 in floating point; the count must still be 4, not 5."""
    n = torch.arange(0, 200)
    for threshold in [0.6, 0.7, 0.3, 0.45, 0.9, 0.05]:
        expected = [reference_keep_count(int(v), threshold) for v in n]
        assert keep_counts(n, 1 - threshold).tolist() == expected, threshold


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="keep_share"):
        keep_counts(torch.tensor([3]), 1.5)
    with pytest.raises(ValueError, match="differ"):
        top_share_mask(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool), keep_share=0.5)


def test_float_noise_around_equal_scores_is_a_tie():
    """A stored reference and the same model run live differ by float32 noise (~1e-6): that keeps every token,
    as exact equality does, while a real difference of 1e-4 nats still decides."""
    from selective_po.selection import SCORE_TIE_TOLERANCE, select_tokens

    mask = torch.ones(2, 50, dtype=torch.bool)
    noise = torch.randn(2, 50, generator=torch.Generator().manual_seed(3)) * 1e-6
    assert torch.equal(select_tokens(noise, mask, keep_share=0.4), mask)
    assert torch.equal(select_tokens(noise, mask, keep_share=0.4), reference_keep(noise, mask, 0.6))
    signal = noise.clone()
    signal[:, :20] += 1e-4
    keep = select_tokens(signal, mask, keep_share=0.4)
    assert keep[:, :20].all() and not keep[:, 20:].any() and SCORE_TIE_TOLERANCE < 1e-4


def reference_quantile_keep(scores, mask, quantile):
    """The official code's count, row by row: `torch.quantile` over the real tokens, in float64."""
    keep = torch.zeros_like(mask)
    for i in range(scores.size(0)):
        real = scores[i][mask[i]].double()
        if real.numel():
            keep[i] = mask[i] & (scores[i].double() >= torch.quantile(real, quantile))
    return keep


@pytest.mark.parametrize("quantile", THRESHOLDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (5, 13), (7, 2)])
@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_quantile_count_matches_torch_quantile_per_row(quantile, shape, side):
    from selective_po.selection import quantile_mask

    generator = torch.Generator().manual_seed(hash((quantile, shape, side, "q")) % 2**31)
    mask = random_mask(*shape, side=side, generator=generator)
    for scores in (torch.randn(shape, generator=generator), torch.randint(-3, 4, shape, generator=generator).float() / 4):
        scores[~mask] = torch.randn(int((~mask).sum()), generator=generator) * 100  # garbage outside the mask
        keep = quantile_mask(scores, mask, quantile=quantile)
        torch.testing.assert_close(keep, reference_quantile_keep(scores, mask, quantile))


def test_quantile_count_keeps_one_fewer_exactly_when_frac_qn_exceeds_q():
    from selective_po.selection import quantile_mask

    for n in range(1, 40):
        scores, mask = torch.randn(1, n, generator=torch.Generator().manual_seed(n)), torch.ones(1, n, dtype=torch.bool)
        for q in (0.1, 0.25, 0.5, 0.6, 0.7, 0.9):
            ceil_count = int(top_share_mask(scores, mask, keep_share=1 - q).sum())
            quantile_count = int(quantile_mask(scores, mask, quantile=q).sum())
            frac = q * n - int(q * n + 1e-9)
            assert ceil_count - quantile_count == (1 if frac > q + 1e-9 else 0), (n, q)


def test_quantile_count_avoids_the_official_codes_defects():
    from selective_po.selection import quantile_mask

    mask = torch.tensor([[True, True, True, True, False]])
    # a real token whose score is exactly 0 is a token, not padding; a padded position never is kept
    assert quantile_mask(torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0]]), mask, quantile=0.5).tolist() == [[False, False, True, True, False]]
    # bf16 scores are upcast rather than failing in torch.quantile
    assert quantile_mask(torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0]], dtype=torch.bfloat16), mask, quantile=0.5).sum() == 2
    # an empty row keeps nothing
    assert not quantile_mask(torch.zeros(1, 5), torch.zeros(1, 5, dtype=torch.bool), quantile=0.5).any()


def test_confidence_keeps_tokens_below_the_mean_probability():
    from selective_po.scoring import confidence_token_scores
    from selective_po.selection import select_tokens

    probs = torch.tensor([[0.9, 0.1, 0.5, 0.8, 0.3], [0.5, 0.5, 0.5, 0.5, 0.2]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    keep = select_tokens(confidence_token_scores(probs.log().float()), mask, keep_share=0.4, rule="confidence")
    # row 0: mean of (0.9, 0.1, 0.5, 0.8) is 0.575; row 1: every real token equally likely, so none is below
    assert keep.tolist() == [[False, True, True, False, False], [False, False, False, False, False]]
    reference = mask & (probs < (probs * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))
    assert torch.equal(keep[0], reference[0])


def test_spans_keep_the_given_tokens_inside_the_response_only():
    from selective_po.selection import select_tokens

    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    given = torch.tensor([[True, True, False, True], [False, False, True, False]])  # some outside the response
    scores = torch.randn(mask.shape)
    keep = select_tokens(scores, mask, keep_share=0.4, rule="spans", given=given)
    assert keep.tolist() == [[False, True, False, True], [False, False, False, False]]  # an empty row keeps nothing
    with pytest.raises(ValueError, match="rule='spans' needs the tokens the data names"):
        select_tokens(scores, mask, keep_share=0.4, rule="spans")


# ----- the noise bound: rows with no signal fall back whole, the others are ranked at float32 precision -----


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (6, 13), (7, 2)])
@pytest.mark.parametrize("side", ["right", "left", "middle"])
def test_the_noise_rule_matches_the_float64_reference(threshold, shape, side):
    from reference import reference_keep_with_noise, reference_uncertain
    from selective_po.selection import select_tokens, uncertain_decisions

    generator = torch.Generator().manual_seed(case_seed(shape, threshold, side))
    mask = random_mask(*shape, side=side, generator=generator)
    bound = torch.rand(shape, generator=generator, dtype=torch.float64) * 0.5
    scores = torch.randn(shape, generator=generator, dtype=torch.float64)
    scores[::2] *= 0.3 * bound[::2] / scores[::2].abs().clamp(min=1e-9)  # every other row: all scores inside their bound
    scores[:, ::5] = scores[:, :1].clone()  # ties
    keep = select_tokens(scores.float(), mask, keep_share=1 - threshold, noise_bound=bound.float())
    assert torch.equal(keep, reference_keep_with_noise(scores.float(), mask, threshold, bound.float()))
    uncertain = uncertain_decisions(scores.float(), mask, keep, noise_bound=bound.float())
    assert torch.equal(uncertain, reference_uncertain(scores.float(), mask, keep, bound.float()))


def test_rows_inside_their_bound_keep_everything_and_the_others_keep_their_share():
    from selective_po.selection import rows_with_signal, select_tokens

    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 6:] = False
    scores = torch.tensor([[0.0] * 10, [0.1 * i for i in range(10)], [0.01, -0.02, 0.0, 0.03, 0.0, 0.02, 9.0, 9.0, 9.0, 9.0]])
    bound = torch.full((3, 10), 0.05)
    assert rows_with_signal(scores, mask, bound).tolist() == [False, True, False]  # padding never counts as signal
    keep = select_tokens(scores, mask, keep_share=0.4, noise_bound=bound)
    assert keep[0].all() and keep[1].tolist() == [False] * 6 + [True] * 4 and torch.equal(keep[2], mask[2])
    # Without a bound the noise-only rows are ranked: their kept tokens are chosen by rounding.
    assert not select_tokens(scores, mask, keep_share=0.4)[2].all()
    # A bound of exactly 0 still treats exact ties (policy == reference) as no signal.
    assert select_tokens(torch.zeros(2, 5), torch.ones(2, 5, dtype=torch.bool), keep_share=0.4, noise_bound=torch.zeros(2, 5)).all()


def test_empty_rows_keep_nothing_and_carry_no_signal():
    from selective_po.selection import rows_with_signal, select_tokens, uncertain_decisions

    mask = torch.zeros(2, 4, dtype=torch.bool)
    scores, bound = torch.randn(2, 4), torch.zeros(2, 4)
    assert not select_tokens(scores, mask, keep_share=0.4, noise_bound=bound).any()
    assert not rows_with_signal(scores, mask, bound).any()
    assert not uncertain_decisions(scores, mask, torch.zeros(2, 4, dtype=torch.bool), noise_bound=bound).any()


def test_a_decision_is_uncertain_only_when_noise_could_swap_it_across_the_cut():
    from selective_po.selection import select_tokens, uncertain_decisions

    scores = torch.tensor([[5.0, 3.0, 2.95, 1.0, 0.0]])
    mask, bound = torch.ones(1, 5, dtype=torch.bool), torch.full((1, 5), 0.1)
    keep = select_tokens(scores, mask, keep_share=0.4, noise_bound=bound)
    assert keep.tolist() == [[True, True, False, False, False]]
    # 3.0 (kept) and 2.95 (dropped) lie within 0.1 of each other; 5.0 and 1.0 are far from the other side.
    assert uncertain_decisions(scores, mask, keep, noise_bound=bound).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("count_rule", ["ceil", "quantile"])
def test_the_noise_rule_applies_to_both_count_rules(count_rule):
    from selective_po.selection import select_tokens

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 20, generator=generator)
    scores[1] *= 1e-3
    mask = torch.ones(4, 20, dtype=torch.bool)
    keep = select_tokens(scores, mask, keep_share=0.4, count_rule=count_rule, noise_bound=torch.full((4, 20), 0.01))
    plain = select_tokens(scores, mask, keep_share=0.4, count_rule=count_rule)
    assert keep[1].all() and torch.equal(keep[[0, 2, 3]], plain[[0, 2, 3]])
