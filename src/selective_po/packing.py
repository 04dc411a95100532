"""Shared-prompt forwards: each pair runs as one row, so its prompt is computed once, not twice.

Data flow: tokens (TRL's collated `[chosen; rejected]` rows) -> **one packed row per pair** (this
module) -> per-token log-probs, put back in the `(2B, T-1)` layout of the plain rows.

TRL scores a pair as two rows, `[prompt; chosen]` and `[prompt; rejected]`, so the backbone runs the
prompt twice (for the policy, with its backward, and again for a live reference). Here a pair is one
row

    prompt  |  chosen  |  prompt[-1]  rejected

with a 4D attention mask and position ids that make every token see exactly what it sees in its own
row: prompt and chosen tokens attend causally to prompt and chosen; the rejected segment attends to
`prompt[:-1]` and causally to itself, never to the chosen tokens. The rejected segment starts with a
copy of the prompt's last token, at the last prompt position: its hidden state is the prompt end's,
and it predicts the first rejected token (the prompt end itself predicts the first chosen token), so
every position has one label and TRL's fused LM head scores the row with `shift_labels`. The values
equal the two-row path up to float summation order (tested to 1e-5 in float32, with gradients).

It is exact only where the two rows really share the prompt and the attention takes the mask as
given; `share_prompt_problem` says when it does not, and the trainer refuses `share_prompt=True` then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

# Attention implementations that apply a custom 4D mask as given (and the mask form each takes).
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


@dataclass
class PackedPairs:
    """One row per pair. Every tensor is `(B, L)` except `attention_mask`, `(B, 1, L, L)`.

    Attributes:
        shift_labels: The token each position predicts (its label), -100 where none is scored.
        chosen_targets, rejected_targets: bool, the positions whose label is a chosen / rejected token.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    shift_labels: Tensor
    chosen_targets: Tensor
    rejected_targets: Tensor


def pack_pairs(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *, mask_kind: str = "bool") -> PackedPairs:
    """Pack TRL's `[chosen; rejected]` rows into one row per pair.

    Args:
        input_ids, attention_mask, completion_mask: Shape `(2B, T)`, as TRL's preference collator
            gives them (padding on either side; each row is prompt then completion).
        mask_kind: `"bool"` (True = may attend) or `"additive"` (0 or the dtype's minimum, float32).

    Raises:
        ValueError: a pair whose two rows carry different prompts (e.g. truncated from the left).
    """
    device, pairs = input_ids.device, input_ids.size(0) // 2
    real = attention_mask.bool().cpu()
    completion = completion_mask.bool().cpu()
    ids = input_ids.cpu()
    rows, prompt_lengths, chosen_lengths = [], [], []
    for i in range(pairs):
        prompt = ids[i][real[i] & ~completion[i]]
        if not torch.equal(prompt, ids[pairs + i][real[pairs + i] & ~completion[pairs + i]]):
            raise ValueError(
                f"share_prompt: the chosen and rejected rows of pair {i} of the batch carry different prompts (truncation "
                "cut them differently), so one forward cannot serve both. Set share_prompt=False, or truncation_mode="
                "'keep_start'."
            )
        chosen = ids[i][real[i] & completion[i]]
        rejected = ids[pairs + i][real[pairs + i] & completion[pairs + i]]
        rows.append((prompt, chosen, rejected))
        prompt_lengths.append(len(prompt))
        chosen_lengths.append(len(chosen))

    def rejected_segment(prompt, rejected):
        return torch.cat([prompt[-1:], rejected])  # empty prompt: no copy

    lengths = [len(p) + len(c) + len(rejected_segment(p, r)) for p, c, r in rows]
    width = max(lengths)
    packed_ids = torch.zeros(pairs, width, dtype=ids.dtype)
    labels = torch.full((pairs, width), -100, dtype=ids.dtype)
    chosen_targets = torch.zeros(pairs, width, dtype=torch.bool)
    rejected_targets = torch.zeros(pairs, width, dtype=torch.bool)
    for i, (prompt, chosen, rejected) in enumerate(rows):
        p, c = len(prompt), len(chosen)
        segment = rejected_segment(prompt, rejected)
        packed_ids[i, : lengths[i]] = torch.cat([prompt, chosen, segment])
        # Position t predicts token t + 1 of its own row; the first completion token of each side is predicted
        # by the prompt's end (for chosen: the real one; for rejected: its copy), or by nothing if no prompt.
        first = 0 if p > 0 else 1
        chosen_span = slice(p - 1 + first, max(p - 1 + c, p - 1 + first))  # never a negative end
        labels[i, chosen_span], chosen_targets[i, chosen_span] = chosen[first:], True
        start = p + c  # the rejected segment; its first position is the prompt end's copy (or, with no prompt, a token)
        rejected_span = slice(start, start + len(rejected) - first)
        labels[i, rejected_span], rejected_targets[i, rejected_span] = rejected[first:], True

    prompt_len = torch.tensor(prompt_lengths).view(-1, 1, 1)
    split = prompt_len + torch.tensor(chosen_lengths).view(-1, 1, 1)  # where the rejected segment starts
    end = torch.tensor(lengths).view(-1, 1, 1)
    query = torch.arange(width).view(1, -1, 1)
    key = torch.arange(width).view(1, 1, -1)
    causal = key <= query
    first_part = causal & (query < split) & (key < split)
    rejected_part = causal & (query >= split) & (query < end) & ((key < prompt_len - 1) | (key >= split))
    padding = (query >= end) & (key == query)  # padded positions see only themselves: no row is empty
    allowed = (first_part | rejected_part | padding).unsqueeze(1)  # (B, 1, L, L)

    positions = torch.arange(width).view(1, -1).expand(pairs, -1).clone()
    flat_split, flat_prompt, flat_end = split.view(-1, 1), prompt_len.view(-1, 1), end.view(-1, 1)
    in_rejected = (positions >= flat_split) & (positions < flat_end)
    rejected_positions = positions - flat_split + (flat_prompt - 1).clamp(min=0)
    positions = torch.where(in_rejected, rejected_positions, positions)
    positions = positions.masked_fill(positions >= flat_end, 0)

    if mask_kind == "bool":
        mask = allowed
    elif mask_kind == "additive":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        raise ValueError(f"mask_kind must be 'bool' or 'additive', got {mask_kind!r}.")
    return PackedPairs(
        input_ids=packed_ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        shift_labels=labels.to(device),
        chosen_targets=chosen_targets.to(device),
        rejected_targets=rejected_targets.to(device),
    )


