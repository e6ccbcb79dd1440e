"""Failure modes of multi-process training (docs/failure-modes.md): a rank that dies mid-step or
hangs stops the others with a clear error within the process group's timeout, and the last
checkpoint stays intact and resumable.

Each scenario spawns 2 gloo ranks (a 3-second timeout) without ``join``: ``mp.spawn``'s own join
would kill the surviving rank as soon as the other exits, before it reports what it saw.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import sparsemoe
from sparsemoe.checkpoint import read_checkpoint
from sparsemoe.training import RandomBatches, TrainConfig, Trainer

TIMEOUT_S = 3.0
FAIL_AT = 5  # rank 1 fails in the loss of step 5; checkpoints every 2 steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out: str, how: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), sparsemoe.MoE(4, 8, 4, gate="topk", k=2), torch.nn.Linear(4, 1))
    ddp = DistributedDataParallel(model)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    t = x.sum(1, keepdim=True)

    def loss(rows: torch.Tensor) -> torch.Tensor:
        if rank == 1 and trainer.step == FAIL_AT - 1:
            if how == "dies":
                os._exit(3)
            time.sleep(2 * TIMEOUT_S)  # hangs: rank 0 waits in the next collective until the timeout
        return (ddp(x[rows]) - t[rows]).pow(2).mean()

    path = str(Path(out, "last.safetensors"))
    config = TrainConfig(epochs=50, lr=1e-2, batch_size=8, checkpoint_every=2, checkpoint_path=path)
    trainer = Trainer(ddp, loss, RandomBatches(64, 8, 0), config)
    start = time.perf_counter()
    try:
        trainer.run()
        message = "no error"
    except RuntimeError as err:
        message = str(err)
    Path(out, f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.3f}\n{message}")
    os._exit(0)  # the group is broken: skip destroy_process_group (it would wait for the lost rank)


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_failed_rank_stops_the_other_with_the_last_checkpoint(tmp_path: Path, how: str) -> None:
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path), how), nprocs=2, join=False)
    assert context is not None
    for process in context.processes:
        process.join(60)
    assert not any(p.is_alive() for p in context.processes), "a rank is still running"
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    # it dies: the connection closes and rank 0 stops at once; it hangs (for twice the timeout): rank 0
    # stops when its collective times out, before rank 1 wakes up
    if how == "dies":
        assert float(seconds) < TIMEOUT_S, seconds
    else:
        assert TIMEOUT_S <= float(seconds) < 2 * TIMEOUT_S, seconds
        assert "Timed out" in message, message
    assert message.startswith(f"rank 0 of 2 stopped after {FAIL_AT - 1} steps: "), message
    last = FAIL_AT - 1 - (FAIL_AT - 1) % 2
    assert f"the last checkpoint is {tmp_path / 'last.safetensors'} (step {last})" in message, message
    _, meta = read_checkpoint(tmp_path / "last.safetensors")  # intact: its checksum verifies
    assert meta["step"] == last
