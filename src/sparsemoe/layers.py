"""MoE layers: a gate, a bank of experts, and the dispatch between them."""

from __future__ import annotations

import torch
from torch import nn

from . import gates
from ._validation import check_float, check_input, check_int
from .dispatch import dispatch, dispatch_tasks
from .experts import ExpertBank, StackedExperts
from .gates.base import Gate
from .routing import Routing
from .search import PermutationSearch, split_gate_name


def _make_gate(gate: str | Gate, d_in: int, num_experts: int, k: int | None, check_finite: bool, kwargs: dict) -> Gate:
    if isinstance(gate, Gate):
        if kwargs or k is not None:
            raise ValueError("pass gate options to the gate itself when giving a Gate instance, not to the layer")
        if (gate.d_in, gate.num_experts) != (d_in, num_experts):
            raise ValueError(
                f"gate has d_in={gate.d_in}, num_experts={gate.num_experts}; the layer needs {d_in}, {num_experts}"
            )
        return gate
    if not isinstance(gate, str):
        raise TypeError(f"gate must be a gate name or a Gate, got {type(gate).__name__}")
    return gates.build(gate, d_in, num_experts, k=k, check_finite=check_finite, **kwargs)


def _make_experts(
    expert: str | ExpertBank, num_experts: int, d_in: int, d_hidden: int | None, d_out: int, activation: str, bias: bool
) -> ExpertBank:
    """The layer's expert bank: a given :class:`ExpertBank`, or stacked experts of kind ``expert``."""
    if isinstance(expert, ExpertBank):
        if expert.num_experts != num_experts:
            raise ValueError(f"expert bank has {expert.num_experts} experts, num_experts={num_experts}")
        return expert
    return StackedExperts(num_experts, d_in, d_hidden, d_out, kind=expert, activation=activation, bias=bias)


class MoE(nn.Module):
    """Sparse Mixture-of-Experts layer: ``[..., d_model] -> [..., d_model]``.

    Args:
        d_model: input and output width.
        d_hidden: hidden width of each expert.
        num_experts: number of experts ``n``.
        gate: a name from :func:`sparsemoe.gates.available` or a :class:`~sparsemoe.gates.Gate`.
        k: experts per input (``None``: the gate's default).
        expert: ``"mlp"`` or ``"swiglu"`` (or ``"linear"``), or an :class:`ExpertBank` of your own.
        activation: activation of ``mlp`` experts.
        capacity_factor: if set, each expert takes at most ``ceil(capacity_factor · N / n)`` pairs;
            the rest are dropped (reported in :meth:`routing_stats`). Default: dropless.
        check_finite: reject inputs holding NaN/inf (one reduction per call).
        local_search: learn a permutation between gate outputs and experts (COMET's "+" gates, see
            :mod:`sparsemoe.search`); a gate name ending in ``+`` (``"comet+"``) switches it on too.
        local_search_steps: training forwards before the permutation is hardened and frozen.
        **gate_kwargs: passed to the gate (``gamma=``, ``entropy_weight=``, ``noisy=``, ...).

    After each forward, ``last_routing`` holds the routing and :meth:`aux_loss` the sum of the
    gate's auxiliary losses, to be added to the training loss.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        gate: str | Gate = "topk",
        k: int | None = None,
        *,
        expert: str | ExpertBank = "mlp",
        activation: str = "gelu",
        bias: bool = False,
        capacity_factor: float | None = None,
        check_finite: bool = True,
        local_search: bool = False,
        local_search_steps: int = 1000,
        **gate_kwargs: object,
    ) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, low=1)
        num_experts = check_int("num_experts", num_experts, low=1)
        gate, local_search = split_gate_name(gate, local_search)
        self.gate = _make_gate(gate, d_model, num_experts, k, check_finite, gate_kwargs)  # type: ignore[arg-type]
        self.search = PermutationSearch(num_experts, local_search_steps) if local_search else None
        self.experts = _make_experts(expert, num_experts, d_model, d_hidden, d_model, activation, bias)
        self.capacity_factor = (
            None if capacity_factor is None else check_float("capacity_factor", capacity_factor, low=0.0, strict=True)
        )
        self.check_finite = check_finite
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [..., d_model]``; ``ids: [...]`` integer ids per position for gates that use them."""
        check_input(x, self.d_model, check_finite=self.check_finite)
        flat = x.reshape(-1, self.d_model)  # [T, d]
        routing = self.gate(flat, None if ids is None else ids.reshape(-1))
        if self.search is not None:
            routing = self.search.permute([routing])[0]
        if self.capacity_factor is not None:
            routing = routing.with_capacity(self.capacity_factor)
        self.last_routing = routing
        return dispatch(flat, routing, self.experts).view_as(x)

    def aux_loss(self) -> torch.Tensor:
        """Weighted sum of the last forward's auxiliary losses (zero before any forward)."""
        if self.last_routing is None:
            return torch.zeros(())
        return self.last_routing.aux_loss()

    def routing_stats(self) -> dict[str, object]:
        """Load per expert, mean active experts per input and dropped fraction of the last forward."""
        if self.last_routing is None:
            raise RuntimeError("routing_stats() needs a forward pass first")
        return self.last_routing.stats().as_dict()


