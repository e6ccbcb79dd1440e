"""Shared measuring instruments: interleaved timing with medians and spread, and allocation peaks.

The machine is shared, so absolute times drift with other people's load. Every comparison is
therefore made *within one run*: the candidates are called in turn (A B C A B C ...), and each
ratio is computed per round before taking its median, so that a slow stretch hits both sides.

A measurement also checks itself: it records the machine's load average before every round, and
when the rounds of a candidate (or the per-round ratios to the first candidate) spread by more
than :data:`MAX_SPREAD`, it runs more rounds (up to as many again). Whatever is still too wide, or
was measured while the load exceeded the cores, is flagged (:meth:`Stat.noisy`,
:meth:`Timings.flag`) so that the report prints it as uncertain rather than as a fact.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

#: The clocks a benchmark's ``--clock`` chooses between, by name (see :func:`use_clock`).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
#: How a results file names each of :data:`CLOCKS`.
CLOCK_LABELS = {"wall": "wall time", "cpu": "process CPU time"}
#: The clock of :func:`interleaved`: wall time by default; ``--clock cpu`` sets it to process CPU time.
CLOCK = time.perf_counter
#: Relative interquartile range (``(q3 - q1) / median``) above which rounds are repeated, then flagged.
MAX_SPREAD = 0.05


def load_per_core() -> float:
    """One-minute load average ÷ cores (above 1: runnable processes wait for a core); 0 where unknown."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def use_clock(name: str) -> None:
    """Make :data:`CLOCKS` ``[name]`` the clock of :func:`interleaved` (a benchmark's ``--clock``)."""
    global CLOCK
    CLOCK = CLOCKS[name]


def clock_name() -> str:
    """The name in :data:`CLOCKS` of the clock now in use."""
    return next(name for name, clock in CLOCKS.items() if clock is CLOCK)


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

    @property
    def spread(self) -> float:
        """Relative interquartile range, ``(q3 - q1) / median``."""
        return (self.q3 - self.q1) / self.median if self.median else 0.0

    def noisy(self) -> bool:
        """Too few rounds or too wide a spread to quote the median as a fact."""
        return self.repeats < 3 or self.spread > MAX_SPREAD

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        """``median [min–max]`` scaled (e.g. by 1e3 for milliseconds)."""
        m, lo, hi = (v * scale for v in (self.median, self.low, self.high))
        return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


@dataclass
class Timings:
    """Per-candidate times of one interleaved run (seconds), in round order, and the load per round."""

    samples: dict[str, list[float]]
    load: list[float] = field(default_factory=list)  # load average ÷ cores before each round

    def stat(self, name: str) -> Stat:
        return Stat.of(self.samples[name])

    def ratio(self, name: str, baseline: str) -> Stat:
        """``name / baseline`` computed round by round (both measured back to back), then summarised."""
        return Stat.of([a / b for a, b in zip(self.samples[name], self.samples[baseline], strict=True)])

    def overloaded(self) -> bool:
        """Most rounds ran while more processes wanted a core than there are cores."""
        return bool(self.load) and statistics.median(self.load) > 1.0

    def flag(self, name: str, baseline: str) -> str:
        """Why the ratio ``name / baseline`` should not be read as a fact ("" if it can)."""
        if name == baseline:
            return ""
        reasons = []
        r = self.ratio(name, baseline)
        if r.repeats < 3:
            reasons.append(f"only {r.repeats} round{'s' if r.repeats > 1 else ''}")
        elif r.noisy():
            reasons.append(f"spread ±{50 * r.spread:.0f}% over {r.repeats} rounds")
        if self.overloaded() and CLOCK is time.perf_counter:
            reasons.append(f"load {statistics.median(self.load):.1f}× the cores")
        return "uncertain: " + ", ".join(reasons) if reasons else ""

    def _too_wide(self) -> bool:
        names = list(self.samples)
        return any(self.stat(n).spread > MAX_SPREAD for n in names) or any(
            self.ratio(n, names[0]).spread > MAX_SPREAD for n in names[1:]
        )


def interleaved(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    min_time: float = 0.0,
    extra_rounds: int | None = None,
) -> Timings:
    """Time each candidate ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    ``min_time`` (seconds): a sample repeats the call until it lasts at least this long and reports
    the mean per call, so that millisecond-scale ops are not dominated by timer and scheduler noise.
    While the spread is wider than :data:`MAX_SPREAD`, up to ``extra_rounds`` more rounds run
    (default: ``repeats``); the first candidate is the baseline of the ratio check.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    timings = Timings({name: [] for name in candidates})
    extra = repeats if extra_rounds is None else extra_rounds
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        rounds = 0
        while rounds < repeats or (rounds < repeats + extra and timings._too_wide()):
            _round(candidates, timings, min_time)
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def _round(candidates: Mapping[str, Callable[[], object]], timings: Timings, min_time: float) -> None:
    """One timed call (or batch of calls lasting ``min_time``) of every candidate, in order."""
    timings.load.append(load_per_core())
    for name, fn in candidates.items():
        calls, start = 0, CLOCK()
        while True:
            fn()
            calls += 1
            elapsed = CLOCK() - start
            if elapsed >= min_time:
                break
        timings.samples[name].append(elapsed / calls)


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
