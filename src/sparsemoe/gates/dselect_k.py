"""DSelect-k (Hazimeh et al., 2021): k binary-encoded expert selectors built on the smooth-step."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from types import MappingProxyType
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_float
from ..routing import Routing
from .base import Gate, entropy, linear_batch, stack_batch, uniform_, uniform_linear, with_z_loss, z_loss_trait
from .smooth_step import smooth_step


class DSelectKGate(Gate):
    """Mixture of ``k`` selectors; selector ``i`` spreads mass over experts by their binary codes.

    With ``m = ceil(log2 n)`` smooth-steps ``s = S_γ(z)``, selector ``i`` gives code ``c`` the mass
    ``r_c = Π_j (s_j if bit_j(c) else 1 - s_j)``; the gate weights are ``q = Σ_i softmax(α)_i r^(i)``.
    Once every ``s`` is exactly 0 or 1 each selector is one-hot, so at most ``k`` experts have
    non-zero weight and only those are computed.

    When ``n`` is not a power of two, codes ``c >= n`` have no expert of their own and stand for
    expert ``c - n`` (an alias). The official code instead penalises and renormalises the mass on
    such codes, but a selector whose smooth-steps saturate on one of them then has zero mass, zero
    output and zero gradient for good (a dead selector); with aliases every code reaches an expert.

    Loss (training only): ``entropy_weight · mean_x Σ_i H(r^(i))`` (over codes) pushes the
    selectors to saturate.

    Args:
        k: number of selectors (experts per input once saturated).
        gamma: width of the smooth-step's soft band.
        entropy_weight: ``λ`` of the entropy regulariser.
        per_example: ``z`` and ``α`` depend on the input (``z = W x``); if False they are
            parameters shared by all inputs (task-only routing).
        z_loss_weight: router z-loss on the selector logits ``α`` (the gate's one softmax; the
            smooth-step inputs ``z`` are left alone, a penalty on them would fight saturation); 0 is off.

    Note:
        Until its smooth-steps saturate, the gate gives every expert a non-zero weight, so a layer
        computes up to all ``n`` experts per input early in training. The cost of that, and how the
        defaults (``gamma=1.0``, ``entropy_weight=0.1``) were chosen: :mod:`sparsemoe.gates.smooth_step`.
    """

    sparsity = "learned"
    aux_losses = MappingProxyType(
        {"entropy": "λ · entropy of each selector over the binary codes", **z_loss_trait("α")}
    )
    summary = "DSelect-k (Hazimeh et al. 2021), per-example or static, any n"
    k_note = "selectors"

    bits: torch.Tensor

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        gamma: float = 1.0,
        entropy_weight: float = 0.1,
        per_example: bool = True,
        z_loss_weight: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight)
        self.gamma = check_float("gamma", gamma, low=0.0, strict=True)
        self.entropy_weight = check_float("entropy_weight", entropy_weight, low=0.0)
        self.per_example = bool(per_example)
        self.num_bits = (num_experts - 1).bit_length()
        codes = torch.arange(2**self.num_bits, device=device)[:, None]
        shifts = torch.arange(self.num_bits - 1, -1, -1, device=device)
        self.register_buffer("bits", (codes >> shifts) & 1 == 1, persistent=False)  # [2^m, m], MSB first
        if self.per_example:
            self.z_proj = uniform_linear(
                d_in, k * self.num_bits, self.gamma / 100, self.gamma / 100, device=device, dtype=dtype
            )
            self.alpha_proj = uniform_linear(d_in, k, 0.05, 0.05, device=device, dtype=dtype)
        else:
            self.z = nn.Parameter(uniform_(torch.empty(k, self.num_bits, device=device, dtype=dtype), self.gamma / 100))
            self.alpha = nn.Parameter(uniform_(torch.empty(k, device=device, dtype=dtype), 0.05))

    def batch_key(self) -> Hashable:
        dtype = (self.z_proj.weight if self.per_example else self.z).dtype
        return (self.gamma, self.entropy_weight, self.per_example, dtype)

    def code_distributions(self, x: torch.Tensor) -> torch.Tensor:
        """``r: [T, k, 2^m]``, each selector's distribution over the binary codes (rows sum to 1)."""
        return self._codes_batch([self], x)[:, 0]

    @staticmethod
    def _codes_batch(gates: Sequence[DSelectKGate], x: torch.Tensor) -> torch.Tensor:
        """``r: [T, G, k, 2^m]`` of each of the ``G`` gates (equal settings)."""
        first, rows, num_gates = gates[0], x.shape[0], len(gates)
        shape = (rows, num_gates, first.k, 1, first.num_bits)
        if first.per_example:
            z = linear_batch(x, [g.z_proj for g in gates]).view(shape)  # [T, G, k, 1, m]
        else:
            z = stack_batch([g.z for g in gates]).view(1, *shape[1:]).expand(shape)
        s = smooth_step(z, first.gamma)
        factors = torch.where(first.bits, s, 1 - s)  # [T, G, k, 2^m, m]
        # Multiplied bit by bit: the same numbers as ``factors.prod(-1)``, whose backward takes a slow
        # cumprod path whenever a factor is exactly 0 (every saturated smooth-step). n = 1 has no bits.
        return cast(torch.Tensor, math.prod(factors.unbind(-1))) if first.num_bits else factors.prod(-1)

    def selector_distributions(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, k, n]``: each selector's distribution over the experts (aliased codes folded in)."""
        return self._fold_aliases(self.code_distributions(x))

    def _fold_aliases(self, codes: torch.Tensor) -> torch.Tensor:
        """``[..., 2^m] -> [..., n]``: add the mass of code ``n + e`` to expert ``e``."""
        aliases = codes.shape[-1] - self.num_experts
        if aliases == 0:
            return codes
        return codes[..., : self.num_experts] + F.pad(codes[..., self.num_experts :], (0, self.num_experts - aliases))

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        return self.route_batch([self], x, ids)[0]

    @classmethod
    def route_batch(cls, gates: Sequence[Gate], x: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
        selectors = cast(Sequence[DSelectKGate], gates)
        first, rows, num_gates = selectors[0], x.shape[0], len(selectors)
        codes = cls._codes_batch(selectors, x)  # [T, G, k, 2^m]
        r = first._fold_aliases(codes)  # [T, G, k, n]
        if first.per_example:
            alpha_logits = linear_batch(x, [g.alpha_proj for g in selectors]).view(rows, num_gates, first.k)
        else:
            alpha_logits = stack_batch([g.alpha for g in selectors]).expand(rows, -1, -1)
        mix = torch.softmax(alpha_logits, dim=-1)  # [T, G, k]
        weights = (mix[..., None] * r).sum(2)  # [T, G, n]
        aux: list[dict[str, torch.Tensor]] = [{} for _ in selectors]
        if first.training and first.entropy_weight > 0 and rows > 0:
            penalty = first.entropy_weight * entropy(codes).sum(-1).mean(0)  # [G]
            aux = [{"entropy": p} for p in penalty.unbind(0)]
        aux = with_z_loss(aux, first._z_loss(alpha_logits))  # alpha_logits: [T, G, k]
        return [Routing.from_dense(weights[:, g], aux_losses=aux[g]) for g in range(num_gates)]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gamma={self.gamma}, entropy_weight={self.entropy_weight}, "
            f"per_example={self.per_example}"
        )
