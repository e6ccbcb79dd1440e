"""Permutation local search overhead as a fraction of a training step (COMET "+" gates)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import sparsemoe

from . import report
from .cases import Case, _data
from .layer import Shape
from .report import Section
from .timing import interleaved

UNAVAILABLE = "local search not available in this build"


def available() -> bool:
    return importlib.util.find_spec("sparsemoe.search") is not None


def local_search_overhead(shape: Shape, repeats: int, out_dir: Path) -> Section:
    """Layer step with the soft permutation (Gumbel-Sinkhorn phase) vs the same layer without it."""
    title = "Local search overhead"
    if not available():
        return Section(
            title,
            f"{UNAVAILABLE} (`sparsemoe.search` does not import).\n",
            targets=[
                ["local search ≤ 5% of a training step", UNAVAILABLE, "not measured", "feature not in this build"]
            ],
        )
    cases = {}
    for label, kwargs in (("without", {}), ("with", {"local_search": True, "local_search_steps": 10**9})):
        torch.manual_seed(0)
        layer = sparsemoe.MoE(shape.d, shape.h, shape.n, gate="topk", k=shape.k, expert="mlp", **kwargs)
        layer.train()
        x, grad = _data(shape.tokens, shape.d, 0)
        cases[label] = Case(label, layer, lambda inp, m=layer: (m(inp), m.aux_loss()), x, grad)
    t = interleaved({name: c.step for name, c in cases.items()}, repeats=repeats)
    overhead = t.ratio("with", "without")
    frac = overhead.median - 1.0
    body = (
        f"MoE layer ({shape}, `mlp`, top-k) training step with `local_search=True` in its soft phase "
        "(the permutation is a Sinkhorn matrix for every forward; after hardening it is a free relabelling) "
        f"against the same layer without it; {repeats} interleaved rounds.\n\n"
        + report.table(["layer", "ms"], [[n, report.ms(t.stat(n))] for n in cases])
        + f"\nwith ÷ without: {report.ratio(overhead)} → overhead {100 * frac:.1f}% of the step.\n"
    )
    return Section(
        title,
        body,
        targets=[["local search ≤ 5% of a training step", f"{100 * frac:.1f}%", report.verdict(frac <= 0.05), ""]],
    )
