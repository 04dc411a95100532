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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trl.trainer.utils as trl_utils

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
