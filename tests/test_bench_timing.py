"""benchmarks.timing: measurements repeat rounds that spread too wide and flag what stays uncertain.

A fake clock makes the candidates' durations exact, so the logic is tested without timing anything.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is not installed

from benchmarks import report, timing


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _candidates(clock: FakeClock, durations: dict[str, list[float]]) -> dict[str, object]:
    cycles = {name: itertools.cycle(values) for name, values in durations.items()}

    def make(name: str):
        def run() -> None:
            clock.now += next(cycles[name])

        return run

    return {name: make(name) for name in durations}


def test_steady_candidates_run_exactly_the_rounds_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(timing, "CLOCK", clock)
    t = timing.interleaved(_candidates(clock, {"a": [1.0], "b": [1.5]}), repeats=4, warmup=0)
    assert len(t.samples["a"]) == 4 and len(t.load) == 4
    ratio = t.ratio("b", "a")
    assert ratio.median == 1.5 and not ratio.noisy()
    assert "(noisy)" not in report.ratio(ratio)
    assert report.verdict(True, ratio) == "met"


def test_spread_rounds_are_repeated_then_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(timing, "CLOCK", clock)
    monkeypatch.setattr(timing, "load_per_core", lambda: 0.5)
    t = timing.interleaved(_candidates(clock, {"a": [1.0], "b": [1.0, 2.0, 1.2, 1.7]}), repeats=4, warmup=0)
    assert len(t.samples["b"]) == 8  # as many extra rounds again, and no more
    ratio = t.ratio("b", "a")
    assert ratio.noisy()
    assert report.ratio(ratio).endswith("(noisy)")
    assert report.verdict(False, ratio).startswith("**missed**?")
    assert t.flag("b", "a").startswith("uncertain: spread")


def test_load_above_the_cores_is_flagged_for_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(timing, "load_per_core", lambda: 3.0)
    monkeypatch.setattr(timing, "CLOCK", clock)
    t = timing.interleaved(_candidates(clock, {"a": [1.0], "b": [1.1]}), repeats=3, warmup=0)
    assert t.overloaded()
    assert t.flag("b", "a") == ""  # the fake clock is not wall time: load does not distort it
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    monkeypatch.setattr(timing, "CLOCK", timing.time.perf_counter)
    assert "load 3.0× the cores" in t.flag("b", "a")
