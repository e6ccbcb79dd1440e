"""sparsemoe: sparse Mixture-of-Experts layers with every major gate and exact-sparse dispatch.

>>> import torch, sparsemoe
>>> moe = sparsemoe.MoE(d_model=64, d_hidden=128, num_experts=8, gate="comet", k=2)
>>> y = moe(torch.randn(4, 10, 64))
>>> loss = y.pow(2).mean() + sparsemoe.aux_loss(moe)

``sparsemoe.dispatch`` is the dispatch module (its function is ``sparsemoe.dispatch.dispatch``), so
that ``import sparsemoe.dispatch`` and ``sparsemoe.dispatch`` name the same thing.
"""

from . import dispatch, gates, kernels, training
from .checkpoint import load_checkpoint, save_checkpoint
from .dispatch import reference_dispatch
from .experts import ExpertBank, ModuleExperts, StackedExperts
from .gates import GateSpec, update_balance
from .hf import moefy
from .layers import CGC, MoE, MoELayer, MultiTaskMoE, aux_loss, routing_stats
from .routing import Routing, RoutingStats
from .search import PermutationSearch

__version__ = "0.1.0"

__all__ = [
    "CGC",
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
    "kernels",
    "load_checkpoint",
    "moefy",
    "reference_dispatch",
    "routing_stats",
    "save_checkpoint",
    "training",
    "update_balance",
]
