"""Exact-sparse dispatch: sort pairs by expert, one grouped matmul, scatter-add back.

Only the pairs in a :class:`~sparsemoe.routing.Routing` are computed; nothing is padded and,
unless a capacity is set on the routing, nothing is dropped.

The experts run through the bank's :meth:`~sparsemoe.experts.ExpertBank.forward_combined`; for
stacked experts the kernels are those of the chosen backend (:mod:`sparsemoe.kernels.backends`,
the one place that decides).

Dense path: when the routings cover every (input, expert) pair (a dense softmax gate), sorting,
gathering and scattering buy nothing. The experts then run on all inputs as batched GEMMs and the
weights mix them as one dense product: the same outputs and gradients, up to rounding order.
(Running small *sparse* routings densely as well was measured and dropped: at the COMET paper's
scale it was within noise of the sparse path, 0.93-1.0x, and for a single top-2 MoE layer with
d=100, h=16, n=8, T=256 it was 1.36x slower.)
"""

from __future__ import annotations

import torch

from .experts import ExpertBank
from .kernels import weighted_combine
from .routing import Routing, count_per_expert


def sort_by_expert(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable order that groups pairs by expert, and the pairs per expert ``LongTensor[n]``.

    The counts have a fixed size ``[n]`` (:func:`~sparsemoe.routing.count_per_expert`: no host
    read on CUDA, traceable by ``torch.compile``).
    """
    return torch.argsort(expert, stable=True), count_per_expert(expert, num_experts)


def covers_all_pairs(routings: list[Routing], num_inputs: int, num_experts: int) -> bool:
    """Whether every ``(input, expert)`` pair appears in at least one routing.

    Costs nothing when the routings hold fewer than ``T·n`` pairs in all (a sparse gate), when there
    are no inputs, or when one routing read from a dense matrix has all ``T·n`` cells (its pairs are
    distinct); else one ``[T·n]`` scatter and a host read of one bool. Always False while compiling
    (the answer is data).
    """
    if torch.compiler.is_compiling():  # first: the tests below compare sizes that are symbolic while tracing
        return False
    cells = num_inputs * num_experts
    if cells == 0 or sum(r.num_pairs for r in routings) < cells:
        return False
    if any(r.dense is not None and r.num_pairs == cells for r in routings):
        return True
    seen = torch.zeros(cells, dtype=torch.bool, device=routings[0].token.device)
    for r in routings:
        seen[r.token * num_experts + r.expert] = True
    return bool(seen.all())


def dense_mix(ys_all: torch.Tensor, routings: list[Routing]) -> list[torch.Tensor]:
    """``y_r[t] = Σ_e W_r[t, e] · ys_all[e, t]`` with ``W_r = routings[r].to_dense()``, one batched matmul for all.

    The weights are stacked input-major (``[T, R, n]``, contiguous) and the expert outputs read as a
    ``[T, n, out]`` view, so ``bmm`` needs no copy of them. On CPU that beats ``einsum("rtn,nto->rto")``
    (the same contraction, the plain MMoE's mix) at small sizes and ties it at large ones: see the
    "Dense mix" section of ``benchmarks/RESULTS.md``.

    Shape: ``ys_all: [n, T, *out]`` -> one ``[T, *out]`` per routing.
    """
    n, num_inputs = ys_all.shape[:2]
    weights = torch.stack([r.to_dense() for r in routings], dim=1).to(ys_all.dtype)  # [T, R, n]
    mixed = torch.bmm(weights, ys_all.reshape(n, num_inputs, -1).transpose(0, 1))  # [T, R, out]
    return list(mixed.view(num_inputs, len(routings), *ys_all.shape[2:]).unbind(1))


def dispatch(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Apply the routed experts to ``x: [T, *in]`` and mix: returns ``[T, *out]``."""
    if covers_all_pairs([routing], routing.num_inputs, experts.num_experts):
        return dense_mix(experts.forward_all(x), [routing])[0]
    order, counts = sort_by_expert(routing.expert, experts.num_experts)
    # the bank gathers, runs its experts and combines (StackedExperts with the chosen kernel backend)
    return experts.forward_combined(x, routing.token[order], counts, routing.weight[order], routing.num_inputs)


def dispatch_tasks(x: torch.Tensor, routings: list[Routing], experts: ExpertBank) -> list[torch.Tensor]:
    """Several routings of the same inputs (one per task, MMoE) over shared experts: one ``[T, *out]`` each.

    Each pair chosen by any routing is computed once. ``torch.unique`` sorts the ``(expert, input)``
    keys, so the unique pairs come out grouped by expert, ready for the grouped matmul without a sort.
    """
    num_inputs, num_experts = routings[0].num_inputs, experts.num_experts
    if covers_all_pairs(routings, num_inputs, num_experts):
        return dense_mix(experts.forward_all(x), routings)
    keys = torch.cat([r.expert * num_inputs + r.token for r in routings])
    unique_keys, position = torch.unique(keys, return_inverse=True)
    counts = count_per_expert(unique_keys // num_inputs, num_experts)  # no host sync on CUDA
    ys = experts.forward_sorted(x.index_select(0, unique_keys % num_inputs), counts)  # [N_unique, *out]
    outputs, start = [], 0
    for r in routings:
        pos = position[start : start + r.num_pairs]
        outputs.append(weighted_combine(ys.index_select(0, pos), r.token, r.weight, num_inputs))
        start += r.num_pairs
    return outputs


def reference_dispatch(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """The definition, one pair at a time: ``y[t] += w · expert_e(x[t])``. For tests only."""
    rows = [
        w * experts.forward_expert(int(e), x[t : t + 1])
        for t, e, w in zip(routing.token.tolist(), routing.expert, routing.weight, strict=True)
    ]
    out_shape = experts.forward_expert(0, x[:0]).shape[1:]
    y = x.new_zeros(routing.num_inputs, *out_shape)
    for t, row in zip(routing.token.tolist(), rows, strict=True):
        y = y.index_add(0, torch.tensor([t], device=x.device), row)
    return y
