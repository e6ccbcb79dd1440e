"""Where a layer step's time goes: its parts timed alone, and a ``torch.profiler`` op table."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from sparsemoe.dispatch import sort_by_expert
from sparsemoe.kernels import weighted_combine

from . import report
from .cases import dense_case, sparsemoe_case
from .layer import Shape
from .report import Section
from .timing import interleaved


def breakdown(shape: Shape, kind: str, repeats: int) -> Section:
    """Time the pieces of one step alone, interleaved with the whole step and the dense-equivalent."""
    ours = sparsemoe_case(shape.tokens, shape.d, shape.h, shape.n, shape.k, kind)
    unchecked = sparsemoe_case(shape.tokens, shape.d, shape.h, shape.n, shape.k, kind, check_finite=False)
    dense = dense_case(shape.tokens, shape.d, shape.h, shape.k, kind)
    layer, x = ours.module, ours.x
    routing = layer.gate(x)
    order, counts = sort_by_expert(routing.expert, shape.n)
    token = routing.token[order]
    xs = x.detach().index_select(0, token).requires_grad_()
    ys = torch.randn_like(xs).requires_grad_()
    weight = routing.weight.detach()[order].requires_grad_()
    grad_rows = torch.randn_like(xs)

    def gate() -> None:
        layer.zero_grad(set_to_none=True)
        r = layer.gate(x)
        torch.autograd.backward([r.weight.sum(), r.aux_loss()])

    def experts() -> None:
        layer.zero_grad(set_to_none=True)
        xs.grad = None
        layer.experts.forward_sorted(xs, counts).backward(grad_rows)

    def dispatch_ops() -> None:
        x.grad = ys.grad = weight.grad = None
        o, _ = sort_by_expert(routing.expert, shape.n)
        t = routing.token[o]
        torch.autograd.backward(
            [x.index_select(0, t), weighted_combine(ys, t, weight, shape.tokens)], [grad_rows, ours.grad_out]
        )

    parts = {
        "whole layer step": ours.step,
        "dense-equivalent": dense.step,
        "experts (grouped GEMMs + activation), fwd+bwd": experts,
        "gate (route + backward, aux loss)": gate,
        "dispatch (sort, gather, weighted scatter-add), fwd+bwd": dispatch_ops,
        "whole layer step, check_finite=False": unchecked.step,
    }
    t = interleaved(parts, repeats=repeats)
    whole = t.stat("whole layer step").median
    rows = []
    for name in list(parts)[:-1]:
        s = t.stat(name)
        rows.append([name, report.ms(s), f"{100 * s.median / whole:.1f}%"])
    validation = whole - t.stat("whole layer step, check_finite=False").median
    rows.append(
        [
            "input validation (check_finite: step with it − step without)",
            f"{1e3 * validation:.1f}",
            f"{100 * validation / whole:.1f}%",
        ]
    )
    accounted = validation + sum(t.stat(n).median for n in list(parts)[2:-1])
    rows.append(
        [
            "unaccounted (autograd, Python, allocation)",
            f"{1e3 * (whole - accounted):.1f}",
            f"{100 * (whole - accounted) / whole:.1f}%",
        ]
    )
    experts_ratio = t.ratio("experts (grouped GEMMs + activation), fwd+bwd", "dense-equivalent")
    body = (
        f"`{kind}` experts at {shape}: each part run alone (same data), interleaved with the whole step; "
        f"median [min–max] of {repeats} rounds; share = median ÷ whole-step median.\n\n"
        + report.table(["part", "ms", "share of step"], rows)
        + f"\nExperts alone ÷ dense-equivalent: {report.ratio(experts_ratio)} (the cost of splitting one "
        "GEMM into n per-expert GEMMs, and of n× larger weight gradients).\n"
    )
    return Section(f"Where the time goes ({kind})", body + op_table(ours.step))


def op_table(step, rows: int = 15) -> str:
    """``torch.profiler`` self-CPU time per op over two steps, as Markdown."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    table_rows = [
        [
            f"`{e.key}`",
            e.count // 2,
            f"{e.self_cpu_time_total / 2e3:.1f}",
            f"{100 * e.self_cpu_time_total / total:.1f}%",
        ]
        for e in events[:rows]
    ]
    return "\n`torch.profiler`, self CPU time per op per step (top ops):\n\n" + report.table(
        ["op", "calls / step", "self ms / step", "share"], table_rows
    )
