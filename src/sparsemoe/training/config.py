"""The training configuration of :func:`~sparsemoe.training.fit`, loaded strictly from JSON or TOML.

A typo in a config file must not silently fall back to a default: unknown keys and values of the
wrong type are errors that name the key (and the file).
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .._fields import check_value, field_type
from .._validation import check_choice, check_float, check_int
from .loop import NAN_POLICIES, SchedulerFactory


@dataclass(frozen=True)
class TrainConfig:
    """Arguments of :func:`~sparsemoe.training.fit` that a run's config file sets.

    ``warmup_steps``: linear LR warm-up over this many steps (0: constant LR).
    """

    epochs: int = 3
    lr: float = 1e-2
    batch_size: int = 32
    seed: int = 0
    weight_decay: float = 0.0
    patience: int | None = None
    warmup_steps: int = 0
    nan_policy: str = "stop"
    checkpoint_every: int | None = None
    checkpoint_path: str | None = None

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, low=1)
        object.__setattr__(self, "lr", check_float("lr", self.lr, low=0.0, strict=True))
        object.__setattr__(self, "weight_decay", check_float("weight_decay", self.weight_decay, low=0.0))
        check_int("batch_size", self.batch_size, low=1)
        check_int("seed", self.seed)
        if self.patience is not None:
            check_int("patience", self.patience, low=0)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        if self.checkpoint_every is not None:
            check_int("checkpoint_every", self.checkpoint_every, low=1)
            if self.checkpoint_path is None:
                raise ValueError("checkpoint_every needs checkpoint_path (the file to write)")

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
        """The LR schedule as ``fit``'s ``scheduler=`` factory (``None``: constant LR)."""
        if self.warmup_steps == 0:
            return None
        warmup = self.warmup_steps

        def factory(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

        return factory

    def fit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~sparsemoe.training.fit`."""
        kwargs = {k: v for k, v in self.to_dict().items() if k != "warmup_steps"}
        return {**kwargs, "scheduler": self.scheduler()}
