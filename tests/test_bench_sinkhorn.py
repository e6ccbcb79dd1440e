"""The Sinkhorn benchmark times equal functions and writes its results file."""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import sinkhorn as bench
from sparsemoe.search import sinkhorn


def test_textbook_loop_is_the_library_sinkhorn() -> None:
    x = torch.randn(6, 6, dtype=torch.float64) / 0.1
    torch.testing.assert_close(bench.textbook(x, 20), sinkhorn(x, 20))


def test_main_writes_one_row_per_candidate(tmp_path: Path) -> None:
    out = bench.main(["--n", "4", "--iterations", "3", "--repeats", "2", "--out", str(tmp_path / "r.md")])
    text = out.read_text()
    assert "python -m benchmarks.sinkhorn --n 4 --iterations 3" in text and "clock: process CPU time" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "candidate" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| textbook unrolled", "| sparsemoe default", "| truncated (5)"]
