"""Experiments runnable as ``sparsemoe reproduce NAME`` (plus ``sparsemoe demo``).

Each experiment module defines ``NAME``, a ``Config`` dataclass (every field has a default and
``metadata={"help": ...}``; ``__post_init__`` validates, see :mod:`sparsemoe.experiments.config`),
``run(config) -> dict``, which writes ``results/<name>/`` (results.json, table.md, PNG plots), and
``write_report(results, folder) -> list[Path]``, which ``run`` calls to write the table and plots from
the results dict alone, so ``python -m tools.rerender`` redraws them with the same code, untrained.
The command line turns the Config fields into ``--options``. Modules are imported only when their
command is used, and this package imports nothing heavy, so listing experiments stays fast.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: name -> module implementing it
EXPERIMENTS: dict[str, str] = {}


def register(name: str, module: str) -> None:
    """Make the experiment module ``module`` (a dotted name, not imported now) runnable as ``name``."""
    if name in EXPERIMENTS:
        raise ValueError(f"experiment {name!r} is already registered")
    EXPERIMENTS[name] = module


def load(name: str) -> ModuleType:
    """Import and return the module registered as ``name``."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return importlib.import_module(EXPERIMENTS[name])


register("comet-movielens", "sparsemoe.experiments.comet_movielens")
register("comet-multimnist", "sparsemoe.experiments.comet_multimnist")
register("comet-tuning", "sparsemoe.experiments.comet_tuning")
register("gate-saturation", "sparsemoe.experiments.gate_saturation")
register("moebert-sst2", "sparsemoe.experiments.moebert_sst2")
register("router-lm", "sparsemoe.experiments.router_lm")
register("thor-multi30k", "sparsemoe.experiments.thor_multi30k")
register("thor-convergence", "sparsemoe.experiments.thor_convergence")
register("upcycle-smollm2", "sparsemoe.experiments.upcycle_smollm2")
