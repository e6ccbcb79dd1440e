"""Expert parallelism on 2 gloo processes equals the unsharded layer, forward and backward; with DDP,
FSDP2 and ``torch.distributed.checkpoint`` it equals one process training on the concatenated batch.

One ``torch.multiprocessing.spawn`` of 2 ranks runs every check (starting processes dominates the
cost); each rank writes what it found to a JSON file and the tests below read those.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import pickle
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel

import sparsemoe
from sparsemoe import MoE, MultiTaskMoE
from sparsemoe.checkpoint import load_checkpoint, save_checkpoint
from sparsemoe.distributed import (
    average_replicated_gradients,
    dcp_state,
    dcp_to_safetensors,
    expert_parallel,
    expert_parameters,
    safetensors_to_dcp,
)
from sparsemoe.training import MetricsLog, RandomBatches, ShardedBatches, TrainConfig, Trainer, TrainResult

from conftest import needs_data

WORLD = 2
NUM_EXPERTS = 4
D = 6
# (case name, gate, layer options)
CASES: list[tuple[str, str, dict]] = [
    ("topk", "topk", {"k": 2}),  # noisy: the noise draws come from the global RNG
    ("switch", "switch", {"capacity_limit": 1.0}),
    ("hash", "hash", {"k": 2, "num_ids": 50}),
    ("random", "random", {"k": 2}),
    ("expert_choice", "expert_choice", {"k": 2}),
    ("softmax", "softmax", {}),
    ("dselect_k", "dselect_k", {"k": 2}),
    ("comet", "comet", {"k": 2}),
    ("comet+soft", "comet", {"k": 2, "local_search": True, "local_search_steps": 5}),
    ("topk+hard", "topk", {"k": 2, "local_search": True, "local_search_steps": 0}),
    # MultiTaskMoE (2 tasks, linear experts): one shared exchange for the pairs of both task gates
    ("mmoe-softmax", "mmoe:softmax", {}),
    ("mmoe-topk", "mmoe:topk", {"k": 2}),
    ("mmoe-comet+soft", "mmoe:comet", {"k": 2, "local_search": True, "local_search_steps": 5}),
]
TOKENS = (7, 5)  # uneven batches per rank
ROUTER_LM_DATA = needs_data("multi30k", "sst2")  # also upcycle-smollm2's corpus
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _check_gate(rank: int, gate: str, options: dict) -> str:
    torch.manual_seed(0)  # the same layer on every rank
    if gate.startswith("mmoe:"):
        gate = gate.split(":")[1]
        moe: torch.nn.Module = MultiTaskMoE(D, D, NUM_EXPERTS, 2, gate=gate, **options).double()
    else:
        moe = MoE(D, 8, NUM_EXPERTS, gate=gate, **options).double()
    ref = copy.deepcopy(moe)
    layer = expert_parallel(moe)
    assert layer is moe, "expert_parallel works in place"
    assert set(layer.state_dict()) == set(ref.state_dict()), "same state_dict keys as the unsharded layer"
    for p in layer.experts.parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), p
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS[rank], D, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 50, (TOKENS[rank],), generator=gen)
    target = torch.randn(TOKENS[rank], D, generator=gen, dtype=torch.float64)
    results = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7 + rank)  # same global draws (noisy top-k) for both
        y = module(xi, ids=ids if gate == "hash" else None)
        if isinstance(y, list):  # one output per task
            y = torch.stack(y)
        loss = (y * target).sum() + module.aux_loss()
        loss.backward()
        results.append((y.detach(), xi.grad, loss.detach()))
    # collectives first, checks after, so a failed check cannot leave the other rank waiting
    ref_expert_grads = {n: p.grad.clone() for n, p in ref.experts.named_parameters()}
    for g in ref_expert_grads.values():
        dist.all_reduce(g)
        g.div_(WORLD)  # the mean over ranks: data parallelism's gradient
    last = layer.last_routing
    remote = torch.cat([r.expert for r in last]) if isinstance(last, list) else last.expert  # type: ignore[union-attr]
    lo, hi = layer.experts.expert_range
    sent_away = int(((remote < lo) | (remote >= hi)).sum())
    (y, gx, loss), (y_ref, gx_ref, loss_ref) = results
    _close(y, y_ref, "output")
    _close(loss, loss_ref, "loss")
    _close(gx, gx_ref, "input gradient")
    _close(sparsemoe.aux_loss(torch.nn.Sequential(layer)), layer.aux_loss(), "model-wide aux_loss")
    assert list(sparsemoe.routing_stats(torch.nn.Sequential(layer))) == ["0"]
    for (name, p), (_, p_ref) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        if name.startswith("experts."):
            grad = p.grad.to_local()
            _close(grad, ref_expert_grads[name[len("experts.") :]][lo:hi], f"{name} gradient (mean over ranks)")
        elif p_ref.grad is None:
            assert p.grad is None, name
        else:
            _close(p.grad, p_ref.grad, f"{name} gradient")
    assert sent_away > 0, "no pair left the rank: the exchange was not exercised"
    return "ok"


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(D, D),
        MoE(
            D,
            8,
            NUM_EXPERTS,
            gate="topk",
            k=2,
            noisy=False,
            balance_weight=0.0,
            local_search=True,
            local_search_steps=2,
        ),
        torch.nn.Linear(D, 1),
    ).double()


def _check_training(rank: int) -> str:
    """4 Adam steps: 2 ranks (DDP-style averaging) vs one process on the concatenated batch."""
    single, sharded = _model(1), _model(1)
    expert_parallel(sharded[1])  # one layer
    opt_single = torch.optim.Adam(single.parameters(), lr=0.05)
    opt_sharded = torch.optim.Adam(sharded.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    losses, ref_losses = [], []
    for _ in range(4):
        x = torch.randn(2 * 6, D, generator=gen, dtype=torch.float64)
        t = torch.randn(2 * 6, 1, generator=gen, dtype=torch.float64)
        ref_loss = (single(x) - t).pow(2).mean()
        opt_single.zero_grad()
        ref_loss.backward()
        opt_single.step()
        mine = slice(6 * rank, 6 * rank + 6)
        loss = (sharded(x[mine]) - t[mine]).pow(2).mean()
        opt_sharded.zero_grad()
        loss.backward()
        average_replicated_gradients(sharded)
        opt_sharded.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
        ref_losses.append(float(ref_loss))
    assert bool(sharded[1].search.hardened), "the run should cross the local-search hardening step"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-12, atol=0)
    return "ok"


def _check_indivisible(rank: int) -> str:
    try:
        expert_parallel(MoE(D, 8, 3, gate="topk"))
    except ValueError as e:
        assert "num_experts=3 of MoE is not divisible by the world size 2" in str(e), str(e)
        return "ok"
    raise AssertionError("no error for 3 experts on 2 ranks")


def _check_mismatched_models(rank: int) -> str:
    """Models built with different seeds on the ranks: a ValueError on every rank at setup, no hang,
    and the model untouched."""
    model = _model(30 + rank)
    try:
        expert_parallel(model)
    except ValueError as e:
        assert "the model differs between ranks 0 and 1" in str(e) and "0.weight" in str(e), str(e)
        assert not any(isinstance(p, DTensor) for p in model.parameters()), "the model was changed"
        return "ok"
    raise AssertionError("no error for models that differ between ranks")


def _check_checkpoint(rank: int, out: str) -> str:
    """A 2-rank checkpoint loads onto 1 process and back, with the same outputs and optimizer state."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, D, generator=gen, dtype=torch.float64)  # x[r]: rank r's tokens
    sharded = expert_parallel(_model(2))
    opt = torch.optim.Adam(sharded.parameters(), lr=0.05)
    for _ in range(3):  # crosses the hardening step too
        opt.zero_grad()
        sharded(x[rank]).pow(2).mean().backward()
        average_replicated_gradients(sharded)
        opt.step()
    path = Path(out, "ep.safetensors")
    save_checkpoint(path, sharded, opt, step=3)  # collective: gathers the experts
    with torch.no_grad():
        y_sharded = sharded(x[rank])
        parts = [torch.empty_like(y_sharded) for _ in range(WORLD)]
        dist.all_gather(parts, y_sharded)
    # 2 -> 1: an unsharded model on each process
    single = _model(3)
    single_opt = torch.optim.Adam(single.parameters(), lr=0.05)
    load_checkpoint(path, single, single_opt)
    with torch.no_grad():
        _close(single(x.reshape(-1, D)), torch.cat(parts), "unsharded model loaded from a 2-rank checkpoint")
    lo, hi = sharded[1].experts.expert_range
    for name in ("w1", "w2"):
        p_single, p_sharded = getattr(single[1].experts, name), getattr(sharded[1].experts, name)
        mine = opt.state[p_sharded]["exp_avg_sq"].to_local()
        _close(single_opt.state[p_single]["exp_avg_sq"][lo:hi], mine, f"Adam {name}")
    # 1 -> 2: rank 0 saves the unsharded model alone; both ranks load it into a fresh sharded one
    path1 = Path(out, "single.safetensors")
    if rank == 0:
        save_checkpoint(path1, single, single_opt, step=3)
    dist.barrier()
    again = expert_parallel(_model(4))
    load_checkpoint(path1, again, torch.optim.Adam(again.parameters(), lr=0.05))
    with torch.no_grad():
        _close(again(x[rank]), y_sharded, "2-rank model loaded from an unsharded checkpoint")
    return "ok"


