"""Permutation local search overhead as a fraction of a training step (COMET "+" gates)."""

from __future__ import annotations

from pathlib import Path

import torch

import sparsemoe

from . import report
from .cases import Case, _data
from .layer import Shape
from .report import Section
from .timing import interleaved


def local_search_overhead(shape: Shape, repeats: int, out_dir: Path) -> Section:
    """Layer step with the soft permutation (Gumbel-Sinkhorn phase) vs the same layer without it."""
    title = "Local search overhead"
    # The soft phase's cost depends on where the schedule is: early on the Sinkhorn matrix is diffuse
    # (more experts per input); late in the schedule it is nearly a permutation; once hardened it is free.
    phases = {"without": None, "soft, first step": 0, "soft, mid-schedule": 500_000, "hardened": -1}
    cases, active = {}, {}
    for label, step in phases.items():
        torch.manual_seed(0)
        kwargs = {} if step is None else {"local_search": True, "local_search_steps": 1_000_000}
        layer = sparsemoe.MoE(shape.d, shape.h, shape.n, gate="topk", k=shape.k, expert="mlp", **kwargs)
        layer.train()
        if step is not None and step >= 0:
            layer.search.step.fill_(step)
        elif step is not None:
            layer.search.harden()
        x, grad = _data(shape.tokens, shape.d, 0)
        layer(x)
        active[label] = layer.last_routing.num_pairs / shape.tokens
        cases[label] = Case(label, layer, lambda inp, m=layer: (m(inp), m.aux_loss()), x, grad)
    t = interleaved({name: c.step for name, c in cases.items()}, repeats=repeats)
    overheads = {name: t.ratio(name, "without") for name in cases if name != "without"}
    rows = [
        [n, report.ms(t.stat(n)), f"{active[n]:.2f}", "—" if n == "without" else report.ratio(overheads[n])]
        for n in cases
    ]
    frac = {name: r.median - 1.0 for name, r in overheads.items()}
    body = (
        f"MoE layer ({shape}, `mlp`, top-k) training step with `local_search=True` against the same layer "
        "without it, at three points of the search: the first soft step (τ = 1e-3, 20 Sinkhorn iterations), "
        "the middle of the soft phase, and after hardening (a relabelling of expert ids). In the soft phase the "
        "permuted weights below 1e-6 are pruned; what is left of the soft matrix sends some inputs to more "
        f"than k experts, and those are computed. {repeats} interleaved rounds.\n\n"
        + report.table(["layer", "ms", "experts / input", "÷ without"], rows)
    )
    verdict = f"soft start {100 * frac['soft, first step']:.1f}%, mid {100 * frac['soft, mid-schedule']:.1f}%, "
    verdict += f"hardened {100 * frac['hardened']:.1f}%"
    why = "" if frac["soft, mid-schedule"] <= 0.05 else "the soft matrix spreads inputs over more experts (table)"
    return Section(
        title,
        body,
        targets=[
            ["local search ≤ 5% of a training step", verdict, report.verdict(frac["soft, mid-schedule"] <= 0.05), why]
        ],
    )
