"""Routing: the (input, expert, weight) pairs a gate chooses.

Everything after the gate (dispatch, experts, combine, statistics, local search) reads only a
:class:`Routing`, so adding a gate means writing one small module that produces one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class RoutingStats:
    """Summary of one routing decision, cheap enough to log every step."""

    load: list[int]  # pairs per expert
    active_per_input: float  # mean number of experts computed per input row
    dropped_fraction: float  # pairs removed by a capacity limit
    num_inputs: int

    def as_dict(self) -> dict[str, float | list[int]]:
        return {
            "load": self.load,
            "active_per_input": self.active_per_input,
            "dropped_fraction": self.dropped_fraction,
            "num_inputs": self.num_inputs,
        }


@dataclass
class Routing:
    """Sparse routing of ``num_inputs`` rows to ``num_experts`` experts.

    Attributes:
        token: ``LongTensor[N]`` input row of each pair.
        expert: ``LongTensor[N]`` expert of each pair.
        weight: ``Tensor[N]`` combine weight (differentiable).
        num_experts: number of experts ``n``.
        num_inputs: number of input rows ``T``.
        aux_losses: auxiliary losses, already multiplied by their coefficients.
        dropped_fraction: share of the gate's pairs removed by a capacity limit.

    Only computed pairs are listed: a gate leaves out every pair whose weight is exactly zero.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    num_experts: int
    num_inputs: int
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped_fraction: float = 0.0

    @property
    def num_pairs(self) -> int:
        return int(self.token.numel())

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, weights: torch.Tensor, *, keep_zeros: bool = False, **kwargs: object) -> Routing:
        """Pairs from a dense ``[T, n]`` weight matrix.

        With ``keep_zeros=False`` exact zeros are left out, which is how DSelect-k and COMET turn
        their saturated smooth-steps into skipped experts.
        """
        num_inputs, num_experts = weights.shape
        if keep_zeros:
            token = torch.arange(num_inputs, device=weights.device).repeat_interleave(num_experts)
            expert = torch.arange(num_experts, device=weights.device).repeat(num_inputs)
            weight = weights.reshape(-1)
        else:
            token, expert = (weights != 0).nonzero(as_tuple=True)
            weight = weights[token, expert]
        return cls(token, expert, weight, num_experts, num_inputs, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_topk(cls, indices: torch.Tensor, weights: torch.Tensor, num_experts: int, **kwargs: object) -> Routing:
        """Pairs from per-row expert indices and weights, both ``[T, k]``."""
        num_inputs, k = indices.shape
        token = torch.arange(num_inputs, device=indices.device).repeat_interleave(k)
        return cls(token, indices.reshape(-1), weights.reshape(-1), num_experts, num_inputs, **kwargs)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------- transforms
    def select(self, mask: torch.Tensor) -> Routing:
        """The pairs where ``mask`` is true; everything else unchanged."""
        return replace(self, token=self.token[mask], expert=self.expert[mask], weight=self.weight[mask])

    def relabel(self, expert_of_slot: torch.Tensor) -> Routing:
        """Send the pairs of gate coordinate ``j`` to expert ``expert_of_slot[j]`` (a permutation)."""
        return replace(self, expert=expert_of_slot[self.expert])

    def with_capacity(self, capacity_factor: float) -> Routing:
        """Keep at most ``ceil(capacity_factor * N / n)`` pairs per expert, first inputs first.

        ``N`` is the number of pairs the gate produced (``T * k`` for a top-k gate), so a factor of
        1.0 is exactly enough for a perfectly balanced gate. Dropped pairs contribute nothing to the
        output, as in Switch Transformer; the share dropped is kept in ``dropped_fraction``.
        """
        if self.num_pairs == 0:
            return self
        capacity = math.ceil(capacity_factor * self.num_pairs / self.num_experts)
        order = torch.argsort(self.expert, stable=True)
        counts = torch.bincount(self.expert, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.empty_like(order)
        rank_in_expert[order] = torch.arange(self.num_pairs, device=order.device) - starts[self.expert[order]]
        keep = rank_in_expert < capacity
        kept = self.select(keep)
        kept.dropped_fraction = 1.0 - kept.num_pairs / self.num_pairs
        return kept

    # ----------------------------------------------------------------------------- views
    def to_dense(self) -> torch.Tensor:
        """The ``[T, n]`` weight matrix (pairs on the same cell add up)."""
        dense = self.weight.new_zeros(self.num_inputs * self.num_experts)
        dense = dense.index_add(0, self.token * self.num_experts + self.expert, self.weight)
        return dense.view(self.num_inputs, self.num_experts)

    def load(self) -> torch.Tensor:
        """``LongTensor[n]``: pairs per expert."""
        return torch.bincount(self.expert, minlength=self.num_experts)

    def active_per_input(self) -> torch.Tensor:
        """``LongTensor[T]``: experts computed for each input row."""
        return torch.bincount(self.token, minlength=self.num_inputs)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses (a zero scalar if there are none)."""
        if not self.aux_losses:
            return self.weight.new_zeros(())
        return torch.stack([loss.to(self.weight.dtype) for loss in self.aux_losses.values()]).sum()

    def stats(self) -> RoutingStats:
        return RoutingStats(
            load=self.load().tolist(),
            active_per_input=self.num_pairs / max(self.num_inputs, 1),
            dropped_fraction=self.dropped_fraction,
            num_inputs=self.num_inputs,
        )
