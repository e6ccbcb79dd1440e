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
  of the RNG states, a SHA-256 of every tensor's bytes (``sha256``) and a SHA-256 of the whole
  document, that digest included (``meta_sha256``). So editing the step, the config or any other
  metadata in the header is detected on load, as is a changed tensor.

Why the JSON lives inside the safetensors header rather than in a side file: one file is replaced
atomically as a unit, so weights and metadata can never come from two different saves, and a
checkpoint is copied or deleted as one thing.

Durability: the bytes are written by the project's one writer (:mod:`sparsemoe.atomic`): a
temporary file in the same folder (normal permissions), ``fsync``, ``os.replace`` over the target,
``fsync`` of the folder. A crash at any point leaves either the previous checkpoint or the new one,
never a mix. Temporary files of writers that died are removed by the next save.

Loading never unpickles (no ``torch.load``): it parses the safetensors header itself, checks both
checksums, and validates everything (model keys and shapes, optimiser class, parameter names and
hyper-parameter keys, scheduler class) BEFORE changing the model, optimiser, scheduler or RNGs, so
a bad file raises a ``ValueError`` naming it and leaves everything untouched. Files of format 2
(before the metadata checksum) still load; their metadata is not covered.

Distributed parameters (DTensors: the expert shards of :mod:`sparsemoe.distributed`): every rank
calls :func:`save_checkpoint`; they (and their optimiser tensors) are gathered into full tensors
and rank 0 writes one file, which an unsharded model loads as its own. :func:`load_checkpoint`
takes each rank's slice out of it (the parameter's own placements), so a checkpoint moves between
any numbers of ranks (2 -> 1, 1 -> 2). What differs between ranks is saved for each rank: its RNG
states (``rank<r>.rng.*``) and those of its buffers that differ from rank 0's (``rank<r>.model.*``;
the random gate's ``rng_state`` advances with the rank's own batch). Loading at the same number of
ranks restores each rank's own, so the resumed run is exact on every rank; at another number of
ranks every rank gets rank 0's (the saved ``model.*`` and ``rng.*``).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .atomic import atomic_path

_META_KEY = "sparsemoe"
_FORMAT = 3
_READABLE_FORMATS = (2, 3)  # 2: before the metadata checksum and the per-rank states


