"""Save and reload converted Hugging Face models (moefied encoders, upcycled causal LMs).

A folder holds ``config.json`` (the Hugging Face config, with the architecture's class name),
``model.safetensors`` (every weight and buffer, hash tables and learned permutations included),
``sparsemoe.json`` (which conversion, :func:`~sparsemoe.hf.moefy` or :func:`~sparsemoe.hf.upcycle`,
under its name, with the arguments that rebuild the structure) and, when given, the tokenizer
files. No pickle anywhere. A folder without ``sparsemoe.json`` is an ordinary dense model and
loads as one (the class named in ``config.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from ..atomic import atomic_path, write_json
from .convert import MoefyConfig, moefy
from .upcycle import UpcycleConfig, upcycle

SPARSEMOE_FILE = "sparsemoe.json"
WEIGHTS_FILE = "model.safetensors"
_FORMAT = 1


def save_moefied(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (converted by :func:`moefy` or :func:`upcycle`, or dense) and ``tokenizer`` to ``directory``."""
    directory = Path(directory)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError(f"save_moefied needs a Hugging Face model with a .config; got {type(model).__name__}")
    directory.mkdir(parents=True, exist_ok=True)
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_model(model, str(tmp))
    moefy_config: MoefyConfig | None = getattr(model, "moefy_config", None)
    upcycle_config: UpcycleConfig | None = getattr(model, "upcycle_config", None)
    sidecar = directory / SPARSEMOE_FILE
    conversion = ("moefy", moefy_config) if moefy_config is not None else ("upcycle", upcycle_config)
    if conversion[1] is not None:
        meta = {"format": _FORMAT, "architecture": type(model).__name__, conversion[0]: conversion[1].to_dict()}
        write_json(sidecar, meta)
    else:
        sidecar.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_moefied(directory: str | Path) -> nn.Module:
    """Rebuild the model saved by :func:`save_moefied` (offline, from the folder only), in eval mode."""
    import transformers

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no config.json; pass a folder written by save_moefied")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    sidecar = directory / SPARSEMOE_FILE
    if not sidecar.is_file():  # a dense model, of the class save_moefied named
        architectures = getattr(config, "architectures", None) or []
        dense_cls = getattr(transformers, architectures[0], None) if architectures else None
        if dense_cls is None:
            dense_cls = transformers.AutoModelForSequenceClassification
        return dense_cls.from_pretrained(directory, local_files_only=True).eval()
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{sidecar} has format {meta.get('format')}; this sparsemoe reads format {_FORMAT}")
    cls = getattr(transformers, meta["architecture"], None)
    if cls is None:
        raise ValueError(f"transformers has no class {meta['architecture']!r} (saved in {sidecar})")
    model = cls(config)
    if "upcycle" in meta:
        options = dict(meta["upcycle"])
        gate_options = options.pop("gate_options")
        upcycle(model, **options, **gate_options)
    else:
        options = dict(meta["moefy"])
        gate_options = options.pop("gate_options")
        moefy(model, **options, **gate_options)
    load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    return model.eval()
