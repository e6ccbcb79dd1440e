"""Checkpoints that resume exactly: one safetensors file, written atomically.

The file holds the model's weights, the optimiser's tensors, the global and per-gate RNG states
(tensors), and a JSON document in the safetensors metadata (config, step, optimiser
hyper-parameters). Writing goes to a temporary file that is renamed over the target, so a crash
leaves the previous checkpoint intact. Loading restores everything needed for the next step to
compute the same loss as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

_META_KEY = "sparsemoe"
_FORMAT = 1


def _generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` a submodule keeps as ``.generator`` (the random gate's, say)."""
    return {
        name: module.generator
        for name, module in model.named_modules()
        if isinstance(getattr(module, "generator", None), torch.Generator)
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int = 0,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and ``optimizer``) to ``path`` atomically; returns the path."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
    }
    tensors["rng.torch"] = torch.get_rng_state()
    for name, generator in _generators(model).items():
        tensors[f"rng.module.{name}"] = generator.get_state()
    meta: dict[str, Any] = {"format": _FORMAT, "step": step, "config": config or {}, "optimizer": None}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for param_id, param_state in state["state"].items():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(param_id), {})[key] = value
        meta["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``, RNG states) from ``path``; returns ``{"step", "config"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "null") or "null")
        if not meta or meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a sparsemoe checkpoint (format {_FORMAT})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is not None:
        if meta["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state; pass optimizer=None")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, param_id, name = key.split(".", 2)
                state.setdefault(int(param_id), {})[name] = value
        for param_id, scalars in meta["optimizer"]["scalars"].items():
            state.setdefault(int(param_id), {}).update(scalars)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        for name, generator in _generators(model).items():
            if f"rng.module.{name}" in tensors:
                generator.set_state(tensors[f"rng.module.{name}"])
    return {"step": meta["step"], "config": meta["config"]}
