"""Expert-choice routing (Zhou et al., 2022): each expert picks its inputs."""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
from torch import nn

from .._validation import check_float
from ..routing import Routing
from .base import Gate, z_loss_trait


class ExpertChoiceGate(Gate):
    """Each expert takes its top ``C = ceil(capacity_factor · T · k / n)`` inputs by softmax score.

    Load is perfectly balanced by construction; an input may get anywhere from 0 to ``n`` experts
    (``k`` on average). The choice looks at the whole batch, so it is not causal.

    ``capacity_factor`` is this gate's routing rule (how many inputs each expert picks), not a drop
    limit: nothing is dropped, and an input no expert picks gets no expert. The layer's
    ``capacity_limit=`` (the drop limit of every gate) applies on top, as for any gate.

    Args:
        k: average experts per input.
        capacity_factor: scales the per-expert capacity; ``inf`` lets every expert take every input
            (dense).
        z_loss_weight: router z-loss on ``W x + b`` (the logits of the per-input softmax over the
            experts; see :class:`~sparsemoe.gates.base.Gate`); 0 is off.
    """

    k_note = "average"
    aux_losses = MappingProxyType(z_loss_trait("Wx+b"))
    summary = "each expert takes its top `C = cf·T·k/n` inputs (Zhou et al. 2022)"

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        capacity_factor: float = 1.0,
        z_loss_weight: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight)
        self.capacity_factor = check_float("capacity_factor", capacity_factor, low=0.0, strict=True, allow_inf=True)
        self.proj = nn.Linear(d_in, num_experts, device=device, dtype=dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        num_inputs = x.shape[0]
        logits = self.proj(x)  # [T, n]
        scores = torch.softmax(logits, dim=-1)
        capacity = self.capacity(num_inputs)
        weight, token = scores.topk(capacity, dim=0)  # [C, n] each
        expert = torch.arange(self.num_experts, device=x.device).expand(capacity, -1)
        z_loss = self._z_loss(logits)
        aux = {} if z_loss is None else {"z_loss": z_loss}
        return Routing(
            token.reshape(-1), expert.reshape(-1), weight.reshape(-1), self.num_experts, num_inputs, aux_losses=aux
        )

    def capacity(self, num_inputs: int) -> int:
        """``C``: how many of ``num_inputs`` inputs each expert takes (at most all of them)."""
        if self.capacity_factor == math.inf:  # a float comparison: torch.compile traces it (math.isinf it does not)
            return num_inputs
        return min(num_inputs, math.ceil(self.capacity_factor * self.k / self.num_experts * num_inputs))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
