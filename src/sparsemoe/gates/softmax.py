"""Dense softmax gate (MMoE): every expert gets a weight for every input."""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from ..routing import Routing
from .base import Gate, z_loss_trait


class SoftmaxGate(Gate):
    """``g(x) = softmax(W x + b)`` over all ``n`` experts; emits all ``T·n`` pairs.

    Args:
        d_in: gate input width.
        num_experts: number of experts.
        z_loss_weight: router z-loss on ``W x + b`` (see :class:`~sparsemoe.gates.base.Gate`); 0 is off.
    """

    k_policy = "dense"
    sparsity = "dense"
    aux_losses = MappingProxyType(z_loss_trait("Wx+b"))
    summary = "dense MMoE gate, `softmax(Wx+b)` over all experts"

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        z_loss_weight: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_in, num_experts, k=num_experts, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight
        )
        self.proj = nn.Linear(d_in, num_experts, device=device, dtype=dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        logits = self.proj(x)  # [T, n]
        z_loss = self._z_loss(logits)
        aux = {} if z_loss is None else {"z_loss": z_loss}
        return Routing.from_dense(torch.softmax(logits, dim=-1), keep_zeros=True, aux_losses=aux)

    def dense_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, n]`` weight of every expert for every input (all pairs are computed)."""
        return torch.softmax(self.proj(x), dim=-1)
