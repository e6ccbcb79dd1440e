"""Expert parallelism on ``torch.distributed``: each rank holds a contiguous slice of the experts.

Launch one process per rank (``torchrun --nproc-per-node N``; gloo on CPU, NCCL on GPU), build the
same model on every rank (same seed), then replace each :class:`~sparsemoe.MoE` (or
:class:`~sparsemoe.MultiTaskMoE`) layer with ``expert_parallel(layer)``. What each rank holds:

* the gate(s), the local-search permutation and every non-MoE parameter: a full replica;
* experts ``[r · n/W, (r+1) · n/W)`` of each MoE layer only (``W`` ranks, ``n`` experts).

The layer's own forward runs unchanged on rank ``r``'s tokens ``x_r``, with its expert bank replaced
by :class:`RemoteExperts`:

1. the gate (and local search, capacity limit) routes ``x_r`` locally, exactly as the unsharded
   layer does;
2. the dispatch sorts the pairs by expert (hence by owning rank) and hands the rows to the bank,
   which exchanges the per-expert row counts (``all_to_all_single`` of ``[W, n/W]`` counts), then
   the rows (``all_to_all_single`` with those uneven splits);
3. each rank runs its local experts on the rows received from every rank (one grouped matmul);
4. the results go back (the reverse exchange) and the layer combines them with the routing weights
   locally, so the gate's gradient never leaves the rank.

The result equals the unsharded layer's output for ``x_r``. Backward runs the exchanges in reverse
(an ``all_to_all`` is its own adjoint with the splits swapped): the input and gate gradients equal
the unsharded layer's on ``x_r``, and each expert gradient is the SUM over ranks of the unsharded
gradients for that expert.

Composing with DDP (``examples/expert_parallel.py`` is the whole recipe): give the expert layers
their own process group (``expert_parallel(layer, group=dist.new_group())``) so that their exchanges
never interleave with DDP's all-reduces, then wrap the model in ``DistributedDataParallel`` with the
expert parameters left out (``DDP._set_params_and_buffers_to_ignore_for_model(model,
ddp_ignored_parameters(model))``), or average the replicated gradients yourself
(:func:`average_replicated_gradients`). DDP averages the replicated gradients over ranks (sum / W);
the expert gradients already hold the sum over ranks, so divide them by ``W`` too
(:func:`scale_expert_gradients`) and the whole update equals single-process training on the
concatenated batch with the loss averaged over ranks. Every rank must run every forward and
backward (the exchanges are collective).

"Its own tokens": each rank routes the batch it holds, so the output always equals the unsharded
layer applied to ``x_r`` alone (with the same gate state). For gates that decide each input on its
own (topk, switch and hash without a capacity, softmax, dselect_k, comet) that is also how those rows
are routed inside the concatenated batch. What depends on the batch acts per rank, as with DDP:
``expert_choice`` picks each expert's top inputs among the rank's batch, with a capacity from the
local batch size; capacity limits count the local pairs; batch-level auxiliary losses (load balance,
z-loss) are computed on the local batch; the random gate's stream (its ``rng_state`` buffer) starts
replicated and advances with the rank's own rows, so ranks with different batch sizes part ways.
Checkpoints (:mod:`sparsemoe.checkpoint`) save and restore each rank's own stream and RNG states.

Local search under DDP: once the permutation hardens, ``log α`` gets an exact zero gradient (not
``None``), so DDP with default settings keeps working (:mod:`sparsemoe.search`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._validation import check_input
from .experts import ExpertBank, StackedExperts
from .layers import MoE, MultiTaskMoE, register_layer_type
from .routing import Routing

ProcessGroup = dist.ProcessGroup


def _all_to_all(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup | None
) -> torch.Tensor:
    """Rows ``x[sum(send_splits[:j]) : ...]`` go to rank ``j``; returns the rows received, by source rank."""
    out = x.new_empty(sum(recv_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven ``all_to_all_single``: ``[sum(send), *f] -> [sum(recv), *f]``.

    The adjoint of sending rows is sending their gradients back: the same exchange with the splits
    swapped. Every rank must call backward (it is a collective).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: ProcessGroup | None,
    ) -> torch.Tensor:
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        send_splits, recv_splits = ctx.splits
        return _all_to_all(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup | None = None
) -> torch.Tensor:
    """Differentiable uneven ``all_to_all_single`` of the rows of ``x: [sum(send_splits), *f]``."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def _slice_experts(bank: nn.Module, start: int, stop: int) -> StackedExperts:
    """A :class:`StackedExperts` holding experts ``[start, stop)`` of ``bank`` (copies, not views)."""
    if not isinstance(bank, StackedExperts):
        raise TypeError(
            f"expert_parallel supports StackedExperts (expert='mlp', 'swiglu' or 'linear'), got {type(bank).__name__}"
        )
    shard = copy.copy(bank)  # a shallow copy: give it its own containers, and sliced parameters
    shard._buffers, shard._modules = dict(bank._buffers), dict(bank._modules)
    shard._parameters = {
        name: None if p is None else nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
        for name, p in bank._parameters.items()
    }
    shard.num_experts = stop - start
    return shard


