"""Checkpoints: durable, complete, resuming to the same losses, and loud about bad files."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch

from sparsemoe import MoE
from sparsemoe.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint


def make(gate: str) -> tuple[MoE, torch.optim.Optimizer]:
    torch.manual_seed(3)
    moe = MoE(8, 16, 4, gate=gate, k=2)
    return moe, torch.optim.Adam(moe.parameters(), lr=1e-2)


def step(moe: MoE, opt: torch.optim.Optimizer) -> float:
    # every global RNG feeds the loss: all must be restored
    x = torch.randn(12, 8) + float(np.random.rand()) + random.random()
    loss = moe(x).pow(2).mean() + moe.aux_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def snapshot(moe: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return (
        {k: v.clone() for k, v in moe.state_dict().items()},
        {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()} for k, s in opt.state.items()},
    )


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert len(a[1]) == len(b[1])


@pytest.mark.parametrize("gate", ["topk", "random", "comet"])
def test_resume_gives_identical_losses(tmp_path, gate: str) -> None:
    moe, opt = make(gate)
    for _ in range(4):
        step(moe, opt)
    save_checkpoint(tmp_path / "ckpt.safetensors", moe, opt, step=4, config={"gate": gate}, state={"pos": 3})
    expected = [step(moe, opt) for _ in range(3)]

    fresh, fresh_opt = make(gate)
    torch.manual_seed(999)  # disturb every RNG; loading must restore them
    np.random.seed(999)
    random.seed(999)
    meta = load_checkpoint(tmp_path / "ckpt.safetensors", fresh, fresh_opt)
    assert meta == {"step": 4, "config": {"gate": gate}, "state": {"pos": 3}, "tensors": {}}
    assert [step(fresh, fresh_opt) for _ in range(3)] == expected  # bit-identical


def test_scheduler_and_extra_tensors_round_trip(tmp_path) -> None:
    moe, opt = make("topk")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        step(moe, opt)
        sched.step()
    best = {"w": torch.arange(6.0).view(2, 3)}
    save_checkpoint(tmp_path / "c.safetensors", moe, opt, scheduler=sched, tensors=best)
    fresh, fresh_opt = make("topk")
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    meta = load_checkpoint(tmp_path / "c.safetensors", fresh, fresh_opt, scheduler=fresh_sched)
    assert torch.equal(meta["tensors"]["w"], best["w"])
    assert fresh_sched.state_dict() == sched.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 5e-3
    assert isinstance(fresh_opt.param_groups[0]["betas"], tuple)


def test_written_durably_with_normal_permissions(tmp_path, monkeypatch) -> None:
    moe, opt = make("topk")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "sub" / "c.safetensors", moe, opt)
    finally:
        os.umask(old)
    assert len(synced) == 2  # the file, then its folder
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0o666 minus the umask, not mkstemp's 0o600
    assert [p.name for p in path.parent.iterdir()] == ["c.safetensors"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    moe, _ = make("topk")
    path = save_checkpoint(tmp_path / "c.safetensors", moe, step=1)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, moe, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left behind


def test_stale_temp_of_dead_writer_is_removed(tmp_path) -> None:
    moe, _ = make("topk")
    stale = tmp_path / ".c.safetensors.999999999.abcd.tmp"  # no such pid
    stale.write_bytes(b"half a checkpoint")
    save_checkpoint(tmp_path / "c.safetensors", moe)
    assert not stale.exists()


def _torch_save(path) -> None:
    torch.save({"w": torch.ones(3)}, path)


@pytest.mark.parametrize(
    "make_bad",
    {
        "truncated": lambda p, good: p.write_bytes(good[: len(good) // 2]),
        "header only": lambda p, good: p.write_bytes(good[:6]),
        "random bytes": lambda p, good: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "text": lambda p, good: p.write_text("step = 3\nweights: none\n"),
        "torch.save": lambda p, good: _torch_save(p),
        "flipped byte": lambda p, good: p.write_bytes(good[:-10] + bytes([good[-10] ^ 0xFF]) + good[-9:]),
        "empty": lambda p, good: p.write_bytes(b""),
    }.items(),
    ids=lambda item: item[0],
)
def test_bad_files_raise_value_error_naming_the_file(tmp_path, make_bad) -> None:
    moe, opt = make("topk")
    step(moe, opt)
    good = save_checkpoint(tmp_path / "good.safetensors", moe, opt).read_bytes()
    bad = tmp_path / "bad.safetensors"
    make_bad[1](bad, good)
    content = bad.read_bytes()
    before = snapshot(moe, opt)
    with pytest.raises(ValueError, match=r"bad\.safetensors") as info:
        load_checkpoint(bad, moe, opt)
    assert "SafetensorError" not in type(info.value).__name__
    assert_same(snapshot(moe, opt), before)
    assert bad.read_bytes() == content  # nothing overwritten


def test_adam_checkpoint_into_sgd_is_a_clear_error(tmp_path) -> None:
    moe, opt = make("topk")
    step(moe, opt)
    path = save_checkpoint(tmp_path / "adam.safetensors", moe, opt)
    other, _ = make("topk")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    sgd = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    before_groups = [dict(g) for g in sgd.state_dict()["param_groups"]]
    before = snapshot(other, sgd)
    with pytest.raises(ValueError, match=r"adam\.safetensors holds a Adam optimizer state .* given is SGD"):
        load_checkpoint(path, other, sgd)
    assert_same(snapshot(other, sgd), before)  # the model was not loaded either
    assert sgd.state_dict()["param_groups"] == before_groups


def test_model_mismatch_is_a_clear_error(tmp_path) -> None:
    moe, _ = make("topk")
    path = save_checkpoint(tmp_path / "w.safetensors", moe)
    expected = r"w\.safetensors: experts\.w1 has shape \(4, 8, 16\), the model has \(5, 8, 16\)"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(path, MoE(8, 16, 5, gate="topk", k=2))
    with pytest.raises(ValueError, match="does not fit this model: missing keys"):
        load_checkpoint(path, MoE(8, 16, 4, gate="comet", k=2))


def test_load_errors(tmp_path) -> None:
    moe, opt = make("topk")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors", moe)
    path = save_checkpoint(tmp_path / "w.safetensors", moe)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, moe, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(ValueError, match="no LR scheduler state"):
        load_checkpoint(path, moe, scheduler=sched)


def test_no_pickle_needed(tmp_path, monkeypatch) -> None:
    moe, opt = make("topk")
    step(moe, opt)
    path = save_checkpoint(tmp_path / "c.safetensors", moe, opt)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    tensors, meta = read_checkpoint(path)
    assert "model.gate.proj.weight" in tensors and meta["optimizer"]["class"] == "Adam"
    load_checkpoint(path, *make("topk"))
