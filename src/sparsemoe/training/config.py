"""The one training configuration (:class:`TrainConfig`), loaded strictly from Python, JSON or TOML.

A typo in a config file must not silently fall back to a default: unknown keys and values of the
wrong type are errors that name the key (and the file). Every value is checked when the config is
built, so a bad ``lr`` or ``epochs`` is reported by name before a model is touched.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .._fields import check_value, field_type
from .._validation import check_choice, check_int

NAN_POLICIES = ("stop", "skip")
MODES = ("min", "max")
CHECKPOINT_FORMATS = ("safetensors", "dcp")
#: seeds seed ``torch.Generator`` and NumPy-style generators: non-negative 63-bit integers
SEED_MAX = 2**63 - 1

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def check_real(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (``> 0`` when ``positive``, else ``>= 0``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (:class:`~sparsemoe.training.Trainer`); the data, model, loss
    and evaluation are arguments of the trainer, not settings.

    Length: ``epochs`` passes over the data and/or ``steps`` optimiser steps; training stops at
    whichever comes first (``epochs`` defaults to 3 when neither is given).

    - ``lr``, ``weight_decay``: of the default optimiser (Adam); an optimiser factory may read them.
    - ``batch_size``, ``seed``: of the default data order (:class:`~sparsemoe.training.RandomBatches`).
    - ``warmup_steps``: linear LR warm-up over this many steps (0: constant LR), see :meth:`scheduler`.
    - ``eval_every``: evaluate every this many steps and after the last one; ``None``: after every epoch.
    - ``metric``/``mode``: the evaluation metric that selects the best weights (restored at the end)
      and drives ``patience`` (evaluations without improvement before stopping); ``None``: keep the
      last weights.
    - ``accumulate``: micro-batches per optimiser step (each loss is divided by it).
    - ``clip_norm``: clip the global gradient norm to this before each step (``None``: no clipping).
    - ``nan_policy``: on a non-finite loss or gradient (checked before the optimiser step) or
      selection metric, ``"stop"`` raises ``FloatingPointError`` naming the step; ``"skip"`` drops
      that step's update (or that evaluation) and goes on.
    - ``checkpoint_every``/``checkpoint_path``: write a resumable checkpoint every this many steps
      to this file, and after the last one unless ``checkpoint_at_end`` is False (for callers that
      save the finished model themselves and delete the file).
    - ``checkpoint_format``: ``"safetensors"``: ``checkpoint_path`` is one file
      (:func:`sparsemoe.save_checkpoint`; several processes gather to rank 0, which writes it);
      ``"dcp"``: ``checkpoint_path`` is a folder written by every rank with
      ``torch.distributed.checkpoint`` (:func:`sparsemoe.distributed.save_dcp_checkpoint`: shards
      stay sharded, for models too large to gather). Either resumes at any number of processes;
      ``resume=`` takes either kind (a folder is read as DCP).
    - ``trim_memory``: on CPU under glibc, hand freed heap memory back to the system after each
      evaluation (``malloc_trim``; costs about a millisecond). With batch sizes that vary a lot,
      glibc otherwise keeps freed memory and the process's resident size creeps up (no leak).
    """

    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-2
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.0
    patience: int | None = None
    warmup_steps: int = 0
    eval_every: int | None = None
    metric: str | None = None
    mode: str = "min"
    accumulate: int = 1
    clip_norm: float | None = None
    nan_policy: str = "stop"
    checkpoint_every: int | None = None
    checkpoint_path: str | None = None
    checkpoint_at_end: bool = True
    checkpoint_format: str = "safetensors"
    trim_memory: bool = False

    def __post_init__(self) -> None:
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", 3)
        if self.epochs is not None:
            check_int("epochs", self.epochs, low=1)
        if self.steps is not None:
            check_int("steps", self.steps, low=1)
        object.__setattr__(self, "lr", check_real("lr", self.lr, positive=True))
        object.__setattr__(self, "weight_decay", check_real("weight_decay", self.weight_decay))
        check_int("batch_size", self.batch_size, low=1)
        check_int("seed", self.seed, low=0, high=SEED_MAX)
        if self.patience is not None:
            check_int("patience", self.patience, low=0)
            if self.metric is None:
                raise ValueError("patience needs metric= (the evaluation metric that must improve)")
        check_int("warmup_steps", self.warmup_steps, low=0)
        if self.eval_every is not None:
            check_int("eval_every", self.eval_every, low=1)
        if self.metric is not None and not isinstance(self.metric, str):
            raise TypeError(f"metric must be a metric name (str) or None, got {type(self.metric).__name__}")
        check_choice("mode", self.mode, MODES)
        check_int("accumulate", self.accumulate, low=1)
        if self.clip_norm is not None:
            object.__setattr__(self, "clip_norm", check_real("clip_norm", self.clip_norm, positive=True))
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, low=1)
            if self.checkpoint_path is None:
                raise ValueError("checkpoint_every needs checkpoint_path (the file to write)")
        if self.checkpoint_path is not None and not isinstance(self.checkpoint_path, (str, Path)):
            raise TypeError(f"checkpoint_path must be a path, got {type(self.checkpoint_path).__name__}")
        if isinstance(self.checkpoint_path, Path):
            object.__setattr__(self, "checkpoint_path", str(self.checkpoint_path))
        check_choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        for name in ("checkpoint_at_end", "trim_memory"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; unknown keys and wrong types raise errors naming the key and ``source``."""
        if not isinstance(values, dict):
            raise TypeError(f"{source}: expected a table of settings, got {type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{source}: unknown key {key!r}{hint} (known keys: {', '.join(known)})")
            check_value(f"{source}: key {key!r}", field_type(cls, known[key]), value)
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load a ``.json`` or ``.toml`` file (TOML needs Python 3.11+)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} is missing")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                if sys.version_info < (3, 11):
                    raise ValueError("TOML configs need Python 3.11+ (tomllib); use a .json file")
                else:  # an else branch, so that type checkers for Python 3.10 skip it
                    import tomllib

                    values = tomllib.loads(text)
            elif path.suffix == ".json":
                values = json.loads(text)
            else:
                raise ValueError(f"config file {path} must end in .json or .toml")
        except (json.JSONDecodeError, ValueError) as e:
            if "tomllib" in str(e) or "must end in" in str(e):
                raise
            raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scheduler(self) -> SchedulerFactory | None:
        """The LR schedule of ``warmup_steps`` as a ``scheduler=`` factory (``None``: constant LR)."""
        if self.warmup_steps == 0:
            return None
        warmup = self.warmup_steps

        def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

        return factory
