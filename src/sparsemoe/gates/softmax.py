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

    k_policy = "dense"
    sparsity = "dense"
    summary = "dense MMoE gate, `softmax(Wx+b)` over all experts"

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k=num_experts, check_finite=check_finite, dtype=dtype)
        self.proj = nn.Linear(d_in, num_experts, device=device, dtype=dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        return Routing.from_dense(self.dense_weights(x), keep_zeros=True)

    def dense_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, n]`` weight of every expert for every input (all pairs are computed)."""
        return torch.softmax(self.proj(x), dim=-1)
