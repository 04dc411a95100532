"""The compact LM head on CPU: TRL's fused head, projecting only the positions whose log-prob is used,
gives the same per-token log-probs, metrics and gradients as projecting every position."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.trainer.utils import add_fused_lm_head

from conftest import build_model, build_tokenizer
from selective_po.logprobs import compact_lm_head

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def test_trl_still_decides_the_compact_path_where_we_switch_it():
    """`compact_lm_head` swaps TRL 1.16's private `_use_triton` in `trl.trainer.utils`; a TRL that moves it fails here."""
    assert callable(getattr(trl_utils, "_use_triton", None))
    assert hasattr(trl_utils, "_ChunkedLogProbFunction")


def batch(seed: int, rows: int = 3, length: int = 17, vocab: int = 300):
    """Odd shapes, padding on either side, a one-token completion and a one-token prompt."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, length), generator=generator)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), -100)
    attention_mask[0, 13:] = 0  # right padding
    labels[0, 5:13] = input_ids[0, 5:13]
    attention_mask[1, :4] = 0  # left padding, one completion token
    labels[1, 16] = input_ids[1, 16]
    labels[2, 1:] = input_ids[2, 1:]  # a one-token prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_compact_matches_every_position_in_values_and_gradients(seed, monkeypatch):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed).float()
    add_fused_lm_head(model, outputs=OUTPUTS)
    inputs, labels = batch(seed, vocab=len(tokenizer))
    projected = []
    original = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda hidden, *a: (projected.append(hidden.shape[0]), original(hidden, *a))[1])

    results = []
    for compact in (False, True):
        model.zero_grad()
        with compact_lm_head() if compact else torch.enable_grad():
            out = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
        (out.log_probs * torch.linspace(0.5, 1.5, out.log_probs.numel()).view_as(out.log_probs)).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (compact, compact_grads) = results

    assert projected == [labels[:, 1:].numel(), int((labels[:, 1:] != -100).sum())]  # every position, then 18
    mask = labels[:, 1:] != -100
    for field in OUTPUTS:
        a, b = getattr(full, field), getattr(compact, field)
        if field != "is_top1":
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=field)
        else:
            assert torch.equal(b[mask], a[mask])
        assert not b[~mask].any()  # positions without a label hold 0, as in TRL's own compact path
    assert full_grads.keys() == compact_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(compact_grads[name], full_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_switch_is_undone_after_the_block():
    before = trl_utils._use_triton
    with compact_lm_head():
        assert trl_utils._use_triton(torch.device("cpu"))
    assert trl_utils._use_triton is before and not trl_utils._use_triton(torch.device("cpu"))


# ----- the float32 scoring pass -----


def fused(model):
    add_fused_lm_head(model)
    return model.eval()


def scoring_batch():
    inputs, labels = batch(5, vocab=250)
    completion = (labels != -100).long()
    return {**inputs, "completion_mask": completion}


def test_a_bf16_model_scores_in_float32_as_its_float32_copy_and_is_left_as_it_was():
    """bf16 weights upcast exactly, so the float32 pass is the float32 model's forward, bit for bit; the bf16 forward
    differs by rounding, and the module keeps its bf16 tensors (the copies live only for the call)."""
    from selective_po.reference_scoring import forward_logps

    tokenizer = build_tokenizer()
    bf16 = fused(build_model(tokenizer, seed=3, hidden=64).to(torch.bfloat16))
    float32 = fused(build_model(tokenizer, seed=3, hidden=64).to(torch.bfloat16).float())
    before = {name: t.clone() for name, t in bf16.state_dict().items()}
    inputs = scoring_batch()
    with torch.no_grad():
        scored = forward_logps(bf16, inputs, float32=True)
        expected = forward_logps(float32, inputs)
        rounded = forward_logps(bf16, inputs)
    mask = inputs["completion_mask"][:, 1:].bool()
    assert scored.dtype == torch.float32
    assert torch.equal(scored[mask], expected[mask])
    assert (rounded.float() - expected).abs()[mask].max() > 1e-3  # bf16 itself: the pass changes something
    after = bf16.state_dict()
    assert all(after[name].dtype == t.dtype and torch.equal(after[name], t) for name, t in before.items())


def test_the_float32_pass_sets_accelerate_autocast_aside_and_restores_it():
    """accelerate wraps a mixed-precision model's forward in bf16 autocast; the pass runs the original forward in
    float32, and the wrapper is back afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from selective_po.reference_scoring import forward_logps

    tokenizer = build_tokenizer()
    plain = fused(build_model(tokenizer, seed=4, hidden=64))
    model = fused(build_model(tokenizer, seed=4, hidden=64))
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state other tests made without bf16
    try:
        model = Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model, evaluation_mode=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    wrapper = model.forward
    inputs = scoring_batch()
    mask = inputs["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        autocast = forward_logps(model, inputs)
        scored = forward_logps(model, inputs, float32=True)
        expected = forward_logps(plain, inputs)
    assert (autocast - expected).abs()[mask].max() > 1e-4, "the wrapper did not autocast: nothing to set aside"
    assert torch.equal(scored[mask], expected[mask])
    assert model.forward == wrapper


def test_the_float32_pass_refuses_what_it_cannot_upcast():
    from selective_po.logprobs import run_in_float32

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(2, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(ValueError, match=r"quantized model.*'packed' is torch.uint8"):
        run_in_float32(model, lambda m: m(torch.ones(1, 2)))
    sharded = torch.nn.Linear(2, 2).to(torch.bfloat16)
    sharded.weight.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    with pytest.raises(ValueError, match=r"sharded torch.bfloat16 weights.*'weight'"):
        run_in_float32(sharded, lambda m: m(torch.ones(1, 2)))
    fine = torch.nn.Linear(2, 2)
    fine.weight.ds_id = 0  # float32 already: nothing to upcast, the engine's own forward runs
    assert run_in_float32(fine, lambda m: m(torch.ones(1, 2))).dtype == torch.float32
