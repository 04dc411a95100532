"""SePOTrainer on a tiny model: stored oracle rewards, reference-free loss, controls, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, build_tokenizer, preference_dataset
from selective_po import SePOConfig, SePOTrainer, sepo_loss
from selective_po.reference_cache import ReferenceLogpsStore
import selective_po.trainer as trainer_module
from selective_po.trainer import policy_forward
from test_trainer import COMMON, one_batch_loss


def make(tmp_path, model_dir, oracle_dirs, **overrides):
    args = SePOConfig(
        output_dir=str(tmp_path / "out"),
        oracle_model_name_or_path=oracle_dirs["oracle"],
        oracle_ref_model_name_or_path=oracle_dirs["oracle_ref"],
        ref_logps_cache_dir=str(tmp_path / "cache"),
        **{**COMMON, **overrides},
    )
    return SePOTrainer(model=model_dir, args=args, train_dataset=preference_dataset())


def direct_logps(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt_ids) - 1 :]


def test_stored_rewards_are_oracle_minus_its_reference(tmp_path, tiny_model_dir, oracle_dirs):
    from transformers import AutoModelForCausalLM

    trainer = make(tmp_path, tiny_model_dir, oracle_dirs)
    assert trainer.ref_model is None
    oracle = AutoModelForCausalLM.from_pretrained(oracle_dirs["oracle"])
    oracle_ref = AutoModelForCausalLM.from_pretrained(oracle_dirs["oracle_ref"])
    for i in (0, 5):
        row = trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            expected = direct_logps(oracle, row["prompt_ids"], row[f"{side}_ids"]) - direct_logps(
                oracle_ref, row["prompt_ids"], row[f"{side}_ids"]
            )
            stored = torch.tensor(row[f"oracle_{side}_token_rewards"])
            torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-4)


def test_loss_is_sepo_on_the_policy_alone(tmp_path, tiny_model_dir, oracle_dirs):
    trainer = make(tmp_path, tiny_model_dir, oracle_dirs, beta=2.0, sepo_gamma=0.1)
    loss, _, metrics = one_batch_loss(trainer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
    rewards = batch["token_rewards"]
    expected = sepo_loss(
        *policy.chunk(2), *rewards.chunk(2), chosen_mask=mask.chunk(2)[0], rejected_mask=mask.chunk(2)[1],
        chosen_share=0.3, rejected_share=0.3, beta=2.0, gamma=0.1,
    )  # fmt: skip
    torch.testing.assert_close(loss, expected.losses.mean())
    assert 0.3 <= metrics["selection/kept_share_chosen"] < 0.5  # ceil(0.3 n) of short responses
    assert metrics["selection/score_kept_chosen"] > metrics["selection/score_dropped_chosen"]
    assert metrics["selection/score_kept_rejected"] < metrics["selection/score_dropped_rejected"]


def test_training_run_and_controls(tmp_path, tiny_model_dir, oracle_dirs):
    for rule in ("scores", "random", "all"):
        trainer = make(
            tmp_path / rule, tiny_model_dir, oracle_dirs, selection_rule=rule, max_steps=3, learning_rate=5e-3,
            logging_steps=1, save_strategy="no",
        )  # fmt: skip
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
        last = [e for e in trainer.state.log_history if "loss" in e][-1]
        share = last["selection/kept_share_chosen"]
        assert share == 1.0 if rule == "all" else 0.3 <= share < 0.5, (rule, share)


def test_oracle_change_rescores(tmp_path, tiny_tokenizer, tiny_model_dir, oracle_dirs, monkeypatch):
    first = make(tmp_path, tiny_model_dir, oracle_dirs).reference_stores["train"]
    build_model(tiny_tokenizer, seed=9).save_pretrained(oracle_dirs["oracle"])
    written = []
    original = ReferenceLogpsStore.write_shard
    monkeypatch.setattr(ReferenceLogpsStore, "write_shard", lambda self, s, *a: (written.append(s.index), original(self, s, *a))[1])
    second = make(tmp_path, tiny_model_dir, oracle_dirs).reference_stores["train"]
    assert second != first and written


def test_oracle_with_another_vocabulary_is_an_error(tmp_path, tiny_model_dir, oracle_dirs):
    other = build_tokenizer(vocab_size=280, seed_texts=["unrelated text entirely"] * 3)
    build_model(other).save_pretrained(oracle_dirs["oracle"])
    other.save_pretrained(oracle_dirs["oracle"])
    with pytest.raises(ValueError, match="different vocabulary"):
        make(tmp_path, tiny_model_dir, oracle_dirs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sepo_chosen_share": 0.0}, r"sepo_chosen_share=0.0 is out of range"),
        ({"sepo_rejected_share": 1.5}, r"sepo_rejected_share=1.5 is out of range"),
        ({"oracle_model_name_or_path": None}, "SePO needs oracle_model_name_or_path"),
        ({"precompute_ref_log_probs": False}, "leave precompute_ref_log_probs=True"),
        ({"ref_model_name_or_path": "x"}, "without a reference model"),
        ({"loss_type": "sdpo"}, r"Unknown loss_type \['sdpo'\]. Allowed: sepo"),
        ({"selection_rule": "best"}, "selection_rule='best' is unknown"),
        ({"selection_rule": "confidence"}, "picks SePO's tokens without an oracle .* oracle_model_name_or_path and oracle_ref"),
        ({"selection_rule": "spans", "oracle_model_name_or_path": None}, "so oracle_ref_model_name_or_path would go unused"),
        ({"selection_rule": "spans", "oracle_model_name_or_path": None, "oracle_ref_model_name_or_path": None,
          "map_across_tokenizers": True}, "so map_across_tokenizers would go unused: leave it unset"),
        ({"sdpo_count_rule": "quantile"}, "sdpo_count_rule applies to Selective-DPO"),
        ({"sdpo_count_rule": "floor"}, "sdpo_count_rule='floor' is unknown"),
    ],
)
def test_config_errors(overrides, message):
    values = {"oracle_model_name_or_path": "o", "oracle_ref_model_name_or_path": "r", **overrides}
    with pytest.raises(ValueError, match=message):
        SePOConfig(output_dir="unused", report_to="none", **values)


def test_weak_to_strong_oracle_smaller_than_the_policy(tmp_path, tiny_tokenizer):
    """A 1-layer, 16-wide oracle pair scores tokens for a 3-layer, 48-wide policy."""
    dirs = {}
    for name, (layers, hidden, seed) in {"policy": (3, 48, 1), "oracle": (1, 16, 2), "oracle_ref": (1, 16, 3)}.items():
        dirs[name] = str(tmp_path / name)
        build_model(tiny_tokenizer, seed=seed, layers=layers, hidden=hidden).save_pretrained(dirs[name])
        tiny_tokenizer.save_pretrained(dirs[name])
    trainer = make(tmp_path, dirs["policy"], dirs, max_steps=2, learning_rate=5e-3, logging_steps=1, save_strategy="no")
    assert trainer.model.config.hidden_size == 48
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(0.3 <= e["selection/kept_share_chosen"] < 0.5 for e in logs)


def test_the_lm_head_projects_only_the_selected_tokens(tmp_path, tiny_model_dir, oracle_dirs, monkeypatch):
    """SePO's selection is known from the stored rewards before the forward: only kept positions are projected,
    and loss and gradients equal those of projecting every completion position."""
    import trl.trainer.utils as trl_utils

    trainer = make(tmp_path, tiny_model_dir, oracle_dirs)
    # The noise bound is measured once, on the first batch, with forwards of every position: measure it first.
    trainer.score_noise_bound(trainer.model, trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)])))
    projected = []
    original = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda hidden, *a: (projected.append(hidden.shape[0]), original(hidden, *a))[1])
    loss, grads, _ = one_batch_loss(trainer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    kept = int(score_mask_of(trainer, batch).sum())
    assert projected == [kept] and kept < int(batch["completion_mask"][:, 1:].sum())

    every_position = lambda model, inputs, shared, score_mask=None, aux_loss=False, forward=trainer_module.policy_forward: forward(model, inputs, shared, aux_loss=aux_loss)  # noqa: E731
    monkeypatch.setattr(trainer_module, "policy_forward", every_position)
    full_loss, full_grads, _ = one_batch_loss(trainer)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def score_mask_of(trainer, batch) -> torch.Tensor:
    """SePO's kept positions `(2B, T-1)`, known from stored values before the policy's forward."""
    return torch.cat(trainer.method.weights(trainer.token_values(batch), trainer.noise_bound))


def oracle_free(tmp_path, model_dir, dataset, **overrides) -> SePOTrainer:
    args = SePOConfig(output_dir=str(tmp_path / "out"), ref_logps_cache_dir=str(tmp_path / "cache"), **{**COMMON, **overrides})
    return SePOTrainer(model=model_dir, args=args, train_dataset=dataset)


def test_confidence_trains_sepo_on_the_policys_unsure_tokens_with_no_oracle(tmp_path, tiny_model_dir):
    trainer = oracle_free(tmp_path, tiny_model_dir, preference_dataset(), selection_rule="confidence", beta=2.0, sepo_gamma=0.1)
    assert trainer.reference_stores == {} and not (tmp_path / "cache").exists()  # no second model scored anything
    loss, grads, metrics = one_batch_loss(trainer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
    # float64 reference: keep each response's tokens whose probability is below the response's mean
    logps, mask = policy.double(), mask.bool()
    p = logps.exp()
    mean = (p * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
    keep = mask & (p < mean)
    u = 2.0 * (logps * keep).sum(-1) / keep.sum(-1).clamp(min=1)
    expected = -torch.nn.functional.logsigmoid(u[:4] - u[4:] - 0.1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert grads and 0 < metrics["selection/kept_share_chosen"] < 1
    assert metrics["selection/score_kept_chosen"] > metrics["selection/score_dropped_chosen"]  # kept: higher 1 - p


def test_spans_train_sepo_on_exactly_the_named_tokens_with_no_oracle(tmp_path, tiny_model_dir, tiny_tokenizer):
    from test_spans import with_answer_spans

    trainer = oracle_free(tmp_path, tiny_model_dir, with_answer_spans(preference_dataset(4)), selection_rule="spans")
    loss, _, metrics = one_batch_loss(trainer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    score_mask = score_mask_of(trainer, batch)  # known before the forward: the LM head projects only these
    targets = batch["input_ids"][:, 1:]
    for r in range(8):
        side, row = ("chosen", "rejected")[r // 4], trainer.train_dataset[r % 4]
        (start, end), content = row[f"{side}_spans"][0], row[side][-1]["content"]
        assert tiny_tokenizer.decode(targets[r][score_mask[r]].tolist()).strip() == content[start:end]
    with torch.no_grad():
        _, policy, mask = policy_forward(trainer.model, batch, trainer._shared_prompt_mask)
    logps, keep = policy.double(), score_mask
    u = (logps * keep).sum(-1) / keep.sum(-1)
    torch.testing.assert_close(loss.double(), -torch.nn.functional.logsigmoid(u[:4] - u[4:]).mean(), rtol=1e-5, atol=1e-6)
    assert metrics["selection/score_kept_chosen"] == 1.0 and metrics["selection/score_dropped_chosen"] == 0.0
