"""Dense softmax gate (MMoE): every expert gets a weight for every input."""

from __future__ import annotations

import torch
from torch import nn

from ..routing import Routing
from .base import Gate


class SoftmaxGate(Gate):
    """``g(x) = softmax(W x + b)`` over all ``n`` experts; emits all ``T·n`` pairs.

    Args:
        d_in: gate input width.
        num_experts: number of experts.
    """

    def __init__(self, d_in: int, num_experts: int, *, check_finite: bool = True) -> None:
        super().__init__(d_in, num_experts, k=num_experts, check_finite=check_finite)
        self.proj = nn.Linear(d_in, num_experts)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        probs = torch.softmax(self.proj(x), dim=-1)  # [T, n]
        return Routing.from_dense(probs, keep_zeros=True)
