"""Hugging Face models as sparse MoEs: encoders (MoEBERT), causal LMs (upcycling), distil, save, predict.

Nothing here imports ``transformers`` at import time; the functions that build Hugging Face
objects import it when called (install the ``hf`` extra). Importing it registers sparsemoe's
dispatch as the Hugging Face experts implementation ``"sparsemoe"`` (:mod:`sparsemoe.hf.backend`).
"""

from .backend import EXPERTS_IMPLEMENTATION, register_experts_backend
from .convert import MoEFFN, MoefyConfig, expert_neurons, ffn_blocks, moefy
from .export import export_mixtral, export_qwen2_moe
from .importance import ffn_importance
from .io import load_moefied, save_moefied
from .upcycle import UpcycleConfig, upcycle

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "MoEFFN",
    "MoefyConfig",
    "UpcycleConfig",
    "expert_neurons",
    "export_mixtral",
    "export_qwen2_moe",
    "ffn_blocks",
    "ffn_importance",
    "load_moefied",
    "moefy",
    "register_experts_backend",
    "save_moefied",
    "upcycle",
]

register_experts_backend()
