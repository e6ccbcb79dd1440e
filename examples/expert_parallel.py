"""Expert parallelism + DDP: the whole recipe, checked against one process.

Run (CPU, gloo; NCCL is used when CUDA is available)::

    torchrun --nproc-per-node 2 examples/expert_parallel.py
    torchrun --nproc-per-node 2 examples/expert_parallel.py --config train.json  # a TrainConfig file

What each rank holds: the embedding, the gate and the head in full (replicated, averaged by DDP),
and ``num_experts / world_size`` experts of the MoE layer (sharded, never averaged). Each rank
trains on its own slice of every batch; the per-rank losses are averaged, which is what one process
training on the whole batch computes. At the end, the checkpoint written by all ranks together is
loaded into an unsharded model on rank 0, which reproduces the sharded model's outputs.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparsemoe import MoE
from sparsemoe.checkpoint import load_checkpoint, save_checkpoint
from sparsemoe.distributed import ddp_ignored_parameters, expert_parallel, scale_expert_gradients
from sparsemoe.training import TrainConfig


def build(d: int, num_experts: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, d), MoE(d, 2 * d, num_experts, gate="topk", k=2, noisy=False, balance_weight=0.0), nn.Linear(d, 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TrainConfig file (.json/.toml): lr, seed, batch_size, ...")
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
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} ranks")

    torch.manual_seed(config.seed)  # the same model on every rank
    d = 16
    model = build(d, args.experts).to(device)
    reference = copy.deepcopy(model)  # one process, whole batches: for the check below
    # 1. shard the experts; a separate group keeps the expert exchanges apart from DDP's all-reduces
    moe = model[1]
    assert isinstance(moe, MoE)
    model[1] = expert_parallel(moe, group=dist.new_group())
    # 2. DDP for everything else: the expert shards must not be averaged
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ddp_ignored_parameters(model))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=config.lr)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=config.lr)

    data = torch.Generator().manual_seed(config.seed + 1)  # the same batches on every rank
    per_rank = config.batch_size // world
    for step in range(1, args.steps + 1):
        x = torch.randn(config.batch_size, d, generator=data).to(device)
        y = x[:, :1].sin().to(device)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = (ddp(x[mine]) - y[mine]).pow(2).mean()
        opt.zero_grad()
        loss.backward()  # DDP averages the replicated gradients
        scale_expert_gradients(model)  # the expert gradients hold the sum over ranks: average them too
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

    # 3. checkpoint: every rank calls it; the experts are gathered and rank 0 writes one file
    path = save_checkpoint(args.out / "model.safetensors", model, opt, step=args.steps, config=config.to_dict())
    x = torch.randn(8, d, generator=data).to(device)
    with torch.no_grad():
        y_sharded = model(x)  # each rank runs the same 8 rows here
    if rank == 0:
        single = build(d, args.experts).to(device)
        load_checkpoint(path, single)  # 2 ranks -> 1 process
        with torch.no_grad():
            diff = (single(x) - y_sharded).abs().max().item()
        print(f"checkpoint {path}: unsharded reload differs from the sharded model by {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
