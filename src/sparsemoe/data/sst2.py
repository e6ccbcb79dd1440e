"""SST-2 (GLUE's binary Stanford Sentiment Treebank): ``sentence<TAB>label`` files with a header line.

The folder ``<data root>/sst2`` holds ``train.tsv`` and ``dev.tsv`` (together GLUE's training set)
and ``test.tsv`` (GLUE's validation set, the split papers report); see ``sparsemoe data fetch sst2``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ._paths import data_dir

NAME = "sst2"
SPLITS = ("train", "dev", "test")


def split_path(split: str) -> Path:
    """The file of ``split`` in the data folder (checked to exist)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return data_dir(NAME) / f"{split}.tsv"


def read_tsv(path: Path, rows: int | None = None) -> tuple[list[str], list[int]]:
    """Sentences (stripped) and labels of ``path``, the first ``rows`` of them when given."""
    with path.open(newline="") as f:
        lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    lines = lines[:rows] if rows else lines
    return [s.strip() for s, _ in lines], [int(label) for _, label in lines]