# ----------------------------------------------------------------------------- small helpers
def _generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` a submodule keeps as ``.generator`` (a user's module; no built-in gate has one)."""
    return {
        name: module.generator
        for name, module in model.named_modules()
        if isinstance(getattr(module, "generator", None), torch.Generator)
    }


def _sharded_keys(model: nn.Module) -> dict[str, DTensor]:
    """``state_dict`` keys of distributed (DTensor) parameters -> the parameter."""
    return {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full tensor (collective over its mesh); any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(t: torch.Tensor, param: DTensor) -> torch.Tensor:
    """This rank's part of the full tensor ``t``, laid out as the DTensor ``param`` (no communication)."""
    return distribute_tensor(t, param.device_mesh, param.placements, src_data_rank=None)


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


def _meta_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata without ``meta_sha256`` (canonical JSON: sorted keys, no spaces).

    The metadata is JSON already (every part went through :func:`_json_ready`), and Python's JSON
    round trip is exact (floats included), so the reader recomputes the same digest.
    """
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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


# ----------------------------------------------------------------------------- argument checks
def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


def _folder_contents(folder: Path) -> str:
    """What is in ``folder``, for an error message about a folder passed as a checkpoint file."""
    entries = sorted(p.name for p in folder.iterdir())
    files = [name for name in entries if name.endswith(".safetensors")]
    if files:
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        return f"it holds the checkpoint file(s) {shown}: pass one of them"
    if not entries:
        return "it is empty"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"it holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown}), none a .safetensors file"


def _check_path(path: object, *, writing: bool) -> Path:
    """``path`` as a ``Path`` to a file (not a folder); for writing, with no file where a folder must be."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming a checkpoint file, got {_describe(path)}")
    path = Path(path)
    if path.is_dir():
        if writing:
            raise ValueError(
                f"path={str(path)!r} is an existing folder, not a file: pass a file path such as "
                f"{str(path / 'checkpoint.safetensors')!r}"
            )
        raise ValueError(f"{path} is a folder, not a checkpoint file: {_folder_contents(path)}")
    if writing:
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"path={str(path)!r} cannot be written: {parent} is a file, not a folder")
                break
    return path


def _check_modules(model: object, optimizer: object, scheduler: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {_describe(model)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {_describe(optimizer)}")
    if scheduler is not None and not (
        callable(getattr(scheduler, "state_dict", None)) and callable(getattr(scheduler, "load_state_dict", None))
    ):
        raise TypeError(
            "scheduler must be an LR scheduler (with state_dict and load_state_dict) or None, "
            f"got {_describe(scheduler)}"
        )


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int (the number of training steps done), got {_describe(step)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def _check_mapping(name: str, value: object) -> dict[str, Any]:
    """``value`` (a mapping of JSON values, or None) as JSON-exact data; errors name ``name``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of JSON-serialisable values (or None), got {_describe(value)}")
    return dict(_json_ready(dict(value), name))


def _check_tensors(tensors: object) -> dict[str, torch.Tensor]:
    if tensors is None:
        return {}
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor (or None), got {_describe(tensors)}")
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensors keys must be str, got {_describe(key)}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"tensors[{key!r}] must be a torch.Tensor, got {_describe(value)}")
    return dict(tensors)


# ----------------------------------------------------------------------------- RNG states
def _rng_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states (and those of ``model``'s ``.generator``s): tensors and JSON scalars."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    for name, generator in _generators(model).items():
        tensors[f"rng.module.{name}"] = generator.get_state()
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


# ----------------------------------------------------------------------------- per-rank states
def _replicated_buffers(model: nn.Module, sharded: Mapping[str, DTensor]) -> dict[str, torch.Tensor]:
    """The ``state_dict`` entries every rank holds in full that are not parameters (buffers)."""
    params = {name for name, _ in model.named_parameters()}
    return {k: _cpu(v) for k, v in model.state_dict().items() if k not in sharded and k not in params}


def _gather_rank_states(
    model: nn.Module,
    sharded: Mapping[str, DTensor],
    rng_tensors: Mapping[str, torch.Tensor],
    rng_meta: Mapping[str, Any],
    out: dict[str, torch.Tensor],
) -> list[dict[str, Any]]:
    """Collective: every rank's RNG states and buffers go to rank 0, which adds ranks 1.. to ``out``.

    Returns (on rank 0; empty elsewhere) the JSON RNG scalars of ranks 1, 2, ... A buffer of rank
    ``r`` is stored (``rank<r>.model.<key>``) only where it differs from rank 0's ``model.<key>``.
    """
    mine = ({k: _cpu(v) for k, v in rng_tensors.items()}, dict(rng_meta), _replicated_buffers(model, sharded))
    rank, world = dist.get_rank(), dist.get_world_size()
    everyone: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    if everyone is None:
        return []
    others = []
    for r, (tensors, meta, buffers) in enumerate(everyone[1:], start=1):
        out.update({f"rank{r}.{k}": v for k, v in tensors.items()})
        for key, value in buffers.items():
            if not torch.equal(value, out[f"model.{key}"]):
                out[f"rank{r}.model.{key}"] = value
        others.append({"rng": meta})
    return others


def _own_rank(model: nn.Module, meta: Mapping[str, Any]) -> int:
    """The rank whose saved states this process restores: its own at the saved world size, else 0."""
    saved_world = meta.get("world_size", 1)
    if saved_world == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != saved_world:
        return 0
    return dist.get_rank()


def _of_rank(tensors: Mapping[str, torch.Tensor], rank: int, section: str) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s ``<section>.*`` tensors (``rank<r>.<section>.*`` for ``r > 0``), keys without the rank."""
    prefix = f"rank{rank}." if rank else ""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(f"{prefix}{section}.")}


# ----------------------------------------------------------------------------- writing
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
    collective: bool | None = None,
) -> Path:
    """Write a complete, durable checkpoint to ``path`` (see the module docstring); returns the path.

    Args:
        path: the file to write (its folder is created); not an existing folder.
        scheduler: an LR scheduler whose ``state_dict`` is stored (JSON).
        step: training step (an int >= 0), returned by :func:`load_checkpoint`.
        config: JSON-serialisable configuration (a dict), returned as is.
        state: JSON-serialisable caller state (a dict: a loop's position), returned as is.
        tensors: caller tensors (a dict of name -> tensor), returned as is.
        collective: every rank of the default process group calls this together: the DTensor
            parameters are gathered, each rank's RNG states (and buffers that differ from rank 0's)
            are saved, rank 0 writes the file and the others wait for it. Default: when ``model``
            holds DTensor parameters (expert-parallel layers), which need it; pass ``True`` in a
            data-parallel run so that a resume restores every rank's own RNG states.

    Every argument is checked before anything is gathered or written: a bad one raises a
    ``TypeError``/``ValueError`` naming it.
    """
    path = _check_path(path, writing=True)
    _check_modules(model, optimizer, scheduler)
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "step": _check_step(step),
        "config": _check_mapping("config", config),
        "state": _check_mapping("state", state),
        "optimizer": None,
        "scheduler": None,
        "world_size": 1,
    }
    extra = _check_tensors(tensors)
    if collective is not None and not isinstance(collective, bool):
        raise TypeError(f"collective must be a bool or None, got {_describe(collective)}")
    if collective and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("collective=True needs torch.distributed initialised (init_process_group); pass False")
    if scheduler is not None:
        meta["scheduler"] = {
            "class": type(scheduler).__name__,
            "state": _json_ready(scheduler.state_dict(), f"{type(scheduler).__name__}.state_dict()"),
        }
    # ---- checked: now gather (collectives) and write
    sharded = _sharded_keys(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        out[f"model.{key}"] = _cpu(_full(value))
    for key, value in extra.items():
        out[f"extra.{key}"] = _cpu(_full(value))  # a DTensor (a sharded model's best weights) in full
    rng_tensors, meta["rng"] = _rng_state(model)
    out.update(rng_tensors)
    if optimizer is not None:
        meta["optimizer"] = _optimizer_to_file(model, optimizer, out)
    distributed = bool(sharded) if collective is None else collective
    if distributed:
        meta["world_size"] = dist.get_world_size()
        meta["other_ranks"] = _gather_rank_states(model, sharded, rng_tensors, meta["rng"], out)
    if not distributed or dist.get_rank() == 0:
        meta["sha256"] = _checksum(out)
        meta["meta_sha256"] = _meta_checksum(meta)
        with atomic_path(path) as tmp:  # written from the tensors: no in-memory copy of the whole file (2x its size)
            save_file(out, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    if distributed:
        dist.barrier()
    return path


def _optimizer_to_file(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    out: dict[str, torch.Tensor],
) -> dict[str, Any]:
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in sorted(sd["state"].items()):
        name = names[index]
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{name}.{key}"] = _cpu(_full(value))
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
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is a folder (the message says what it holds), or the file is not a
            sparsemoe checkpoint, is truncated, or was damaged or edited (names the file).
    """
    path = _check_path(path, writing=False)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: no file or folder there")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file, so not a checkpoint")
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
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise bad(f"checkpoint format {found!r}, this version reads formats {list(_READABLE_FORMATS)}")
    if meta["format"] >= 3 and meta.get("meta_sha256") != _meta_checksum(meta):
        raise bad(
            "metadata checksum mismatch: the JSON metadata in its header (step, config, state, optimizer "
            "or scheduler settings, RNG states) was modified or corrupted after it was written"
        )
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
    (``state``/``tensors``: what the caller passed to :func:`save_checkpoint`). An expert-parallel
    model loading a checkpoint saved by the same number of ranks restores each rank's own RNG
    states and buffers (see the module docstring).

    Raises:
        FileNotFoundError: nothing at ``path``.
        TypeError: ``model``/``optimizer``/``scheduler`` of the wrong type.
        ValueError: a folder at ``path``, an unreadable file, or a checkpoint that does not fit
            ``model``/``optimizer``/``scheduler`` (the message names the file and the mismatch).
    """
    path = _check_path(path, writing=False)
    _check_modules(model, optimizer, scheduler)
    tensors, meta = read_checkpoint(path)
    rank = _own_rank(model, meta)
    model_state = _model_state_from_file(path, model, tensors)
    if rank:  # this rank's own buffers where they differ from rank 0's
        for key, value in _of_rank(tensors, rank, "model").items():
            key = key[len("model.") :]
            if key not in model_state or value.shape != model_state[key].shape:
                raise ValueError(f"{path}: rank {rank}'s {key} does not fit this model")
            model_state[key] = value
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
        rng_meta = meta["rng"] if rank == 0 else meta["other_ranks"][rank - 1]["rng"]
        _restore_rng(_of_rank(tensors, rank, "rng"), rng_meta, model)
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
        if value.shape != current[key].shape:  # a DTensor's shape is the full one
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model has {tuple(current[key].shape)}")
        out[key] = shard_like(value, sharded[key]) if key in sharded else value
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
        if name in sharded and value.shape == params[name].shape:
            value = shard_like(value, sharded[name])
        state.setdefault(index[name], {})[entry] = value
    for name, scalars in saved["scalars"].items():
        if name not in index:
            raise ValueError(f"{path}: optimizer state for {name!r}, which the optimizer does not hold")
        state.setdefault(index[name], {}).update(scalars)
    return {"state": state, "param_groups": groups}
