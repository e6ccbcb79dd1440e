"""Progressive Layered Extraction (PLE, Tang et al., RecSys 2020): stacked CGC levels, one tower per task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..layers import CGC, aux_loss
from .mmoe import Tower


class PLE(nn.Module):
    """``bottom(x) -> CGC level 1 -> ... -> CGC level L -> tower_t``; one ``[T, d_out_t]`` tensor per task.

    Each level has ``task_experts`` experts per task and ``shared_experts`` shared ones; task ``t``'s
    gate mixes its own and the shared experts. Every level but the last also has a shared gate over
    all its experts, whose mix is the next level's shared input; the next level's task ``t`` experts
    read task ``t``'s mix. With one level PLE is CGC, the paper's single-level model.

    Args:
        d_in: width of the bottom's output (of ``x`` without a bottom).
        d_expert_out: output width of each level's experts.
        task_outputs: output width per task (1 for a binary or a regression task).
        levels: CGC levels.
        gate: the gate spec of every gate; ``**gate_options`` (and ``k``) go to each.
        tower_hidden: hidden width of each tower.
        bottom: shared module applied to the input first (embeddings, say).
        dropout: dropout on each task's mix before its tower.
    """

    def __init__(
        self,
        d_in: int,
        d_expert_out: int,
        task_outputs: Sequence[int],
        *,
        levels: int = 2,
        task_experts: int = 2,
        shared_experts: int = 2,
        gate: str = "softmax",
        k: int | None = None,
        tower_hidden: int = 64,
        bottom: nn.Module | None = None,
        dropout: float = 0.0,
        expert: str = "linear",
        **gate_options: Any,
    ) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        num_tasks = len(task_outputs)
        if num_tasks < 1:
            raise ValueError("task_outputs must name at least one task")
        self.bottom = bottom
        self.levels = nn.ModuleList(
            CGC(
                d_in if level == 0 else d_expert_out,
                d_expert_out,
                num_tasks,
                task_experts,
                shared_experts,
                gate,
                k,
                shared_gate=level < levels - 1,
                expert=expert,
                **gate_options,
            )
            for level in range(levels)
        )
        self.dropout = nn.Dropout(dropout)
        self.towers = nn.ModuleList(Tower(d_expert_out, tower_hidden, d) for d in task_outputs)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        h: torch.Tensor | list[torch.Tensor] = self.bottom(x) if self.bottom is not None else x
        for level in self.levels:
            h = level(h, ids)
        return [tower(self.dropout(out)) for tower, out in zip(self.towers, h, strict=True)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of every level's gate losses from the last forward (:func:`sparsemoe.aux_loss`)."""
        return aux_loss(self)