def unpack(values: Tensor, packed: PackedPairs, shift_mask: Tensor) -> Tensor:
    """Per-token values of the packed rows, `(B, L)`, in the plain rows' layout `(2B, T-1)` (0 elsewhere).

    Keeps the autograd graph: the plain layout's values are the packed ones, moved.
    """
    flat = torch.cat([values[packed.chosen_targets], values[packed.rejected_targets]])
    if flat.numel() != int(shift_mask.sum()):
        raise RuntimeError(f"share_prompt: {flat.numel()} packed values for {int(shift_mask.sum())} completion positions.")
    return values.new_zeros(shift_mask.shape).masked_scatter(shift_mask, flat)


def unpack_order(values: Tensor, shift_mask: Tensor) -> Tensor:
    """Values of the plain layout `(2B, T-1)` at its completion positions, in the packed targets' order."""
    return values[shift_mask]  # row-major: chosen rows then rejected rows, as `unpack` fills them


def shared_prompt_forward(model, inputs: dict, *, mask_kind: str, score_mask: Tensor | None = None, **model_kwargs):
    """TRL's fused-LM-head forward over packed pairs, its per-token fields put back in the plain layout.

    Returns what `model(..., labels=labels, fused_lm_head=True)` returns on the plain rows: a
    `FusedCausalLMOutput` whose `log_probs`, `entropy`, `mean_logits` and `is_top1` are `(2B, T-1)`.
    `score_mask` `(2B, T-1)`, a subset of the completion positions, limits the LM head to those
    positions (0 elsewhere).
    """
    packed = pack_pairs(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], mask_kind=mask_kind)
    shift_mask = inputs["completion_mask"][:, 1:].bool()
    if score_mask is not None:
        keep = unpack_order(score_mask, shift_mask)  # one flag per packed target, in the packed order
        targets = torch.cat([packed.chosen_targets.nonzero(), packed.rejected_targets.nonzero()])  # (N, 2)
        dropped = targets[~keep.to(targets.device)]
        packed.shift_labels[dropped[:, 0], dropped[:, 1]] = -100
    outputs = model(
        input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids,
        shift_labels=packed.shift_labels, fused_lm_head=True, use_cache=False, **model_kwargs,
    )  # fmt: skip
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    moved = {name: unpack(getattr(outputs, name), packed, shift_mask) for name in fields if getattr(outputs, name) is not None}
    return dataclasses.replace(outputs, **moved, label_mask=shift_mask)


