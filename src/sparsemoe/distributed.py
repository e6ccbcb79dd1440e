"""Expert parallelism on ``torch.distributed``: each rank holds a slice of every expert bank as DTensors.

Launch one process per rank (``torchrun --nproc-per-node N``; gloo on CPU, NCCL on GPU), build the
same model on every rank (same seed), then call ``expert_parallel(model)`` (or ``(model, mesh)``)
BEFORE building the optimizer. It works in place, as ``fully_shard`` does: every
:class:`~sparsemoe.MoE` and :class:`~sparsemoe.MultiTaskMoE` inside keeps its place and its
parameter names; each expert parameter (``experts.w1``, ...) becomes a DTensor of the full
``[n, ...]`` shape sharded on dim 0 over the 1-D mesh (``Shard(0)``): rank ``r`` stores experts
``[r · n/W, (r+1) · n/W)``. ``state_dict()``, optimizers and ``torch.distributed.checkpoint`` see
ordinary distributed parameters. Gates, the local-search permutation and every other parameter
stay replicated.

How the layer runs sharded without knowing about it: the expert bank's class is swapped for a
subclass (as ``fully_shard`` swaps a module's class) whose bulk methods exchange rows between ranks.
The layer's own forward runs unchanged on rank ``r``'s tokens ``x_r``:

1. the gate (and local search, capacity limit) routes ``x_r`` locally, exactly as unsharded;
2. the dispatch sorts the pairs by expert (hence by owning rank) and hands the rows to the bank,
   which exchanges the per-expert row counts (``all_to_all_single`` of ``[W, n/W]`` counts), then
   the rows (``all_to_all_single`` with those uneven splits);
3. each rank runs its local experts (``param.to_local()``) on the rows received (one grouped matmul);
4. the results go back (the reverse exchange) and the layer combines them with the routing weights
   locally, so the gate's gradient never leaves the rank.

The output equals the unsharded layer's on ``x_r``. Gradients follow data parallelism over the
mesh (the loss of the step is the mean of the ranks' losses): each expert gradient is the MEAN over
ranks of the unsharded gradients for that expert (the exchange sums them; the local weights scale
by ``1/W`` in backward), while the replicated parameters hold this rank's gradient, to be averaged
by ``DistributedDataParallel`` (which ``expert_parallel(model)`` tells to leave the expert shards
alone) or by :func:`average_replicated_gradients`. Then every update equals single-process training
on the concatenated batch. Every rank must run every forward and backward (the exchanges are
collective).

"Its own tokens": each rank routes the batch it holds. For gates that decide each input on its own
(topk, switch and hash without a capacity, softmax, dselect_k, comet) that is also how those rows
are routed inside the concatenated batch. What depends on the batch acts per rank, as with DDP:
``expert_choice`` picks each expert's top inputs among the rank's batch; capacity limits count the
local pairs; batch-level auxiliary losses are computed on the local batch; the random gate's
stream (its ``rng_state`` buffer) advances with the rank's own rows. Checkpoints
(:mod:`sparsemoe.checkpoint`) gather DTensor parameters into full tensors and save each rank's
own RNG states and buffers; ``torch.distributed.checkpoint`` saves the shards as they are
(:func:`dcp_state`), and :func:`dcp_to_safetensors`/:func:`safetensors_to_dcp` convert between the two.
:func:`save_dcp_checkpoint`/:func:`load_dcp_checkpoint` are the resumable form the training loop
writes with ``TrainConfig(checkpoint_format="dcp")``: the shards, each rank's RNG states and
buffers, and the loop's state, loadable at any number of ranks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .atomic import write_json
from .checkpoint import (
    _check_mapping,
    _check_modules,
    _check_step,
    _check_tensors,
    _json_ready,
    _replicated_buffers,
    _restore_rng,
    _rng_state,
    _sharded_keys,
    load_checkpoint,
    save_checkpoint,
)
from .experts import ExpertBank, StackedExperts
from .layers import moe_layers

ProcessGroup = dist.ProcessGroup
__all__ = [
    "all_ranks",
    "all_to_all",
    "average_replicated_gradients",
    "data_parallel",
    "dcp_state",
    "dcp_to_safetensors",
    "expert_banks",
    "expert_parallel",
    "expert_parameters",
    "join_torchrun",
    "load_dcp_checkpoint",
    "rank_output",
    "read_dcp_checkpoint",
    "safetensors_to_dcp",
    "save_dcp_checkpoint",
]


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


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward: turns the exchange's sum over ranks into a mean."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class _ShardedBank:
    """Mixed in before a :class:`StackedExperts` class by :func:`expert_parallel` (never built directly).

    The bank still presents all ``n`` experts to the layer; ``forward_sorted(xs, counts)`` (rows
    sorted by expert, ``counts: [n]``) sends each row to the rank owning its expert, runs this
    rank's shard on the rows it receives from every rank, and returns the results in the order of
    ``xs``. The other bulk methods go through it; single experts may be remote, so
    ``forward_expert`` refuses. It pickles (``torch.save(model)``) as its importable base class
    plus state; the process group is not pickled but found again by name when the bank next runs.
    """

    ep_mesh: DeviceMesh
    expert_range: tuple[int, int]
    num_experts: int
    _parameters: dict[str, nn.Parameter | None]

    @property
    def ep_group(self) -> ProcessGroup:
        """The mesh's process group (after unpickling: looked up by name among this process's groups)."""
        group = self.__dict__.get("_ep_group")
        if group is None:
            try:
                group = self.ep_mesh.get_group()
            except (RuntimeError, ValueError, KeyError) as e:
                raise RuntimeError(
                    "this expert-parallel bank was unpickled in a process without the process group it was "
                    "sharded over: unpickle it only in the ranks of the job that pickled it; to move a model "
                    "between jobs or world sizes save it with sparsemoe.save_checkpoint or "
                    "sparsemoe.distributed.save_dcp_checkpoint"
                ) from e
            self.__dict__["_ep_group"] = group
        return group

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        """Pickle as the importable base class (the subclass is made at run time), without the process
        group (it does not pickle); unpickling remakes the subclass and finds the group by the mesh's."""
        state = dict(self.__dict__)
        state.pop("_ep_group", None)
        return _new_sharded_bank, (type(self)._ep_base,), state  # type: ignore[attr-defined]

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"an expert-parallel bank computes rows in bulk only; expert {expert} may be remote")

    def forward_combined(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return ExpertBank.forward_combined(self, *args, **kwargs)  # type: ignore[arg-type]

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return ExpertBank.forward_all(self, x)  # type: ignore[arg-type]

    def _local_view(self) -> StackedExperts:
        """This bank with its local shards as plain tensors (differentiable ``to_local()``), for one call."""
        world = self.ep_mesh.size()
        view = object.__new__(type(self))  # a shallow copy that runs no __new__/__init__ (fully_shard's has one)
        view.__dict__.update(self.__dict__)
        view._parameters = {
            name: None if p is None else _ScaleGrad.apply(cast(DTensor, p).to_local(), 1.0 / world)
            for name, p in self._parameters.items()
        }
        view.num_experts = self.expert_range[1] - self.expert_range[0]
        return view  # type: ignore[return-value]

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        world, group = self.ep_mesh.size(), self.ep_group
        per = self.expert_range[1] - self.expert_range[0]
        # 1. split sizes: rows per (destination rank, its local expert), and what we will receive.
        recv_counts = _all_to_all(counts.view(world, per), [1] * world, [1] * world, group)  # [W, per]
        send_splits = counts.view(world, per).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # 2. rows to the ranks owning their experts (they are sorted by expert, hence by rank).
        received = all_to_all(xs, send_splits, recv_splits, group)
        # 3. received rows are grouped by source rank, then local expert: regroup by local expert.
        local_expert = torch.arange(per, device=xs.device).repeat(world)
        local_expert = local_expert.repeat_interleave(recv_counts.reshape(-1).to(xs.device))
        regroup = torch.argsort(local_expert, stable=True)
        base: type[StackedExperts] = type(self)._ep_base  # type: ignore[attr-defined]
        ys = base.forward_sorted(self._local_view(), received.index_select(0, regroup), recv_counts.sum(0))
        back = torch.empty_like(regroup)
        back[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        # 4. results back to the ranks the rows came from, in their order.
        return all_to_all(ys.index_select(0, back), recv_splits, send_splits, group)

    def extra_repr(self) -> str:
        lo, hi = self.expert_range
        base: type[StackedExperts] = type(self)._ep_base  # type: ignore[attr-defined]
        return f"{base.extra_repr(self)}, sharded: experts [{lo}, {hi}) of rank {self.ep_mesh.get_local_rank()}"  # type: ignore[arg-type]


_SHARDED_CLASSES: dict[type, type] = {}


def _sharded_class(cls: type[StackedExperts]) -> type:
    """The expert-parallel subclass of ``cls`` (one per class, as ``fully_shard`` does)."""
    if cls not in _SHARDED_CLASSES:
        _SHARDED_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (_ShardedBank, cls), {"_ep_base": cls})
    return _SHARDED_CLASSES[cls]


def _new_sharded_bank(base: type[StackedExperts]) -> _ShardedBank:
    """An empty expert-parallel bank of ``base`` (unpickling fills its state): see ``_ShardedBank.__reduce_ex__``."""
    return cast(_ShardedBank, object.__new__(_sharded_class(base)))


def _check_mesh(mesh: object, group: object) -> int:
    """The number of ranks the experts will be sharded over; errors for bad ``mesh``/``group`` first."""
    if not _initialised():
        raise RuntimeError(
            "expert_parallel needs torch.distributed initialised: call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the environment)"
        )
    if mesh is not None and group is not None:
        raise ValueError("pass mesh= or group=, not both (a mesh holds its own group)")
    if mesh is not None:
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"mesh must be a torch.distributed.DeviceMesh, got {type(mesh).__name__}")
        if mesh.ndim != 1:
            names = mesh.mesh_dim_names
            raise ValueError(
                f"mesh has {mesh.ndim} dimensions {names}; experts are sharded over one: pass that dimension, "
                f"e.g. mesh[{(names or ('ep',))[-1]!r}]"
            )
        return mesh.size()
    if group is not None and not isinstance(group, ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.get_world_size(group)


def _check_same_model(module: nn.Module, group: ProcessGroup | None) -> None:
    """ValueError on every rank unless ``module``'s parameters are identical on all ranks of ``group``.

    A model built differently on some rank (another seed, size or gate) would otherwise hang in the
    first exchange or train silently wrong; one small ``all_gather_object`` of per-parameter
    fingerprints (name, shape, sum, sum of squares, in float64) catches it at setup.
    """
    with torch.no_grad():
        mine = [
            (name, tuple(p.shape), float(p.double().sum()), float(p.double().pow(2).sum()))
            for name, p in module.named_parameters()
        ]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            differing = next((a[0] for a, b in zip(theirs, everyone[0], strict=False) if a != b), "the parameter list")
            raise ValueError(
                f"the model differs between ranks 0 and {rank} of the group (first at {differing}): build it "
                "identically on every rank (same code, then torch.manual_seed with the same seed) before "
                "expert_parallel"
            )


def expert_parallel(
    module: nn.Module, mesh: DeviceMesh | None = None, *, group: ProcessGroup | None = None
) -> nn.Module:
    """Shard the experts of every MoE layer in ``module`` over ``mesh`` IN PLACE; returns ``module``.

    Args:
        module: a model holding :class:`~sparsemoe.MoE`/:class:`~sparsemoe.MultiTaskMoE` layers with
            stacked experts, or one such layer; identical on every rank (build it after seeding).
        mesh: a 1-D ``DeviceMesh`` (or one named dimension of a larger one, ``mesh["ep"]``).
        group: a process group instead of a mesh (kept for compatibility). Neither: a new group
            over every rank (a collective call).

    Call it before building the optimizer (the expert parameters are replaced by DTensors) and
    before ``DistributedDataParallel(module)``: it sets ``module``'s DDP ignore list to the expert
    parameters, so DDP averages only the replicated ones. See the module doc for the gradients.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: ``module`` is not a module, holds no MoE layer, or a layer's experts are not stacked.
        ValueError: a layer's ``num_experts`` is not divisible by the mesh size, or is already sharded,
            or the model differs between ranks (checked at setup: a collective).
    """
    layers = list(moe_layers(module))  # raises TypeError for a non-module
    if not layers:
        raise TypeError(f"expert_parallel found no sparsemoe.MoE or MultiTaskMoE in the {type(module).__name__}")
    world = _check_mesh(mesh, group)
    for name, layer in layers:  # every check before any change
        bank, where = layer.experts, name or type(module).__name__
        if isinstance(bank, _ShardedBank):
            raise ValueError(f"the experts of {where} are already expert-parallel; call expert_parallel once")
        if not isinstance(bank, StackedExperts):
            raise TypeError(
                f"expert_parallel supports StackedExperts (expert='mlp', 'swiglu' or 'linear'); {where} has "
                f"{type(bank).__name__}"
            )
        if bank.num_experts % world != 0:
            raise ValueError(
                f"num_experts={bank.num_experts} of {where} is not divisible by the world size {world}: each rank "
                f"must hold the same number of experts; use a number of ranks that divides {bank.num_experts} or "
                "change num_experts"
            )
    _check_same_model(module, mesh.get_group() if mesh is not None else group)
    if mesh is None:  # a group of its own by default, so the exchanges never interleave with DDP's collectives
        device_type = next(iter(layers[0][1].experts.parameters())).device.type
        mesh = DeviceMesh.from_group(group if group is not None else dist.new_group(), device_type)
    rank = mesh.get_local_rank()
    ignored: list[str] = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    for name, layer in layers:
        bank = layer.experts
        per = bank.num_experts // world
        for pname, p in list(bank._parameters.items()):
            if p is None:
                continue
            local = p.detach()[rank * per : (rank + 1) * per].clone()
            shard = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            bank._parameters[pname] = nn.Parameter(shard, requires_grad=p.requires_grad)
            ignored.append(f"{name}.experts.{pname}" if name else f"experts.{pname}")
        bank.__class__ = _sharded_class(type(bank))
        bank.ep_mesh = mesh
        bank.__dict__["_ep_group"] = mesh.get_group()  # looked up now, not in the first (maybe compiled) forward
        bank.expert_range = (rank * per, (rank + 1) * per)
    module._ddp_params_and_buffers_to_ignore = ignored  # type: ignore[assignment]  # DDP(module) reads it
    return module


def expert_banks(model: nn.Module) -> Iterator[tuple[str, StackedExperts]]:
    """``(name, bank)`` of every expert-parallel expert bank in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _ShardedBank):
            yield name, module  # type: ignore[misc]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters of ``model`` (DTensors; not to be averaged over ranks)."""
    return [p for _, bank in expert_banks(model) for p in bank.parameters()]


def average_replicated_gradients(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """DDP without DDP: average the gradients of every replicated parameter over the ranks (one
    flattened all-reduce). Call after ``backward`` on every rank; the expert gradients need nothing.

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


# ----------------------------------------------------------------------------- running a study under torchrun
class _Discard(io.TextIOBase):
    """A text stream that drops what is written (the ``stdout`` of ranks other than 0)."""

    def write(self, text: str) -> int:
        return len(text)


def join_torchrun() -> tuple[int, int]:
    """Join the default process group that ``torchrun`` describes; returns ``(rank, world size)``.

    Already initialised: that group. Else without ``WORLD_SIZE > 1`` in the environment (a plain
    run) it does nothing and returns ``(0, 1)``.
    The backend is NCCL when CUDA is available, else gloo (each rank then uses ``cuda:LOCAL_RANK``).
    Ranks other than 0 print nothing afterwards (their ``stdout`` is discarded): rank 0
    reports, and the results it writes are the run's.
    """
    if not _initialised():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = _Discard()  # for the rest of the process
    return rank, dist.get_world_size()


def data_parallel(model: nn.Module, *, experts: bool = False) -> nn.Module:
    """``model`` ready for the :class:`~sparsemoe.training.Trainer` in this process group.

    One process: ``model`` itself. Several: ``DistributedDataParallel(model)`` (train through the
    returned module so the gradients are averaged; evaluate with either), after
    :func:`expert_parallel` when ``experts`` (every expert bank sharded over all ranks).
    """
    if not _initialised() or dist.get_world_size() == 1:
        return model
    if experts:
        expert_parallel(model)
    return nn.parallel.DistributedDataParallel(model)


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (one all-reduce; ``flag`` itself in one process).

    Studies use it to agree on what to do collectively, e.g. to reuse a saved run only when every
    rank sees it, so that no rank trains (a collective) alone.
    """
    if not _initialised() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@contextmanager
def rank_output(out: Path) -> Iterator[Path]:
    """The folder a study writes to on this rank: ``out`` itself on rank 0 (and in one process).

    On the other ranks of a ``torchrun`` job: a private copy of ``out`` as rank 0 sees it on entry
    (saved runs, checkpoints), removed on exit. A study that trains the runs its store lacks then
    trains the same runs in step on every rank (they start from the same saved state and each writes
    the same records to its own folder), no rank writes into rank 0's folder, and a checkpoint that
    rank 0 wrote in an earlier sitting is in every rank's copy, so all resume it together.
    """
    rank = dist.get_rank() if _initialised() else 0
    if rank == 0:
        all_ranks(True)  # rank 0 writes nothing before every rank has its copy
        yield out
        return
    private = Path(tempfile.mkdtemp(prefix=f"{out.name}-rank{rank}-"))
    try:
        if out.exists():
            shutil.copytree(out, private, dirs_exist_ok=True)
        all_ranks(True)
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)


# ----------------------------------------------------------------------------- torch.distributed.checkpoint
def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}``: what ``dcp.save``/``dcp.load`` take for ``model`` (and ``optimizer``).

    Parameter-name keyed (``torch.distributed.checkpoint.state_dict.get_state_dict``), so a checkpoint
    saved by ranks holding DTensor shards loads into an unsharded model in one process and back; after
    ``dcp.load(state, ...)`` apply it with ``set_state_dict(model, optimizer, model_state_dict=
    state["model"], optim_state_dict=state["optim"])`` (or ``model.load_state_dict`` without optimizer).
    """
    if optimizer is None:
        return {"model": model.state_dict()}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _load_dcp(checkpoint_id: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    state = dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(checkpoint_id), no_dist=not _initialised())
    if optimizer is None:
        model.load_state_dict(state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def dcp_to_safetensors(
    checkpoint_id: str | Path, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> Path:
    """A ``torch.distributed.checkpoint`` of ``model`` (and ``optimizer``; saved from :func:`dcp_state` by
    any number of ranks) as one safetensors checkpoint (:func:`sparsemoe.checkpoint.save_checkpoint`).

    Run it in one process with an unsharded ``model`` and ``optimizer`` of the saved run's kind; they
    are loaded on the way (the file's step is 0 and its RNG states this process's).
    """
    _load_dcp(checkpoint_id, model, optimizer)
    return save_checkpoint(path, model, optimizer)


def safetensors_to_dcp(
    path: str | Path, checkpoint_id: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """A safetensors checkpoint of ``model`` (and ``optimizer``) as a ``torch.distributed.checkpoint``
    (the :func:`dcp_state` layout), which any number of ranks can load. ``model`` and ``optimizer``
    are loaded on the way; in a multi-process run every rank calls it (sharded models included)."""
    load_checkpoint(path, model, optimizer, restore_rng=False)
    dcp.save(dcp_state(model, optimizer), checkpoint_id=str(checkpoint_id), no_dist=not _initialised())


# ----------------------------------------------------------------------------- resumable DCP checkpoints
_DCP_FORMAT = 1
_DCP_POINTER = "checkpoint.json"  # written last, atomically: names the complete step folder


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _initialised() else (0, 1)


@contextmanager
def _one_process_dcp() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier() -> None:
    if _initialised() and dist.get_world_size() > 1:
        dist.barrier()


def save_dcp_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    step: int = 0,
    config: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """:func:`sparsemoe.checkpoint.save_checkpoint` as a ``torch.distributed.checkpoint`` folder; every rank calls it.

    ``path`` is a folder: the shards go to ``path/step-<step>/`` (:func:`dcp_state`: DTensor
    parameters and their optimiser state stay sharded, each rank writes its part), each rank's RNG
    states and buffers as ``rank<r>.*`` entries; then rank 0 writes ``path/checkpoint.json``
    atomically (step, ``config``, ``state``, scheduler state, the RNG scalars of every rank), naming
    that folder, and removes the older ones. A crash at any point leaves the previous checkpoint
    readable. Any number of ranks (or one process) loads it with :func:`load_dcp_checkpoint`.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; a DCP checkpoint is a folder: pass a folder path (or remove the file)")
    _check_modules(model, optimizer, scheduler)
    meta: dict[str, Any] = {
        "format": _DCP_FORMAT,
        "step": _check_step(step),
        "config": _check_mapping("config", config),
        "state": _check_mapping("state", state),
        "optimizer": None if optimizer is None else type(optimizer).__name__,
        "scheduler": None,
    }
    extra = _check_tensors(tensors)
    if scheduler is not None:
        meta["scheduler"] = {
            "class": type(scheduler).__name__,
            "state": _json_ready(scheduler.state_dict(), f"{type(scheduler).__name__}.state_dict()"),
        }
    # ---- checked: now write (collectives)
    rank, world = _rank_world()
    rng_tensors, rng_meta = _rng_state(model)
    own = {**rng_tensors, **{f"buffers.{k}": v for k, v in _replicated_buffers(model, _sharded_keys(model)).items()}}
    content = {**dcp_state(model, optimizer), **{f"rank{rank}.{k}": v for k, v in own.items()}}
    if extra:
        content["extra"] = extra
    name = f"step-{meta['step']:08d}"
    try:  # never write into the folder the pointer names (the same step saved twice: a finished run resumed)
        if json.loads((folder / _DCP_POINTER).read_text()).get("folder") == name:
            name += "-again"
    except (OSError, ValueError, AttributeError):
        pass
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder / name, ignore_errors=True)  # a partial save of a run that died at this step
    _barrier()
    with _one_process_dcp():
        dcp.save(content, checkpoint_id=str(folder / name), no_dist=not _initialised())
    everyone: list[Any] = [rng_meta]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, rng_meta)
    if rank == 0:
        meta.update(folder=name, world_size=world, rng=everyone, extra=sorted(extra))
        write_json(folder / _DCP_POINTER, meta)
        for old in folder.glob("step-*"):
            if old.name != name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return folder


