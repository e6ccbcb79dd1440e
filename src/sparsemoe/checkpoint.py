"""Checkpoints that survive crashes and resume bit-identically: one safetensors file per checkpoint.

What a file holds:

* tensors (safetensors): the model's ``state_dict`` (``model.*``), the optimiser's per-parameter
  tensors keyed by parameter NAME (``optim.<name>.<key>``), the RNG states (torch CPU and CUDA,
  numpy, python ``random``, and the ``torch.Generator`` of any module that keeps one as
  ``.generator``: ``rng.*``; the random gate keeps its stream as the ``rng_state`` buffer instead, so
  it travels in the ``state_dict``) and caller tensors
  (``extra.*``, e.g. the training loop's best weights);
* a JSON document in the safetensors metadata: format, step, config, optimiser class and
  hyper-parameters, scheduler state, the caller's state (the loop's data position), the scalar parts
  of the RNG states, and a SHA-256 of every tensor's bytes.

Why the JSON lives inside the safetensors header rather than in a side file: one file is replaced
atomically as a unit, so weights and metadata can never come from two different saves, and a
checkpoint is copied or deleted as one thing.

Durability: the bytes go to a temporary file in the same folder (created with mode ``0o666`` minus
the umask, i.e. normal permissions), which is ``fsync``-ed, renamed over the target with
``os.replace`` and the folder is ``fsync``-ed. A crash at any point leaves either the previous
checkpoint or the new one, never a mix. Temporary files of writers that died are removed by the
next save.

Loading never unpickles (no ``torch.load``): it parses the safetensors header itself, checks the
checksum, and validates everything (model keys and shapes, optimiser class, parameter names and
hyper-parameter keys, scheduler class) BEFORE changing the model, optimiser, scheduler or RNGs, so
a bad file raises a ``ValueError`` naming it and leaves everything untouched.

Expert parallelism (:mod:`sparsemoe.distributed`): every rank calls :func:`save_checkpoint`; the
expert shards (and their optimiser tensors) are gathered into full ``[n, ...]`` tensors and rank 0
writes one file, identical to the unsharded model's. :func:`load_checkpoint` slices each rank's
experts out of it, so a checkpoint moves between any numbers of ranks (2 -> 1, 1 -> 2). The RNG
states saved are rank 0's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from .distributed import ExpertParallel, expert_parallel_layers

_META_KEY = "sparsemoe"
_FORMAT = 2
_TMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------- small helpers
def _generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` a submodule keeps as ``.generator`` (a user's module; no built-in gate has one)."""
    return {
        name: module.generator
        for name, module in model.named_modules()
        if isinstance(getattr(module, "generator", None), torch.Generator)
    }


def _sharded_keys(model: nn.Module) -> dict[str, ExpertParallel]:
    """``state_dict`` keys of expert-parallel shards -> their layer."""
    out = {}
    for prefix, layer in expert_parallel_layers(model):
        for name, _ in layer.experts.named_parameters():
            out[f"{prefix}.experts.{name}" if prefix else f"experts.{name}"] = layer
    return out


def _gather(t: torch.Tensor, layer: ExpertParallel) -> torch.Tensor:
    """The full ``[n, ...]`` tensor from every rank's ``[n/W, ...]`` slice (collective)."""
    parts = [torch.empty_like(t) for _ in range(layer.world_size)]
    dist.all_gather(parts, t.detach().contiguous(), group=layer.group)
    return torch.cat(parts)


