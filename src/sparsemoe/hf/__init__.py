"""Hugging Face models as sparse MoEs: encoders (MoEBERT), causal LMs (upcycling), distil, save, predict.

Nothing here imports ``transformers`` at import time; the functions that build Hugging Face
objects import it when called (install the ``hf`` extra).
"""

from .convert import MoEFFN, MoefyConfig, expert_neurons, ffn_blocks, moefy
from .importance import ffn_importance
from .io import load_moefied, save_moefied
from .upcycle import UpcycleConfig, upcycle

__all__ = [
    "MoEFFN",
    "MoefyConfig",
    "UpcycleConfig",
    "expert_neurons",
    "ffn_blocks",
    "ffn_importance",
    "load_moefied",
    "moefy",
    "save_moefied",
    "upcycle",
]
