"""Shared measuring instruments: interleaved timing with medians and spread, and allocation peaks.

The machine is shared, so absolute times drift with other people's load. Every comparison is
therefore made *within one run*: the candidates are called in turn (A B C A B C ...), and each
ratio is computed per round before taking its median, so that a slow stretch hits both sides.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: The clock of :func:`interleaved`: wall time by default; :func:`use_clock` switches it.
CLOCK = time.perf_counter


@dataclass(frozen=True)
class Stat:
    """Median of repeats with their spread (min, max and the interquartile range)."""

    median: float
    low: float
    high: float
    q1: float
    q3: float
    repeats: int

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        if not samples:
            raise ValueError("no samples")
        s = sorted(samples)
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
        return cls(statistics.median(s), s[0], s[-1], q1, q3, len(s))

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        """``median [min–max]`` scaled (e.g. by 1e3 for milliseconds)."""
        m, lo, hi = (v * scale for v in (self.median, self.low, self.high))
        return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


@dataclass
class Timings:
    """Per-candidate wall times of one interleaved run (seconds), in round order."""

    samples: dict[str, list[float]]

    def stat(self, name: str) -> Stat:
        return Stat.of(self.samples[name])

    def ratio(self, name: str, baseline: str) -> Stat:
        """``name / baseline`` computed round by round (both measured back to back), then summarised."""
        return Stat.of([a / b for a, b in zip(self.samples[name], self.samples[baseline], strict=True)])


def interleaved(
    candidates: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, min_time: float = 0.0
) -> Timings:
    """Time each candidate ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    ``min_time`` (seconds): a sample repeats the call until it lasts at least this long and reports
    the mean per call, so that millisecond-scale ops are not dominated by timer and scheduler noise.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in candidates.items():
                calls, start = 0, CLOCK()
                while True:
                    fn()
                    calls += 1
                    elapsed = CLOCK() - start
                    if elapsed >= min_time:
                        break
                samples[name].append(elapsed / calls)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timings(samples)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes held by tensors allocated while ``fn`` runs, relative to its start.

    Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
    PyTorch's CPU allocator with its size; the running sum of those events, in time order, is the
    live memory ``fn`` added, and its maximum is the peak. This counts exactly the tensors the op
    creates (activations saved for backward, temporaries, gradients), unlike process RSS, which
    the C allocator's caching blurs. Freeing memory allocated before ``fn`` (e.g. an old ``.grad``)
    would lower the running sum, so callers clear gradients first.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def machine_info() -> dict[str, str]:
    """CPU model, core count, torch version and threads, for the header of RESULTS.md."""
    import os
    import platform

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor() or "unknown"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }
