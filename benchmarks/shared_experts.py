"""``python -m benchmarks.shared_experts``: shared experts as one dense MLP vs fused into the routed grouped matmul.

``MoE(..., shared_experts=s)`` computes its shared experts for every input. Two ways to do it:

* ``dense`` (what the layer does): the routed experts through the grouped matmul, plus the shared
  experts as one dense MLP of width ``s·h`` on all ``T`` rows (:meth:`sparsemoe.MoE.shared_output`);
* ``fused`` (a prototype, here only): one bank of ``n + S`` experts, the shared MLP split into ``S``
  experts of the routed width (``S = s·h / d_hidden``; the MLP of width ``S·h`` is the sum of those
  ``S`` MLPs of width ``h``), and the routing extended by the ``T·S`` pairs ``(t, n + j, 1)``, so one
  sort, one gather, one grouped matmul per layer and one combine serve both.

Both run the same gate (top-k without noise, so both see the same routing) on the same weights;
the table gives forward and forward+backward times, the ratio fused / dense measured round by round
(:mod:`benchmarks.timing`) and the largest output difference (the two must agree). ``python -m
benchmarks.run --only shared`` includes the same section; this module's ``main`` writes
``benchmarks/RESULTS-shared-experts.md``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks import timing
from benchmarks.report import Section, ms, table, write_results
from benchmarks.timing import interleaved
from sparsemoe import MoE
from sparsemoe.dispatch import dispatch
from sparsemoe.experts import StackedExperts
from sparsemoe.routing import Routing

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    """One MoE layer with shared experts: ``T`` rows of width ``d``, ``n`` experts of width ``h``, top-``k``."""

    tokens: int
    d_model: int
    d_hidden: int
    experts: int
    k: int
    shared_hidden: int  # total width of the shared experts (a multiple of d_hidden)

    def __str__(self) -> str:
        return (
            f"T={self.tokens}, d={self.d_model}, n={self.experts}, k={self.k}, h={self.d_hidden}, "
            f"shared width {self.shared_hidden}"
        )


@dataclass(frozen=True)
class SharedConfig:
    shapes: tuple[Shape, ...]
    repeats: int = 5
    min_time: float = 0.05


FULL = SharedConfig(
    (
        Shape(1024, 256, 256, 8, 2, 256),  # DeepSeek-MoE style: one shared expert of the routed width
        Shape(1024, 256, 128, 16, 4, 512),  # Qwen2-MoE style: one shared expert 4x the routed width
        Shape(4096, 256, 256, 8, 2, 256),
    )
)
QUICK = SharedConfig((Shape(256, 64, 64, 8, 2, 64), Shape(256, 64, 32, 8, 2, 128)), repeats=3, min_time=0.02)


class FusedShared(nn.Module):
    """The prototype: ``moe``'s gate, and one bank holding its routed and (split) shared experts."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        routed, shared = moe.experts, moe.shared_expert
        assert isinstance(routed, StackedExperts) and shared is not None and shared.w2 is not None
        assert routed.w2 is not None and routed.b1 is None and routed.kind == "mlp"
        n, d, h = routed.num_experts, routed.d_in, routed.d_hidden
        self.split = shared.d_hidden // h  # S
        self.gate_of = moe  # routes with the layer's gate (not a submodule: its experts are not ours)
        self.bank = StackedExperts(n + self.split, d, h, routed.d_out, kind="mlp", activation=routed.activation)
        with torch.no_grad():
            self.bank.w1.copy_(torch.cat([routed.w1, shared.w1[0].view(d, self.split, h).transpose(0, 1)]))
            self.bank.w2.copy_(torch.cat([routed.w2, shared.w2[0].view(self.split, h, -1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.gate_of.route(x)
        n, rows = self.gate_of.gate.num_experts, x.shape[0]
        shared = torch.arange(self.split, device=x.device)
        token = torch.arange(rows, device=x.device).repeat_interleave(self.split)  # [T·S]
        fused = Routing(
            torch.cat([routing.token, token]),
            torch.cat([routing.expert, n + shared.repeat(rows)]),
            torch.cat([routing.weight, x.new_ones(rows * self.split)]),
            n + self.split,
            rows,
        )
        return dispatch(x, fused, self.bank)


def _layers(shape: Shape) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    moe = MoE(
        shape.d_model, shape.d_hidden, shape.experts, gate="topk", k=shape.k, noisy=False,
        shared_experts=1, shared_hidden=shape.shared_hidden,
    )  # fmt: skip
    return {"dense": moe, "fused": FusedShared(moe)}


def measure(cfg: SharedConfig) -> tuple[Section, list[dict[str, float]]]:
    """The section, and per shape the medians (ms) and ratios fused / dense."""
    rows, numbers = [], []
    for shape in cfg.shapes:
        layers = _layers(shape)
        x = torch.randn(shape.tokens, shape.d_model, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (layers["fused"](x) - layers["dense"](x)).abs().max().item()

        def forward(m: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return m(x)

            return run

        def step(m: nn.Module, x: torch.Tensor = x) -> Callable[[], object]:
            xi = x.clone().requires_grad_()

            def run() -> None:
                m.zero_grad(set_to_none=True)
                m(xi).square().mean().backward()

            return run

        fwd = interleaved({n: forward(m) for n, m in layers.items()}, repeats=cfg.repeats, min_time=cfg.min_time)
        bwd = interleaved({n: step(m) for n, m in layers.items()}, repeats=cfg.repeats, min_time=cfg.min_time)
        cells: list[object] = [str(shape)]
        found: dict[str, float] = {}
        for what, timings in (("forward", fwd), ("step", bwd)):
            ratio = timings.ratio("fused", "dense")
            flag = timings.flag("fused", "dense")
            cells += [
                ms(timings.stat("dense")),
                ms(timings.stat("fused")),
                f"{ratio.median:.2f}×" + (f" {flag}" if flag else ""),
            ]
            found[f"{what}_ratio"] = ratio.median
        cells.append(f"{diff:.1e}")
        rows.append(cells)
        numbers.append(found)
    faster = sum(n["step_ratio"] < 1 for n in numbers)
    verdict = (
        f"Fused is faster for forward+backward (ratio < 1) in {faster} of {len(numbers)} shapes "
        "(`MoE` computes its shared experts as one dense MLP)."
    )
    body = (
        "Routed experts + shared experts of one `MoE` layer (top-k gate, MLP experts, fp32): `dense` is the "
        "layer (grouped matmul for the routed pairs, one dense MLP for the shared experts), `fused` a prototype "
        "with the shared experts split into experts of the routed width and added to the routing "
        "(`benchmarks/shared_experts.py`). Ratio: fused / dense, round by round (< 1: fused is faster).\n\n"
        + table(
            [
                "shape",
                "dense fwd ms",
                "fused fwd ms",
                "fused/dense fwd",
                "dense step ms",
                "fused step ms",
                "fused/dense step",
                "max abs diff",
            ],
            rows,
        )
        + f"\n{verdict}\n"
    )
    return Section("Shared experts: dense vs fused", body), numbers


def shared_experts(cfg: SharedConfig) -> Section:
    """The section of ``benchmarks/RESULTS.md`` (family ``shared`` of ``python -m benchmarks.run``)."""
    return measure(cfg)[0]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_experts", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=tuple(timing.CLOCKS), default="cpu", help="cpu: process CPU time (default)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-shared-experts.md", help="the markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timing.use_clock(args.clock)
    command = "python -m benchmarks.shared_experts" + (" --quick" if args.quick else "")
    command += f" --threads {args.threads} --clock {args.clock}"
    cfg = QUICK if args.quick else FULL
    text = write_results(args.out, lambda: measure(cfg)[0], command=command, threads=args.threads, repeats=cfg.repeats)
    print(text)
    return args.out


if __name__ == "__main__":
    main()