def read_dcp_checkpoint(path: str | Path) -> dict[str, Any]:
    """The metadata of a :func:`save_dcp_checkpoint` folder (step, config, state, ...), without loading tensors.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: ``path`` is not such a folder, or its step folder is missing.
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"no checkpoint at {folder}: no file or folder there")
    pointer = folder / _DCP_POINTER
    if not folder.is_dir() or not pointer.is_file():
        raise ValueError(
            f"{folder} is not a sparsemoe DCP checkpoint folder (no {_DCP_POINTER}; a DCP save that never "
            "finished, or a single-file checkpoint: load that with sparsemoe.load_checkpoint)"
        )
    try:
        meta = json.loads(pointer.read_text())
    except ValueError as e:
        raise ValueError(f"{pointer} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != _DCP_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{pointer}: DCP checkpoint format {found!r}, this version reads format {_DCP_FORMAT}")
    if not (folder / meta["folder"]).is_dir():
        raise ValueError(f"{folder}: {meta['folder']} named by {_DCP_POINTER} is missing")
    return meta


def load_dcp_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a :func:`save_dcp_checkpoint` folder into ``model`` (and ``optimizer``, ``scheduler``, RNGs).

    Every rank calls it; the number of ranks (or one process) and the sharding may differ from the
    saving run's (DCP reshards). At the saved world size each rank gets back its own RNG states and
    buffers; at another, rank 0's (as :func:`sparsemoe.checkpoint.load_checkpoint` does).
    ``tensors``: templates (name -> tensor of the saved shape and layout, a DTensor for a sharded
    one) for the caller tensors saved, filled in place. Returns ``{"step", "config", "state",
    "tensors"}``. The metadata, the classes and the saved keys are checked before anything changes.
    """
    meta = read_dcp_checkpoint(path)
    _check_modules(model, optimizer, scheduler)
    folder = Path(path)
    if (meta["optimizer"] is None) != (optimizer is None) or (
        optimizer is not None and meta["optimizer"] != type(optimizer).__name__
    ):
        raise ValueError(
            f"{folder} holds {meta['optimizer'] or 'no'} optimizer state; the optimizer given is "
            f"{type(optimizer).__name__ if optimizer is not None else None}: build the saved kind (or pass none)"
        )
    saved_scheduler = meta["scheduler"]["class"] if meta["scheduler"] else None
    if saved_scheduler != (type(scheduler).__name__ if scheduler is not None else None):
        raise ValueError(
            f"{folder} holds {saved_scheduler or 'no'} LR scheduler state; pass the same kind of scheduler"
        )
    templates = dict(tensors or {})
    missing = sorted(set(meta["extra"]) - set(templates))
    if missing:
        raise ValueError(f"{folder} holds caller tensors {missing[:5]}: pass tensors= templates for them")
    rank, world = _rank_world()
    own = rank if world == meta["world_size"] else 0
    checkpoint_id = folder / meta["folder"]
    stored = dcp.FileSystemReader(str(checkpoint_id)).read_metadata().state_dict_metadata
    prefix = f"rank{own}."
    model_keys = {f"model.{k}" for k in model.state_dict()}
    saved_keys = {k for k in stored if k.startswith("model.")}
    if model_keys != saved_keys:
        raise ValueError(
            f"{folder} does not fit this model: missing keys {sorted(model_keys - saved_keys)[:10]}, "
            f"unexpected keys {sorted(saved_keys - model_keys)[:10]}"
        )
    # ---- checked: now load (collective when distributed)
    content = dcp_state(model, optimizer)  # a fresh optimizer gets its state initialised, to be overwritten
    for key, item in stored.items():  # this rank's RNG states and buffers, shaped as saved
        if key.startswith(prefix):
            size, dtype = item.size, item.properties.dtype  # type: ignore[union-attr]
            content[key] = torch.empty(size, dtype=dtype)
    if meta["extra"]:
        content["extra"] = {k: templates[k] for k in meta["extra"]}
    with _one_process_dcp():
        dcp.load(content, checkpoint_id=str(checkpoint_id), no_dist=not _initialised())
    if optimizer is None:
        model.load_state_dict(content["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=content["model"], optim_state_dict=content["optim"])
    buffers = {k[len(prefix) + len("buffers.") :]: v for k, v in content.items() if k.startswith(f"{prefix}buffers.")}
    if buffers:  # this rank's own buffers (DCP keeps one copy of a replicated tensor)
        model.load_state_dict(buffers, strict=False)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"]["state"])
    if restore_rng:
        rng = {k[len(prefix) :]: v for k, v in content.items() if k.startswith(f"{prefix}rng.")}
        _restore_rng(rng, meta["rng"][own], model)
    return {"step": meta["step"], "config": meta["config"], "state": meta["state"], "tensors": content.get("extra", {})}
