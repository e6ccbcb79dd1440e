"""Expert-choice routing (Zhou et al., 2022): each expert picks its inputs."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import check_float
from ..routing import Routing
from .base import Gate


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
    """

    k_note = "average"
    summary = "each expert takes its top `C = cf·T·k/n` inputs (Zhou et al. 2022)"

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        capacity_factor: float = 1.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype)
        self.capacity_factor = check_float("capacity_factor", capacity_factor, low=0.0, strict=True, allow_inf=True)
        self.proj = nn.Linear(d_in, num_experts, device=device, dtype=dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        num_inputs = x.shape[0]
        scores = torch.softmax(self.proj(x), dim=-1)  # [T, n]
        capacity = self.capacity(num_inputs)
        weight, token = scores.topk(capacity, dim=0)  # [C, n] each
        expert = torch.arange(self.num_experts, device=x.device).expand(capacity, -1)
        return Routing(token.reshape(-1), expert.reshape(-1), weight.reshape(-1), self.num_experts, num_inputs)

    def capacity(self, num_inputs: int) -> int:
        """``C``: how many of ``num_inputs`` inputs each expert takes (at most all of them)."""
        if self.capacity_factor == math.inf:  # a float comparison: torch.compile traces it (math.isinf it does not)
            return num_inputs
        return min(num_inputs, math.ceil(self.capacity_factor * self.k / self.num_experts * num_inputs))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