class RemoteExperts(ExpertBank):
    """All ``n`` experts as seen from one rank: rows of other ranks' experts are computed remotely.

    ``forward_sorted(xs, counts)`` (rows sorted by expert, ``counts: [n]``) sends each row to the rank
    owning its expert, runs this rank's shard on the rows it receives from every rank, and returns
    the results in the order of ``xs``. It is collective: every rank of ``group`` must call it the
    same number of times (and backward through it). Any layer that drives its experts through the
    :class:`ExpertBank` interface (``MoE``'s dispatch, ``MultiTaskMoE``) runs unchanged on it.
    """

    def __init__(self, shard: StackedExperts, num_experts: int, group: ProcessGroup | None) -> None:
        super().__init__()
        self.shard = shard
        self.num_experts = num_experts
        self.d_out = shard.d_out
        self.group = group
        self.world_size = dist.get_world_size(group)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"RemoteExperts computes rows in bulk only (forward_sorted); expert {expert} may be remote")

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        world, per = self.world_size, self.shard.num_experts
        # 1. split sizes: rows per (destination rank, its local expert), and what we will receive.
        recv_counts = _all_to_all(counts.view(world, per), [1] * world, [1] * world, self.group)  # [W, per]
        send_splits = counts.view(world, per).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # 2. rows to the ranks owning their experts (they are sorted by expert, hence by rank).
        received = all_to_all(xs, send_splits, recv_splits, self.group)
        # 3. received rows are grouped by source rank, then local expert: regroup by local expert.
        local_expert = torch.arange(per, device=xs.device).repeat(world)
        local_expert = local_expert.repeat_interleave(recv_counts.reshape(-1).to(xs.device))
        regroup = torch.argsort(local_expert, stable=True)
        ys = self.shard.forward_sorted(received.index_select(0, regroup), recv_counts.sum(0))
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        # 4. results back to the ranks the rows came from, in their order.
        return all_to_all(ys.index_select(0, back), recv_splits, send_splits, self.group)


