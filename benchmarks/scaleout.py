"""``python -m benchmarks.scaleout``: training steps per second of a small MoE model on 1 and 2
processes (one thread each, gloo), and the share of each step spent in collectives.

The model: Linear(d, d) -> MoE(d, hidden, n experts, top-2, MLP experts) -> Linear(d, 1), float32,
a global batch of ``B`` rows per step (MSE to a random target, Adam). Three set-ups, each a
``torch.multiprocessing.spawn`` of its own (gloo on 127.0.0.1, ``torch.set_num_threads(1)``):

* ``1 process``: the whole batch;
* ``2 processes, data-parallel``: each rank ``B/2`` rows, then the replicated gradients averaged by
  :func:`sparsemoe.distributed.average_replicated_gradients` (one flattened all-reduce after the
  backward; DDP's bucketed all-reduce moves the same bytes but overlaps them with the backward, so
  this share is an upper bound of what DDP exposes);
* ``2 processes, expert-parallel``: the same, after :func:`sparsemoe.distributed.expert_parallel`
  (each rank holds n/2 experts; rows cross ranks in two ``all_to_all_single`` per MoE forward and
  two per backward; only the replicated gradients are all-reduced).

Communication share: the time spent inside ``torch.distributed.all_to_all_single`` and
``all_reduce`` (wrapped with a clock; gloo runs them synchronously) over the step time. It includes
waiting for the other rank, so load imbalance (and the other users of a shared machine) count as
communication. Steps per second: the median of ``--rounds`` rounds of ``--steps`` steps after a
warm-up; the global batch is the same in every set-up, so steps per second compare throughput.
Writes ``benchmarks/RESULTS-scaleout.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsemoe import MoE
from sparsemoe.atomic import atomic_write_text
from sparsemoe.distributed import average_replicated_gradients, expert_parallel

from .timing import load_per_core, machine_info

HERE = Path(__file__).resolve().parent
#: the model and batch: d, expert hidden width, experts, global batch rows
SHAPE: dict[str, int] = {"d": 128, "hidden": 256, "experts": 16, "batch": 1024}
SETUPS: list[tuple[str, int, bool]] = [
    ("1 process", 1, False),
    ("2 processes, data-parallel", 2, False),
    ("2 processes, expert-parallel", 2, True),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same model on every rank
    d = SHAPE["d"]
    moe = MoE(d, SHAPE["hidden"], SHAPE["experts"], gate="topk", k=2, noisy=False, balance_weight=0.0)
    return torch.nn.Sequential(torch.nn.Linear(d, d), moe, torch.nn.Linear(d, 1))


class _CommClock:
    """Wraps ``dist.all_to_all_single`` and ``dist.all_reduce`` to add up the seconds spent in them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("all_to_all_single", "all_reduce"):
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _worker(rank: int, world: int, ep: bool, port: int, steps: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
        )
    model = _model()
    if ep:
        expert_parallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = SHAPE["batch"] // world
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own rows
    x, t = torch.randn(rows, SHAPE["d"], generator=gen), torch.randn(rows, 1, generator=gen)
    clock = _CommClock()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (model(x) - t).pow(2).mean().backward()
        if world > 1:
            average_replicated_gradients(model)
        opt.step()

    for _ in range(3):  # warm-up
        step()
    per_round, shares = [], []
    for _ in range(rounds):
        if world > 1:
            dist.barrier()
        clock.seconds = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            step()
        took = time.perf_counter() - start
        per_round.append(steps / took)
        shares.append(clock.seconds / took)
    mine = {"steps_per_s": statistics.median(per_round), "comm_share": statistics.median(shares)}
    everyone: list[Any] = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        dist.destroy_process_group()
    if rank == 0:
        torch.save(everyone, Path(out))


def measure(world: int, ep: bool, steps: int, rounds: int, scratch: Path) -> list[dict[str, float]]:
    """Per rank: ``{"steps_per_s", "comm_share"}`` of one set-up (spawned processes)."""
    path = scratch / f"scaleout-{world}-{int(ep)}.pt"
    mp.spawn(_worker, args=(world, ep, _free_port(), steps, rounds, str(path)), nprocs=world, join=True)
    found: list[dict[str, float]] = torch.load(path)
    path.unlink()
    return found


def render(rows: list[tuple[str, float, list[dict[str, float]]]], steps: int, rounds: int, seconds: float) -> str:
    """The markdown report; ``rows``: (set-up, load average per core before it, per-rank results)."""
    info = machine_info()
    shape = SHAPE
    base = statistics.fmean(r["steps_per_s"] for r in rows[0][2])
    lines = [
        "# Scale-out benchmark: one training step of a small MoE model on 1 and 2 processes",
        "",
        f"Produced by `python -m benchmarks.scaleout --steps {steps} --rounds {rounds}` in {seconds:.0f} s on "
        f"{info['cpu']} ({info['cores']} cores, shared), torch {info['torch']}, one thread per process, gloo. "
        "See the module doc of `benchmarks/scaleout.py`.",
        "",
        f"Model: Linear({shape['d']}, {shape['d']}) -> MoE({shape['d']}, {shape['hidden']}, {shape['experts']} "
        f"experts, top-2, MLP) -> Linear({shape['d']}, 1), float32; global batch {shape['batch']} rows "
        "(split evenly over the processes); Adam.",
        "",
        "| set-up | steps/s (rank 0) | steps/s (slowest rank) | speed-up vs 1 process | "
        "communication share (rank 0) | communication share (max over ranks) | load average per core before |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, load, found in rows:
        slowest = min(r["steps_per_s"] for r in found)
        lines.append(
            f"| {name} | {found[0]['steps_per_s']:.1f} | {slowest:.1f} | {slowest / base:.2f}x | "
            f"{100 * found[0]['comm_share']:.0f}% | {100 * max(r['comm_share'] for r in found):.0f}% | {load:.2f} |"
        )
    lines += [
        "",
        "Communication share: seconds inside `all_to_all_single`/`all_reduce` (waiting for the other rank "
        "included) over the step time. The set-ups run one after another on a machine shared with other users: "
        "a load average per core above 1 means processes waited for a core, which slows the 2-process set-ups "
        "most (their ranks wait for each other) and makes the speed-ups uncertain between runs.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaleout", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per round (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (default 5)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-scaleout.md", help="the markdown file to write")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    scratch = args.out.resolve().parent
    rows = [(name, load_per_core(), measure(world, ep, args.steps, args.rounds, scratch)) for name, world, ep in SETUPS]
    text = render(rows, args.steps, args.rounds, time.perf_counter() - start)
    atomic_write_text(args.out, text)
    print(text)
    return args.out


if __name__ == "__main__":
    main()
