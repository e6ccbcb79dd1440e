"""Sinkhorn forward + backward: the exact default against the textbook unrolled iteration.

Not called by the benchmark runner (yet). Run it as ``python -m benchmarks.sinkhorn`` (one thread,
n = 16, the schedule's last point: τ = 1e-7, 150 iterations). Candidates, all timed interleaved:

* ``textbook unrolled``: ``x - logsumexp(x)`` per half-step, differentiated by autograd (the gradient
  the official code computes, written the obvious way);
* ``sparsemoe default``: :func:`sparsemoe.search.sinkhorn`, one fused ``log_softmax`` per half-step,
  the same gradient (tests/test_search.py checks it to 1e-9 in float64);
* ``truncated (5)``: the approximation ``grad_iterations=5`` (a different gradient), for scale.

CPU time (process time) is reported next to wall time because the machine is shared.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparsemoe.search import sinkhorn

from . import timing


def textbook(x: torch.Tensor, iterations: int) -> torch.Tensor:
    for _ in range(iterations):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x.exp()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--tau", type=float, default=1e-7)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    log_alpha = torch.empty(args.n, args.n).uniform_(-0.05, 0.05).requires_grad_()
    weights = torch.randn(args.n, args.n)

    def step(fn):  # type: ignore[no-untyped-def]
        def call() -> None:
            log_alpha.grad = None
            (weights * fn(log_alpha / args.tau)).sum().backward()

        return call

    candidates = {
        "textbook unrolled": step(lambda x: textbook(x, args.iterations)),
        "sparsemoe default": step(lambda x: sinkhorn(x, args.iterations)),
        "truncated (5)": step(lambda x: sinkhorn(x, args.iterations, grad_iterations=5)),
    }
    for clock in (time.perf_counter, time.process_time):
        timing.CLOCK = clock
        result = timing.interleaved(candidates, repeats=args.repeats, warmup=2, min_time=0.05)
        label = "wall" if clock is time.perf_counter else "cpu"
        print(f"{label} time per forward+backward (n={args.n}, {args.iterations} iterations, tau={args.tau:g}):")
        for name in candidates:
            s = result.stat(name)
            ratio = result.ratio("textbook unrolled", name)
            print(
                f"  {name:18s} median {s.median * 1e3:6.2f} ms (IQR {s.q1 * 1e3:.2f}-{s.q3 * 1e3:.2f}); "
                f"textbook / this: {ratio.median:.2f}x"
            )


if __name__ == "__main__":
    main()
