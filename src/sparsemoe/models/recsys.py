"""The COMET paper's two-task recommender: user/item embeddings -> multi-gate MoE -> a tower per task."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from .. import gates
from ..layers import MultiTaskMoE
from .mmoe import MMoE


class UserItemEmbedding(nn.Module):
    """``[T, 2]`` (user, item) ids -> ``[T, 2·d]``: the concatenated embeddings (the shared bottom)."""

    def __init__(self, num_users: int, num_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.user(ids[:, 0]), self.item(ids[:, 1])], dim=-1)


class RecsysMMoE(MMoE):
    """Embeddings as the shared bottom and the gate input; Dense+ReLU experts; two towers.

    Dropout is applied to each task's mixed expert output (the paper puts it inside each expert:
    the same rate, but one mask per task instead of one per expert).

    ``forward(ids [T, 2])`` returns ``[watch logit [T, 1], rating [T, 1]]``. The gates receive the user
    id of each row as ``ids`` (gates that read ids, such as hash, route by user, as in the official
    code where every user is pre-assigned to an expert; ``num_ids=num_users`` where a gate takes it).

    Args:
        gate: gate spec (``"comet+"`` etc. switches local search on); ``**gate_options`` go to the gates.
        k: experts per input for gates with a choice of ``k`` (ignored by dense and top-1 gates;
            ``gate_options["k"]`` overrides it).
        embed_dim: width of each embedding (the paper: 128).
        expert_dim: width of each Dense expert (the paper: 256).
        tower_hidden: hidden width of each tower (the paper: 256).
        dropout: dropout after each expert (the paper: 0.5).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        gate: str,
        *,
        num_experts: int = 16,
        k: int | None = 2,
        embed_dim: int = 128,
        expert_dim: int = 256,
        tower_hidden: int = 256,
        dropout: float = 0.5,
        local_search_steps: int = 1000,
        **gate_options: Any,
    ) -> None:
        spec = gates.parse(gate)
        options = {**gates.k_options(spec.name, k), **gate_options}
        if gates.accepts_option(spec.name, "num_ids"):
            options.setdefault("num_ids", num_users)
        moe = MultiTaskMoE(
            2 * embed_dim,
            expert_dim,
            num_experts,
            2,
            gate=spec,
            expert="linear",
            activation="relu",
            local_search_steps=local_search_steps,
            **options,
        )
        super().__init__(moe, tower_hidden, [1, 1], bottom=UserItemEmbedding(num_users, num_items, embed_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]  # ids are the input here
        h = cast(nn.Module, self.bottom)(ids)  # [T, 2d]
        outs = self.moe(h, ids=ids[:, 0])
        return [tower(self.dropout(out)) for tower, out in zip(self.towers, outs, strict=True)]
