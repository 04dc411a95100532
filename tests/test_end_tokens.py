"""`end_token_selection`: how the selection rules treat each response's end-of-turn token, against a float64
re-derivation from the token ids (every mode, values and gradients, padding, ties, truncated and empty rows), the
trainer's wiring and logging, and the config's errors."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest
import torch

from conftest import preference_dataset
from reference import reference_end_token_selection, reference_kept_dpo
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.methods import selective_dpo, sepo
from selective_po.selection import END_TOKEN_MODES
from selective_po.token_values import TokenValues, end_of_turn_mask
from selective_po.weighting import AboveMean, EndTokens, RandomShare
from test_selection import random_mask
from test_trainer import COMMON, one_batch_loss

END_IDS = [4, 5]  # two ids, as a tokenizer's EOS and a generation config's second end id
SHAPES = [(1, 1), (4, 9), (7, 23)]


def batch(shape, *, side, seed, grid):
    """Token ids with end ids at random places (none, one or several per row), masks padded on `side`, scores."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 12, shape, generator=g) for _ in range(2)]
    masks = [random_mask(*shape, side=side, generator=g) for _ in range(2)]
    draw = (lambda: -torch.randint(0, 6, shape, generator=g).float() / 4) if grid else (lambda: -torch.rand(shape, generator=g) * 5)
    logps = [draw() for _ in range(4)]  # policy chosen, policy rejected, reference chosen, reference rejected
    return ids, masks, logps


def values_for(ids, masks, logps, dtype=torch.float32):
    pc, pr, rc, rr = (t.to(dtype) for t in logps)
    end_turn = tuple(end_of_turn_mask(i, m, END_IDS) for i, m in zip(ids, masks))
    return TokenValues(mask=tuple(masks), policy=(pc, pr), reference=(rc, rr), end_turn=end_turn)


def test_the_end_of_turn_token_is_each_rows_first_end_id_inside_the_completion():
    ids = torch.tensor([[4, 1, 5, 4], [1, 2, 3, 1], [1, 5, 2, 2], [4, 4, 4, 4]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, True], [True, True, True, False], [False] * 4])
    expected = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, False], [False] * 4])
    assert torch.equal(end_of_turn_mask(ids, mask, END_IDS), expected)


@pytest.mark.parametrize("mode", END_TOKEN_MODES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["right", "left", "middle"])
@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_dpo_under_each_mode_matches_the_reference(mode, shape, side, grid, dtype):
    ids, masks, logps = batch(shape, side=side, seed=zlib.crc32(repr((mode, shape, side, grid)).encode()), grid=grid)
    method = selective_dpo(threshold=0.6, beta=0.3)
    method = replace(method, weighting=EndTokens(method.weighting, mode))
    values = values_for(ids, masks, logps, dtype)
    values.policy = tuple(p.clone().requires_grad_(True) for p in values.policy)
    out = method(values)
    out.losses.sum().backward()

    pc, pr, rc, rr = (t.double() for t in logps)
    scores_c, scores_r = (rc - pc).float().double(), (pr - rr).float().double()  # the fast path ranks float32 scores
    keep_c, keep_r = reference_end_token_selection(scores_c, scores_r, *ids, *masks, END_IDS, share_c=0.4, share_r=0.4, mode=mode)
    assert torch.equal(out.chosen_keep, keep_c) and torch.equal(out.rejected_keep, keep_r)
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    expected = reference_kept_dpo(*leaves, rc, rr, keep_c, keep_r, beta=0.3)
    expected.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.losses.double(), expected, **tol)
    for fast, slow in zip(values.policy, leaves):  # no token kept anywhere: no graph, zero gradients
        torch.testing.assert_close(fast.grad.double(), torch.zeros_like(slow) if slow.grad is None else slow.grad, **tol)


