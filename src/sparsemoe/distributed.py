"""Expert parallelism on ``torch.distributed``: each rank holds a contiguous slice of the experts.

Launch one process per rank (``torchrun --nproc-per-node N``; gloo on CPU, NCCL on GPU), build the
same model on every rank (same seed), then replace each :class:`~sparsemoe.MoE` layer with
``expert_parallel(layer)``. What each rank holds afterwards:

* the gate, the local-search permutation and every non-MoE parameter: a full replica;
* experts ``[r · n/W, (r+1) · n/W)`` of each MoE layer only (``W`` ranks, ``n`` experts).

Forward on rank ``r`` with its own tokens ``x_r``:

1. route locally (``moe.route``: gate + local search + capacity limit), exactly as the unsharded
   layer does on ``x_r``;
2. sort the pairs by expert (hence by owning rank), exchange the per-expert pair counts
   (``all_to_all_single`` of ``[W, n/W]`` counts), then the input rows of the pairs
   (``all_to_all_single`` with those uneven splits);
3. run the local experts on the rows received from every rank (one grouped matmul);
4. send the results back (the reverse exchange) and combine them with the routing weights locally,
   so the gate's gradient never leaves the rank.

The result equals ``moe(x_r)`` of the unsharded layer. Backward runs the exchanges in reverse (an
``all_to_all`` is its own adjoint with the splits swapped): the input and gate gradients equal the
unsharded layer's on ``x_r``, and each expert gradient is the SUM over ranks of the unsharded
gradients for that expert.

Composing with DDP (``examples/expert_parallel.py`` is the whole recipe): give the expert layers
their own process group (``expert_parallel(layer, group=dist.new_group())``) so that their exchanges
never interleave with DDP's all-reduces, then wrap the model in ``DistributedDataParallel`` with the
expert parameters left out (``DDP._set_params_and_buffers_to_ignore_for_model(model,
ddp_ignored_parameters(model))``), or average the replicated gradients yourself
(:func:`average_replicated_gradients`). DDP averages the
replicated gradients over ranks (sum / W); the expert gradients already hold the sum over ranks, so
divide them by ``W`` too (:func:`scale_expert_gradients`) and the whole update equals single-process
training on the concatenated batch with a loss averaged over ranks. Every rank must run every
forward and backward (the exchanges are collective).

"Its own tokens": gates that decide per input (topk, switch, hash, random, softmax, dselect_k,
comet) route ``x_r`` exactly as the unsharded layer routes those rows inside any batch.
``expert_choice`` picks, for each expert, the top inputs of the batch it sees, so here it picks
among each rank's local batch, with a capacity computed from the local batch size: the output
equals the unsharded layer applied to ``x_r`` alone, not to the concatenated batch. Batch-level
auxiliary losses (load balance, z-loss) are likewise computed on the local batch, as with DDP.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._validation import check_input
from .dispatch import combine, sort_by_expert
from .experts import StackedExperts
from .layers import MoE
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
    shard = copy.copy(bank)  # shares nothing below: its parameter dict is replaced
    shard._parameters = {
        name: None if p is None else nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
        for name, p in bank._parameters.items()
    }
    shard.num_experts = stop - start
    return shard


class ExpertParallelMoE(nn.Module):
    """An :class:`~sparsemoe.MoE` whose experts are sharded over the ranks of ``group``.

    Built by :func:`expert_parallel`. Same ``forward(x, ids=None)``, ``last_routing``,
    ``aux_loss()`` and ``routing_stats()`` as :class:`~sparsemoe.MoE`, and the same ``state_dict``
    keys, except that ``experts.*`` tensors hold only this rank's ``[n/W, ...]`` slice
    (``expert_range``). Checkpoints gather them (:mod:`sparsemoe.checkpoint`).
    """

    _router: MoE

    def __init__(self, moe: MoE, group: ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(moe, MoE):
            raise TypeError(f"expert_parallel takes a sparsemoe.MoE, got {type(moe).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "expert_parallel needs torch.distributed initialised: call "
                "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the environment)"
            )
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = moe.num_experts
        if n % world != 0:
            raise ValueError(
                f"num_experts={n} is not divisible by the world size {world}: each rank must hold the same "
                f"number of experts; use a number of ranks that divides {n} or change num_experts"
            )
        self.group = group
        self.world_size, self.rank = world, rank
        self.num_experts = n
        self.experts_per_rank = n // world
        self.d_model = moe.d_model
        self.check_finite = moe.check_finite
        start = rank * self.experts_per_rank
        self.expert_range = (start, start + self.experts_per_rank)
        self.gate = moe.gate
        self.search = moe.search
        self.experts = _slice_experts(moe.experts, *self.expert_range)
        # A shallow copy of the layer whose gate/search are ours, used only for ``route``; kept out of
        # the module tree so that it adds no state_dict keys.
        router = copy.copy(moe)
        router._modules = dict(moe._modules)
        router._modules["experts"] = self.experts
        object.__setattr__(self, "_router", router)

    @property
    def last_routing(self) -> Routing | None:
        return self._router.last_routing

    def train(self, mode: bool = True) -> ExpertParallelMoE:
        super().train(mode)
        self._router.train(mode)
        return self

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [..., d_model]`` this rank's tokens -> ``[..., d_model]``; collective (see module doc)."""
        check_input(x, self.d_model, check_finite=self.check_finite)
        flat = x.reshape(-1, self.d_model)  # [T, d]
        routing = self._router.route(flat, None if ids is None else ids.reshape(-1))
        return self._exchange_and_compute(flat, routing).view(*x.shape[:-1], -1)

    def _exchange_and_compute(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        world, per = self.world_size, self.experts_per_rank
        order, counts = sort_by_expert(routing.expert, self.num_experts)  # pairs grouped by expert = by rank
        token, weight = routing.token[order], routing.weight[order]
        # 1. split sizes: pairs per (destination rank, its local expert), and what we will receive.
        recv_counts = _all_to_all(counts.view(world, per), [1] * world, [1] * world, self.group)  # [W, per]
        send_splits = counts.view(world, per).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # 2. input rows of our pairs to the ranks owning their experts.
        received = all_to_all(flat.index_select(0, token), send_splits, recv_splits, self.group)
        # 3. received rows are grouped by source rank, then local expert: regroup by local expert.
        local_expert = torch.arange(per, device=flat.device).repeat(world)
        local_expert = local_expert.repeat_interleave(recv_counts.reshape(-1).to(flat.device))
        regroup = torch.argsort(local_expert, stable=True)
        ys = self.experts.forward_sorted(received.index_select(0, regroup), recv_counts.sum(0))
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        # 4. results back to the ranks that own the tokens, combined with the local weights.
        ys = all_to_all(ys.index_select(0, back), recv_splits, send_splits, self.group)
        return combine(ys, token, weight, routing.num_inputs)

    def aux_loss(self) -> torch.Tensor:
        """Weighted sum of the last forward's auxiliary losses on this rank's tokens."""
        routing = self.last_routing
        return torch.zeros(()) if routing is None else routing.aux_loss()

    def routing_stats(self) -> dict[str, object]:
        """Routing statistics of this rank's tokens in the last forward."""
        if self.last_routing is None:
            raise RuntimeError("routing_stats() needs a forward pass first")
        return dict(self.last_routing.stats().as_dict())

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        return f"num_experts={self.num_experts}, rank={self.rank}/{self.world_size}, experts=[{lo}, {hi})"


def expert_parallel(moe: MoE, group: ProcessGroup | None = None) -> ExpertParallelMoE:
    """Shard ``moe``'s experts over the ranks of ``group`` (default: the world); see the module doc.

    ``moe`` must be identical on every rank (build it after seeding identically). It is left
    unchanged; drop it to free its full expert weights.

    Raises:
        ValueError: ``num_experts`` is not divisible by the number of ranks.
        RuntimeError: ``torch.distributed`` is not initialised.
    """
    return ExpertParallelMoE(moe, group)


def expert_parallel_layers(model: nn.Module) -> Iterator[tuple[str, ExpertParallelMoE]]:
    """``(name, layer)`` of every expert-parallel layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
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
