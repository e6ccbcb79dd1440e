"""Classify sentences with a saved (dense or converted) model: what ``sparsemoe predict`` runs."""

from __future__ import annotations

from pathlib import Path

import torch


def predict(model_dir: str | Path, sentences: list[str], *, max_length: int = 64) -> list[tuple[str, float]]:
    """``(label, probability)`` of the most likely class of each sentence.

    ``model_dir`` is a folder written by :func:`sparsemoe.hf.save_moefied` (or ``save_pretrained``);
    everything is loaded offline from it. A folder that cannot be loaded raises ``FileNotFoundError``
    naming it.
    """
    from transformers import AutoTokenizer

    from .io import load_moefied

    try:
        model = load_moefied(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a model from {model_dir}: {err}") from err
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = torch.softmax(logits.float(), dim=-1)  # [B, classes]
    labels = getattr(model.config, "id2label", None) or {}
    best_p, best = probs.max(-1)
    return [(labels.get(int(i), str(int(i))), float(p)) for p, i in zip(best_p, best, strict=True)]
