"""The run store and atomic writes: resumable runs, whole files only, normal permissions."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparsemoe.atomic import atomic_path, atomic_write_text, save_figure
from sparsemoe.experiments.store import RunStore, write_json


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that changes it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"x": 1})
    assert _mode(target) == 0o666 & ~mask
    atomic_write_text(target, "second")  # replacing an existing file gives the same mode
    assert _mode(target) == 0o666 & ~mask and target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_path_hands_a_sibling_to_path_based_writers(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and tmp != target
        assert not target.exists()
        tmp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_run_store_saves_finds_lists_and_clears(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    key = RunStore.key(gate="comet+", seed=0, lr=1e-3, note="a/b c")
    assert "/" not in key and " " not in key and key.startswith("gate=comet+__seed=0")
    assert store.get(key) is None
    store.put(key, {"auc": 0.9})
    store.put(RunStore.key(gate="topk", seed=1), {"auc": 0.8})
    assert store.get(key) == {"auc": 0.9}
    assert json.loads(store.path(key).read_text()) == {"auc": 0.9}
    assert sorted(r["auc"] for r in store) == [0.8, 0.9]
    store.clear()
    assert list(store) == [] and store.get(key) is None


def test_store_refuses_runs_made_with_other_settings(tmp_path: Path) -> None:
    store = RunStore(tmp_path, {"steps": 100, "lr": 0.1, "seeds": 2}, selection=("seeds",))
    store.put("seed=0", {"auc": 0.5})
    # Choosing other runs (seeds) resumes; changing what shapes a run does not.
    assert RunStore(tmp_path, {"steps": 100, "lr": 0.1, "seeds": 5}, selection=("seeds",)).get("seed=0") == {"auc": 0.5}
    with pytest.raises(ValueError, match=r"steps: saved 100, now 200.*new --out"):
        RunStore(tmp_path, {"steps": 200, "lr": 0.1, "seeds": 2}, selection=("seeds",))
    with pytest.raises(ValueError, match=r"momentum: saved None, now 0\.9"):
        RunStore(tmp_path, {"steps": 100, "lr": 0.1, "momentum": 0.9})
    # The recorded settings are not a run, and clearing forgets them.
    assert list(store) == [{"auc": 0.5}]
    store.clear()
    assert list(store) == []
    RunStore(tmp_path, {"steps": 200})  # a cleared folder takes new settings


def test_store_settings_survive_paths_and_tuples(tmp_path: Path) -> None:
    config = {"out": tmp_path / "x", "shape": (1, 2)}
    RunStore(tmp_path, config)
    RunStore(tmp_path, config)  # JSON turns tuples into lists and paths into strings: still equal


def test_every_write_is_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one writer fsyncs the file, then (after the rename) its folder."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(tmp_path / "a.json", {"x": 1})
    assert synced == ["file", "folder"]


def test_save_figure_keeps_the_format_of_the_suffix(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "plot.png", dpi=50)
    save_figure(fig, tmp_path / "plot.svg")
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "plot.svg"]


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".a.json.999999999.abcd.tmp"  # no such process
    live = tmp_path / f".a.json.{os.getpid()}.abcd.tmp"  # a writer still running (this one)
    stale.write_text("half")
    live.write_text("in progress")
    write_json(tmp_path / "a.json", [1])
    assert not stale.exists() and live.exists()


# Writers that bypass the one writer: a file written in place can be left half-written by a crash.
# Appending to a log ("a") is not a rewrite: a crash tears at most its last line, which readers drop.
_DIRECT_WRITES = re.compile(
    r"\.write_text\(|\.write_bytes\(|\.savefig\(|\bsave_file\(|\bsave_model\(|open\([^)]*['\"]w"
)


def test_the_package_writes_files_only_through_the_one_writer() -> None:
    src = Path(__file__).resolve().parents[1] / "src" / "sparsemoe"
    found = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "atomic.py" or path.parent.name == "data":  # data/: downloads, not results (yet)
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            # a library that writes by path is fine inside `with atomic_path(...) as tmp:` (writes to tmp)
            if _DIRECT_WRITES.search(code) and "(tmp" not in code and "str(tmp)" not in code:
                found.append(f"{path.relative_to(src)}:{number}: {line.strip()}")
    assert not found, "write these through sparsemoe.atomic:\n" + "\n".join(found)


def test_reuse_note_counts_the_saved_runs_a_rerun_will_skip(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    keys = [RunStore.key(gate="topk", seed=seed) for seed in range(3)]
    assert store.reuse_note(keys, "--fresh to retrain") is None  # nothing saved: nothing to say
    store.put(keys[0], {"seed": 0})
    assert store.reuse_note(keys, "--fresh to retrain") == (
        f"reusing 1 saved run (in {tmp_path / 'runs'}); --fresh to retrain"
    )
    store.put(keys[2], {"seed": 2})
    store.put(RunStore.key(gate="hash", seed=0), {"seed": 0})  # saved, but not asked for
    assert store.reuse_note(keys, "x").startswith("reusing 2 saved runs ")


def test_run_missing_trains_only_unsaved_keys_and_removes_their_checkpoints(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.put("done", {"seed": 0})
    calls: list[Path] = []

    def job(checkpoint: Path) -> dict:
        calls.append(checkpoint)
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.write_bytes(b"partial run")  # what an interrupted sitting would resume from
        return {"seed": 1}

    store.run_missing({"done": job, "new": job}, extra={"config": {"lr": 0.1}})
    assert calls == [tmp_path / "checkpoints" / "new.safetensors"]  # the saved run is not retrained
    assert store.get("new") == {"seed": 1, "config": {"lr": 0.1}} and store.get("done") == {"seed": 0}
    assert not calls[0].exists()
