"""sparsemoe: sparse Mixture-of-Experts layers with every major gate and exact-sparse dispatch.

>>> import torch, sparsemoe
>>> moe = sparsemoe.MoE(d_model=64, d_hidden=128, num_experts=8, gate="comet", k=2)
>>> y = moe(torch.randn(4, 10, 64))
>>> loss = y.pow(2).mean() + moe.aux_loss()
"""

from . import gates
from .checkpoint import load_checkpoint, save_checkpoint
from .dispatch import dispatch, reference_dispatch
from .experts import ExpertBank, ModuleExperts, StackedExperts
from .hf import moefy
from .layers import MoE, MultiTaskMoE
from .routing import Routing, RoutingStats
from .search import PermutationSearch

__version__ = "0.1.0"

__all__ = [
    "ExpertBank",
    "MoE",
    "ModuleExperts",
    "MultiTaskMoE",
    "PermutationSearch",
    "Routing",
    "RoutingStats",
    "StackedExperts",
    "dispatch",
    "gates",
    "load_checkpoint",
    "moefy",
    "reference_dispatch",
    "save_checkpoint",
]
