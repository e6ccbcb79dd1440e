"""Exact-sparse dispatch: sort pairs by expert, one grouped matmul, scatter-add back.

Only the pairs in a :class:`~sparsemoe.routing.Routing` are computed; nothing is padded and,
unless a capacity is set on the routing, nothing is dropped.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .experts import ExpertBank
from .routing import Routing


def sort_by_expert(expert: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable order that groups pairs by expert, and the pairs per expert ``[n]``."""
    order = torch.argsort(expert, stable=True)
    return order, torch.bincount(expert, minlength=num_experts)


class _WeightedIndexAdd(torch.autograd.Function):
    """``out[token[i]] += weight[i] · ys[i]`` for every pair ``i``, into ``[T, *out]``.

    Autograd would keep the scaled copy's graph and allocate three ``[N, *out]`` gradients; this
    backward gathers the output gradient once and reuses it in place for ``∂ys``. First-order only.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        ys: torch.Tensor,
        token: torch.Tensor,
        weight: torch.Tensor,
        num_inputs: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(ys, token, weight)
        scale = weight.view(-1, *([1] * (ys.dim() - 1)))
        return ys.new_zeros(num_inputs, *ys.shape[1:]).index_add_(0, token, ys * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ys, token, weight = ctx.saved_tensors
        grad_rows = grad.index_select(0, token)  # [N, *out]: the gradient reaching each pair
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad_rows * ys).flatten(1).sum(1)
        if ctx.needs_input_grad[0]:
            grad_rows.mul_(weight.view(-1, *([1] * (ys.dim() - 1))))
        return grad_rows, None, grad_weight, None


def combine(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """``y[t] = Σ_{pairs of t} weight · ys``: ``[N, *out] -> [T, *out]``."""
    return _WeightedIndexAdd.apply(ys, token, weight.to(ys.dtype), num_inputs)


def dispatch(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Apply the routed experts to ``x: [T, *in]`` and mix: returns ``[T, *out]``."""
    order, counts = sort_by_expert(routing.expert, experts.num_experts)
    token = routing.token[order]
    ys = experts.forward_sorted(x.index_select(0, token), counts)  # [N, *out], grouped by expert
    return combine(ys, token, routing.weight[order], routing.num_inputs)


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
