"""Models built from sparsemoe layers, as used by the demo and the experiments."""

from .mmoe import MMoE, Tower

__all__ = ["MMoE", "Tower"]