def _local(t: torch.Tensor, layer: ExpertParallel) -> torch.Tensor:
    lo, hi = layer.expert_range
    return t[lo:hi]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone()


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json_ready(value: Any, where: str) -> Any:
    """``value`` if JSON can hold it exactly (tuples become lists); a TypeError naming ``where`` otherwise."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where} cannot be stored in a checkpoint's JSON metadata: {e}") from None


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Name (in ``model``) of each parameter in optimiser order (the indices of its state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model; pass the model it trains")
            out.append(names[id(p)])
    return out


# ----------------------------------------------------------------------------- RNG states
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, gauss_next],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    return tensors, meta


def _restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], model: nn.Module) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(meta["cuda_devices"])]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        warnings.warn(f"checkpoint holds {len(cuda)} CUDA RNG state(s) that this machine cannot restore", stacklevel=3)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss_next))
    for name, generator in _generators(model).items():
        if f"rng.module.{name}" in tensors:
            generator.set_state(tensors[f"rng.module.{name}"])


# ----------------------------------------------------------------------------- writing
def _write_durably(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, ``os.replace``, fsync of the folder."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view[: 1 << 24])
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of ``path`` left by writers that no longer run (killed mid-save)."""
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        try:
            pid = int(tmp.name[len(path.name) + 2 :].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete, durable checkpoint to ``path`` (see the module docstring); returns the path.

    Args:
        scheduler: an LR scheduler whose ``state_dict`` is stored (JSON).
        step: training step, returned by :func:`load_checkpoint`.
        config: JSON-serialisable configuration, returned as is.
        state: JSON-serialisable caller state (a loop's position), returned as is.
        tensors: caller tensors, returned as is.

    With expert-parallel layers in ``model`` every rank must call this (it gathers the shards);
    rank 0 writes the file and the others wait for it.
    """
    path = Path(path)
    sharded = _sharded_keys(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        out[f"model.{key}"] = _cpu(_gather(value, sharded[key]) if key in sharded else value)
    for key, value in (tensors or {}).items():
        out[f"extra.{key}"] = _cpu(value)
    rng_tensors, rng_meta = _rng_state()
    out.update(rng_tensors)
    for name, generator in _generators(model).items():
        out[f"rng.module.{name}"] = generator.get_state()
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "step": int(step),
        "config": _json_ready(dict(config or {}), "config"),
        "state": _json_ready(dict(state or {}), "state"),
        "rng": rng_meta,
        "optimizer": None,
        "scheduler": None,
    }
    if optimizer is not None:
        meta["optimizer"] = _optimizer_to_file(model, optimizer, sharded, out)
    if scheduler is not None:
        meta["scheduler"] = {
            "class": type(scheduler).__name__,
            "state": _json_ready(scheduler.state_dict(), f"{type(scheduler).__name__}.state_dict()"),
        }
    meta["sha256"] = _checksum(out)
    if not sharded or dist.get_rank() == 0:
        _write_durably(path, save_tensors(out, metadata={_META_KEY: json.dumps(meta)}))
    if sharded:
        dist.barrier()
    return path


def _optimizer_to_file(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sharded: Mapping[str, ExpertParallel],
    out: dict[str, torch.Tensor],
) -> dict[str, Any]:
    names = _param_names(model, optimizer)
    params = dict(model.named_parameters())
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in sorted(sd["state"].items()):
        name = names[index]
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                if name in sharded and value.shape == params[name].shape:
                    value = _gather(value, sharded[name])
                out[f"optim.{name}.{key}"] = _cpu(value)
            else:
                scalars.setdefault(name, {})[key] = _json_ready(value, f"optimizer state {name}.{key}")
    groups = []
    for i, group in enumerate(sd["param_groups"]):
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper = _json_ready(hyper, f"optimizer param_groups[{i}]")
        groups.append({**hyper, "params": [names[j] for j in group["params"]]})
    return {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON metadata of a checkpoint file, checked, without unpickling anything.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a sparsemoe checkpoint, is truncated or damaged (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()

    def bad(why: str) -> ValueError:
        return ValueError(f"{path} is not a readable sparsemoe checkpoint: {why}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes is too short for a safetensors header (truncated?)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        raise bad(
            f"its first 8 bytes announce a {header_len}-byte header but the file has {len(data)} bytes "
            "(truncated, or not a safetensors file: a torch.save/pickle or text file, say)"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"no sparsemoe metadata in its header ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise bad(f"checkpoint format {found!r}, this version reads format {_FORMAT}")
    try:
        tensors = load_tensors(data)
    except Exception as e:  # safetensors raises its own error type for damaged data
        raise bad(f"damaged tensor data ({type(e).__name__}: {e})") from None
    if _checksum(tensors) != meta.get("sha256"):
        raise bad("checksum mismatch: the tensor data was modified or corrupted after it was written")
    return tensors, meta


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore ``model`` (and ``optimizer``, ``scheduler``, RNG states) from ``path``.

    Everything is validated before anything is changed: on any error the model, optimiser,
    scheduler and RNGs are untouched. Returns ``{"step", "config", "state", "tensors"}``
    (``state``/``tensors``: what the caller passed to :func:`save_checkpoint`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unreadable file, or a checkpoint that does not fit ``model``/``optimizer``/
            ``scheduler`` (the message names the file and the mismatch).
    """
    path = Path(path)
    tensors, meta = read_checkpoint(path)
    model_state = _model_state_from_file(path, model, tensors)
    optim_state = None
    if optimizer is not None:
        optim_state = _optimizer_state_from_file(path, model, optimizer, tensors, meta["optimizer"])
    if scheduler is not None:
        saved = meta["scheduler"]
        if saved is None:
            raise ValueError(f"{path} holds no LR scheduler state; pass scheduler=None")
        if saved["class"] != type(scheduler).__name__:
            raise ValueError(
                f"{path} holds a {saved['class']} scheduler state; the scheduler given is a {type(scheduler).__name__}"
            )
    # ---- validated: now change things
    model.load_state_dict(model_state)
    if optimizer is not None and optim_state is not None:
        optimizer.load_state_dict(optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"]["state"])
    if restore_rng:
        _restore_rng(tensors, meta["rng"], model)
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    return {"step": meta["step"], "config": meta["config"], "state": meta["state"], "tensors": extra}


def _model_state_from_file(
    path: Path, model: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` from the file (expert shards sliced out), checked key by key."""
    sharded = _sharded_keys(model)
    current = model.state_dict()
    saved = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this model: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
        )
    out = {}
    for key, value in sorted(saved.items()):  # sorted: the first bad key reported is deterministic
        if key in sharded:
            layer = sharded[key]
            full = (current[key].shape[0] * layer.world_size, *current[key].shape[1:])
            if tuple(value.shape) != full:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model needs {full} (all experts)")
            value = _local(value, layer)
        elif value.shape != current[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model has {tuple(current[key].shape)}")
        out[key] = value
    return out


def _optimizer_state_from_file(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    saved: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """An optimiser ``state_dict`` from the file, after checking that it fits ``optimizer``."""
    if saved is None:
        raise ValueError(f"{path} holds no optimizer state; pass optimizer=None")
    cls = type(optimizer).__name__
    if saved["class"] != cls:
        raise ValueError(
            f"{path} holds a {saved['class']} optimizer state but the optimizer given is {cls}: "
            f"build a torch.optim.{saved['class']} to resume, or pass optimizer=None to load the weights only"
        )
    names = _param_names(model, optimizer)
    current = optimizer.state_dict()["param_groups"]
    if len(saved["param_groups"]) != len(current):
        raise ValueError(
            f"{path} holds {len(saved['param_groups'])} optimizer param group(s), the optimizer has {len(current)}"
        )
    groups = []
    for i, (old, new) in enumerate(zip(saved["param_groups"], current, strict=True)):
        mine = [names[j] for j in new["params"]]
        if old["params"] != mine:
            raise ValueError(
                f"{path}: optimizer param group {i} holds parameters {old['params']}, the optimizer has {mine}"
            )
        keys_old, keys_new = set(old) - {"params"}, set(new) - {"params"}
        if keys_old != keys_new:
            hint = ""
            if "initial_lr" in keys_old ^ keys_new:
                hint = " (initial_lr is set by an LR scheduler: build the same scheduler as the saved run)"
            raise ValueError(
                f"{path}: optimizer param group {i} has hyper-parameters {sorted(keys_old)}, the {cls} given has "
                f"{sorted(keys_new)}{hint}"
            )
        group = {k: tuple(v) if isinstance(new[k], tuple) else v for k, v in old.items() if k != "params"}
        groups.append({**group, "params": new["params"]})
    sharded = _sharded_keys(model)
    params = dict(model.named_parameters())
    index = {name: j for j, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, _, entry = key[len("optim.") :].rpartition(".")
        if name not in index:
            raise ValueError(f"{path}: optimizer state for {name!r}, which the optimizer does not hold")
        if name in sharded and value.dim() and value.shape[0] == params[name].shape[0] * sharded[name].world_size:
            value = _local(value, sharded[name])
        state.setdefault(index[name], {})[entry] = value
    for name, scalars in saved["scalars"].items():
        if name not in index:
            raise ValueError(f"{path}: optimizer state for {name!r}, which the optimizer does not hold")
        state.setdefault(index[name], {}).update(scalars)
    return {"state": state, "param_groups": groups}
