"""Shared-prompt forwards equal the two-row path: per-token log-probs and gradients within 1e-5 in float32."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from conftest import build_model, build_tokenizer, preference_dataset
from selective_po import SelectiveDPOConfig, SelectiveDPOTrainer
from selective_po.logprobs import compact_lm_head
from selective_po.packing import pack_pairs, packed_model_problem, resolve_share_prompt, share_prompt_problem, shared_prompt_forward
from test_trainer import COMMON, one_batch_loss

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def examples(generator, vocab: int) -> list[dict]:
    """Odd lengths, a one-token prompt, a one-token response, responses of very different lengths."""
    draw = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    shapes = [(5, 7, 3), (1, 4, 9), (6, 1, 2), (3, 11, 1), (9, 2, 13)]
    return [{"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)} for p, c, r in shapes]


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("implementation, mask_kind", [("sdpa", "bool"), ("eager", "additive")])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_pairs_equal_two_rows_in_values_and_gradients(implementation, mask_kind, seed, device):
    """On CUDA the two-row path is TRL's own compact kernel, so this also checks the packed row against it."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed).float().to(device)
    model.config._attn_implementation = implementation
    add_fused_lm_head(model, outputs=OUTPUTS)
    batch = DataCollatorForPreference(pad_token_id=0)(examples(torch.Generator().manual_seed(seed), len(tokenizer)))
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    mask = batch["completion_mask"][:, 1:].bool()
    weights = torch.linspace(0.5, 1.5, mask.numel(), device=device).view(mask.shape)

    results = []
    for shared in (False, True):
        model.zero_grad()
        with compact_lm_head():
            if shared:
                out = shared_prompt_forward(model, batch, mask_kind=mask_kind)
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)
        (out.log_probs * weights).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (shared, shared_grads) = results
    for field in OUTPUTS:
        a, b = getattr(plain, field), getattr(shared, field)
        if field == "is_top1":
            assert torch.equal(a[mask], b[mask])
        else:
            torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=1e-5, msg=field)
        assert not b[~mask].any()
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_one_row_per_pair_and_the_rejected_tokens_never_see_the_chosen():
    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33]}]
    )
    packed = pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert packed.input_ids.tolist() == [[11, 12, 13, 21, 22, 13, 31, 32, 33]]  # the prompt's last token, copied
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    allowed = packed.attention_mask[0, 0]
    assert not allowed[5:, 3:5].any()  # rejected segment: no chosen token
    assert not allowed[5:, 2].any() and allowed[5:, :2].all()  # the copy stands in for the prompt's last token
    assert packed.shift_labels.tolist() == [[-100, -100, 21, 22, -100, 31, 32, 33, -100]]


def test_trainer_with_a_shared_prompt_equals_two_rows(tmp_path, tiny_model_dir):
    results = {}
    for shared in (False, True):
        args = SelectiveDPOConfig(output_dir=str(tmp_path / str(shared)), share_prompt=shared, bf16=False, **COMMON)
        trainer = SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
        assert (trainer._shared_prompt_mask is not None) == shared
        results[shared] = one_batch_loss(trainer)
    (loss, grads, metrics), (shared_loss, shared_grads, shared_metrics) = results[False], results[True]
    torch.testing.assert_close(shared_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for key, value in metrics.items():
        assert shared_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_on_by_default_where_exact_and_refused_where_not(tmp_path, tiny_model_dir):
    default = SelectiveDPOTrainer(model=tiny_model_dir, args=SelectiveDPOConfig(output_dir=str(tmp_path), **COMMON),
                                  train_dataset=preference_dataset())  # fmt: skip
    assert default._shared_prompt_mask == "bool"  # sdpa
    args = SelectiveDPOConfig(output_dir=str(tmp_path), share_prompt=True, truncation_mode="keep_end", **COMMON)
    with pytest.raises(ValueError, match="share_prompt=True is not exact here: truncation_mode='keep_end'"):
        SelectiveDPOTrainer(model=tiny_model_dir, args=args, train_dataset=preference_dataset())
    # On a GPU the default is two rows (measured slower packed); True still packs there.
    gpu = torch.device("cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(default.accelerator), "device", property(lambda self: gpu))
        assert resolve_share_prompt(default) is None
        default.args.share_prompt = True
        assert resolve_share_prompt(default) == "bool"
    config = build_model(build_tokenizer()).config
    config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in share_prompt_problem(model_config=config, truncation_mode="keep_start", padding_free=False,
                                                       extra_inputs=False)  # fmt: skip


@pytest.mark.parametrize("stored", [False, True])
def test_a_reference_side_model_that_cannot_run_packed_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer, stored):
    """The policy (sdpa) settles share_prompt; a reference loaded with eager attention would get a bool mask it reads
    as additive, and a model with sliding-window layers a mask that drops its window: both are refused by name."""
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    options = {"precompute_ref_log_probs": True, "ref_logps_cache_dir": str(tmp_path / "cache")} if stored else {}
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **options})
    with pytest.raises(ValueError, match="'ref_model' cannot run the pairs as shared-prompt rows.*'eager'.*share_prompt=False"):
        trainer = SelectiveDPOTrainer(model=tiny_model_dir, ref_model=eager, args=args, train_dataset=preference_dataset(4))
        one_batch_loss(trainer)  # the live reference is checked at its first forward
    args = SelectiveDPOConfig(output_dir=str(tmp_path / "out"), share_prompt=False, **{**COMMON, **options})
    two_rows = SelectiveDPOTrainer(model=tiny_model_dir, ref_model=eager, args=args, train_dataset=preference_dataset(4))
    assert torch.isfinite(one_batch_loss(two_rows)[0])
    config = build_model(tiny_tokenizer).config
    config._attn_implementation, config.layer_types = "sdpa", ["sliding_attention", "full_attention"]
    assert "sliding-window" in packed_model_problem(config, "bool")
    config.layer_types = None
    assert packed_model_problem(config, "bool") is None and "'sdpa'" in packed_model_problem(config, "additive")


def test_different_prompts_in_a_pair_are_an_error():
    batch = DataCollatorForPreference(pad_token_id=0)([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}])
    batch["input_ids"][1, 0] = 9  # as if truncation had cut the rejected row's prompt differently
    with pytest.raises(ValueError, match="pair 0 of the batch carry different prompts"):
        pack_pairs(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
