"""Markdown tables and matplotlib figures shared by the benchmark families."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparsemoe.atomic import save_figure

from .timing import Stat


@dataclass
class Section:
    """One part of RESULTS.md: a title, Markdown text, figures written, and target checks."""

    title: str
    body: str
    figures: list[str] = field(default_factory=list)
    targets: list[list[str]] = field(default_factory=list)  # rows: target, where we land, met?, why not


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def ms(stat: Stat) -> str:
    """Milliseconds, ``median [min–max]``."""
    return stat.fmt(1e3, 1)


def us(stat: Stat) -> str:
    """Microseconds, ``median [min–max]``."""
    return stat.fmt(1e6, 0)


def ratio(stat: Stat) -> str:
    """``median [min–max]``, marked "(noisy)" when the rounds spread too wide to read it as a fact."""
    return f"{stat.median:.3f} [{stat.low:.3f}–{stat.high:.3f}]" + (" (noisy)" if stat.noisy() else "")


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.0f}"


def verdict(ok: bool, stat: Stat | None = None) -> str:
    """``met`` / ``**missed**``; with a ``stat`` whose spread is too wide, only a likely verdict."""
    word = "met" if ok else "**missed**"
    return f"{word}? (uncertain: noisy)" if stat is not None and stat.noisy() else word


def pyplot():
    """matplotlib with a file-only backend (no display on CI machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def errorbar(ax, xs: Sequence[float], stats: Sequence[Stat], label: str, **kw: object) -> None:
    """Median with a bar from min to max."""
    med = [s.median for s in stats]
    lo = [s.median - s.low for s in stats]
    hi = [s.high - s.median for s in stats]
    ax.errorbar(xs, med, yerr=[lo, hi], capsize=3, marker="o", label=label, **kw)


def save(fig, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    save_figure(fig, out_dir / name, dpi=110)
    pyplot().close(fig)
    return name
