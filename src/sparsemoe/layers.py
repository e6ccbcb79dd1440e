"""MoE layers: gates, a bank of experts, and the dispatch between them.

:class:`MoE` (one gate) and :class:`MultiTaskMoE` (one gate per task over shared experts) share
one base, :class:`MoELayer`, so they take their arguments, validate their inputs, route and report
statistics the same way. :func:`aux_loss` and :func:`routing_stats` collect over every MoE layer
of a model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from ._validation import check_dtype, check_float, check_float_dtype, check_ids, check_input, check_int
from .dispatch import dispatch, dispatch_tasks
from .experts import ExpertBank, StackedExperts
from .gates import Gate, GateSpec, route_tasks
from .routing import Routing, count_per_expert, max_violation, total_aux_loss
from .search import PermutationSearch

#: a gate as layers accept it: a spec string (``"comet+"``), a parsed :class:`GateSpec`, or a built gate
GateArg = str | GateSpec | Gate
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def resolve_router_dtype(dtype: torch.dtype | None, router_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype gates are built in: ``router_dtype`` if given, float32 for bf16/fp16 layers, else ``dtype``.

    Routing decisions are discrete, so a low-precision router changes which experts are chosen;
    keeping it in float32 costs little (as Hugging Face and tutel do).
    """
    check_float_dtype("dtype", dtype)
    check_float_dtype("router_dtype", router_dtype)
    if router_dtype is not None:
        return router_dtype
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _build_gate(
    gate: GateArg,
    d_in: int,
    num_experts: int,
    options: dict[str, Any],
    factory: dict[str, Any],
    local_search: bool | None = None,
) -> tuple[Gate, bool]:
    """A layer's gate and whether it gets local search (the spec's ``+`` or ``local_search``, which must agree)."""
    if isinstance(gate, Gate):
        if options:
            raise ValueError(
                f"gate options ({', '.join(sorted(options))}) go to the gate itself when a Gate instance is given"
            )
        if (gate.d_in, gate.num_experts) != (d_in, num_experts):
            raise ValueError(
                f"gate has d_in={gate.d_in}, num_experts={gate.num_experts}; the layer needs {d_in}, {num_experts}"
            )
        return gate, bool(local_search)
    spec = GateSpec.parse(gate, local_search=local_search)
    return spec.build(d_in, num_experts, **options, **factory), spec.local_search


def _with_k(options: dict[str, Any], k: int | None) -> dict[str, Any]:
    return options if k is None else {**options, "k": k}


def _routing_args(local_search_steps: object, capacity_limit: object) -> tuple[int, float | None]:
    """The layer's routing arguments, checked before anything is built (and the global RNG drawn).

    ``capacity_limit=inf`` is no limit, the same as ``None``.
    """
    steps = check_int("local_search_steps", local_search_steps, low=0)
    if capacity_limit is None:
        return steps, None
    limit = check_float("capacity_limit", capacity_limit, low=0.0, strict=True, allow_inf=True)
    return steps, None if math.isinf(limit) else limit


