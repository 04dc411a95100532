"""Threshold-free selection quality against known spans, checked against slow references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from selective_po.selection_quality import response_auroc, response_recall_at_share, response_top1, span_selection_quality


def auroc_by_ranks(scores, in_span) -> float:
    """Mann-Whitney U from average ranks (float64): a reference independent of the pairwise count."""
    scores, in_span = np.asarray(scores, dtype=np.float64), np.asarray(in_span, dtype=bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    s, n = in_span.sum(), len(scores) - in_span.sum()
    return float((ranks[in_span].sum() - s * (s + 1) / 2) / (s * n))


def expected_over_tie_breaks(scores, in_span, k) -> float:
    """Recall of the span among k kept, averaged over every order of the tied tokens (brute force)."""
    scores, in_span = np.asarray(scores), np.asarray(in_span, dtype=bool)
    recalls = []
    for perm in itertools.permutations(range(len(scores))):
        # sort by score descending, ties broken by the permutation
        ranked = sorted(range(len(scores)), key=lambda t: (-scores[t], perm.index(t)))
        recalls.append(in_span[ranked[:k]].sum() / in_span.sum())
    return float(np.mean(recalls))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_mann_whitney_with_average_ranks(seed):
    generator = np.random.default_rng(seed)
    n = int(generator.integers(2, 30))
    scores = generator.integers(0, 5, n).astype(np.float64)  # many exact ties
    in_span = generator.random(n) < 0.4
    in_span[0], in_span[-1] = True, False
    assert response_auroc(scores, in_span) == pytest.approx(auroc_by_ranks(scores, in_span), abs=1e-12)


def test_auroc_ends_and_ties():
    span = np.array([True, True, False, False, False])
    assert response_auroc(np.array([5.0, 4, 3, 2, 1]), span) == 1.0
    assert response_auroc(np.array([1.0, 2, 3, 4, 5]), span) == 0.0
    assert response_auroc(np.zeros(5), span) == 0.5  # all tied: exactly chance
    assert response_auroc(np.array([1e-7, 0, 0, 0, 0]), span) == 0.5  # float noise is a tie, as in selection
    assert math.isnan(response_auroc(np.ones(3), np.ones(3, dtype=bool)))  # no negatives
    assert math.isnan(response_auroc(np.ones(3), np.zeros(3, dtype=bool)))  # no span token


@pytest.mark.parametrize("seed", range(5))
def test_recall_and_top1_are_the_expectation_over_random_tie_breaks(seed):
    generator = np.random.default_rng(seed)
    n = 6
    scores = generator.integers(0, 3, n).astype(np.float64)
    in_span = generator.random(n) < 0.5
    in_span[int(generator.integers(n))] = True
    for share in (0.2, 0.4, 0.5, 1.0):
        k = math.ceil(share * n - 1e-9)
        assert response_recall_at_share(scores, in_span, keep_share=share) == pytest.approx(
            expected_over_tie_breaks(scores, in_span, k), abs=1e-12
        )
    top = scores == scores.max()
    assert response_top1(scores, in_span) == pytest.approx(in_span[top].mean())


def test_all_tied_scores_give_the_random_baseline_not_full_recall():
    in_span = np.array([False, True, True, False, False, False, False, False, False, False])
    quality = span_selection_quality({"chosen": [(np.zeros(10), in_span)], "rejected": [(np.zeros(10), in_span)]}, keep_share=0.4)
    for side in ("chosen", "rejected"):
        assert quality[f"span_auroc_{side}"] == 0.5 == quality[f"span_auroc_{side}_random"]
        assert quality[f"span_top1_{side}"] == pytest.approx(0.2) == quality[f"span_top1_{side}_random"]
        assert quality[f"span_recall_at_k_{side}"] == pytest.approx(0.4) == quality[f"span_recall_at_k_{side}_random"]


def test_summary_means_over_defined_responses_with_intervals():
    perfect = (np.array([3.0, 2.0, 0.0, 0.0]), np.array([True, True, False, False]))
    backwards = (np.array([0.0, 0.0, 2.0, 3.0]), np.array([True, True, False, False]))
    no_span = (np.array([1.0, 2.0]), np.array([False, False]))  # defines top-1 (0), but no AUROC or recall
    quality = span_selection_quality({"chosen": [perfect, backwards, no_span], "rejected": [perfect] * 3}, keep_share=0.5)
    assert quality["span_auroc_chosen"] == 0.5 and quality["span_auroc_chosen_responses"] == 2
    assert quality["span_auroc_chosen_low"] == 0.0 and quality["span_auroc_chosen_high"] == 1.0
    assert quality["span_top1_chosen"] == pytest.approx(1 / 3) and quality["span_top1_chosen_responses"] == 3
    assert quality["span_recall_at_k_chosen"] == 0.5 and quality["span_recall_at_k_chosen_responses"] == 2
    assert quality["span_auroc_rejected"] == 1.0 == quality["span_auroc_rejected_low"] == quality["span_auroc_rejected_high"]
    assert quality["span_recall_at_k_rejected"] == 1.0 and quality["span_recall_at_k_rejected_random"] == 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_sepo_oracle_rewards_rank_tokens_as_selective_dpo_scores_with_the_oracle_as_reference(seed):
    """Why benchmarks/selection_quality.py measures SePO's oracle through Selective-DPO's scorer: with the
    start model as policy and the DPO model (SePO's oracle) as reference, the chosen scores equal the
    oracle rewards and the rejected scores their negatives, so the same tokens are kept at any share."""
    from selective_po.losses import sepo_keep_masks
    from selective_po.scoring import sdpo_token_scores
    from selective_po.selection import select_tokens

    g = torch.Generator().manual_seed(seed)
    start, oracle = (-torch.rand(2, 5, 11, generator=g, dtype=torch.float64) * 4 for _ in range(2))  # (chosen/rejected, B, T)
    mask = torch.rand(2, 5, 11, generator=g) > 0.2
    rewards = oracle - start  # log p_oracle - log p_ref, SePO's token rewards
    chosen_scores, rejected_scores = sdpo_token_scores(start[0], start[1], oracle[0], oracle[1])
    torch.testing.assert_close(chosen_scores, rewards[0].float())
    torch.testing.assert_close(rejected_scores, -rewards[1].float())
    for share in (0.3, 0.4, 1.0):
        sepo = sepo_keep_masks(rewards[0], rewards[1], chosen_mask=mask[0], rejected_mask=mask[1], chosen_share=share, rejected_share=share)
        sdpo = (select_tokens(chosen_scores, mask[0], keep_share=share), select_tokens(rejected_scores, mask[1], keep_share=share))
        assert torch.equal(sepo[0], sdpo[0]) and torch.equal(sepo[1], sdpo[1])
    for side, scores in ((0, chosen_scores), (1, rejected_scores)):  # and the threshold-free measures agree
        for row in range(5):
            keep = mask[side, row]
            in_span = (torch.arange(11) % 3 == 0)[keep].numpy()
            sign = 1 if side == 0 else -1
            assert response_auroc(scores[row][keep].numpy(), in_span) == response_auroc(sign * rewards[side, row][keep].numpy(), in_span)