@register_layer_type
class ExpertParallel(nn.Module):
    """A :class:`~sparsemoe.MoE` or :class:`~sparsemoe.MultiTaskMoE` with experts sharded over ``group``.

    Built by :func:`expert_parallel`. Same ``forward``, ``last_routing``, ``aux_loss()`` and
    ``routing_stats()`` as the layer it wraps, and the same ``state_dict`` keys, except that the
    ``experts.*`` tensors hold only this rank's ``[n/W, ...]`` slice (experts ``expert_range``).
    Checkpoints gather them (:mod:`sparsemoe.checkpoint`).
    """

    _layer: MoE | MultiTaskMoE
    experts: StackedExperts

    def __init__(self, layer: MoE | MultiTaskMoE, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(layer, (MoE, MultiTaskMoE)):
            raise TypeError(f"expert_parallel takes a sparsemoe.MoE or MultiTaskMoE, got {type(layer).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "expert_parallel needs torch.distributed initialised: call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the environment)"
            )
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = layer.num_experts
        if n % world != 0:
            raise ValueError(
                f"num_experts={n} is not divisible by the world size {world}: each rank must hold the same "
                f"number of experts; use a number of ranks that divides {n} or change num_experts"
            )
        self.group = group
        self.world_size, self.rank = world, rank
        self.num_experts = n
        self.experts_per_rank = n // world
        start = rank * self.experts_per_rank
        self.expert_range = (start, start + self.experts_per_rank)
        # gate(s), search: replicated, shared with the layer copy; the layer's order is kept, so that
        # parameters (and optimiser param groups) come in the same order as in the unsharded model
        for name, child in layer.named_children():
            self.add_module(name, _slice_experts(child, *self.expert_range) if name == "experts" else child)
        # The layer's own forward runs on a shallow copy whose expert bank computes remotely. The copy
        # is kept out of the module tree (no extra state_dict keys); its children are ours.
        inner = copy.copy(layer)
        inner._modules = dict(layer._modules)
        inner._modules["experts"] = RemoteExperts(self.experts, n, group)
        object.__setattr__(self, "_layer", inner)

    @property
    def last_routing(self) -> Routing | list[Routing] | None:
        return self._layer.last_routing

    def train(self, mode: bool = True) -> ExpertParallel:
        super().train(mode)
        self._layer.train(mode)
        return self

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """As the wrapped layer's forward, on this rank's tokens; collective (see the module doc)."""
        if isinstance(self._layer, MultiTaskMoE) and len(args) < 1 and kwargs.get("gate_input") is None:
            check_input(x, self._layer.d_in, check_finite=self._layer.check_finite)
        return self._layer(x, *args, **kwargs)

    def aux_loss(self) -> torch.Tensor:
        """Weighted sum of the last forward's auxiliary losses on this rank's tokens."""
        return self._layer.aux_loss()

    def routing_stats(self) -> Any:
        """Routing statistics of this rank's tokens in the last forward."""
        return self._layer.routing_stats()

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        return f"num_experts={self.num_experts}, rank={self.rank}/{self.world_size}, experts=[{lo}, {hi})"


def expert_parallel(layer: MoE | MultiTaskMoE, group: ProcessGroup | None = None) -> ExpertParallel:
    """Shard ``layer``'s experts over the ranks of ``group`` (default: the world); see the module doc.

    ``layer`` (a :class:`~sparsemoe.MoE` or :class:`~sparsemoe.MultiTaskMoE` with stacked experts)
    must be identical on every rank (build it after seeding identically). Its gate(s) and search are
    shared with the returned module, not copied; its expert bank is left as it was (the shard is a
    copy), so drop ``layer`` to free the full expert weights.

    Raises:
        ValueError: ``num_experts`` is not divisible by the number of ranks.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    return ExpertParallel(layer, group)


def expert_parallel_layers(model: nn.Module) -> Iterator[tuple[str, ExpertParallel]]:
    """``(name, layer)`` of every expert-parallel layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallel):
            yield name, module


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters of ``model`` (one slice per rank; not to be averaged by DDP)."""
    return [p for _, layer in expert_parallel_layers(model) for p in layer.experts.parameters()]


def ddp_ignored_parameters(model: nn.Module) -> list[str]:
    """Fully qualified names of the sharded parameters, for DDP's ignore list."""
    names = []
    for prefix, layer in expert_parallel_layers(model):
        names += [
            f"{prefix}.experts.{name}" if prefix else f"experts.{name}" for name, _ in layer.experts.named_parameters()
        ]
    return names


def scale_expert_gradients(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """Divide the expert gradients by the world size, to match DDP's averaging of the replicated ones."""
    world = dist.get_world_size(group)
    for p in expert_parameters(model):
        if p.grad is not None:
            p.grad.div_(world)


def average_replicated_gradients(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """DDP without DDP: average the gradients of every non-expert parameter over the ranks (one
    flattened all-reduce), then :func:`scale_expert_gradients`. Call after ``backward`` on every rank.

    A parameter without a gradient on some ranks gets zeros there; one without a gradient on every
    rank keeps ``grad=None`` (so optimisers skip it, as in a single process).
    """
    sharded = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in sharded]
    world = dist.get_world_size(group)
    if params:
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
        params = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag]
    if params:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()
    scale_expert_gradients(model, group)
