"""Hugging Face encoders as sparse MoEs: convert (MoEBERT), importance, distil, save, predict.

Nothing here imports ``transformers`` at import time; the functions that build Hugging Face
objects import it when called (install the ``hf`` extra).
"""

from .convert import MoEFFN, MoefyConfig, expert_neurons, ffn_blocks, moefy
from .importance import ffn_importance
from .io import load_moefied, save_moefied

__all__ = [
    "MoEFFN",
    "MoefyConfig",
    "expert_neurons",
    "ffn_blocks",
    "ffn_importance",
    "load_moefied",
    "moefy",
    "save_moefied",
]
