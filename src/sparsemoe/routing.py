"""Routing: the (input, expert, weight) pairs a gate chooses.

Everything after the gate (dispatch, experts, combine, statistics, local search) reads only a
:class:`Routing`, so adding a gate means writing one small module that produces one.

A routing is immutable: transforms (:meth:`Routing.select`, :meth:`Routing.relabel`,
:meth:`Routing.with_capacity`, :meth:`Routing.with_aux_losses`) return new objects, so a routing kept
in ``layer.last_routing`` never changes behind the caller's back. Its tensors must not be modified in
place either: routings of one size share their index tensors (:func:`pair_grid`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

_DEBUG = os.environ.get("SPARSEMOE_DEBUG", "") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Check every routing's index bounds on construction (costs a device sync; off by default).

    Also switched on by the environment variable ``SPARSEMOE_DEBUG=1``.
    """
    global _DEBUG
    _DEBUG = bool(enabled)


def count_per_expert(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``torch.bincount(expert, minlength=num_experts)`` for indices below ``num_experts``: ``LongTensor[n]``.

    The project's one way to count pairs per expert (or, given ``token`` and ``num_inputs``, pairs
    per input): the output has the fixed size ``[num_experts]`` and never needs a host read.

    On CUDA ``bincount`` reads the largest index on the host to size its output (a synchronisation)
    and ``torch.compile`` cannot trace that data-dependent size; there a fixed-size ``index_add_``
    counts instead. The CPU keeps ``bincount`` (1.3-1.4x faster there, torch 2.13, one thread).
    """
    if expert.is_cuda or torch.compiler.is_compiling():
        return expert.new_zeros(num_experts).index_add_(0, expert, torch.ones_like(expert))
    return torch.bincount(expert, minlength=num_experts)


def pair_grid(num_inputs: int, per_input: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token, column)``, both ``LongTensor[T·c]``: row-major pairs, ``c = per_input`` for each of ``T`` inputs.

    ``token = [0, .., 0, 1, .., 1, ...]`` (each input ``c`` times), ``column = [0, 1, .., c-1, 0, 1, ...]``.
    They depend only on the sizes, so they are built once per size and device and shared (a routing's tensors
    are never modified in place): a small model would otherwise spend several ops per routing on them.
    """
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        # A compiled graph builds them itself; a CUDA graph capture would fill a cached tensor only on replay.
        return _build_pair_grid(num_inputs, per_input, device)
    return _cached_pair_grid(num_inputs, per_input, device)