class MoELayer(nn.Module):
    """What :class:`MoE` and :class:`MultiTaskMoE` share: input checks, routing, losses, statistics.

    Subclasses set ``experts``, ``d_in`` (values per row of the experts' input), ``d_gate``,
    ``router_dtype`` and call :meth:`_init_routing`, and implement :meth:`task_gates`.
    """

    experts: ExpertBank
    d_in: int
    search: PermutationSearch | None
    capacity_limit: float | None
    check_finite: bool
    d_gate: int
    router_dtype: torch.dtype | None

    def _init_routing(
        self,
        num_experts: int,
        local_search: bool,
        local_search_steps: int,
        capacity_limit: float | None,
        check_finite: bool,
        device: torch.device | str | None,
    ) -> None:
        """``local_search_steps`` and ``capacity_limit`` as checked by :func:`_routing_args`."""
        self.search = PermutationSearch(num_experts, local_search_steps).to(device) if local_search else None
        self.capacity_limit = capacity_limit
        self.check_finite = bool(check_finite)
        self._routings: list[Routing] | None = None
        # pairs per expert since the last reset, per gate ([]: none yet); always the same list object,
        # updated in place, so compiled forwards see no changed attribute
        self._window: list[torch.Tensor] = []

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def __getstate__(self) -> dict[str, Any]:
        # The last routing is a record of one forward (its weights may hold an autograd graph):
        # copies and pickles of the layer start without one, like a freshly built layer.
        return {**super().__getstate__(), "_routings": None}

    def task_gates(self) -> Sequence[Gate]:
        raise NotImplementedError

    # ------------------------------------------------------------------ input handling
    def _flatten(
        self, x: torch.Tensor, gate_input: torch.Tensor | None, ids: torch.Tensor | None
    ) -> tuple[torch.Size, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validate; returns the leading shape, ``x`` as rows, the gate input as ``[T, d_gate]`` rows, ids ``[T]``."""
        row_dims = self.experts.input_dims
        check_input(x, self.d_in if row_dims == 1 else None, check_finite=self.check_finite)
        check_dtype(x, self.experts, layer=type(self).__name__)
        if x.dim() < row_dims or math.prod(x.shape[x.dim() - row_dims :]) != self.d_in:
            raise ValueError(
                f"each row of x must hold d_in={self.d_in} values in its last {row_dims} dimension(s), "
                f"got shape {tuple(x.shape)}"
            )
        leading = x.shape[: x.dim() - row_dims]
        rows = x.reshape(-1, *x.shape[x.dim() - row_dims :])  # [T, *in]
        if gate_input is None:
            gate_rows = rows.flatten(1)
            if gate_rows.shape[1] != self.d_gate:
                raise ValueError(
                    f"the gates take inputs of width {self.d_gate} but a row of x has {gate_rows.shape[1]} values; "
                    "pass gate_input= of that width"
                )
        else:
            check_input(gate_input, self.d_gate, name="gate_input", check_finite=self.check_finite)
            if self.router_dtype is None:  # otherwise the gate rows are cast to the router's dtype
                check_dtype(gate_input, self.task_gates()[0], layer=type(self).__name__, name="gate_input")
            gate_rows = gate_input.reshape(-1, self.d_gate)
            if gate_rows.shape[0] != rows.shape[0]:
                raise ValueError(
                    f"gate_input has {gate_rows.shape[0]} rows but x has {rows.shape[0]}; give one gate input per "
                    f"row of x (shape {(*leading, self.d_gate)})"
                )
        flat_ids = None if ids is None else check_ids(ids, rows.shape[0])
        return leading, rows, gate_rows, flat_ids

    @contextlib.contextmanager
    def _router_precision(self, device: torch.device) -> Iterator[None]:
        """Run the gates outside autocast, so logits and routing stay in the router's dtype."""
        if torch.is_autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                yield
        else:
            yield

    def _route_rows(self, gate_rows: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
        """Every task gate, then the shared local search, then the capacity limit."""
        if self.router_dtype is not None:
            gate_rows = gate_rows.to(self.router_dtype)
        with self._router_precision(gate_rows.device):
            routings = route_tasks(self.task_gates(), gate_rows, ids)
            if self.search is not None:
                routings = self.search.permute(routings)
        if self.capacity_limit is not None:
            routings = [r.with_capacity(self.capacity_limit) for r in routings]
        self._record(routings)
        return routings

    def _record(self, routings: list[Routing]) -> None:
        """Keep the last routings and add their loads to the window (on the device: no host sync).

        Forwards under ``torch.compile`` (the changing window would make the compiled graph recompile)
        or ``torch.func`` transforms (per-sample routings) are not counted in the window; their last
        routing is kept as always."""
        self._routings = routings
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # vmap/grad (torch.func) tensors
        if torch.compiler.is_compiling() or any(wrapped(r.expert) for r in routings):
            return
        counts = [count_per_expert(r.expert.detach(), r.num_experts) for r in routings]
        window = self._window
        window[:] = counts if not window else [a + b for a, b in zip(window, counts, strict=True)]

    def reset_routing_window(self) -> None:
        """Start a new window for ``routing_stats(window=True)``."""
        self._window.clear()

    # ------------------------------------------------------------------ losses and statistics
    def aux_loss(self) -> torch.Tensor:
        """Weighted sum of the last forward's auxiliary losses over all gates (zero before any forward)."""
        if not self._routings:
            return torch.zeros((), device=next(self.parameters()).device)
        return total_aux_loss(self._routings)

    def routing_stats(self, window: bool = False) -> object:
        """Statistics of the last forward's routing (per task for multi-task layers); see :meth:`_stats`."""
        raise NotImplementedError

    def _stats(self, window: bool = False) -> list[dict[str, float | list[int]]]:
        """Per gate: the last forward's statistics, or with ``window=True`` those of every forward since
        the layer was built or :meth:`reset_routing_window` was called: ``load`` (pairs per expert summed
        over the window), ``max_violation`` (MaxVio of those loads), ``dead_experts`` (experts with no pair)."""
        if window:
            if not self._window:
                raise RuntimeError("routing_stats(window=True) needs a forward pass since the last reset")
            loads = [[int(c) for c in counts.tolist()] for counts in self._window]
            return [
                {"load": load, "max_violation": max_violation(load), "dead_experts": sum(c == 0 for c in load)}
                for load in loads
            ]
        if self._routings is None:
            raise RuntimeError("routing_stats() needs a forward pass first")
        return [r.stats().as_dict() for r in self._routings]


class MoE(MoELayer):
    """Sparse Mixture-of-Experts layer: ``[..., d_model] -> [..., d_model]``.

    Args:
        d_model: input and output width.
        d_hidden: hidden width of each expert.
        num_experts: number of experts ``n``.
        gate: a gate spec (``"topk"``, ``"comet+"``: the ``+`` switches local search on), a parsed
            :class:`~sparsemoe.gates.GateSpec`, or a built :class:`~sparsemoe.gates.Gate`.
        k: experts per input (``None``: the gate's default; gates without a choice of k reject others).
        expert: ``"mlp"``, ``"swiglu"`` or ``"linear"``, or an :class:`ExpertBank` of your own.
        activation: activation of ``mlp``/``linear`` experts.
        bias: learn expert biases.
        capacity_limit: if set, each expert takes at most ``ceil(capacity_limit · N / n)`` of the
            ``N`` pairs (first choices first, GShard-style); the rest are dropped and reported in
            :meth:`routing_stats`. Default (``None``, or ``inf``): dropless. The one drop limit for
            every gate: Switch's capacity factor is this (``gate="switch", capacity_limit=1.25``);
            ``expert_choice``'s ``capacity_factor`` is a gate option because there it is the routing
            rule (how many inputs each expert picks), not a drop limit.
        check_finite: reject inputs holding NaN/inf (one reduction per call; on CUDA an asynchronous
            device-side assert, so the forward never waits for the device: see
            :func:`sparsemoe._validation.device_side_checks`).
        local_search: learn a permutation between gate outputs and experts (COMET's "+" gates, see
            :mod:`sparsemoe.search`). ``None`` (default) follows the spec's ``+``; ``False`` with a
            ``"+"`` spec raises (the two contradict each other).
        local_search_steps: training forwards before the permutation is hardened and frozen.
        device, dtype: factory arguments, as for ``torch.nn.Linear``.
        router_dtype: dtype of the gate (default: float32 when ``dtype`` is bf16/fp16, else ``dtype``).
        shared_experts: experts computed for every input besides the routed ones (DeepSeek-MoE,
            Qwen2-MoE), added to the routed output. ``s`` shared experts of width ``h`` are stored
            as one dense expert of width ``s·h`` (the same function as their sum, as DeepSeek-V3
            stores them) in ``shared_expert``, computed as one dense MLP (not fused into the routed
            experts' grouped matmul: fused, they measured slower at every shape tried on CPU,
            ``benchmarks/RESULTS-shared-experts.md``). Needs ``expert`` to be ``"mlp"`` or ``"swiglu"``.
        shared_hidden: hidden width ``h`` of each shared expert (default ``d_hidden``).
        shared_gate: scale the shared output by ``sigmoid(x · w)`` (Qwen2-MoE; ``shared_expert_gate``).
        **gate_options: passed to the gate (``gamma=``, ``entropy_weight=``, ``noisy=``, ...).

    Shape:
        ``forward(x [..., d_model], ids LongTensor[...] | None) -> [..., d_model]``; ``ids`` gives each
        position an integer id for the gates that read one (hash: token ids; random: sequence index).

    After each forward, ``last_routing`` holds the routing and :meth:`aux_loss` the sum of the
    gate's auxiliary losses, to be added to the training loss (:func:`sparsemoe.aux_loss` collects
    them over a whole model).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None,
        num_experts: int,
        gate: GateArg = "topk",
        k: int | None = None,
        *,
        expert: str | ExpertBank = "mlp",
        activation: str = "gelu",
        bias: bool = False,
        capacity_limit: float | None = None,
        check_finite: bool = True,
        local_search: bool | None = None,
        local_search_steps: int = 1000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_dtype: torch.dtype | None = None,
        shared_experts: int = 0,
        shared_hidden: int | None = None,
        shared_gate: bool = False,
        **gate_options: Any,
    ) -> None:
        super().__init__()
        self.d_model = self.d_in = self.d_gate = check_int("d_model", d_model, low=1)
        num_experts = check_int("num_experts", num_experts, low=1)
        local_search_steps, capacity_limit = _routing_args(local_search_steps, capacity_limit)
        shared_width = _shared_width(shared_experts, shared_hidden, shared_gate, d_hidden, expert)
        self.router_dtype = resolve_router_dtype(dtype, router_dtype)
        self.gate, search = _build_gate(
            gate,
            d_model,
            num_experts,
            _with_k(gate_options, k),
            {"check_finite": check_finite, "device": device, "dtype": self.router_dtype},
            local_search,
        )
        self.experts = _make_experts(expert, num_experts, d_model, d_hidden, d_model, activation, bias, device, dtype)
        self.shared_expert: StackedExperts | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if shared_width:
            kind = cast(str, expert)  # checked by _shared_width
            self.shared_expert = StackedExperts(
                1, d_model, shared_width, d_model, kind=kind, activation=activation, bias=bias, device=device,
                dtype=dtype,
            )  # fmt: skip
            if shared_gate:
                self.shared_expert_gate = nn.Linear(d_model, 1, bias=False, device=device, dtype=dtype)
        self._init_routing(num_experts, search, local_search_steps, capacity_limit, check_finite, device)

    def task_gates(self) -> Sequence[Gate]:
        return (self.gate,)

    def shared_output(self, rows: torch.Tensor) -> torch.Tensor:
        """``[T, d_model]``: the shared experts on every row ``rows: [T, d_model]`` (gated if ``shared_gate``)."""
        assert self.shared_expert is not None
        y = self.shared_expert.forward_expert(0, rows)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(rows)) * y
        return y

    @property
    def last_routing(self) -> Routing | None:
        """The routing of the last forward (``None`` before any)."""
        return None if self._routings is None else self._routings[0]

    def route(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        """Routing of validated rows ``x: [T, d_model]``: gate, local search, capacity limit."""
        return self._route_rows(x, ids)[0]

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        leading, rows, gate_rows, flat_ids = self._flatten(x, None, ids)
        routing = self.route(gate_rows, flat_ids)
        y = dispatch(rows, routing, self.experts)  # [T, *out]
        if self.shared_expert is not None:
            y = y + self.shared_output(rows)
        return y.view(*leading, *y.shape[1:])

    def routing_stats(self, window: bool = False) -> dict[str, float | list[int]]:
        """Load per expert, mean active experts per input and dropped fraction of the last forward
        (``window=True``: load, MaxVio and dead experts since the last :meth:`reset_routing_window`)."""
        return self._stats(window)[0]


class MultiTaskMoE(MoELayer):
    """Multi-gate MoE (MMoE, Ma et al. 2018): shared experts, one gate per task.

    Each (input, expert) pair chosen by any task is computed once; every task then mixes the
    expert outputs with its own weights, to be fed to a tower per task. Task gates of one kind and
    settings route in one batched call (:meth:`Gate.route_batch`), which small models feel.

    Args:
        d_in: input width of the experts (and of the gates, unless ``d_gate`` is given).
        d_expert_out: output width of each expert.
        num_experts: number of shared experts.
        num_tasks: number of tasks (= gates).
        gate: a gate spec or :class:`~sparsemoe.gates.GateSpec` (one such gate per task), a factory
            ``() -> Gate`` called once per task, or a sequence of ``num_tasks`` built gates.
        k, capacity_limit, check_finite, device, dtype, router_dtype, **gate_options: as in :class:`MoE`.
        expert: ``"linear"`` (one dense layer with ``activation``, as in the COMET paper), ``"mlp"``,
            ``"swiglu"``, or an :class:`ExpertBank` (e.g. :class:`ModuleExperts` of CNNs, whose rows
            may have any trailing shape: see ``ExpertBank.input_dims``).
        d_hidden: hidden width for ``mlp``/``swiglu`` experts.
        d_gate: width of a separate gate input (``forward(x, gate_input=...)``).
        local_search, local_search_steps: as in :class:`MoE`; ONE permutation is shared by all the
            task gates, as in the COMET paper.

    Shape:
        ``forward(x [..., d_in], gate_input [..., d_gate] | None, ids LongTensor[...] | None)`` returns
        a list of ``num_tasks`` tensors ``[..., d_expert_out]`` (the same leading shape as ``x``).
    """

    def __init__(
        self,
        d_in: int,
        d_expert_out: int,
        num_experts: int,
        num_tasks: int,
        gate: str | GateSpec | Callable[[], Gate] | Sequence[Gate] = "softmax",
        k: int | None = None,
        *,
        expert: str | ExpertBank = "linear",
        d_hidden: int | None = None,
        activation: str = "relu",
        bias: bool = True,
        d_gate: int | None = None,
        capacity_limit: float | None = None,
        check_finite: bool = True,
        local_search: bool | None = None,
        local_search_steps: int = 1000,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_dtype: torch.dtype | None = None,
        **gate_options: Any,
    ) -> None:
        super().__init__()
        self.d_in = check_int("d_in", d_in, low=1)
        self.num_tasks = check_int("num_tasks", num_tasks, low=1)
        num_experts = check_int("num_experts", num_experts, low=1)
        self.d_gate = check_int("d_gate", d_gate if d_gate is not None else d_in, low=1)
        local_search_steps, capacity_limit = _routing_args(local_search_steps, capacity_limit)
        self.router_dtype = resolve_router_dtype(dtype, router_dtype)
        options = _with_k(gate_options, k)
        factory = {"check_finite": check_finite, "device": device, "dtype": self.router_dtype}
        task_gates: list[Gate] = []
        search = bool(local_search)
        if isinstance(gate, (str, GateSpec)):
            for _ in range(num_tasks):
                built, search = _build_gate(gate, self.d_gate, num_experts, options, factory, local_search)
                task_gates.append(built)
        else:
            if options:
                raise ValueError(
                    f"gate options ({', '.join(sorted(options))}) go to the gates themselves when gates are given"
                )
            task_gates = _task_gates_from(gate, num_tasks)
            for built in task_gates:
                _build_gate(built, self.d_gate, num_experts, {}, factory)  # checks sizes
        self.gates = nn.ModuleList(task_gates)
        self.experts = _make_experts(
            expert, num_experts, d_in, d_hidden, check_int("d_expert_out", d_expert_out, low=1), activation, bias,
            device, dtype,
        )  # fmt: skip
        self._init_routing(num_experts, search, local_search_steps, capacity_limit, check_finite, device)

    def task_gates(self) -> Sequence[Gate]:
        return list(self.gates)  # type: ignore[arg-type]

    @property
    def last_routing(self) -> list[Routing] | None:
        """The routing of each task gate in the last forward (``None`` before any)."""
        return self._routings

    def route(self, gate_input: torch.Tensor, ids: torch.Tensor | None = None) -> list[Routing]:
        """One routing per task for validated rows ``gate_input: [T, d_gate]``."""
        return self._route_rows(gate_input, ids)

    def forward(
        self, x: torch.Tensor, gate_input: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        leading, rows, gate_rows, flat_ids = self._flatten(x, gate_input, ids)
        routings = self.route(gate_rows, flat_ids)
        # Each pair chosen by any task is computed once (see dispatch_tasks; dense when every pair is chosen).
        outputs = dispatch_tasks(rows, routings, self.experts)
        outputs = [out.view(*leading, *out.shape[1:]) for out in outputs]
        return outputs

    def routing_stats(self, window: bool = False) -> list[dict[str, float | list[int]]]:
        """Per task: load per expert, mean active experts per input, dropped fraction (``window``: as in MoE)."""
        return self._stats(window)


class CGC(MoELayer):
    """Customized Gate Control (Tang et al., RecSys 2020): task-specific experts plus shared experts.

    ``num_tasks`` groups of ``task_experts`` experts and ``shared_experts`` shared ones, held in one
    bank (task ``t`` owns experts ``t·task_experts ...``, the shared ones come last). Task ``t``'s
    gate (any gate) chooses among its own and the shared experts only. With ``shared_gate=True``
    (the lower levels of PLE) one more gate chooses among all experts; its mix is an extra output,
    the shared input of the next level. Balancing gates balance over the choices they see. Each
    group's experts run once per forward, on the pairs any gate reaching them chose
    (:func:`~sparsemoe.dispatch.dispatch_tasks`): the shared experts are not recomputed per gate.

    Args:
        d_in: input width of experts and gates.
        d_expert_out: output width of each expert.
        num_tasks, task_experts, shared_experts: the expert groups (``task_experts`` or
            ``shared_experts`` may be 0, not both).
        gate: a gate spec (one gate per task, plus the shared gate); ``k``, ``**gate_options`` go to each.
        expert, d_hidden, activation, bias, check_finite, device, dtype, router_dtype: as in :class:`MultiTaskMoE`.

    Shape:
        ``forward(x, ids)``: ``x`` is one tensor ``[..., d_in]`` read by every group (the first level)
        or a list of ``num_tasks + 1`` tensors (task ``t``'s experts and gate read ``x[t]``, the shared
        experts and the shared gate ``x[-1]``). Returns ``num_tasks`` tensors ``[..., d_expert_out]``,
        plus the shared gate's mix last with ``shared_gate=True``. Routings (``last_routing``,
        :meth:`routing_stats`) name experts by their index in the whole bank.
    """

    def __init__(
        self,
        d_in: int,
        d_expert_out: int,
        num_tasks: int,
        task_experts: int,
        shared_experts: int,
        gate: str | GateSpec = "softmax",
        k: int | None = None,
        *,
        shared_gate: bool = False,
        expert: str = "linear",
        d_hidden: int | None = None,
        activation: str = "relu",
        bias: bool = True,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        router_dtype: torch.dtype | None = None,
        **gate_options: Any,
    ) -> None:
        super().__init__()
        self.d_in = self.d_gate = check_int("d_in", d_in, low=1)
        self.num_tasks = check_int("num_tasks", num_tasks, low=1)
        self.task_experts = check_int("task_experts", task_experts, low=0)
        self.shared_experts = check_int("shared_experts", shared_experts, low=0)
        if not isinstance(shared_gate, bool):
            raise TypeError(f"shared_gate must be True or False, got {type(shared_gate).__name__}")
        if not isinstance(gate, (str, GateSpec)):
            raise TypeError(f"CGC takes a gate spec (such as 'softmax' or 'topk'), got {type(gate).__name__}")
        own = self.task_experts + self.shared_experts
        if own == 0:
            raise ValueError("CGC needs experts: task_experts + shared_experts must be at least 1")
        total = self.num_tasks * self.task_experts + self.shared_experts
        shared = list(range(total - self.shared_experts, total))
        choices = [list(range(t * self.task_experts, (t + 1) * self.task_experts)) + shared for t in range(num_tasks)]
        if shared_gate:
            choices.append(list(range(total)))
        self.router_dtype = resolve_router_dtype(dtype, router_dtype)
        options = _with_k(gate_options, k)
        factory = {"check_finite": check_finite, "device": device, "dtype": self.router_dtype}
        built = [_build_gate(gate, d_in, len(c), options, factory, False)[0] for c in choices]
        self.gates = nn.ModuleList(built)
        for i, c in enumerate(choices):  # gate i's choice j -> expert index in the bank
            self.register_buffer(f"choice_{i}", torch.tensor(c, dtype=torch.long, device=device), persistent=False)
        self.experts = _make_experts(
            expert, total, d_in, d_hidden, check_int("d_expert_out", d_expert_out, low=1), activation, bias, device,
            dtype,
        )  # fmt: skip
        self._init_routing(total, False, 1, None, check_finite, device)

    def task_gates(self) -> Sequence[Gate]:
        return list(self.gates)  # type: ignore[arg-type]

    @property
    def last_routing(self) -> list[Routing] | None:
        """Each gate's routing in the last forward, over the whole bank (``None`` before any)."""
        return self._routings

    def _group(self, g: int) -> tuple[int, int]:
        """Bank indices ``[lo, hi)`` of group ``g`` (task ``g``, or the shared experts for ``g = num_tasks``)."""
        if g < self.num_tasks:
            return g * self.task_experts, (g + 1) * self.task_experts
        return self.num_experts - self.shared_experts, self.num_experts

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        groups = self.num_tasks + 1
        inputs = [x] * groups if isinstance(x, torch.Tensor) else list(x)
        if len(inputs) != groups:
            raise ValueError(f"x must be one tensor or a list of num_tasks + 1 = {groups} tensors, got {len(inputs)}")
        flat = [self._flatten(t, None, ids) for t in inputs]  # (leading, rows, gate rows, ids) per group
        leading = flat[0][0]
        if any(f[0] != leading for f in flat):
            raise ValueError(f"the inputs' leading shapes differ: {[tuple(f[0]) for f in flat]}")
        routings = []
        with self._router_precision(flat[0][1].device):
            for i, gate in enumerate(self.task_gates()):
                rows = flat[min(i, self.num_tasks)][2]
                rows = rows if self.router_dtype is None else rows.to(self.router_dtype)
                local = gate.route(rows, flat[0][3])
                choice: torch.Tensor = getattr(self, f"choice_{i}")
                routings.append(
                    Routing(local.token, choice[local.expert], local.weight, self.num_experts, local.num_inputs,
                            aux_losses=local.aux_losses)
                )  # fmt: skip
        self._record(routings)
        outputs: list[torch.Tensor | None] = [None] * len(routings)
        for g in range(groups):  # each group's experts on that group's input, once for every gate reaching them
            lo, hi = self._group(g)
            if lo == hi:
                continue
            # task gate i reaches its own group and the shared one; the shared gate (i = num_tasks) every group
            readers = [i for i in range(len(routings)) if g in (i, self.num_tasks) or i == self.num_tasks]
            parts = []
            for i in readers:
                routing = routings[i]
                keep = (routing.expert >= lo) & (routing.expert < hi)
                parts.append(
                    Routing(routing.token[keep], routing.expert[keep], routing.weight[keep], self.num_experts,
                            routing.num_inputs)
                )  # fmt: skip
            for i, y in zip(readers, dispatch_tasks(flat[g][1], parts, self.experts), strict=True):
                previous = outputs[i]
                outputs[i] = y if previous is None else previous + y
        finished = []
        for out in outputs:
            assert out is not None  # every gate reaches at least one expert
            finished.append(out.view(*leading, *out.shape[1:]))
        return finished

    def routing_stats(self, window: bool = False) -> list[dict[str, float | list[int]]]:
        """Per gate (tasks, then the shared gate): load per expert of the whole bank, the rest as in MoE."""
        return self._stats(window)


def _shared_width(
    shared_experts: object, shared_hidden: object, shared_gate: object, d_hidden: int | None, expert: object
) -> int:
    """Hidden width of the one dense MLP holding the shared experts (0: none), checked before anything is built."""
    count = check_int("shared_experts", shared_experts, low=0)
    if not isinstance(shared_gate, bool):
        raise TypeError(f"shared_gate must be True or False, got {type(shared_gate).__name__}")
    if count == 0:
        if shared_hidden is not None or shared_gate:
            raise ValueError("shared_hidden= and shared_gate= need shared_experts >= 1 (the number of shared experts)")
        return 0
    if expert not in ("mlp", "swiglu"):
        raise ValueError(
            f"shared_experts needs expert='mlp' or 'swiglu' (got {expert!r}): shared experts are stored as one "
            "MLP of their total width"
        )
    width = shared_hidden if shared_hidden is not None else d_hidden
    if width is None:
        raise ValueError("shared_experts needs a width: pass shared_hidden= or d_hidden=")
    return count * check_int("shared_hidden", width, low=1)


def _task_gates_from(gate: object, num_tasks: int) -> list[Gate]:
    """Gates from a factory or a sequence, one per task."""
    if isinstance(gate, Gate):
        raise TypeError(
            "MultiTaskMoE needs one gate per task: pass a gate spec such as 'topk', a factory "
            "(lambda: MyGate(...)), or a list of num_tasks gates"
        )
    if isinstance(gate, Sequence):
        gates_ = list(gate)
    elif callable(gate):
        factory = cast(Callable[[], Gate], gate)
        gates_ = []
        for _ in range(num_tasks):
            made = factory()
            if not isinstance(made, Gate):
                raise TypeError(
                    f"the gate factory returned {type(made).__name__}, not a Gate; it must build one gate per call "
                    "(e.g. gate=lambda: TopKGate(d_in, num_experts, k=2))"
                )
            gates_.append(made)
    else:
        raise TypeError(f"gate must be a gate spec, a factory or a list of gates, got {type(gate).__name__}")
    not_gates = sorted({type(g).__name__ for g in gates_ if not isinstance(g, Gate)})
    if not_gates:
        raise TypeError(f"gate must list Gate objects, got {', '.join(not_gates)} among them")
    if len(gates_) != num_tasks:
        raise ValueError(f"need exactly num_tasks={num_tasks} Gate objects, got {len(gates_)}")
    if len({id(g) for g in gates_}) != len(gates_):
        raise ValueError("each task needs its own gate object; the list repeats one")
    return gates_


def _make_experts(
    expert: str | ExpertBank,
    num_experts: int,
    d_in: int,
    d_hidden: int | None,
    d_out: int,
    activation: str,
    bias: bool,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> ExpertBank:
    """The layer's expert bank: a given :class:`ExpertBank`, or stacked experts of kind ``expert``."""
    if isinstance(expert, ExpertBank):
        if expert.num_experts != num_experts:
            raise ValueError(f"expert bank has {expert.num_experts} experts, num_experts={num_experts}")
        return expert
    return StackedExperts(
        num_experts, d_in, d_hidden, d_out, kind=expert, activation=activation, bias=bias, device=device, dtype=dtype
    )


def moe_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, layer)`` of every MoE layer in ``model`` (the model itself included)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (the model holding the MoE layers), got {type(model).__name__}"
        )
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of every MoE layer in ``model`` from its last forward.

    Add it to the training loss; it is zero for a model without MoE layers or gate losses.
    """
    losses = [layer.aux_loss() for _, layer in moe_layers(model)]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


def routing_stats(model: nn.Module) -> dict[str, Any]:
    """Routing statistics of every MoE layer in ``model`` that has run, by module name."""
    return {
        name or "<model>": layer.routing_stats() for name, layer in moe_layers(model) if layer.last_routing is not None
    }
