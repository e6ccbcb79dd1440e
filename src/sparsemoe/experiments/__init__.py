"""Experiments runnable as ``sparsemoe reproduce NAME`` (plus ``sparsemoe demo``).

Each experiment module exposes ``add_arguments(parser)`` and ``run(args) -> dict`` and writes its
results to ``results/<name>/`` (results.json, table.md, PNG plots). Modules are imported only when
their command is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: name -> module implementing it
EXPERIMENTS: dict[str, str] = {}


def register(name: str, module: str) -> None:
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} is already registered")
    EXPERIMENTS[name] = module


def load(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return importlib.import_module(EXPERIMENTS[name])


register("comet-movielens", "sparsemoe.experiments.comet_movielens")
register("comet-multimnist", "sparsemoe.experiments.comet_multimnist")
register("comet-tuning", "sparsemoe.experiments.comet_tuning")
register("moebert-sst2", "sparsemoe.experiments.moebert_sst2")