def _check_pickle(rank: int, out: str) -> str:
    """An expert-parallel model survives ``torch.save``/``torch.load`` and ``pickle`` in its own job:
    the same class and shards, and its next step (output, gradients) equals the original's, so its
    exchanges still find the process group."""
    x = torch.randn(TOKENS[rank], D, generator=torch.Generator().manual_seed(40 + rank), dtype=torch.float64)
    model = expert_parallel(_model(21))
    model(x).sum().backward()  # one step first: the local search has moved on
    model.zero_grad()
    path = Path(out, f"ep-model-rank{rank}.pt")  # rank 0's: test_pickled_expert_parallel_model_outside_its_job
    torch.save(model, path)
    copies = [torch.load(path, weights_only=False), pickle.loads(pickle.dumps(model))]
    steps = []
    for m in (model, *copies):  # every rank runs every forward and backward (collectives)
        y = m(x)
        y.sum().backward()
        steps.append((y.detach(), [None if p.grad is None else _full(p.grad) for p in m.parameters()]))
    (y_ref, grads_ref), names = steps[0], [n for n, _ in model.named_parameters()]
    for copied, (y, grads) in zip(copies, steps[1:], strict=True):
        assert type(copied[1].experts) is type(model[1].experts), type(copied[1].experts)
        for name, p in copied[1].experts.named_parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
            _close(p.to_local(), getattr(model[1].experts, name).to_local(), f"{name} shard")
        _close(y, y_ref, "output of the unpickled model")
        for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
            assert (g is None) == (g_ref is None), name
            if g is not None:
                _close(g, g_ref, f"{name} gradient of the unpickled model")
    return "ok"


def _check_ddp_through_hardening(rank: int) -> str:
    """DDP with default settings trains across the local-search hardening step, equal to one process.

    Before the fix, hardening stopped ``log_alpha`` from requiring grad, and DDP (which waits for a
    gradient of every parameter it was built with) failed at the next step: "Expected to have
    finished reduction in the prior iteration".
    """
    single, model = _model(6), _model(6)
    ddp = DistributedDataParallel(model)  # default settings: find_unused_parameters=False
    opt_single = torch.optim.Adam(single.parameters(), lr=0.05)
    opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(8)
    losses, ref_losses = [], []
    for _ in range(5):  # local_search_steps=2: hardens at the 3rd training forward
        x = torch.randn(2 * 6, D, generator=gen, dtype=torch.float64)
        t = torch.randn(2 * 6, 1, generator=gen, dtype=torch.float64)
        ref_loss = (single(x) - t).pow(2).mean()
        opt_single.zero_grad()
        ref_loss.backward()
        opt_single.step()
        mine = slice(6 * rank, 6 * rank + 6)
        loss = (ddp(x[mine]) - t[mine]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / WORLD)
        ref_losses.append(float(ref_loss))
    search = model[1].search
    assert bool(search.hardened), "the run should cross the local-search hardening step"
    grad = search.log_alpha.grad
    assert grad is not None and not grad.any(), "after hardening log_alpha gets an exact zero gradient"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    return "ok"


