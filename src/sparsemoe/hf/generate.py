"""Causal LMs from disk: upcycle a folder (or GGUF file) into a saved MoE, and generate text from one.

What ``sparsemoe upcycle`` and ``sparsemoe generate`` run. Everything loads offline from local files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from .io import SPARSEMOE_FILE, load_moefied, save_moefied
from .upcycle import upcycle


def _say(message: str) -> None:
    print(f"sparsemoe: {message}", file=sys.stderr, flush=True)


def load_causal_lm(source: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a folder (``save_pretrained``/``save_moefied``) or a ``.gguf`` file.

    A GGUF file is dequantised to float32 by transformers (needs the ``llm`` extra: ``gguf``).
    Raises ``FileNotFoundError`` naming ``source`` when nothing loads from it.
    """
    import transformers

    source = Path(source)
    model: Any
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; pass a model folder or a .gguf file")
    try:
        if source.is_file():
            if source.suffix != ".gguf":
                raise FileNotFoundError(f"{source} is a file but not a .gguf file; pass a model folder or a .gguf file")
            folder, gguf = source.parent, {"gguf_file": source.name}
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **gguf)
            return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **gguf)
        if (source / SPARSEMOE_FILE).is_file():
            model = load_moefied(source)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
        return model, transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as err:
        raise FileNotFoundError(f"cannot load a causal LM from {source}: {err}") from err


def upcycle_folder(source: str | Path, out: str | Path, **options: Any) -> Path:
    """Load ``source``, :func:`~sparsemoe.hf.upcycle` it with ``options``, save it and its tokenizer to ``out``."""
    _say(f"loading {source}")
    model, tokenizer = load_causal_lm(source)
    if getattr(model, "upcycle_config", None) is not None or getattr(model, "moefy_config", None) is not None:
        raise ValueError(f"{source} holds a converted model already; upcycle a dense one")
    _say(f"upcycling {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    upcycle(model, **options)
    _say(f"saving to {out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return save_moefied(model, out, tokenizer)


def generate_text(source: str | Path, prompt: str, *, max_new_tokens: int = 32, sample: bool = False) -> str:
    """The prompt continued by the model in ``source`` (greedy unless ``sample``)."""
    model, tokenizer = load_causal_lm(source)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad)
    return str(tokenizer.decode(out[0], skip_special_tokens=True))
