"""selective-po: token-selective preference optimization on top of TRL.

Data flows one way, one module per stage:
    data.py (preference pairs) -> TRL tokenization -> per-token log-probs (trainer.py)
    -> scoring.py (token scores) -> selection.py (keep mask) -> losses.py (per-example loss)
    -> trainer.py (wires it into TRL's DPOTrainer)
"""

from .config import SelectiveDPOConfig
from .losses import SelectiveDPOOutput, dpo_sigmoid_loss, masked_sum, select_sdpo_tokens, selective_dpo_loss
from .scoring import sdpo_token_scores
from .selection import keep_counts, top_share_mask
from .trainer import SelectiveDPOTrainer
from .data import load_preference_dataset

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
