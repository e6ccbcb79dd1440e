"""Loaders for the real data sets the experiments use, read from ``$SPARSEMOE_DATA_DIR``."""

from .movielens import MovieLens, load_movielens
from .multimnist import MultiMNIST, load_multimnist

__all__ = ["MovieLens", "MultiMNIST", "load_movielens", "load_multimnist"]
