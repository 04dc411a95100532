"""selective-po: token-selective preference optimization on top of TRL.

Data flows one way, one module per stage:
    data.py (preference pairs) -> TRL tokenization -> per-token log-probs (the policy's in trainer.py;
    the reference side's in references.py, live or stored once by reference_cache.py) -> scoring.py
    (token scores) -> selection.py (keep mask) -> losses.py (per-example loss) -> trainer.py (wires it
    into TRL's DPOTrainer). noise.py measures how far scores may lie from their exact values, which
    selection.py uses so that rounding never chooses tokens. parity.py says what each TRL option does under the selective losses.
"""

import warnings

# TRL 1.16 calls transformers' renamed gradient-checkpointing helpers on every step; the warnings
# are about TRL's code, not the user's, and nothing the user can change silences them.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)

from .config import SelectiveDPOConfig, SePOConfig  # noqa: E402
from .data import load_preference_dataset  # noqa: E402
from .losses import (  # noqa: E402
    SelectiveDPOOutput,
    SelectiveLossOutput,
    dpo_sigmoid_loss,
    masked_sum,
    select_sdpo_tokens,
    selective_dpo_loss,
    sepo_loss,
)
from .noise import NoiseBound  # noqa: E402
from .scoring import sdpo_token_scores  # noqa: E402
from .selection import keep_counts, random_share_mask, rows_with_signal, select_tokens, top_share_mask  # noqa: E402
from .trainer import SelectiveDPOTrainer, SePOTrainer  # noqa: E402

__all__ = [
    "NoiseBound",
    "SePOConfig",
    "SePOTrainer",
    "SelectiveDPOConfig",
    "SelectiveDPOOutput",
    "SelectiveDPOTrainer",
    "SelectiveLossOutput",
    "dpo_sigmoid_loss",
    "keep_counts",
    "load_preference_dataset",
    "masked_sum",
    "random_share_mask",
    "rows_with_signal",
    "sdpo_token_scores",
    "select_sdpo_tokens",
    "select_tokens",
    "selective_dpo_loss",
    "sepo_loss",
    "top_share_mask",
]
__version__ = "0.1.0"
