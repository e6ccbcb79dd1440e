"""Checkpoints: durable, complete, resuming to the same losses, and loud about bad files."""

from __future__ import annotations

import json
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


def _rewrite_meta(path, edit) -> None:
    """Rewrite the JSON metadata in ``path``'s safetensors header with ``edit(meta)``; tensors unchanged."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    meta = json.loads(header["__metadata__"]["sparsemoe"])
    edit(meta)
    header["__metadata__"]["sparsemoe"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + size :])


@pytest.mark.parametrize(
    "edit",
    {
        "step 5 -> 9": (b'\\"step\\": 5', b'\\"step\\": 9'),
        "config": (b'\\"lr\\": 0.5', b'\\"lr\\": 0.7'),
        "state": (b'\\"pos\\": 3', b'\\"pos\\": 4'),
    }.items(),
    ids=lambda item: item[0],
)
def test_edited_metadata_is_detected(tmp_path, edit) -> None:
    """The SHA-256 covers the header's metadata: an edit of the same length loads no more."""
    moe, opt = make("topk")
    step(moe, opt)
    path = save_checkpoint(tmp_path / "c.safetensors", moe, opt, step=5, config={"lr": 0.5}, state={"pos": 3})
    data = path.read_bytes()
    old, new = edit[1]
    assert data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    before = snapshot(moe, opt)
    with pytest.raises(ValueError, match=r"c\.safetensors .*metadata checksum mismatch"):
        load_checkpoint(path, moe, opt)
    assert_same(snapshot(moe, opt), before)


def test_format_2_checkpoints_still_load(tmp_path) -> None:
    """Files written before the metadata checksum (format 2) load as they did."""
    moe, opt = make("topk")
    step(moe, opt)
    path = save_checkpoint(tmp_path / "c.safetensors", moe, opt, step=4, config={"gate": "topk"})
    expected = step(moe, opt)

    def to_format_2(meta: dict) -> None:
        meta["format"] = 2
        del meta["meta_sha256"], meta["world_size"]

    _rewrite_meta(path, to_format_2)
    fresh, fresh_opt = make("topk")
    assert load_checkpoint(path, fresh, fresh_opt)["step"] == 4
    assert step(fresh, fresh_opt) == expected
    _rewrite_meta(path, lambda meta: meta.update(format=1))
    with pytest.raises(ValueError, match=r"checkpoint format 1, this version reads formats \[2, 3\]"):
        load_checkpoint(path, fresh, fresh_opt)


class _NotAScheduler:
    def __repr__(self) -> str:
        return "NotAScheduler()"


BAD_SAVE_ARGUMENTS = [
    ({"step": "x"}, TypeError, r"step must be an int .*got str \('x'\)"),
    ({"step": None}, TypeError, r"step must be an int .*got NoneType"),
    ({"step": 1.7}, TypeError, r"step must be an int .*got float \(1\.7\)"),
    ({"step": True}, TypeError, r"step must be an int .*got bool"),
    ({"step": -1}, ValueError, r"step must be >= 0, got -1"),
    ({"config": [1, 2]}, TypeError, r"config must be a dict .*got list \(\[1, 2\]\)"),
    ({"config": {"f": {1, 2}}}, TypeError, r"config cannot be stored in a checkpoint's JSON"),
    ({"state": "pos=3"}, TypeError, r"state must be a dict .*got str"),
    ({"tensors": {"a": 3}}, TypeError, r"tensors\['a'\] must be a torch\.Tensor, got int \(3\)"),
    ({"tensors": [torch.ones(2)]}, TypeError, r"tensors must be a dict of name -> torch\.Tensor"),
    ({"tensors": {1: torch.ones(2)}}, TypeError, r"tensors keys must be str, got int"),
    ({"model": "model"}, TypeError, r"model must be a torch\.nn\.Module, got str \('model'\)"),
    ({"optimizer": "adam"}, TypeError, r"optimizer must be a torch\.optim\.Optimizer or None, got str"),
    ({"scheduler": _NotAScheduler()}, TypeError, r"scheduler must be an LR scheduler"),
    ({"path": "folder"}, ValueError, r"path='.*folder' is an existing folder, not a file: pass a file path"),
    ({"path": "a_file/c.safetensors"}, ValueError, r"cannot be written: .*a_file is a file, not a folder"),
    ({"path": 3}, TypeError, r"path must be a str or os\.PathLike naming a checkpoint file, got int"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    BAD_SAVE_ARGUMENTS,
    ids=[", ".join(f"{k}={v!r}" for k, v in case[0].items()) for case in BAD_SAVE_ARGUMENTS],
)
def test_bad_save_arguments_name_the_argument_and_write_nothing(tmp_path, kwargs, error, match) -> None:
    moe, opt = make("topk")
    step(moe, opt)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    good = save_checkpoint(tmp_path / "c.safetensors", moe, opt, step=1)
    before = good.read_bytes()
    call = {"path": good, "model": moe, "optimizer": opt, **kwargs}
    if isinstance(call["path"], str):
        call["path"] = tmp_path / call["path"]
    with pytest.raises(error, match=match):
        save_checkpoint(**call)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "c.safetensors", "folder"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_loading_a_folder_says_what_is_there(tmp_path) -> None:
    moe, _ = make("topk")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty is a folder, not a checkpoint file: it is empty"):
        load_checkpoint(tmp_path / "empty", moe)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"holds 1 entry \(README\.txt\), none a \.safetensors file"):
        load_checkpoint(tmp_path / "notes", moe)
    save_checkpoint(tmp_path / "runs" / "last.safetensors", moe)
    save_checkpoint(tmp_path / "runs" / "best.safetensors", moe)
    with pytest.raises(
        ValueError, match=r"holds the checkpoint file\(s\) best\.safetensors, last\.safetensors: pass one"
    ):
        load_checkpoint(tmp_path / "runs", moe)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        load_checkpoint(tmp_path / "runs" / "last.safetensors", "model")  # type: ignore[arg-type]
