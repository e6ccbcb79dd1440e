"""COMET (Ibrahim et al., 2023): k soft binary trees whose leaves are the experts."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from types import MappingProxyType
from typing import cast

import torch

from .._validation import check_float
from ..routing import Routing
from .base import Gate, entropy, linear_batch, uniform_linear, with_z_loss, z_loss_trait
from .smooth_step import smooth_step


def _leaf_paths(num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Root-to-leaf paths of the heap-ordered tree with ``n - 1`` internal nodes.

    Node ``v`` has children ``2v+1`` (left) and ``2v+2`` (right) and is a leaf iff ``v >= n - 1``;
    leaves are numbered left to right (DFS order), leaf ``j`` being expert ``j``.

    Returns ``nodes, goes_left``, both ``[n, depth]``. Shorter paths are padded with the extra node
    index ``n - 1`` and ``goes_left=True``; the caller gives that node the split value 1.
    """
    internal = num_experts - 1
    paths: list[list[tuple[int, bool]]] = []

    def visit(node: int, path: list[tuple[int, bool]]) -> None:
        if node >= internal:
            paths.append(path)
            return
        visit(2 * node + 1, [*path, (node, True)])
        visit(2 * node + 2, [*path, (node, False)])

    visit(0, [])
    depth = max(1, max(len(p) for p in paths))
    nodes = torch.full((num_experts, depth), internal, dtype=torch.long)
    goes_left = torch.ones(num_experts, depth, dtype=torch.bool)
    for leaf, path in enumerate(paths):
        for level, (node, left) in enumerate(path):
            nodes[leaf, level] = node
            goes_left[leaf, level] = left
    return nodes, goes_left


class CometGate(Gate):
    """Tree-ensemble gate with a cardinality constraint of ``k``.

    Tree ``t`` routes ``x`` down its ``n - 1`` internal nodes with ``s = S_γ(w·x + b)`` (left gets
    ``s``, right ``1 - s``), giving leaf reach probabilities ``P_t(x)`` that sum to 1. Each leaf has
    an input-dependent logit ``a_{t,j}(x)``; the weights are one softmax over all ``k·n`` pairs of
    ``a + log P`` (``P = 0`` gives exactly 0), summed over trees. Once the splits on every tree's
    path saturate, at most ``k`` experts are non-zero and only they are computed.

    Loss (training only): ``entropy_weight · mean_x Σ_t H(P_t(x))``.

    Args:
        k: number of trees (experts per input once saturated).
        gamma: width of the smooth-step's soft band.
        entropy_weight: ``λ`` of the entropy regulariser.
        z_loss_weight: router z-loss on ``a + log P``, the logits of the gate's softmax over the
            ``k·n`` (tree, leaf) pairs (unreachable leaves, ``log 0 = -inf``, add nothing); 0 is off.

    Note:
        Until its splits saturate, every leaf is reachable, so a layer computes up to all ``n``
        experts per input early in training (the routing becomes ``k``-sparse as it trains). The
        cost of that, and how the defaults (``gamma=1.0``, ``entropy_weight=0.1``) were chosen:
        :mod:`sparsemoe.gates.smooth_step`.
    """

    sparsity = "learned"
    aux_losses = MappingProxyType(
        {"entropy": "λ · entropy of each tree's leaf reach probabilities", **z_loss_trait("a + log P")}
    )
    summary = "COMET tree ensemble (Ibrahim et al. 2023), any n"
    k_note = "trees"

    path_nodes: torch.Tensor
    path_left: torch.Tensor
    path_sides: torch.Tensor

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        gamma: float = 1.0,
        entropy_weight: float = 0.1,
        z_loss_weight: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight)
        self.gamma = check_float("gamma", gamma, low=0.0, strict=True)
        self.entropy_weight = check_float("entropy_weight", entropy_weight, low=0.0)
        self.split = uniform_linear(
            d_in, (num_experts - 1) * k, self.gamma / 100, self.gamma / 100, device=device, dtype=dtype
        )
        self.leaf = uniform_linear(d_in, num_experts * k, 0.05, 0.0, device=device, dtype=dtype)
        nodes, goes_left = _leaf_paths(num_experts)
        nodes, goes_left = nodes.to(device), goes_left.to(device)
        self.register_buffer("path_nodes", nodes, persistent=False)
        self.register_buffer("path_left", goes_left, persistent=False)
        # Where each path step reads in [s, 1 - s] (node v going left at v, going right at n + v).
        self.register_buffer("path_sides", (nodes + num_experts * ~goes_left).flatten(), persistent=False)

    def batch_key(self) -> Hashable:
        return (self.gamma, self.entropy_weight, self.split.weight.dtype)

    def reach_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``P: [T, n, k]``, the probability that tree ``t`` sends ``x`` to leaf ``j``."""
        return self._reach_batch([self], x)[:, 0]

    @staticmethod
    def _reach_batch(gates: Sequence[CometGate], x: torch.Tensor) -> torch.Tensor:
        """``P: [T, G, n, k]`` of each of the ``G`` gates (equal settings)."""
        first, rows, num_gates = gates[0], x.shape[0], len(gates)
        n, k = first.num_experts, first.k
        splits = linear_batch(x, [g.split for g in gates]).view(rows, num_gates, n - 1, k)
        s = smooth_step(splits, first.gamma)
        s = torch.cat([s, s.new_ones(rows, num_gates, 1, k)], dim=2)  # padding node: always "left"
        # Node-major [2n, T, G, k], so that each path step gathers (and its backward adds) whole rows.
        sides = torch.cat([s, 1 - s], dim=2).permute(2, 0, 1, 3).contiguous()
        factors = sides.index_select(0, first.path_sides).view(*first.path_nodes.shape, rows, num_gates, k)
        # The product over the path, level by level: the same numbers as ``factors.prod(1)``, whose
        # backward takes a slow cumprod path whenever a factor is exactly 0 (every saturated split).
        reach = cast(torch.Tensor, math.prod(factors.unbind(1)))  # [n, T, G, k]
        return reach.permute(1, 2, 0, 3).contiguous()

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        return self.route_batch([self], x, ids)[0]

    @classmethod
    def route_batch(cls, gates: Sequence[Gate], x: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
        trees = cast(Sequence[CometGate], gates)
        first, rows, num_gates = trees[0], x.shape[0], len(trees)
        reach = cls._reach_batch(trees, x)  # [T, G, n, k]
        leaf_logits = linear_batch(x, [g.leaf for g in trees]).view_as(reach)
        reachable = reach > 0
        # log P with log 0 = -inf, written so that the backward pass never sees 1/0.
        log_reach = torch.where(reachable, torch.log(torch.where(reachable, reach, 1.0)), -torch.inf)
        logits = (leaf_logits + log_reach).flatten(2)  # [T, G, n*k]
        joint = torch.softmax(logits, dim=-1)
        weights = joint.view_as(reach).sum(-1)  # [T, G, n]
        aux: list[dict[str, torch.Tensor]] = [{} for _ in trees]
        if first.training and first.entropy_weight > 0 and rows > 0:
            penalty = first.entropy_weight * entropy(reach, dim=2).sum(-1).mean(0)  # [G]
            aux = [{"entropy": p} for p in penalty.unbind(0)]
        aux = with_z_loss(aux, first._z_loss(logits))
        return [Routing.from_dense(weights[:, g], aux_losses=aux[g]) for g in range(num_gates)]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, entropy_weight={self.entropy_weight}"
