"""sparsemoe: sparse Mixture-of-Experts layers with every major gate and exact-sparse dispatch.

>>> import torch, sparsemoe
>>> moe = sparsemoe.MoE(d_model=64, d_hidden=128, num_experts=8, gate="comet", k=2)
>>> y = moe(torch.randn(4, 10, 64))
>>> loss = y.pow(2).mean() + sparsemoe.aux_loss(moe)
"""

from . import gates
from .checkpoint import load_checkpoint, save_checkpoint
from .dispatch import dispatch, reference_dispatch
from .experts import ExpertBank, ModuleExperts, StackedExperts
from .gates import GateSpec, update_balance
from .hf import moefy
from .layers import MoE, MoELayer, MultiTaskMoE, aux_loss, routing_stats
from .routing import Routing, RoutingStats
from .search import PermutationSearch

__version__ = "0.1.0"

__all__ = [
    "ExpertBank",
    "GateSpec",
    "MoE",
    "MoELayer",
    "ModuleExperts",
    "MultiTaskMoE",
    "PermutationSearch",
    "Routing",
    "RoutingStats",
    "StackedExperts",
    "aux_loss",
    "dispatch",
    "gates",
    "load_checkpoint",
    "moefy",
    "reference_dispatch",
    "routing_stats",
    "save_checkpoint",
    "update_balance",
]