def _train_against_one_process(rank: int, model: torch.nn.Module, wrapped: torch.nn.Module, seed: int) -> None:
    """4 Adam steps of ``wrapped`` (rank r: rows [6r, 6r+6), loss averaged over ranks by the wrapper)
    against one process on all 12 rows: equal losses and parameters (experts gathered) after every step."""
    single = _model(seed)
    opt_single = torch.optim.Adam(single.parameters(), lr=0.05)
    opt = torch.optim.Adam(wrapped.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):  # local_search_steps=2: crosses the hardening step
        x = torch.randn(2 * 6, D, generator=gen, dtype=torch.float64)
        t = torch.randn(2 * 6, 1, generator=gen, dtype=torch.float64)
        ref_loss = (single(x) - t).pow(2).mean()
        opt_single.zero_grad()
        ref_loss.backward()
        opt_single.step()
        mine = slice(6 * rank, 6 * rank + 6)
        loss = (wrapped(x[mine]) - t[mine]).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # no call after backward: the wrapper averages, the experts are scaled already
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        _close(total / WORLD, ref_loss.detach(), "mean loss over ranks vs one process")
    for name, p in model.named_parameters():
        _close(_full(p).detach(), single.get_parameter(name).detach(), f"{name} after 4 Adam steps")
    assert bool(model[1].search.hardened), "the run should cross the local-search hardening step"


def _check_ddp(rank: int) -> str:
    """build, expert_parallel(model, mesh["ep"]) (a named dimension of a 2-D mesh), DDP(model): nothing else."""
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "ep"))
    model = expert_parallel(_model(7), mesh["ep"])
    _train_against_one_process(rank, model, DistributedDataParallel(model), 7)
    return "ok"


def _check_fsdp2(rank: int) -> str:
    """build, expert_parallel(model, mesh), fully_shard(model, mesh, ignored_params=the expert shards)."""
    mesh = init_device_mesh("cpu", (WORLD,))
    model = expert_parallel(_model(8), mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(expert_parameters(model)))
    # seed 8: with some seeds (5, 19) a local-search logit gets a gradient near 0 whose last bits
    # differ with the reduction order; Adam divides it by its own root mean square and the logit
    # then differs by ~1e-10 after 4 steps (the same in both FSDP2 layouts here)
    _train_against_one_process(rank, model, model, 8)
    return "ok"


def _check_fsdp2_2d(rank: int) -> str:
    """On a 2-D (dp x ep) mesh FSDP2 takes the expert DTensors as they are, no extra argument:
    (dp=2, ep=1) ``expert_parallel(model, mesh["ep"]); fully_shard(model, mesh=mesh["dp"])`` and
    (dp_mod_ep=1, ep=2) the experts fully_shard-ed over what ep leaves of dp, the rest over every rank
    (torchtitan's layout); both equal one process over 4 Adam steps."""
    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "ep"))
    model = expert_parallel(_model(18), mesh["ep"])
    fully_shard(model, mesh=mesh["dp"])
    _train_against_one_process(rank, model, model, 18)
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp_mod_ep", "ep"))
    model = expert_parallel(_model(8), mesh["ep"])
    fully_shard(model[1].experts, mesh=mesh["dp_mod_ep"])
    fully_shard(model, mesh=mesh._flatten("dp"))  # every rank holds other rows: dp over all of them
    _train_against_one_process(rank, model, model, 8)  # seed 8 as _check_fsdp2 (see its note)
    return "ok"


def _check_fsdp2_pitfalls(rank: int) -> str:
    """docs/failure-modes.md, "FSDP2 and expert parallelism": (1) fully_shard over the very mesh the
    experts are sharded on, without ignored_params, fails in torch itself with the errors the doc
    quotes; (2) on a (dp=1, ep=2) mesh, fully_shard(model, mesh=mesh["dp"]) runs but averages the
    replicated parameters over dp only (one rank), so training departs from one process."""
    for names, error in ((("ep",), "Cannot concatenate overlapping meshes"), (None, "Invariant encountered")):
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=names)
        model = expert_parallel(_model(8), mesh)
        with pytest.raises((RuntimeError, TypeError), match=error):
            fully_shard(model, mesh=mesh)
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "ep"))
    model = expert_parallel(_model(8), mesh["ep"])
    fully_shard(model, mesh=mesh["dp"])
    with pytest.raises(AssertionError, match="not close"):
        _train_against_one_process(rank, model, model, 8)
    return "ok"


