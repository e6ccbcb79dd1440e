"""What every experiment's report is made of: one ``mean_std``, number formats, Markdown tables, figures.

The study modules beside this one lay out their tables and plots (they read their study's results)
from these pieces, so summary statistics and formats cannot drift apart between studies. matplotlib
is imported only when a figure is drawn (through :func:`pyplot`), on the Agg backend: the experiments
write PNG files and need no display.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import atomic

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.figure import Figure


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


def fmt_value(value: float | None, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or ``n/a`` where nothing was measured (``None``)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (figures go to files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def system_colours(systems: Iterable[str]) -> dict[str, Any]:
    """One tab10 colour per system name, in order of first appearance (repeats ignored; cycling past ten)."""
    palette = pyplot().get_cmap("tab10").colors
    return {s: palette[i % len(palette)] for i, s in enumerate(dict.fromkeys(systems))}


def seed_style(seed: int) -> str:
    """The line style of a seed's runs in a plot where colour is the system's."""
    styles = ("-", "--", ":", "-.")
    return styles[seed % len(styles)]


def save_figure(fig: Figure, path: str | Path, dpi: int) -> None:
    """Write ``fig`` to ``path`` atomically and close it (pyplot keeps every open figure alive otherwise)."""
    atomic.save_figure(fig, path, dpi=dpi)
    pyplot().close(fig)