def moe_aux_loss_coef(model_config, router_aux_loss_coef: float | None) -> float:
    """The weight TRL gives a mixture-of-experts model's load-balancing loss (0 for any other model)."""
    text_config = model_config.get_text_config()
    if not hasattr(text_config, "output_router_logits"):  # TRL's test for a model with a router
        return 0.0
    return getattr(text_config, "router_aux_loss_coef", 0.0) if router_aux_loss_coef is None else router_aux_loss_coef


def share_prompt_problem(*, model_config, truncation_mode: str, padding_free: bool, extra_inputs: bool,
                         aux_loss_coef: float = 0.0) -> str | None:  # fmt: skip
    """Why packing pairs would not be exact for this run, or `None` when it is."""
    implementation = getattr(model_config, "_attn_implementation", None)
    if implementation not in MASK_KINDS:
        return (f"the attention implementation is {implementation!r}; a shared prompt needs one that applies a custom 4D "
                f"mask as given ({', '.join(MASK_KINDS)})")  # fmt: skip
    if _has_sliding_window(model_config):
        return "the model has sliding-window layers, whose window a custom 4D mask would replace"
    if aux_loss_coef:
        # Routing is per token, so the log-probs would be exact; the load-balancing loss counts tokens, and TRL's
        # two rows count every prompt token twice.
        return (f"the model is a mixture of experts whose load-balancing loss (router_aux_loss_coef={aux_loss_coef}) "
                "would count each prompt's tokens once, where TRL's two rows count them twice")  # fmt: skip
    if truncation_mode != "keep_start":
        return f"truncation_mode={truncation_mode!r} can cut the chosen and rejected rows' prompts differently"
    if padding_free:
        return "padding_free=True packs rows on its own"
    if extra_inputs:
        return "the batch has inputs besides token ids (e.g. images), which would need packing too"
    return None


def _has_sliding_window(model_config) -> bool:
    text_config = model_config.get_text_config()
    return bool(getattr(text_config, "use_sliding_window", False)) or "sliding_attention" in (getattr(text_config, "layer_types", None) or ())


def packed_model_problem(model_config, mask_kind: str) -> str | None:
    """Why a reference-side model (reference, scorer, oracle) cannot run the policy's packed rows, whose
    mask is of form `mask_kind`, or `None` when it can: the policy alone settled `share_prompt`."""
    implementation = getattr(model_config, "_attn_implementation", None)
    if MASK_KINDS.get(implementation) != mask_kind:
        needed = next(name for name, kind in MASK_KINDS.items() if kind == mask_kind)
        return f"its attention implementation is {implementation!r}, not the policy's {needed!r} that the packed rows' mask is built for"
    if _has_sliding_window(model_config):
        return "it has sliding-window layers, whose window a custom 4D mask would replace"
    return None


def resolve_share_prompt(trainer) -> str | None:
    """The attention-mask form of the shared-prompt forward for this trainer, or `None` when pairs run as two rows."""
    from accelerate.utils import is_peft_model

    args = trainer.args
    if args.share_prompt is False or not args.uses_selection:
        return None
    if args.share_prompt is None and trainer.accelerator.device.type != "cpu":
        # Measured on an H200 (docs/performance.md): packed steps saved memory but were 0-8% slower than
        # two rows, so the default is two rows there; True still packs.
        return None
    peft = is_peft_model(trainer.model)
    model = trainer.model.get_base_model() if peft else trainer.model
    prompt_learning = peft and any(getattr(c, "is_prompt_learning", False) for c in trainer.model.peft_config.values())
    problem = share_prompt_problem(
        model_config=model.config, truncation_mode=args.truncation_mode, padding_free=trainer.padding_free,
        extra_inputs=prompt_learning or getattr(trainer, "_is_vlm", False),
        aux_loss_coef=moe_aux_loss_coef(model.config, args.router_aux_loss_coef),
    )  # fmt: skip
    if problem is None:
        return mask_kind_for(model.config)
    if args.share_prompt:
        raise ValueError(f"share_prompt=True is not exact here: {problem}. Set share_prompt=False (or leave it unset).")
    return None


def mask_kind_for(model_config) -> str:
    return MASK_KINDS[model_config._attn_implementation]


def prompt_token_share(batch: dict) -> float:
    """Share of a batch's real tokens that are prompt tokens (what sharing the prompt saves, per side)."""
    real = batch["attention_mask"].bool()
    prompt = real & ~batch["completion_mask"].bool()
    return float(prompt.sum() / real.sum())