@pytest.mark.parametrize("mode", END_TOKEN_MODES)
@pytest.mark.parametrize("side", ["right", "middle"])
def test_sepo_under_each_mode_matches_the_reference(mode, side):
    ids, masks, logps = batch((6, 17), side=side, seed=11, grid=True)
    method = sepo(chosen_share=0.3, rejected_share=0.3, beta=1.0)
    method = replace(method, weighting=EndTokens(method.weighting, mode))
    values = values_for(ids, masks, logps)
    values.stored = {"oracle": (logps[2], logps[3])}
    chosen, rejected = method.weights(values)
    keep_c, keep_r = reference_end_token_selection(logps[2].double(), -logps[3].double(), *ids, *masks, END_IDS,
                                                   share_c=0.3, share_r=0.3, mode=mode)  # fmt: skip
    assert torch.equal(chosen, keep_c) and torch.equal(rejected, keep_r)


@pytest.mark.parametrize("inner", [RandomShare(0.5, 0.5), AboveMean()], ids=["random", "confidence"])
@pytest.mark.parametrize("mode", ["keep", "exclude", "paired"])
def test_no_rule_keeps_a_token_after_the_end_of_turn(inner, mode):
    ids, masks, logps = batch((8, 15), side="right", seed=3, grid=False)
    values = values_for(ids, masks, logps)
    values.generator = torch.Generator().manual_seed(0)
    keep = EndTokens(inner, mode)(replace_scores(values), values)
    for kept, end, mask in zip(keep, values.end_turn, masks):
        after = (end.long().cumsum(-1) > 0) & ~end
        assert not (kept & after).any() and not (kept & ~mask).any()
        if mode == "keep":
            assert torch.equal(kept & end, end)
        if mode == "exclude":
            assert not (kept & end).any()


def replace_scores(values):
    from selective_po.scoring import Confidence

    return Confidence()(values)


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="end_token_selection='always' is unknown"):
        EndTokens(RandomShare(0.5, 0.5), "always")


@pytest.mark.parametrize("mode, chosen, rejected", [("keep", 1.0, 1.0), ("exclude", 0.0, 0.0)])
def test_the_trainer_applies_the_mode_and_logs_how_often_the_end_token_is_kept(tmp_path, tiny_model_dir, mode, chosen, rejected):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), loss_type="sdpo", end_token_selection=mode, **COMMON)
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    loss, grads, metrics = one_batch_loss(trainer)
    assert torch.isfinite(loss) and grads
    assert metrics["selection/end_kept_chosen"] == chosen and metrics["selection/end_kept_rejected"] == rejected


def test_the_trainer_reads_the_tokenizers_end_of_turn_and_never_the_newline_after_it(tmp_path, tiny_model_dir):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), loss_type="sdpo", end_token_selection="keep", **COMMON)
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    values = trainer.token_values(inputs)
    end_id = trainer.processing_class.eos_token_id
    newline = trainer.processing_class.encode("\n")
    for end, mask, ids in zip(values.end_turn, values.mask, inputs["input_ids"][:, 1:].chunk(2)):
        assert end.sum(-1).tolist() == [1] * 4 and (ids[end] == end_id).all()
        after = (end.long().cumsum(-1) > 0) & ~end & mask
        assert after.any() and all(i in newline for i in ids[after].tolist())  # the template's "\n" after <|im_end|>
    candidates = trainer.method.weighting.candidates(values)
    assert not any((c & ((e.long().cumsum(-1) > 0))).any() for c, e in zip(candidates, values.end_turn))


def test_the_official_default_leaves_every_completion_token_a_candidate(tmp_path, tiny_model_dir):
    args = SelectiveDPOConfig(output_dir=str(tmp_path), loss_type="sdpo", **COMMON)
    trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    values = trainer.token_values(inputs)
    assert trainer.method.weighting.mode == "candidate"
    assert all(torch.equal(c, m) for c, m in zip(trainer.method.weighting.candidates(values), values.mask))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss_type": "sigmoid", "end_token_selection": "keep"}, "selects no tokens"),
        ({"loss_type": "sdpo", "end_token_selection": "first"}, "end_token_selection='first' is unknown"),
    ],
)
def test_config_names_the_bad_end_token_choice(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        SelectiveDPOConfig(output_dir=str(tmp_path), **options)