class MultiTaskMoE(nn.Module):
    """Multi-gate MoE (MMoE, Ma et al. 2018): shared experts, one gate per task.

    Each (input, expert) pair chosen by any task is computed once; every task then mixes the
    expert outputs with its own weights. Returns one ``[..., d_expert_out]`` tensor per task, to
    be fed to a tower per task.

    Args:
        d_in: input width of the experts (and of the gates, unless ``d_gate`` is given).
        d_expert_out: output width of each expert.
        num_experts: number of shared experts.
        num_tasks: number of tasks (= gates).
        gate, k, check_finite, **gate_kwargs: as in :class:`MoE`; the same for every task.
        expert: ``"linear"`` (one dense layer with ``activation``, as in the COMET paper), ``"mlp"``,
            ``"swiglu"``, or an :class:`ExpertBank` (e.g. :class:`ModuleExperts` of CNNs, whose
            inputs may have any trailing shape).
        d_hidden: hidden width for ``mlp``/``swiglu`` experts.
        d_gate: width of a separate gate input (``forward(x, gate_input=...)``).
        local_search, local_search_steps: as in :class:`MoE`; ONE permutation is shared by all the
            task gates, as in the COMET paper.
    """

    def __init__(
        self,
        d_in: int,
        d_expert_out: int,
        num_experts: int,
        num_tasks: int,
        gate: str = "softmax",
        k: int | None = None,
        *,
        expert: str | ExpertBank = "linear",
        d_hidden: int | None = None,
        activation: str = "relu",
        bias: bool = True,
        d_gate: int | None = None,
        check_finite: bool = True,
        local_search: bool = False,
        local_search_steps: int = 1000,
        **gate_kwargs: object,
    ) -> None:
        super().__init__()
        gate, local_search = split_gate_name(gate, local_search)  # type: ignore[assignment]
        self.d_in = check_int("d_in", d_in, low=1)
        self.num_tasks = check_int("num_tasks", num_tasks, low=1)
        num_experts = check_int("num_experts", num_experts, low=1)
        self.d_gate = check_int("d_gate", d_gate if d_gate is not None else d_in, low=1)
        if not isinstance(gate, str):
            raise TypeError("MultiTaskMoE builds one gate per task and takes the gate by name")
        self.gates = nn.ModuleList(
            _make_gate(gate, self.d_gate, num_experts, k, check_finite, dict(gate_kwargs)) for _ in range(num_tasks)
        )
        d_out = check_int("d_expert_out", d_expert_out, low=1)
        self.experts = _make_experts(expert, num_experts, d_in, d_hidden, d_out, activation, bias)
        self.search = PermutationSearch(num_experts, local_search_steps) if local_search else None
        self.check_finite = check_finite
        self.last_routing: list[Routing] | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(
        self, x: torch.Tensor, gate_input: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """``x: [T, ...]`` expert inputs; ``gate_input: [T, d_gate]`` (default ``x``); a list of outputs."""
        if gate_input is None:
            if isinstance(self.experts, StackedExperts):
                check_input(x, self.d_in, check_finite=self.check_finite)
            gate_input = x.reshape(-1, self.d_gate) if x.dim() != 2 else x
        routings = [gate(gate_input, ids) for gate in self.gates]
        if self.search is not None:
            routings = self.search.permute(routings)
        outputs = dispatch_tasks(x, routings, self.experts)
        self.last_routing = routings
        return outputs

    def aux_loss(self) -> torch.Tensor:
        """Sum over tasks of the last forward's auxiliary losses."""
        if self.last_routing is None:
            return torch.zeros(())
        return torch.stack([r.aux_loss() for r in self.last_routing]).sum()

    def routing_stats(self) -> list[dict[str, object]]:
        """Per task: load per expert, mean active experts per input, dropped fraction."""
        if self.last_routing is None:
            raise RuntimeError("routing_stats() needs a forward pass first")
        return [r.stats().as_dict() for r in self.last_routing]
