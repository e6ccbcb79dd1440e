"""Checkpoints: atomic, complete, and resuming to the same next loss."""

from __future__ import annotations

import pytest
import torch

from sparsemoe import MoE
from sparsemoe.checkpoint import load_checkpoint, save_checkpoint


def make(gate: str) -> tuple[MoE, torch.optim.Optimizer]:
    torch.manual_seed(3)
    moe = MoE(8, 16, 4, gate=gate, k=2)
    return moe, torch.optim.Adam(moe.parameters(), lr=1e-2)


def step(moe: MoE, opt: torch.optim.Optimizer) -> float:
    x = torch.randn(12, 8)  # global RNG: must be restored too
    loss = moe(x).pow(2).mean() + moe.aux_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("gate", ["topk", "random", "comet"])
def test_resume_gives_same_next_loss(tmp_path, gate: str) -> None:
    moe, opt = make(gate)
    for _ in range(4):
        step(moe, opt)
    save_checkpoint(tmp_path / "ckpt.safetensors", moe, opt, step=4, config={"gate": gate})
    expected = [step(moe, opt) for _ in range(3)]

    fresh, fresh_opt = make(gate)
    torch.manual_seed(999)  # disturb the global RNG; loading must restore it
    meta = load_checkpoint(tmp_path / "ckpt.safetensors", fresh, fresh_opt)
    assert meta == {"step": 4, "config": {"gate": gate}}
    assert [step(fresh, fresh_opt) for _ in range(3)] == pytest.approx(expected, abs=0, rel=1e-6)


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    moe, _ = make("topk")
    path = save_checkpoint(tmp_path / "c.safetensors", moe, step=1)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sparsemoe.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, moe, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


def test_load_errors(tmp_path) -> None:
    moe, opt = make("topk")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors", moe)
    path = save_checkpoint(tmp_path / "w.safetensors", moe)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, moe, opt)
