"""Markdown tables and matplotlib figures shared by the benchmark families."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sparsemoe.atomic import atomic_write_text, save_figure

from . import timing
from .timing import Stat


@dataclass
class Section:
    """One part of RESULTS.md: a title, Markdown text, figures written, and target checks."""

    title: str
    body: str
    figures: list[str] = field(default_factory=list)
    targets: list[list[str]] = field(default_factory=list)  # rows: target, where we land, met?, why not


def write_results(out: Path, measure: Callable[[], Section], *, command: str, threads: int, repeats: int) -> str:
    """Run ``measure`` and write its section to ``out`` (atomically) under a header naming the command, the
    machine, the clock (:data:`timing.CLOCK`), the time it took and the load around it; returns the text."""
    load = timing.load_per_core()
    start = time.perf_counter()
    section = measure()
    seconds, load_after = time.perf_counter() - start, timing.load_per_core()
    info = timing.machine_info()
    clock = timing.CLOCK_LABELS[timing.clock_name()]
    loaded = " (loaded machine: read the ratios, not the times)" if max(load, load_after) > 1 else ""
    text = (
        f"# {section.title}\n\nProduced by `OMP_NUM_THREADS={threads} {command}` in {seconds:.0f} s on "
        f"{info['cpu']} ({info['cores']} cores, shared with other jobs), torch {info['torch']}, {threads} thread(s), "
        f"clock: {clock}. Load average per core at start and end: {load:.1f}, {load_after:.1f}{loaded}. "
        f"A short run ({repeats} rounds per shape).\n\n" + section.body
    )
    atomic_write_text(out, text)
    return text


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
