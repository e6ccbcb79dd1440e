"""Multi-gate MoE model: optional shared bottom, :class:`MultiTaskMoE`, one tower per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import MultiTaskMoE


class Tower(nn.Sequential):
    """``Linear -> ReLU -> Linear``: the per-task head of the COMET paper's models."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int = 1) -> None:
        super().__init__(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class MMoE(nn.Module):
    """``bottom(x) -> MultiTaskMoE -> tower_t``; returns one ``[T, d_out_t]`` tensor per task.

    Args:
        moe: the shared experts and per-task gates.
        tower_hidden: hidden width of each tower.
        task_outputs: output width per task (1 for a binary or a regression task).
        bottom: shared module applied to the input first (embeddings, say); its output feeds
            the experts and, unless ``gate_from_input`` is set, the gates.
        gate_from_input: route on the raw (flattened) input rather than the bottom's output, as
            the COMET paper does for images.
    """

    def __init__(
        self,
        moe: MultiTaskMoE,
        tower_hidden: int,
        task_outputs: Sequence[int],
        *,
        bottom: nn.Module | None = None,
        gate_from_input: bool = False,
    ) -> None:
        super().__init__()
        if len(task_outputs) != moe.num_tasks:
            raise ValueError(f"task_outputs has {len(task_outputs)} entries, the MoE has {moe.num_tasks} tasks")
        self.bottom = bottom
        self.moe = moe
        self.gate_from_input = gate_from_input
        d_expert_out = moe.experts.d_out
        if d_expert_out is None:
            raise ValueError("the expert bank's d_out is None: give ModuleExperts(..., d_out=) to size the towers")
        self.towers = nn.ModuleList(Tower(d_expert_out, tower_hidden, d) for d in task_outputs)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        h = self.bottom(x) if self.bottom is not None else x
        gate_input = x.flatten(1) if self.gate_from_input else None
        return [tower(out) for tower, out in zip(self.towers, self.moe(h, gate_input=gate_input, ids=ids), strict=True)]

    def aux_loss(self) -> torch.Tensor:
        return self.moe.aux_loss()