def _check_dcp(rank: int, out: str) -> str:
    """torch.distributed.checkpoint of model + Adam from 2 ranks; reloaded on 2 ranks it gives the same outputs.

    The 2 -> 1 reload (one process, no process group) is in test_dcp_checkpoint_loads_into_one_process.
    """
    model = expert_parallel(_model(9))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(WORLD, 6, D, generator=gen, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        model(x[rank]).pow(2).mean().backward()
        average_replicated_gradients(model)
        opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(out, "dcp")))
    with torch.no_grad():
        y = model(x[rank])
        parts = [torch.empty_like(y) for _ in range(WORLD)]
        dist.all_gather(parts, y)
    if rank == 0:
        torch.save({"x": x, "y": torch.stack(parts)}, Path(out, "dcp-io.pt"))
    again = expert_parallel(_model(10))
    again_opt = torch.optim.Adam(again.parameters(), lr=0.05)
    again(x[rank]).sum().backward()  # Adam state exists only after a step: take one to load into
    again_opt.step()
    model_sd, optim_sd = get_state_dict(again, again_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(out, "dcp")))
    set_state_dict(again, again_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with torch.no_grad():
        _close(again(x[rank]), y, "2-rank model reloaded from a DCP checkpoint")
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        _close(_full(opt.state[p]["exp_avg_sq"]), _full(again_opt.state[q]["exp_avg_sq"]), "Adam state reloaded")
    return "ok"


def _check_trainer(rank: int, out: str, clip_norm: float | None = None) -> str:
    """sparsemoe.training.Trainer under 2 processes (expert parallelism + DDP): it shards the data by
    itself (each row once), logs the mean loss and metric over the ranks, saves collectively and
    resumes; losses, metrics and weights equal one process's Trainer on the same data. With
    ``clip_norm`` (small enough to clip every step) the total norm spans the expert shards of both ranks."""
    out = str(Path(out, "trainer" if clip_norm is None else "trainer-clipped"))
    Path(out).mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(21)
    x, t = torch.randn(24, D, generator=gen, dtype=torch.float64), torch.randn(24, 1, generator=gen)
    x_val, t_val = torch.randn(12, D, generator=gen, dtype=torch.float64), torch.randn(12, 1, generator=gen)
    t, t_val = t.double(), t_val.double()
    seen: list[list[int]] = []

    def run(model: torch.nn.Module, steps: int, rows: slice, resume: Path | None = None) -> TrainResult:
        """Rank r's rows ``rows`` of the validation set; one process (``rows`` all of it): no sharding."""

        def loss(batch: torch.Tensor) -> torch.Tensor:
            seen.append(batch.tolist())
            return (model(x[batch]) - t[batch]).pow(2).mean()

        def evaluate() -> dict[str, float]:
            return {"val_mse": float((model(x_val[rows]) - t_val[rows]).pow(2).mean())}

        alone = rows == slice(0, 12)
        data = RandomBatches(24, 8, seed=3)
        # the 2-rank runs save at step 2 (not at the end: the second run resumes from there)
        saving = {} if alone else {"checkpoint_path": str(Path(out, "trainer.safetensors")), "checkpoint_every": 2}
        config = TrainConfig(steps=steps, lr=0.05, eval_every=2, metric="val_mse", checkpoint_at_end=False,
                             clip_norm=clip_norm, **saving)  # type: ignore[arg-type]  # fmt: skip
        log = [] if alone else [MetricsLog(Path(out, f"trainer-rank{rank}.jsonl"))]
        trainer = Trainer(
            model, loss, ShardedBatches(data, 0, 1) if alone else data, config, evaluate=evaluate, callbacks=log
        )
        return trainer.run(resume=resume)

    first = run(DistributedDataParallel(expert_parallel(_model(13))), 2, slice(6 * rank, 6 * rank + 6))
    rows_by_rank: list[list[list[int]] | None] = [None] * WORLD
    dist.all_gather_object(rows_by_rank, seen)
    model = expert_parallel(_model(14))
    second = run(DistributedDataParallel(model), 4, slice(6 * rank, 6 * rank + 6), Path(out, "trainer.safetensors"))
    seen.clear()
    single = _model(13)
    ref = run(single, 4, slice(0, 12))
    for step, ref_rows in enumerate(seen[:2]):  # the 2 ranks together saw each row of the batch once
        ranks = [r[step] for r in rows_by_rank]  # type: ignore[index]
        assert sorted(ranks[0] + ranks[1]) == sorted(ref_rows) and not set(ranks[0]) & set(ranks[1]), ranks
    losses = torch.tensor(first.step_losses + second.step_losses)
    _close(losses, torch.tensor(ref.step_losses), "Trainer step losses (mean over ranks) vs one process")
    metrics = [h["val_mse"] for h in second.history]
    assert len(metrics) == 2, second.history
    _close(torch.tensor(metrics), torch.tensor([h["val_mse"] for h in ref.history]), "val_mse (mean over ranks)")
    for name, p in model.named_parameters():
        _close(_full(p).detach(), single.get_parameter(name).detach(), f"{name} after a resumed 2-rank Trainer")
    logged = [json.loads(line)["val_mse"] for line in Path(out, "trainer-rank0.jsonl").read_text().splitlines()]
    assert logged == metrics, (logged, metrics)  # rank 0 logs the means over the ranks
    assert not Path(out, "trainer-rank1.jsonl").exists(), "logs are written by rank 0 alone"
    return "ok"


def _check_trainer_ddp_resume(rank: int, out: str) -> str:
    """A data-parallel Trainer (DDP, dropout drawing from each rank's own global RNG) saves every rank's
    RNG states: resumed at step 2 it equals the uninterrupted run on both ranks, bit for bit."""
    gen = torch.Generator().manual_seed(40)
    x, t = torch.randn(32, D, generator=gen, dtype=torch.float64), torch.randn(32, 1, generator=gen).double()
    path = str(Path(out, "ddp-trainer.safetensors"))

    def run(steps: int, resume: str | None = None) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)).double()
        ddp = DistributedDataParallel(model)
        torch.manual_seed(60 + rank)  # each rank's own dropout stream

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return (ddp(x[batch]) - t[batch]).pow(2).mean()

        config = TrainConfig(steps=steps, lr=0.05, checkpoint_path=path, checkpoint_every=2, checkpoint_at_end=False)
        return Trainer(ddp, loss, RandomBatches(32, 8, seed=2), config).run(resume=resume).step_losses

    whole = run(4)
    run(2)
    resumed = run(4, resume=path)
    assert resumed == whole[2:], f"rank {rank}: resumed {resumed}, uninterrupted {whole[2:]}"
    return "ok"


def _world_change_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(41)
    return torch.randn(24, D, generator=gen, dtype=torch.float64), torch.randn(24, 1, generator=gen).double()


WORLD_CHANGE = {"safetensors": "world-change.safetensors", "dcp": "world-change-dcp"}  # format -> checkpoint


def _world_change_run(
    model: torch.nn.Module, steps: int, out: str, save: str | None, resume: str | None = None
) -> list[float]:
    """A Trainer on the 24 rows in batches of 8 (sharded over the ranks when there are several);
    ``save``: the checkpoint format to write at step 2."""
    x, t = _world_change_data()

    def loss(batch: torch.Tensor) -> torch.Tensor:
        return (model(x[batch]) - t[batch]).pow(2).mean()

    saving = {}
    if save is not None:
        saving = {"checkpoint_path": str(Path(out, WORLD_CHANGE[save])), "checkpoint_every": 2}
    config = TrainConfig(
        steps=steps, lr=0.05, checkpoint_at_end=False, checkpoint_format=save or "safetensors", **saving
    )  # type: ignore[arg-type]
    return Trainer(model, loss, RandomBatches(24, 8, seed=5), config).run(resume=resume).step_losses


def _check_trainer_world_change(rank: int, out: str) -> str:
    """2 ranks (expert-parallel + DDP) save at step 2 (one safetensors file, and a DCP folder) and run
    on to step 4 uninterrupted; the test resumes each checkpoint in one process
    (test_resume_at_another_world_size)."""
    for fmt in WORLD_CHANGE:
        _world_change_run(DistributedDataParallel(expert_parallel(_model(16))), 2, out, save=fmt)
    whole = _world_change_run(DistributedDataParallel(expert_parallel(_model(16))), 4, out, save=None)
    if rank == 0:
        Path(out, "world-change.json").write_text(json.dumps(whole))
    return "ok"


