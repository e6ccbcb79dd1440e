"""Sinkhorn forward + backward: the exact default against the textbook unrolled iteration.

Not called by the benchmark runner. One thread, by default n = 16 at the schedule's last point
(τ = 1e-7, 150 iterations). Candidates, all timed interleaved:

* ``textbook unrolled``: ``x - logsumexp(x)`` per half-step, differentiated by autograd (the gradient
  the official code computes, written the obvious way);
* ``sparsemoe default``: :func:`sparsemoe.search.sinkhorn`, one fused ``log_softmax`` per half-step,
  the same gradient (tests/test_search.py checks it to 1e-9 in float64);
* ``truncated (5)``: the approximation ``grad_iterations=5`` (a different gradient), for scale.

``python -m benchmarks.sinkhorn`` writes ``benchmarks/RESULTS-sinkhorn.md``; ``--clock`` picks process
CPU time (the default: the machine is shared) or wall time.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import timing
from benchmarks.report import Section, ms, ratio, table, write_results
from sparsemoe.search import sinkhorn

HERE = Path(__file__).resolve().parent


def textbook(x: torch.Tensor, iterations: int) -> torch.Tensor:
    for _ in range(iterations):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x.exp()


def measure(n: int, iterations: int, tau: float, repeats: int) -> Section:
    """Forward + backward of each candidate on one ``n x n`` matrix, timed interleaved."""
    torch.manual_seed(0)
    log_alpha = torch.empty(n, n).uniform_(-0.05, 0.05).requires_grad_()
    weights = torch.randn(n, n)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            log_alpha.grad = None
            (weights * fn(log_alpha / tau)).sum().backward()

        return call

    candidates = {
        "textbook unrolled": step(lambda x: textbook(x, iterations)),
        "sparsemoe default": step(lambda x: sinkhorn(x, iterations)),
        "truncated (5)": step(lambda x: sinkhorn(x, iterations, grad_iterations=5)),
    }
    result = timing.interleaved(candidates, repeats=repeats, warmup=2, min_time=0.05)
    rows = [[name, ms(result.stat(name)), ratio(result.ratio(name, "textbook unrolled"))] for name in candidates]
    body = (
        f"One forward + backward of Sinkhorn on one {n}x{n} matrix, {iterations} iterations, tau = {tau:g} "
        "(the permutation schedule's last point). Ratio: this / textbook, round by round (< 1: faster). "
        "`sparsemoe default` computes the textbook gradient (tests/test_search.py checks it to 1e-9 in "
        "float64); `truncated (5)` is the `grad_iterations=5` approximation, a different gradient.\n\n"
        + table(["candidate", "ms per forward+backward", "this / textbook"], rows)
    )
    return Section("Sinkhorn: the exact default against the textbook unrolled iteration", body)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sinkhorn", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--tau", type=float, default=1e-7)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=tuple(timing.CLOCKS), default="cpu", help="cpu: process CPU time (default)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-sinkhorn.md", help="the markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    timing.use_clock(args.clock)
    command = (
        f"python -m benchmarks.sinkhorn --n {args.n} --iterations {args.iterations} --tau {args.tau:g} "
        f"--repeats {args.repeats} --clock {args.clock}"
    )
    text = write_results(
        args.out,
        lambda: measure(args.n, args.iterations, args.tau, args.repeats),
        command=command,
        threads=1,
        repeats=args.repeats,
    )
    print(text)
    return args.out


if __name__ == "__main__":
    main()