def _build_pair_grid(num_inputs: int, per_input: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    token = torch.arange(num_inputs, device=device).repeat_interleave(per_input)
    column = torch.arange(per_input, device=device).repeat(num_inputs)
    return token, column


@functools.lru_cache(maxsize=32)
def _cached_pair_grid(num_inputs: int, per_input: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built as normal tensors even when first asked for under inference_mode: inference tensors
    # could not be saved for a later backward (index ops save their indices).
    with torch.inference_mode(False):
        return _build_pair_grid(num_inputs, per_input, device)


def max_violation(load: Sequence[int]) -> float:
    """MaxVio (Wang et al. 2024): ``max_i load_i / mean load − 1``; 0 when balanced or empty.

    Per batch in :meth:`Routing.stats`; over a window, pass the loads summed over its batches.
    """
    total = sum(load)
    return max(load) * len(load) / total - 1.0 if total else 0.0


@dataclass(frozen=True)
class RoutingStats:
    """Summary of one routing decision, cheap enough to log every step (one host sync)."""

    load: list[int]  # pairs per expert
    active_per_input: float  # mean number of experts computed per input row
    dropped_fraction: float  # pairs removed by a capacity limit
    num_inputs: int
    max_violation: float = 0.0  # MaxVio: max_i load_i / mean load - 1 (0: perfectly balanced)
    dead_experts: int = 0  # experts that received no input
    router_entropy: float = 0.0  # mean over inputs of the entropy (nats) of its normalised weights

    def as_dict(self) -> dict[str, float | list[int]]:
        return {
            "load": self.load,
            "active_per_input": self.active_per_input,
            "dropped_fraction": self.dropped_fraction,
            "num_inputs": self.num_inputs,
            "max_violation": self.max_violation,
            "dead_experts": self.dead_experts,
            "router_entropy": self.router_entropy,
        }


@dataclass(frozen=True)
class Routing:
    """Sparse routing of ``num_inputs`` rows to ``num_experts`` experts.

    Attributes:
        token: ``LongTensor[N]`` input row of each pair.
        expert: ``LongTensor[N]`` expert of each pair.
        weight: ``Tensor[N]`` combine weight (floating point, differentiable).
        num_experts: number of experts ``n``.
        num_inputs: number of input rows ``T``.
        aux_losses: auxiliary losses, already multiplied by their coefficients (read-only mapping).
        dropped_fraction: share of the gate's pairs removed by a capacity limit.
        dense: the ``[T, n]`` weight matrix the pairs were read from (:meth:`from_dense`), or ``None``.
            Each pair is then a distinct cell and every other cell is exactly 0, so :meth:`to_dense`
            returns it as it is (with its autograd graph) instead of rebuilding it from the pairs;
            transforms that change the pairs drop it.

    Only computed pairs are listed: a gate leaves out every pair whose weight is exactly zero.
    Construction checks the cheap invariants (1-D, equal lengths, dtypes); index bounds are checked
    only in debug mode (:func:`set_debug`), since they need a device sync.
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    num_experts: int
    num_inputs: int
    aux_losses: Mapping[str, torch.Tensor] = field(default_factory=dict)
    dropped_fraction: float = 0.0
    dense: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("token", "expert", "weight"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                raise ValueError(f"Routing.{name} must be a 1-D tensor, got {_describe(value)}")
        if not self.token.numel() == self.expert.numel() == self.weight.numel():
            raise ValueError(
                "Routing.token, expert and weight must have one entry per pair, got lengths "
                f"{self.token.numel()}, {self.expert.numel()}, {self.weight.numel()}"
            )
        for name in ("token", "expert"):
            dtype = getattr(self, name).dtype
            if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise TypeError(f"Routing.{name} must have an integer dtype, got {dtype}")
        if not self.weight.dtype.is_floating_point:
            raise TypeError(f"Routing.weight must be floating point, got {self.weight.dtype}")
        if self.num_experts < 1 or self.num_inputs < 0:
            raise ValueError(
                f"Routing needs num_experts >= 1 and num_inputs >= 0, got {self.num_experts}, {self.num_inputs}"
            )
        if self.dense is not None and tuple(self.dense.shape) != (self.num_inputs, self.num_experts):
            raise ValueError(
                f"Routing.dense must have shape [num_inputs, num_experts] = [{self.num_inputs}, {self.num_experts}], "
                f"got {tuple(self.dense.shape)}"
            )
        object.__setattr__(self, "aux_losses", MappingProxyType(dict(self.aux_losses)))
        if _DEBUG:
            self.check_bounds()

    def __reduce__(self) -> tuple[type[Routing], tuple[Any, ...]]:
        # A read-only mapping cannot be pickled or deep-copied as it is: rebuild from a plain dict.
        fields_ = (self.token, self.expert, self.weight, self.num_experts, self.num_inputs)
        return type(self), (*fields_, dict(self.aux_losses), self.dropped_fraction, self.dense)

    def check_bounds(self) -> None:
        """Raise if a pair points outside ``[0, T) x [0, n)`` (syncs with the device)."""
        if self.num_pairs == 0:
            return
        if int(self.token.min()) < 0 or int(self.token.max()) >= self.num_inputs:
            raise ValueError(
                f"Routing.token must lie in [0, {self.num_inputs}), got {self.token.min()}..{self.token.max()}"
            )
        if int(self.expert.min()) < 0 or int(self.expert.max()) >= self.num_experts:
            raise ValueError(
                f"Routing.expert must lie in [0, {self.num_experts}), got {self.expert.min()}..{self.expert.max()}"
            )

    @property
    def num_pairs(self) -> int:
        return int(self.token.numel())

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_dense(
        cls, weights: torch.Tensor, *, keep_zeros: bool = False, aux_losses: Mapping[str, torch.Tensor] | None = None
    ) -> Routing:
        """Pairs from a dense ``[T, n]`` weight matrix.

        With ``keep_zeros=False`` exact zeros are left out, which is how DSelect-k and COMET turn
        their saturated smooth-steps into skipped experts. ``weights`` is kept as :attr:`dense`.
        """
        num_inputs, num_experts = weights.shape
        if keep_zeros:
            token, expert = pair_grid(num_inputs, num_experts, weights.device)
            weight = weights.reshape(-1)
        else:
            token, expert = (weights != 0).nonzero(as_tuple=True)
            weight = weights[token, expert]
        return cls(token, expert, weight, num_experts, num_inputs, aux_losses or {}, dense=weights)

    @classmethod
    def from_topk(
        cls,
        indices: torch.Tensor,
        weights: torch.Tensor,
        num_experts: int,
        *,
        aux_losses: Mapping[str, torch.Tensor] | None = None,
    ) -> Routing:
        """Pairs from per-row expert indices and weights, both ``[T, k]`` (column = choice rank)."""
        num_inputs, k = indices.shape
        token, _ = pair_grid(num_inputs, k, indices.device)
        return cls(token, indices.reshape(-1), weights.reshape(-1), num_experts, num_inputs, aux_losses or {})

    # ----------------------------------------------------------------------------- transforms
    def select(self, mask: torch.Tensor) -> Routing:
        """The pairs where ``mask`` is true; everything else unchanged."""
        return replace(self, token=self.token[mask], expert=self.expert[mask], weight=self.weight[mask], dense=None)

    def relabel(self, expert_of_slot: torch.Tensor) -> Routing:
        """Send the pairs of gate coordinate ``j`` to expert ``expert_of_slot[j]`` (a permutation)."""
        return replace(self, expert=expert_of_slot[self.expert], dense=None)

    def with_aux_losses(self, **losses: torch.Tensor) -> Routing:
        """A copy with ``losses`` added to (or replacing entries of) :attr:`aux_losses`."""
        return replace(self, aux_losses={**self.aux_losses, **losses})

    def choice_rank(self) -> torch.Tensor:
        """``LongTensor[N]``: 0 for each input's highest-weight pair, 1 for its second, ...

        Ties keep the routing's order (for :meth:`from_topk`, the gate's order of choice).
        """
        by_weight = torch.argsort(self.weight.detach(), descending=True, stable=True)
        order = by_weight[torch.argsort(self.token[by_weight], stable=True)]  # by token, then weight
        counts = count_per_expert(self.token, self.num_inputs)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(self.num_pairs, device=order.device) - starts[self.token[order]]
        return rank

    def with_capacity(self, capacity_factor: float) -> Routing:
        """Keep at most ``ceil(capacity_factor * N / n)`` pairs per expert.

        ``N`` is the number of pairs the gate produced (``T * k`` for a top-k gate), so a factor of
        1.0 is exactly enough for a perfectly balanced gate. Priority follows GShard: every input's
        first choice before any second choice, and within a choice rank the earlier input first.
        Dropped pairs contribute nothing to the output, as in Switch Transformer; the share dropped
        is kept in ``dropped_fraction``. ``inf`` is no limit.
        """
        if self.num_pairs == 0 or math.isinf(capacity_factor):
            return self
        capacity = math.ceil(capacity_factor * self.num_pairs / self.num_experts)
        priority = self.choice_rank() * max(self.num_inputs, 1) + self.token  # [N]
        by_priority = torch.argsort(priority)
        order = by_priority[torch.argsort(self.expert[by_priority], stable=True)]  # by expert, then priority
        counts = count_per_expert(self.expert, self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(order)
        slot[order] = torch.arange(self.num_pairs, device=order.device) - starts[self.expert[order]]
        kept = self.select(slot < capacity)
        dropped = 1.0 - (1.0 - self.dropped_fraction) * kept.num_pairs / self.num_pairs
        return replace(kept, dropped_fraction=dropped)

    # ----------------------------------------------------------------------------- views
    def to_dense(self) -> torch.Tensor:
        """The ``[T, n]`` weight matrix (pairs on the same cell add up)."""
        if self.dense is not None:
            return self.dense
        dense = self.weight.new_zeros(self.num_inputs * self.num_experts)
        dense = dense.index_add(0, self.token * self.num_experts + self.expert, self.weight)
        return dense.view(self.num_inputs, self.num_experts)

    def load(self) -> torch.Tensor:
        """``LongTensor[n]``: pairs per expert."""
        return count_per_expert(self.expert, self.num_experts)

    def active_per_input(self) -> torch.Tensor:
        """``LongTensor[T]``: experts computed for each input row."""
        return count_per_expert(self.token, self.num_inputs)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses (a zero scalar if there are none)."""
        return total_aux_loss([self])

    def weight_entropy(self) -> torch.Tensor:
        """Scalar: mean over inputs (with pairs) of the entropy, in nats, of their weights normalised to sum 1.

        0 for one expert per input; ``log k`` for ``k`` equal weights. Detached (a statistic).
        """
        w = self.weight.detach().float().clamp_min(0)
        total = w.new_zeros(self.num_inputs).index_add(0, self.token, w)  # [T]
        p = w / total[self.token].clamp_min(torch.finfo(w.dtype).tiny)  # [N]
        per_input = w.new_zeros(self.num_inputs).index_add(0, self.token, -torch.special.xlogy(p, p))  # [T]
        routed = (total > 0).to(w.dtype)
        return (per_input * routed).sum() / routed.sum().clamp_min(1)

    def stats(self) -> RoutingStats:
        load = self.load()  # [n]
        # one transfer for every number (float64 holds the counts exactly)
        values = torch.cat([load.to(torch.float64), self.weight_entropy().to(torch.float64).reshape(1)]).tolist()
        counts, entropy = [int(c) for c in values[:-1]], values[-1]
        return RoutingStats(
            load=counts,
            active_per_input=self.num_pairs / max(self.num_inputs, 1),
            dropped_fraction=self.dropped_fraction,
            num_inputs=self.num_inputs,
            max_violation=max_violation(counts),
            dead_experts=sum(c == 0 for c in counts),
            router_entropy=entropy,
        )


def total_aux_loss(routings: Sequence[Routing]) -> torch.Tensor:
    """Sum of the auxiliary losses of several routings (at least one), in the first one's weight dtype.

    One ``stack`` and one ``sum`` for all of them: small models feel every extra op.
    """
    weight = routings[0].weight
    losses = [loss.to(weight.dtype) for r in routings for loss in r.aux_losses.values()]
    return torch.stack(losses).sum() if losses else weight.new_zeros(())


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
