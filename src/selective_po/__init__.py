"""selective-po: token-selective preference optimization on top of TRL.

Data flows one way, one module per stage:
    data.py (preference pairs) -> TRL tokenization -> per-token log-probs (trainer.py; the
    reference's may be stored once by reference_cache.py) -> scoring.py (token scores) -> selection.py (keep mask) -> losses.py (per-example loss)
    -> trainer.py (wires it into TRL's DPOTrainer)
"""

import warnings

# TRL 1.16 calls transformers' renamed gradient-checkpointing helpers on every step; the warnings
# are about TRL's code, not the user's, and nothing the user can change silences them.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)

from .config import SelectiveDPOConfig  # noqa: E402
from .data import load_preference_dataset  # noqa: E402
from .losses import SelectiveDPOOutput, dpo_sigmoid_loss, masked_sum, select_sdpo_tokens, selective_dpo_loss  # noqa: E402
from .scoring import sdpo_token_scores  # noqa: E402
from .selection import keep_counts, top_share_mask  # noqa: E402
from .trainer import SelectiveDPOTrainer  # noqa: E402

__all__ = [
    "SelectiveDPOConfig",
    "SelectiveDPOOutput",
    "SelectiveDPOTrainer",
    "dpo_sigmoid_loss",
    "keep_counts",
    "load_preference_dataset",
    "masked_sum",
    "sdpo_token_scores",
    "select_sdpo_tokens",
    "selective_dpo_loss",
    "top_share_mask",
]
__version__ = "0.1.0"
