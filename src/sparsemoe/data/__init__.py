"""Loaders for the real data sets the experiments use, read from the data folder (see :func:`data_root`)."""

from ._paths import DATA_ENV, data_dir, data_root
from .movielens import MovieLens, load_movielens
from .multimnist import MultiMNIST, load_multimnist

__all__ = ["DATA_ENV", "MovieLens", "MultiMNIST", "data_dir", "data_root", "load_movielens", "load_multimnist"]
