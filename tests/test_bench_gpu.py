"""benchmarks.gpu on CPU: the script runs end to end, and its Triton rows appear only where they can run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from sparsemoe import kernels
from sparsemoe.kernels import backends


def test_gpu_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    gpu.main(["--device", "cpu", "--quick", "--no-compile", "--out", str(tmp_path)])
    text = (tmp_path / "RESULTS-gpu.md").read_text()
    assert text.count("| sparsemoe (topk), no Triton |") == len(gpu.QUICK_SHAPES)
    assert "Triton kernels |" not in text
    assert "Triton row skipped: its kernels run on CUDA only" in text
    saturated = text.split("## DSelect-k and COMET once saturated")[1]
    for gate in ("dselect_k", "comet"):
        row = next(line for line in saturated.splitlines() if line.startswith(f"| sparsemoe ({gate}) |"))
        # saturated: k experts per input (a rare split left inside the soft band adds one), not all 64
        assert float(row.split("|")[2]) < gpu.SATURATED_K + 0.1


def test_triton_rows_need_cuda_and_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = gpu._ours(gpu.QUICK_SHAPES[0], torch.device("cpu"), torch.float32)
    monkeypatch.setitem(backends._LOADED, "triton", None)
    rows, note = gpu._triton_rows(ours, torch.device("cuda"))
    assert [c.name for c in rows] == ["sparsemoe (topk), no Triton"] and "not installed" in note
    monkeypatch.setitem(backends._LOADED, "triton", backends.TORCH)  # any loaded backend
    rows, note = gpu._triton_rows(ours, torch.device("cuda"))
    assert [c.name for c in rows] == ["sparsemoe (topk), Triton kernels", "sparsemoe (topk), no Triton"]
    assert note == ""


def test_switched_case_restores_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = gpu._ours(gpu.QUICK_SHAPES[0], torch.device("cpu"), torch.float32)
    seen: list[str] = []
    original = ours.forward

    def forward(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        seen.append(kernels.get_backend())
        return original(inp)

    monkeypatch.setattr(ours, "forward", forward)
    with kernels.use_backend("triton"):
        gpu._switched(ours, False).step()
        assert seen == ["torch"] and kernels.get_backend() == "triton"
