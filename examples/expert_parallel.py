"""Expert parallelism + DDP or FSDP2: the whole recipe, checked against one process.

Run (CPU, gloo; NCCL is used when CUDA is available)::

    torchrun --nproc-per-node 2 examples/expert_parallel.py                 # + DistributedDataParallel
    torchrun --nproc-per-node 2 examples/expert_parallel.py --wrap fsdp2    # + fully_shard
    torchrun --nproc-per-node 2 examples/expert_parallel.py --config train.json  # a TrainConfig file

What each rank holds: the embedding, the gate and the head in full (replicated: DDP averages their
gradients; FSDP2 shards them), and ``num_experts / world_size`` experts of the MoE layer (DTensors
sharded on dim 0, never averaged). Each rank trains on its own slice of every batch; the per-rank
losses are averaged, which is what one process training on the whole batch computes. At the end,
a ``torch.distributed.checkpoint`` written by all ranks together is loaded into an unsharded model
on rank 0 alone (no process group), which reproduces the sharded model's outputs.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from sparsemoe import MoE
from sparsemoe.distributed import expert_parallel, expert_parameters
from sparsemoe.training import TrainConfig


def build(d: int, num_experts: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, d), MoE(d, 2 * d, num_experts, gate="topk", k=2, noisy=False, balance_weight=0.0), nn.Linear(d, 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TrainConfig file (.json/.toml): lr, seed, batch_size, ...")
    parser.add_argument("--wrap", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("results/expert-parallel-example"))
    args = parser.parse_args()
    config = TrainConfig.from_file(args.config) if args.config else TrainConfig(lr=0.01, batch_size=64)
    torch.set_num_threads(1)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # torchrun provides rank, world size and address
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} ranks")

    torch.manual_seed(config.seed)  # the same model on every rank
    d = 16
    model = build(d, args.experts).to(device)
    reference = copy.deepcopy(model)  # one process, whole batches: for the check below
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("ep",))
    # 1. shard the experts in place: experts.w1/w2 become DTensors sharded on dim 0 over the mesh
    expert_parallel(model, mesh)
    # 2. data parallelism for everything else (the expert gradients are complete already)
    if args.wrap == "ddp":
        wrapped: nn.Module = DistributedDataParallel(model)  # expert_parallel told DDP to skip the shards
    else:
        # ignored_params: the shards are expert-parallel over this same mesh, which FSDP2 (torch 2.13)
        # refuses to combine with its own ("Cannot concatenate overlapping meshes"); 2-D meshes that
        # need no argument: docs/failure-modes.md, "FSDP2 and expert parallelism"
        wrapped = fully_shard(model, mesh=mesh, ignored_params=set(expert_parameters(model)))
    opt = torch.optim.Adam(wrapped.parameters(), lr=config.lr)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=config.lr)

    data = torch.Generator().manual_seed(config.seed + 1)  # the same batches on every rank
    per_rank = config.batch_size // world
    for step in range(1, args.steps + 1):
        x = torch.randn(config.batch_size, d, generator=data).to(device)
        y = x[:, :1].sin()
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = (wrapped(x[mine]) - y[mine]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world

        ref_loss = (reference(x) - y).pow(2).mean()
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        if rank == 0 and (step % 5 == 0 or step == 1):
            print(f"step {step:3d}  loss on {world} ranks {mean_loss.item():.6f}  one process {ref_loss.item():.6f}")

    # 3. checkpoint: every rank writes its shards (torch.distributed.checkpoint)
    path = args.out / f"dcp-{args.wrap}"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(path))
    x = torch.randn(8, d, generator=data).to(device)
    with torch.no_grad():
        y_sharded = wrapped(x)  # each rank runs the same 8 rows here
    dist.barrier()
    if rank == 0:  # 2 ranks -> 1 process: an unsharded model loads it without any collective
        single = build(d, args.experts).to(device)
        state = {"model": single.state_dict()}
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
        single.load_state_dict(state["model"])
        with torch.no_grad():
            diff = (single(x) - y_sharded).abs().max().item()
        print(f"checkpoint {path}: unsharded reload differs from the sharded model by {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
