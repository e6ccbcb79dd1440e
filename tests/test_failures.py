"""The failure-mode matrix of docs/failure-modes.md: each row is a test here (or named there).

A process killed while writing a checkpoint, bad data files and bad config files.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemoe import MoE
from sparsemoe.checkpoint import load_checkpoint
from sparsemoe.data.table import read_table
from sparsemoe.training import TrainConfig, fit

from conftest import needs_data

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def train(path: Path | None, resume: Path | None = None, epochs: int = 3) -> list[float]:
    """A tiny MoE regression run, checkpointing every 2 steps (4 steps per epoch)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    model = torch.nn.Sequential(MoE(6, 8, 4, gate="topk", k=2), torch.nn.Linear(6, 1))

    def loss(rows: torch.Tensor) -> torch.Tensor:
        return (model(x[rows]) - y[rows]).pow(2).mean() + model[0].aux_loss()

    return fit(
        model, loss, 32, lambda: (model(x) - y).pow(2).mean().item(), epochs=epochs, lr=0.02, batch_size=8, seed=0,
        checkpoint_path=path, checkpoint_every=2 if path else None, resume=resume,
    ).step_losses  # fmt: skip


# The child trains and stalls inside the 2nd checkpoint write (after the 1st is on disk), at a point
# given by argv[1]; the test SIGKILLs it there. "write": half the file's bytes in the temporary file;
# "rename": all bytes written and fsync-ed, before os.replace.
CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import sparsemoe.checkpoint as ck
from test_failures import train

where, path = sys.argv[1], sys.argv[2]
calls = {{"n": 0}}
real_save, real_replace = ck.save_file, os.replace

def stall():
    print("STALLED", flush=True)
    time.sleep(600)

def save_file(tensors, filename, metadata=None):
    calls["n"] += 1
    real_save(tensors, filename, metadata=metadata)
    if calls["n"] == 2 and where == "write":
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        stall()

def replace(a, b):
    if calls["n"] == 2 and where == "rename":
        stall()
    return real_replace(a, b)

ck.save_file, os.replace = save_file, replace
train(__import__("pathlib").Path(path))
print("FINISHED", flush=True)
"""


@pytest.mark.parametrize("where", ["write", "rename"])
def test_killed_while_writing_a_checkpoint(tmp_path, where: str) -> None:
    path = tmp_path / "run.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS)), where, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and not line and child.poll() is None:
            line = child.stdout.readline().strip()  # type: ignore[union-attr]
        assert line == "STALLED", f"child did not reach the checkpoint write: {line!r}"
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1  # the write in progress
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    # the previous checkpoint (step 2) is intact and loadable
    meta = load_checkpoint(path, torch.nn.Sequential(MoE(6, 8, 4, gate="topk", k=2), torch.nn.Linear(6, 1)))
    assert meta["step"] == 2
    # resuming from it (and writing to it again) gives the uninterrupted run's losses, bit for bit;
    # the first save also removes the dead writer's temp file
    full = train(None)
    assert train(path, resume=path) == full[2:]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_resume_from_a_corrupted_checkpoint_stops_before_touching_it(tmp_path) -> None:
    path = tmp_path / "run.safetensors"
    train(path, epochs=1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"run\.safetensors is not a readable sparsemoe checkpoint: checksum mismatch"):
        train(path, resume=path)
    assert path.read_bytes() == bytes(data)  # not overwritten by the failed run


# ----------------------------------------------------------------------------- data files
def write_inter(path: Path, lines: list[str]) -> Path:
    path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(x + "\n" for x in lines))
    return path


def test_data_file_missing(tmp_path) -> None:
    from sparsemoe.data.movielens import read_ratings

    with pytest.raises(FileNotFoundError, match=r"data file .*nowhere/ml-100k\.inter is missing"):
        read_ratings(str(tmp_path / "nowhere"))


def test_data_file_empty(tmp_path) -> None:
    from sparsemoe.data.movielens import read_ratings

    write_inter(tmp_path / "ml-100k.inter", [])
    with pytest.raises(ValueError, match=r"ml-100k\.inter is empty: no data lines after 1 header line"):
        read_ratings(str(tmp_path))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ValueError, match=r"e\.csv is empty"):
        read_table(tmp_path / "e.csv", columns=3, delimiter=",")


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("7\t12", r"line 4: 2 fields, expected 4"),
        ("7\tdune\t3\t881250949", r"line 4, field 2: 'dune' is not an integer"),
    ],
)
def test_data_file_malformed_names_file_and_line(tmp_path, bad_line: str, message: str) -> None:
    from sparsemoe.data.movielens import read_ratings

    write_inter(tmp_path / "ml-100k.inter", ["196\t242\t3\t881250949", "186\t302\t3\t891717742", bad_line])
    with pytest.raises(ValueError, match=r"ml-100k\.inter, " + message):
        read_ratings(str(tmp_path))


def test_good_table_reads_and_gzip_truncation_is_reported(tmp_path) -> None:
    good = tmp_path / "t.csv.gz"
    with gzip.open(good, "wt") as f:
        f.write("".join(f"{i},{i + 1},{i + 2}\n" for i in range(2000)))
    table = read_table(good, columns=3, delimiter=",")
    assert table.shape == (2000, 3) and table[5].tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match=r"t\.csv\.gz, line 1: 3 fields, expected 4"):
        read_table(good, columns=4, delimiter=",")
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"cut\.csv\.gz is damaged or truncated"):
        read_table(cut, columns=3, delimiter=",")


@needs_data("movielens-100k")
def test_real_data_reads_unchanged() -> None:
    from sparsemoe.data.movielens import read_ratings

    ratings = read_ratings()
    assert ratings.shape == (100_000, 3) and ratings[0].tolist() == [196, 242, 3]
    assert np.isin(ratings[:, 2], [1, 2, 3, 4, 5]).all()


# ----------------------------------------------------------------------------- config files
def test_config_unknown_key(tmp_path) -> None:
    path = tmp_path / "train.json"
    path.write_text('{"epochs": 2, "learning_rate": 0.1}')
    with pytest.raises(ValueError, match=r"train\.json: unknown key 'learning_rate'"):
        TrainConfig.from_file(path)
    path.write_text('{"epoch": 2}')
    with pytest.raises(ValueError, match=r"unknown key 'epoch'; did you mean 'epochs'\?"):
        TrainConfig.from_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"lr": "0.1"}', r"key 'lr' must be float, got str"),
        ('{"epochs": true}', r"key 'epochs' must be int or null, got bool"),
        ('{"batch_size": 8.5}', r"key 'batch_size' must be int, got float"),
        ('{"patience": "never"}', r"key 'patience' must be int or null, got str"),
    ],
)
def test_config_wrong_type(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(TypeError, match=r"train\.json: " + message):
        TrainConfig.from_file(path)


def test_config_bad_values_and_files(tmp_path) -> None:
    path = tmp_path / "train.toml"
    path.write_text('nan_policy = "ignore"\n')
    with pytest.raises(ValueError, match=r"train\.toml: nan_policy must be one of"):
        TrainConfig.from_file(path)
    path.write_text("epochs = \n")
    with pytest.raises(ValueError, match=r"train\.toml is not valid TOML"):
        TrainConfig.from_file(path)
    with pytest.raises(FileNotFoundError, match="missing"):
        TrainConfig.from_file(tmp_path / "none.json")
    path.write_text("epochs = 2\nlr = 1\nwarmup_steps = 3\n")
    config = TrainConfig.from_file(path)
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.scheduler() is not None