def _check_trainer_nan_on_one_rank(rank: int) -> str:
    """A non-finite loss on rank 1 only: both ranks still run that step's backward (the exchanges are
    collective: breaking off on rank 1 alone hangs rank 0 until the timeout), skip it (nan_policy='skip')
    and stay in step. (Here the NaN reaches rank 0's gradients through DDP anyway.)"""
    model = expert_parallel(_model(15))
    ddp = DistributedDataParallel(model)
    x = torch.randn(16, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    calls = [0]

    def loss(batch: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        value = ddp(x[batch]).pow(2).mean()
        return value * float("nan") if rank == 1 and calls[0] == 2 else value

    config = TrainConfig(steps=3, lr=0.05, nan_policy="skip")
    result = Trainer(ddp, loss, RandomBatches(16, 8, seed=1), config).run()
    assert result.skipped_steps == [2], result.skipped_steps
    assert math.isnan(result.step_losses[1]) and math.isfinite(result.step_losses[2]), result.step_losses
    head = model[0].weight.detach().clone()
    heads = [torch.empty_like(head) for _ in range(WORLD)]
    dist.all_gather(heads, head)
    assert torch.equal(heads[0], heads[1]), "the replicated weights parted: the ranks disagreed on a step"
    return "ok"


def _ep_random_model(seed: int) -> torch.nn.Module:
    """Linear, dropout (global RNG), an expert-parallel random-gate MoE (its own stream), linear."""
    torch.manual_seed(seed)
    moe = MoE(D, 8, NUM_EXPERTS, gate="random", k=2)
    return torch.nn.Sequential(
        torch.nn.Linear(D, D), torch.nn.Dropout(0.2), expert_parallel(moe.double()), torch.nn.Linear(D, 1)
    ).double()


def _train_steps(rank: int, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    out = []
    for i in steps:  # rank r's batch i: TOKENS[r] rows (uneven, so the random gates' streams part)
        gen = torch.Generator().manual_seed(1000 * rank + i)
        x = torch.randn(TOKENS[rank], D, generator=gen, dtype=torch.float64)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        average_replicated_gradients(model)
        opt.step()
        out.append(float(loss))
    return out


def _check_trainer_dcp_resume(rank: int, out: str, wrap: str) -> str:
    """A Trainer with checkpoint_format="dcp" on 2 ranks (``wrap``: DDP, or FSDP2 sharding the
    replicated parameters too; dropout and an expert-parallel random gate drawing per-rank streams;
    best weights selected by a metric): resumed at step 2 from the DCP folder, losses, metrics and the
    restored best weights equal the uninterrupted run's on each rank, bit for bit."""
    gen = torch.Generator().manual_seed(43)
    x, t = torch.randn(32, D, generator=gen, dtype=torch.float64), torch.randn(32, 1, generator=gen).double()
    path = str(Path(out, f"trainer-dcp-{wrap}"))

    def run(steps: int, resume: str | None = None) -> tuple[TrainResult, torch.nn.Module]:
        torch.manual_seed(3)
        model = torch.nn.Sequential(
            torch.nn.Linear(D, D),
            torch.nn.Dropout(0.2),
            MoE(D, 8, NUM_EXPERTS, gate="random", k=2),
            torch.nn.Linear(D, 1),
        ).double()
        if wrap == "ddp":
            net: torch.nn.Module = DistributedDataParallel(expert_parallel(model))
        else:
            mesh = init_device_mesh("cpu", (WORLD,))
            net = fully_shard(expert_parallel(model, mesh), mesh=mesh, ignored_params=set(expert_parameters(model)))
        torch.manual_seed(70 + rank)  # each rank's own dropout stream

        def loss(batch: torch.Tensor) -> torch.Tensor:
            return (net(x[batch]) - t[batch]).pow(2).mean()

        def evaluate() -> dict[str, float]:
            return {"val": float((model(x[:6]) - t[:6]).pow(2).mean())}

        config = TrainConfig(
            steps=steps,
            lr=0.05,
            eval_every=1,
            metric="val",
            checkpoint_path=path,
            checkpoint_every=2,
            checkpoint_at_end=False,
            checkpoint_format="dcp",
        )
        trainer = Trainer(net, loss, RandomBatches(32, 8, seed=2), config, evaluate=evaluate)
        return trainer.run(resume=resume), model

    whole, model = run(4)
    run(2)
    assert sorted(p.name for p in Path(path).iterdir()) == ["checkpoint.json", "step-00000002"]
    resumed, again = run(4, resume=path)
    assert resumed.step_losses == whole.step_losses[2:], f"rank {rank}: {resumed.step_losses} vs {whole.step_losses}"
    assert resumed.history == whole.history and resumed.best_step == whole.best_step, (resumed.history, whole.history)
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(_full(p), _full(q)), f"rank {rank}: {name} (best weights) differs after the DCP resume"
    return "ok"


def _check_resume_every_rank(rank: int, out: str) -> str:
    """A 2-rank checkpoint restores each rank's own RNG states and gate stream: resume is exact on both."""
    model = _ep_random_model(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(50 + rank)  # each rank's own dropout stream
    _train_steps(rank, model, opt, range(2))
    path = Path(out, "per-rank.safetensors")
    save_checkpoint(path, model, opt, step=2)
    streams = [torch.empty_like(model[2].gate.rng_state) for _ in range(WORLD)]
    dist.all_gather(streams, model[2].gate.rng_state)
    expected = _train_steps(rank, model, opt, range(2, 5))
    fresh = _ep_random_model(9)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.05)
    torch.manual_seed(999)  # disturb the global RNG: loading must restore this rank's
    load_checkpoint(path, fresh, fresh_opt)
    got = _train_steps(rank, fresh, fresh_opt, range(2, 5))
    assert not torch.equal(streams[0], streams[1]), "the ranks' gate streams should differ (uneven batches)"
    assert got == expected, f"rank {rank}: resumed {got}, uninterrupted {expected}"
    return "ok"


DEMO_GATES = ["softmax", "hash"]  # gates that route each row on its own: 2 ranks = one process


def _demo_config(out: Path, expert_parallel: bool = False) -> object:
    from sparsemoe.experiments import demo

    return demo.Config(quick=True, gates=DEMO_GATES, epochs=1, out=out, expert_parallel=expert_parallel)


def _check_demo(rank: int, out: str) -> str:
    """``sparsemoe demo`` under 2 processes, data-parallel then expert-parallel: rank 0 writes the results."""
    from sparsemoe.experiments import demo

    for name, ep in (("demo-dp", False), ("demo-ep", True)):
        found = demo.run(_demo_config(Path(out, name), ep))  # type: ignore[arg-type]
        assert found["config"]["processes"] == WORLD and found["config"]["expert_parallel"] == ep, found["config"]
    return "ok"


def _router_lm_config(out: Path, expert_parallel: bool = False) -> object:
    """router-lm --quick, 2 systems, 1 seed, no dropout (dropout masks are per rank, so with it the 2
    ranks agree with one process within seed noise only)."""
    from sparsemoe.experiments import router_lm

    systems = ["dense", "topk_lossfree"]
    return router_lm.Config(quick=True, systems=systems, seeds=1, dropout=0.0, out=out, expert_parallel=expert_parallel)


def _check_router_lm(rank: int, out: str) -> str:
    """``reproduce router-lm --quick`` under 2 processes, data-parallel then expert-parallel."""
    from sparsemoe.experiments import router_lm

    for name, ep in (("router-lm-dp", False), ("router-lm-ep", True)):
        found = router_lm.run(_router_lm_config(Path(out, name), ep))  # type: ignore[arg-type]
        assert found["processes"] == WORLD and found["config"].get("expert_parallel", False) == ep, found["config"]
    return "ok"


UPCYCLE_SYSTEMS = ["dense", "sigmoid_copy"]  # no router noise (topk_*'s is drawn per rank): 2 ranks = one process


def _upcycle_config(out: Path, expert_parallel: bool = False) -> object:
    """upcycle-smollm2 --quick (the tiny random Llama, no dropout), 2 systems, 1 seed."""
    from sparsemoe.experiments import upcycle_smollm2

    return upcycle_smollm2.Config(
        quick=True, systems=UPCYCLE_SYSTEMS, seeds=1, out=out, expert_parallel=expert_parallel
    )


def _check_upcycle(rank: int, out: str) -> str:
    """``reproduce upcycle-smollm2 --quick`` under 2 processes, data-parallel then expert-parallel."""
    from sparsemoe.experiments import upcycle_smollm2

    for name, ep in (("upcycle", False), ("upcycle-ep", True)):
        found = upcycle_smollm2.run(_upcycle_config(Path(out, name), ep))  # type: ignore[arg-type]
        assert found["processes"] == WORLD and len(found["runs"]) == len(UPCYCLE_SYSTEMS), found.keys()
        assert found["config"].get("expert_parallel", False) == ep, found["config"]
    return "ok"


def _run(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception:
        return traceback.format_exc()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    results = {name: _run(lambda g=gate, o=options: _check_gate(rank, g, o)) for name, gate, options in CASES}
    results["training"] = _run(lambda: _check_training(rank))
    results["indivisible"] = _run(lambda: _check_indivisible(rank))
    results["mismatched models"] = _run(lambda: _check_mismatched_models(rank))
    results["checkpoint 2<->1"] = _run(lambda: _check_checkpoint(rank, out))
    results["ddp through hardening"] = _run(lambda: _check_ddp_through_hardening(rank))
    results["pickle"] = _run(lambda: _check_pickle(rank, out))
    results["checkpoint resume per rank"] = _run(lambda: _check_resume_every_rank(rank, out))
    results["ddp"] = _run(lambda: _check_ddp(rank))
    results["fsdp2"] = _run(lambda: _check_fsdp2(rank))
    results["fsdp2 2-D mesh"] = _run(lambda: _check_fsdp2_2d(rank))
    results["fsdp2 pitfalls as documented"] = _run(lambda: _check_fsdp2_pitfalls(rank))
    results["dcp"] = _run(lambda: _check_dcp(rank, out))
    results["trainer"] = _run(lambda: _check_trainer(rank, out))
    results["trainer clipped"] = _run(lambda: _check_trainer(rank, out, clip_norm=1e-3))
    results["trainer nan on one rank"] = _run(lambda: _check_trainer_nan_on_one_rank(rank))
    results["trainer ddp resume"] = _run(lambda: _check_trainer_ddp_resume(rank, out))
    results["trainer dcp resume"] = _run(lambda: _check_trainer_dcp_resume(rank, out, "ddp"))
    results["trainer dcp resume fsdp2"] = _run(lambda: _check_trainer_dcp_resume(rank, out, "fsdp2"))
    results["demo"] = _run(lambda: _check_demo(rank, out))
    if not ROUTER_LM_DATA.args[0]:  # its data is here (else the test is skipped)
        results["router-lm"] = _run(lambda: _check_router_lm(rank, out))
        if HAS_TRANSFORMERS:
            results["upcycle-smollm2"] = _run(lambda: _check_upcycle(rank, out))
    results["trainer world change"] = _run(lambda: _check_trainer_world_change(rank, out))
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("expert_parallel")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def results(spawned: Path) -> list[dict[str, str]]:
    return [json.loads((spawned / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize(
    "case",
    [c[0] for c in CASES]
    + ["training", "indivisible", "checkpoint 2<->1", "ddp through hardening", "checkpoint resume per rank"]
    + ["ddp", "fsdp2", "dcp", "trainer", "trainer nan on one rank", "mismatched models"]
    + ["trainer ddp resume", "demo", "trainer world change", "trainer dcp resume"]
    + ["fsdp2 2-D mesh", "fsdp2 pitfalls as documented", "trainer dcp resume fsdp2", "trainer clipped", "pickle"],
)
def test_expert_parallel_matches_unsharded(results: list[dict[str, str]], case: str) -> None:
    for rank, found in enumerate(results):
        assert found[case] == "ok", f"rank {rank}:\n{found[case]}"


def test_pickled_expert_parallel_model_outside_its_job(spawned: Path, results: list[dict[str, str]]) -> None:
    """Unpickled in a process without its process group (here: no group at all), an expert-parallel
    model loads, and its forward says why it cannot run and what to save instead."""
    assert results[0]["pickle"] == "ok", results[0]["pickle"]
    assert not dist.is_initialized()
    model = torch.load(spawned / "ep-model-rank0.pt", weights_only=False)
    with pytest.raises(RuntimeError, match="unpickled in a process without the process group"):
        model(torch.randn(3, D, dtype=torch.float64))


def test_dcp_checkpoint_loads_into_one_process(spawned: Path, results: list[dict[str, str]]) -> None:
    """The DCP checkpoint written by 2 expert-parallel ranks loads into an unsharded model (and its Adam)
    in this process, with no process group: the same outputs as the 2 ranks on their rows."""
    assert results[0]["dcp"] == "ok", results[0]["dcp"]
    io = torch.load(spawned / "dcp-io.pt")
    model = _model(11)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(io["x"][0]).sum().backward()
    opt.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(spawned / "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with torch.no_grad():
        for rank in range(WORLD):
            _close(model(io["x"][rank]), io["y"][rank], f"one process vs rank {rank} of the 2-rank run")
    assert int(opt.state[model[1].experts.w1]["step"]) == 3, "the optimizer state comes from the checkpoint"
    # the same checkpoint as one safetensors file, loaded by sparsemoe.checkpoint
    converted = dcp_to_safetensors(spawned / "dcp", spawned / "from-dcp.safetensors", _model(12))
    fresh = _model(13)
    load_checkpoint(converted, fresh)
    with torch.no_grad():
        _close(fresh(io["x"].reshape(-1, D)), io["y"].reshape(-1, 1), "safetensors converted from the 2-rank DCP")


@pytest.mark.parametrize("fmt", list(WORLD_CHANGE))
def test_resume_at_another_world_size(spawned: Path, results: list[dict[str, str]], fmt: str) -> None:
    """A Trainer checkpoint of 2 expert-parallel ranks (one file, or a DCP folder) resumes in one
    process: the global batches go on in the same order (the one process takes whole batches), the
    experts load unsharded, and the losses equal the uninterrupted 2-rank run's (same weights and
    Adam state, same rows)."""
    assert results[0]["trainer world change"] == "ok", results[0]["trainer world change"]
    whole = json.loads((spawned / "world-change.json").read_text())
    resumed = _world_change_run(_model(17), 4, str(spawned), save=None, resume=str(spawned / WORLD_CHANGE[fmt]))
    assert len(resumed) == 2
    _close(torch.tensor(resumed), torch.tensor(whole[2:]), "steps 3-4 resumed in 1 process vs 2 ranks")


def test_demo_on_two_processes_matches_one(spawned: Path, results: list[dict[str, str]], tmp_path: Path) -> None:
    """``sparsemoe demo`` on 2 ranks (DDP, and expert-parallel) scores as one process does: each rank
    trained on half of every batch, the gradients averaged; only the one results.json per run exists."""
    from sparsemoe.experiments import demo

    assert results[0]["demo"] == "ok", results[0]["demo"]
    torch.set_num_threads(1)
    one = demo.run(_demo_config(tmp_path))  # type: ignore[arg-type]
    assert one["config"]["processes"] == 1
    for name in ("demo-dp", "demo-ep"):
        two = json.loads((spawned / name / "quick" / "results.json").read_text())
        assert two["processes"] == WORLD
        assert len(list((spawned / name / "quick" / "runs").glob("*.json"))) == len(DEMO_GATES)
        for gate in DEMO_GATES:
            got, want = two["summary"][gate]["mean_auc"]["mean"], one["summary"][gate]["mean_auc"]["mean"]
            assert abs(got - want) < 1e-3, f"{name} {gate}: 2 processes {got}, one process {want}"


@ROUTER_LM_DATA
def test_router_lm_on_two_processes_matches_one(spawned: Path, results: list[dict[str, str]], tmp_path: Path) -> None:
    """``reproduce router-lm --quick`` on 2 ranks (DDP, and expert-parallel): each rank trained on its
    half of every batch, the loss-free biases moved by the global loads, so without dropout the
    validation perplexity and balance equal one process's (float32 rounding apart); rank 0 alone wrote
    the results and the runs."""
    from sparsemoe.experiments import router_lm

    assert results[0]["router-lm"] == "ok", results[0]["router-lm"]
    torch.set_num_threads(1)
    one = {r["system"]: r for r in router_lm.run(_router_lm_config(tmp_path))["runs"]}  # type: ignore[arg-type]
    for name in ("router-lm-dp", "router-lm-ep"):
        two = json.loads((spawned / name / "quick" / "results.json").read_text())
        assert two["processes"] == WORLD and len(two["runs"]) == 2
        assert sorted(p.name for p in (spawned / name / "quick" / "runs").glob("*.json")) == [
            "system=dense__seed=0.json",
            "system=topk_lossfree__seed=0.json",
        ]
        for run in two["runs"]:
            want = one[run["system"]]
            for key in ("val_ce", "maxvio_global"):
                if want[key] is not None:
                    assert abs(run[key] - want[key]) < 1e-4 * max(1.0, abs(want[key])), (name, run["system"], key)


@ROUTER_LM_DATA
@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="upcycle-smollm2 needs transformers")
def test_upcycle_smollm2_on_two_processes_matches_one(
    spawned: Path, results: list[dict[str, str]], tmp_path: Path
) -> None:
    """``reproduce upcycle-smollm2 --quick`` on 2 ranks (DDP, and expert-parallel: the clipped norm spans
    both ranks' expert shards): each rank trained on its half of every
    batch, the gradients averaged before clipping and the sigmoid router's loss-free biases moved by
    the global loads, so the step losses and validation perplexities equal one process's (float32
    rounding apart);
    rank 0 alone wrote the results and the runs, and a one-process run records no process count."""
    from sparsemoe.experiments import upcycle_smollm2

    assert results[0]["upcycle-smollm2"] == "ok", results[0]["upcycle-smollm2"]
    torch.set_num_threads(1)
    found = upcycle_smollm2.run(_upcycle_config(tmp_path))  # type: ignore[arg-type]
    assert "processes" not in found
    one = {r["system"]: r for r in found["runs"]}
    two = json.loads((spawned / "upcycle" / "quick" / "results.json").read_text())
    assert two["processes"] == WORLD and two["config"] == found["config"]
    assert sorted(p.name for p in (spawned / "upcycle" / "quick" / "runs").glob("*.json")) == [
        f"system={s}__seed=0.json" for s in UPCYCLE_SYSTEMS
    ]
    sharded = json.loads((spawned / "upcycle-ep" / "quick" / "results.json").read_text())
    assert sharded["config"] == {**found["config"], "expert_parallel": True}
    for run in two["runs"] + sharded["runs"]:
        want = one[run["system"]]
        for key in ("val_ppl_before", "val_ppl"):
            assert abs(run[key] - want[key]) < 1e-4 * want[key], (run["system"], key, run[key], want[key])
        assert run["train_tokens"] == want["train_tokens"] and len(run["losses"]) == len(want["losses"])
        for got, expected in zip(run["losses"], want["losses"], strict=True):  # the loss averaged over the ranks
            assert abs(got - expected) < 1e-4 * expected, (run["system"], run["losses"], want["losses"])


def test_dcp_safetensors_converters_round_trip(tmp_path: Path) -> None:
    """One process: DCP -> safetensors -> DCP keeps the weights and the Adam state exactly."""
    model = _model(20)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(8, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    dcp.save(dcp_state(model, opt), checkpoint_id=str(tmp_path / "a"), no_dist=True)

    def fresh(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        other = _model(seed)
        return other, torch.optim.Adam(other.parameters(), lr=0.01)  # the saved lr comes back too

    dcp_to_safetensors(tmp_path / "a", tmp_path / "b.safetensors", *fresh(21))
    third, third_opt = fresh(22)
    load_checkpoint(tmp_path / "b.safetensors", third, third_opt)
    safetensors_to_dcp(tmp_path / "b.safetensors", tmp_path / "c", *fresh(23))
    last, last_opt = fresh(24)
    state = dcp_state(last, last_opt)
    dcp.load(state, checkpoint_id=str(tmp_path / "c"), no_dist=True)
    set_state_dict(last, last_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with torch.no_grad():
        for other, other_opt, what in ((third, third_opt, "DCP -> safetensors"), (last, last_opt, "-> DCP again")):
            _close(other(x), model(x), what)
            for p, q in zip(model.parameters(), other.parameters(), strict=True):
                _close(other_opt.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"], f"Adam state, {what}")
                assert int(other_opt.state[q]["step"]) == 2, what
            assert other_opt.param_groups[0]["lr"] == 0.05, what


def _dcp_trainer(tmp: Path, steps: int, resume: Path | None = None, **config: object) -> tuple[TrainResult, Trainer]:
    """One process: a dropout model trained by a Trainer writing DCP checkpoints to ``tmp/ckpt``."""
    gen = torch.Generator().manual_seed(44)
    x, t = torch.randn(24, D, generator=gen, dtype=torch.float64), torch.randn(24, 1, generator=gen).double()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1)).double()

    def loss(batch: torch.Tensor) -> torch.Tensor:
        return (model(x[batch]) - t[batch]).pow(2).mean()

    def evaluate() -> dict[str, float]:
        return {"val": float((model(x[:6]) - t[:6]).pow(2).mean())}

    settings = {"checkpoint_path": str(tmp / "ckpt"), "checkpoint_every": 2, "checkpoint_format": "dcp", **config}
    settings.setdefault("batch_size", 8)
    cfg = TrainConfig(steps=steps, lr=0.05, eval_every=1, metric="val", warmup_steps=3, **settings)  # type: ignore[arg-type]
    trainer = Trainer(model, loss, RandomBatches(24, cfg.batch_size, seed=1), cfg, evaluate=evaluate)
    torch.manual_seed(7)  # the dropout stream: a resume restores it from the checkpoint
    return trainer.run(resume=resume), trainer


def test_trainer_dcp_checkpoint_in_one_process(tmp_path: Path) -> None:
    """checkpoint_format="dcp" without a process group: the folder holds one complete step and its
    pointer; resuming from it (scheduler, dropout RNG, best weights) equals the uninterrupted run."""
    whole, done = _dcp_trainer(tmp_path / "a", 5)
    _dcp_trainer(tmp_path / "b", 3, checkpoint_at_end=False)
    assert sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir()) == ["checkpoint.json", "step-00000002"]
    resumed, again = _dcp_trainer(tmp_path / "b", 5, resume=tmp_path / "b" / "ckpt")
    assert resumed.step_losses == whole.step_losses[2:]
    assert resumed.history == whole.history and resumed.best_step == whole.best_step
    assert again.scheduler is not None and again.scheduler.last_epoch == done.scheduler.last_epoch  # type: ignore[union-attr]
    for p, q in zip(done.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_trainer_dcp_checkpoint_errors(tmp_path: Path) -> None:
    """Bad settings and folders are ValueErrors naming the problem, raised before training."""
    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        TrainConfig(checkpoint_format="zip")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; a DCP checkpoint is a folder"):
        _dcp_trainer(tmp_path, 2, checkpoint_path=str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a sparsemoe DCP checkpoint folder"):
        _dcp_trainer(tmp_path, 2, resume=tmp_path / "empty")
    _dcp_trainer(tmp_path / "c", 2)  # saves step 2 twice (every 2 steps, and at the end): the second elsewhere
    assert sorted(p.name for p in (tmp_path / "c" / "ckpt").iterdir()) == ["checkpoint.json", "step-00000002-again"]
    assert _dcp_trainer(tmp_path / "c", 2, resume=tmp_path / "c" / "ckpt")[0].step_losses == []  # finished
    with pytest.raises(ValueError, match="written with batch_size=8, this run has batch_size=4"):
        _dcp_trainer(tmp_path / "c", 4, resume=tmp_path / "c" / "ckpt", batch_size=4)


def test_needs_initialised_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(MoE(D, 8, NUM_EXPERTS))


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_torchrun_example_matches_one_process(tmp_path: Path, wrap: str) -> None:
    """examples/expert_parallel.py: expert parallelism + DDP or FSDP2 on 2 ranks equals one process;
    its DCP checkpoint reloads into one unsharded model with the same outputs."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(_free_port()), str(root / "examples" / "expert_parallel.py")]
    command += ["--steps", "5", "--out", str(tmp_path), "--wrap", wrap]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split() for line in done.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2  # steps 1 and 5
    for words in steps:
        assert words[6] == words[9], words  # loss on 2 ranks == one process (6 decimals)
    diff = float(done.stdout.rsplit("by ", 1)[1].split()[0])
    assert diff < 1e-6
