"""Per-token log-probs computed only where they are used.

Data flow: tokens -> **per-token log-probs** (this module and the trainer's forwards) -> token scores.

Every forward here goes through TRL's fused LM head (`model(..., labels=labels, fused_lm_head=True)`,
see `trl.trainer.utils.add_fused_lm_head`): the backbone runs once and the head projects, in tiles,
without materializing `(batch, seq_len, vocab)` logits, with its own backward. On CUDA and XPU TRL
projects only the positions whose label is not -100 (completion tokens). Elsewhere, CPU included,
TRL 1.16 projects every position, prompt and padding too, because fixed tile shapes avoid
recompilation on devices such as Neuron. A CPU recompiles nothing, and there that choice costs more
than the backbone: a no-grad forward over 32 rows of 105 tokens (half of them completion tokens)
took 10.0 s with every position projected and 4.7 s with the backbone plus the completion positions
only (`benchmarks/step_time.py` has the training-step figures).

`compact_lm_head()` makes TRL's head take its compact path on a CPU too. It is TRL's own code and
kernel, so the values, gradients, logit scaling and soft-capping are exactly TRL's; only the set of
positions projected changes, and positions outside it are 0 either way. It relies on TRL 1.16's
private `trl.trainer.utils._use_triton`, which decides that path; `tests/test_logprobs.py` fails if
it moves.

`run_in_float32` runs a no-grad forward in float32 whatever the weights' dtype and the run's autocast,
for `score_dtype="float32"`: scores made of bf16 log-probs carry bf16's rounding noise, which can
exceed the true gaps between tokens (`docs/selection.md`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import trl.trainer.utils as trl_utils

T = TypeVar("T")

_TRL_USE_TRITON = getattr(trl_utils, "_use_triton", None)


def _compact_anywhere_but_neuron(device) -> bool:
    return _TRL_USE_TRITON(device) or device.type == "cpu"


@contextlib.contextmanager
def compact_lm_head() -> Iterator[None]:
    """Within this block, TRL's fused LM head projects only positions with a label (on CPU as on CUDA).

    Only the choice of positions in `trl.trainer.utils` changes; the tile kernels still pick Triton or
    torch by their own test, so a CPU runs torch tiles. Forwards run inside the block; their backward
    may run after it (it does not consult the choice).
    """
    if _TRL_USE_TRITON is None:
        raise RuntimeError(
            "trl.trainer.utils._use_triton is gone: this TRL release chooses the LM head's compact path another way. "
            "selective-po supports TRL 1.16.x; install it (`pip install 'trl>=1.16,<1.17'`)."
        )
    previous = trl_utils._use_triton
    trl_utils._use_triton = _compact_anywhere_but_neuron
    try:
        yield
    finally:
        trl_utils._use_triton = previous


class _Call(torch.nn.Module):
    """`call(inner)` as a module's forward, so that `torch.func.functional_call` can swap `inner`'s tensors."""

    def __init__(self, inner: torch.nn.Module, call: Callable[[torch.nn.Module], T]):
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self) -> T:
        return self.call(self.inner)


@contextlib.contextmanager
def _without_mixed_precision_wrapper(module: torch.nn.Module) -> Iterator[None]:
    """accelerate wraps a prepared model's `forward` in autocast (keeping the original as `_original_forward`, as its
    own `unwrap_model(keep_fp32_wrapper=False)` reads it); set that wrapper aside for the block, then put it back."""
    original = module.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = module.__dict__["forward"]
    module.forward = original
    try:
        yield
    finally:
        module.forward = wrapped


@contextlib.contextmanager
def _highest_float32_matmuls() -> Iterator[None]:
    """float32 matmuls in full precision for the block (CUDA would otherwise allow TF32's 10-bit mantissa)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def run_in_float32(module: torch.nn.Module, call: Callable[[torch.nn.Module], T]) -> T:
    """`call(module)` computed in float32, for no-grad scoring passes (`score_dtype="float32"`).

    bf16 and fp16 weights and buffers are replaced, for this call only, by float32 copies
    (`torch.func.functional_call`: the module itself is not changed; the copies cost 4 bytes a
    parameter while they live); autocast is off, accelerate's mixed-precision wrapper is set aside, and
    float32 matmuls run at full precision.

    Args:
        module: An unwrapped model (no DDP or DeepSpeed engine around it).
        call: What to compute with it, e.g. `lambda m: forward_logps(m, batch)`.

    Raises:
        ValueError: The module holds quantized (non-floating) weights, or sharded ones (ZeRO-3, FSDP) that
            would need upcasting: neither can run in float32 here.
    """
    params = dict(module.named_parameters())
    quantized = sorted(name for name, p in params.items() if not p.is_floating_point())
    if quantized:
        raise ValueError(
            f"score_dtype='float32' cannot run a quantized model in float32 (e.g. {quantized[0]!r} is "
            f"{params[quantized[0]].dtype}): its layers compute in their quantization's compute dtype. Leave score_dtype "
            "unset, or load the model unquantized."
        )
    tensors = {**params, **dict(module.named_buffers())}
    narrow = [name for name, t in tensors.items() if t.dtype in (torch.bfloat16, torch.float16)]  # float64 stays as it is
    sharded = [name for name in narrow if hasattr(tensors[name], "ds_id") or type(tensors[name]).__name__ == "DTensor"]
    if sharded:
        raise ValueError(
            f"score_dtype='float32' cannot upcast sharded {tensors[sharded[0]].dtype} weights (ZeRO-3 or FSDP; e.g. "
            f"{sharded[0]!r}). Load the model in float32 and train with bf16=True (autocast), or use ZeRO-2/DDP."
        )
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    with _without_mixed_precision_wrapper(module), torch.autocast(device.type, enabled=False), _highest_float32_matmuls():
        if not narrow:
            return call(module)
        upcast = {f"inner.{name}": tensors[name].float() for name in narrow}
        return torch.func.functional_call(_Call(module, call), upcast, ())
