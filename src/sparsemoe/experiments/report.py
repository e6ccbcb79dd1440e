"""Tables and summaries for experiment results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation and standard error of ``values``."""
    arr = np.asarray(values, dtype=float)
    n = arr.size
    std = float(arr.std(ddof=1)) if n > 1 else 0.0
    return {
        "mean": float(arr.mean()) if n else math.nan,
        "std": std,
        "sem": std / math.sqrt(n) if n else math.nan,
        "n": n,
    }


def fmt(stat: dict[str, float], digits: int = 4) -> str:
    """``mean ± std`` (or just the mean for a single value)."""
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
