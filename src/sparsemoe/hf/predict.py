"""``sparsemoe predict --model DIR "a sentence" ...``: label and probability of each sentence."""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsemoe predict", description="Classify sentences with a saved (dense or converted) model."
    )
    parser.add_argument("--model", required=True, help="folder written by save_moefied (or save_pretrained)")
    parser.add_argument("sentences", nargs="+", help="sentences to classify")
    parser.add_argument("--max-length", type=int, default=64, help="truncate sentences to this many tokens")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print ``label<TAB>probability<TAB>sentence`` per sentence; returns the exit status."""
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    from .io import load_moefied

    try:
        model = load_moefied(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"sparsemoe predict: cannot load --model {args.model}: {err}", file=sys.stderr)
        return 2
    batch = tokenizer(args.sentences, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    labels = getattr(model.config, "id2label", None) or {}
    for sentence, row in zip(args.sentences, probs, strict=True):
        p, index = row.max(-1)
        print(f"{labels.get(int(index), str(int(index)))}\t{float(p):.4f}\t{sentence}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
