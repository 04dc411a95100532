"""selective-po: token-selective preference optimization on top of TRL.

Data flows one way, one module per stage:
    data.py (preference pairs) -> TRL tokenization -> per-token log-probs (the policy's in trainer.py;
    the other models' in references.py, live or stored once by reference_cache.py), gathered per batch as
    token_values.py's TokenValues -> scoring.py (a scorer: token scores) -> weighting.py (a weighting: a
    keep mask or weights; selection.py holds the mask primitives) -> losses.py (a loss: per-example
    values). methods.py names each method's composition of the three; trainer.py wires it into TRL's
    DPOTrainer. noise.py measures how far scores may lie from their exact values, which
    selection.py uses so that rounding never chooses tokens. parity.py says what each TRL option does under the selective losses.
"""

import warnings

# TRL 1.16 calls transformers' renamed gradient-checkpointing helpers on every step; the warnings
# are about TRL's code, not the user's, and nothing the user can change silences them.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)

from .config import SelectiveDPOConfig, SePOConfig  # noqa: E402
from .data import load_preference_dataset  # noqa: E402
from .losses import SelectiveDPOOutput, SelectiveLossOutput, dpo_sigmoid_loss, masked_sum  # noqa: E402
from .methods import (  # noqa: E402
    Method,
    method_for,
    select_sdpo_tokens,
    selective_dpo_loss,
    sepo_loss,
    tgdpo_loss,
    tisdpo_loss,
)
from .noise import NoiseBound  # noqa: E402
from .scoring import sdpo_token_scores  # noqa: E402
from .selection import keep_counts, random_share_mask, rows_with_signal, select_tokens, top_share_mask  # noqa: E402
from .token_values import TokenScores, TokenValues  # noqa: E402
from . import losses as _losses, methods as _methods  # noqa: E402

# The compositions on plain tensors were once defined in `losses`; their old import path still works.
for _name in ("kept_token_sums", "noise_diagnostics", "select_sdpo_tokens", "selective_dpo_loss", "sepo_keep_masks", "sepo_loss"):
    setattr(_losses, _name, getattr(_methods, _name))
from .trainer import SelectiveDPOTrainer, SePOTrainer  # noqa: E402

__all__ = [
    "Method",
    "NoiseBound",
    "SePOConfig",
    "SePOTrainer",
    "SelectiveDPOConfig",
    "SelectiveDPOOutput",
    "SelectiveDPOTrainer",
    "SelectiveLossOutput",
    "TokenScores",
    "TokenValues",
    "dpo_sigmoid_loss",
    "keep_counts",
    "load_preference_dataset",
    "masked_sum",
    "method_for",
    "random_share_mask",
    "rows_with_signal",
    "sdpo_token_scores",
    "select_sdpo_tokens",
    "select_tokens",
    "selective_dpo_loss",
    "sepo_loss",
    "tgdpo_loss",
    "tisdpo_loss",
    "top_share_mask",
]
__version__ = "0.1.0"
