"""DSelect-k (Hazimeh et al., 2021): k binary-encoded expert selectors built on the smooth-step."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._validation import check_float
from ..routing import Routing
from .base import Gate, entropy, uniform_, uniform_linear
from .smooth_step import smooth_step


class DSelectKGate(Gate):
    """Mixture of ``k`` selectors; selector ``i`` spreads mass over experts by their binary codes.

    With ``m = ceil(log2 n)`` smooth-steps ``s = S_γ(z)``, selector ``i`` gives expert ``e`` the mass
    ``r_e = Π_j (s_j if bit_j(e) else 1 - s_j)``; the gate weights are ``q = Σ_i softmax(α)_i r^(i)``.
    Once every ``s`` is exactly 0 or 1 each selector is one-hot, so at most ``k`` experts have
    non-zero weight and only those are computed.

    Losses (training only): ``entropy_weight · mean_x Σ_i H(r^(i))`` pushes the selectors to
    saturate; when ``n`` is not a power of two, ``unreachable_weight · mean_x Σ_i (1/Σ_{e<n} r_e - 1)``
    keeps mass off the codes that have no expert (and ``r`` is renormalised over the real ones). The
    official code omits the ``- 1``; it changes no gradient and makes the loss 0 at its optimum.

    Cost until saturation: while an input's smooth-steps are inside their soft band
    (``|z| < γ/2``) its weights are non-zero on up to all ``n`` experts, and the layer computes every
    one of them for that input (``n/k`` times the expert compute of a saturated layer). Sparsity
    arrives during training; ``last_routing.num_pairs / num_inputs`` shows how far it has got.

    Defaults (``gamma=1.0``, ``entropy_weight=0.1``), from the seeded ``gate-saturation`` study
    (results/gate-saturation: 16 experts, k=2, one MoE layer on scikit-learn digits, Adam lr 1e-3,
    2 seeds): with ``γ = 1`` DSelect-k computes k experts per input on held-out data after 50 steps
    (``γ = 0.1``: 5-10 steps; ``γ = 10``: still above k after 1,000 steps), at the same test accuracy
    for ``γ`` in {0.1, 1, 10}; the entropy weight (0.1 or 1) barely moved either. ``γ = 1`` keeps
    the widest soft band (the most gradient for the routing) among the candidates that saturate
    within a few hundred steps, and is the official code's default. Saturation speed scales with
    ``|w·x|`` relative to ``γ``: inputs of a much smaller norm need a smaller ``γ``.

    Args:
        k: number of selectors (experts per input once saturated).
        gamma: width of the smooth-step's soft band.
        entropy_weight: ``λ`` of the entropy regulariser.
        per_example: ``z`` and ``α`` depend on the input (``z = W x``); if False they are
            parameters shared by all inputs (task-only routing).
        unreachable_weight: weight of the unreachable-code penalty.
    """

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        gamma: float = 1.0,
        entropy_weight: float = 0.1,
        per_example: bool = True,
        unreachable_weight: float = 1.0,
        check_finite: bool = True,
    ) -> None:
        super().__init__(d_in, num_experts, k, check_finite=check_finite)
        self.gamma = check_float("gamma", gamma, low=0.0, strict=True)
        self.entropy_weight = check_float("entropy_weight", entropy_weight, low=0.0)
        self.unreachable_weight = check_float("unreachable_weight", unreachable_weight, low=0.0)
        self.per_example = bool(per_example)
        self.num_bits = (num_experts - 1).bit_length()
        codes = torch.arange(num_experts)[:, None]
        shifts = torch.arange(self.num_bits - 1, -1, -1)
        self.register_buffer("bits", (codes >> shifts) & 1 == 1, persistent=False)  # [n, m], MSB first
        if self.per_example:
            self.z_proj = uniform_linear(d_in, k * self.num_bits, self.gamma / 100, self.gamma / 100)
            self.alpha_proj = uniform_linear(d_in, k, 0.05, 0.05)
        else:
            self.z = nn.Parameter(uniform_(torch.empty(k, self.num_bits), self.gamma / 100))
            self.alpha = nn.Parameter(uniform_(torch.empty(k), 0.05))

    def selector_distributions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``r: [T, k, n]`` (each row sums to 1) and the mass each selector put on real experts ``[T, k]``."""
        if self.per_example:
            z = self.z_proj(x).view(x.shape[0], self.k, 1, self.num_bits)  # [T, k, 1, m]
        else:
            z = self.z.view(1, self.k, 1, self.num_bits).expand(x.shape[0], -1, -1, -1)
        s = smooth_step(z, self.gamma)
        factors = torch.where(self.bits, s, 1 - s)  # [T, k, n, m]
        # Multiplied bit by bit: the same numbers as ``factors.prod(-1)``, whose backward takes a slow
        # cumprod path whenever a factor is exactly 0 (every saturated smooth-step). n = 1 has no bits.
        r = math.prod(factors.unbind(-1)) if self.num_bits else factors.prod(-1)  # [T, k, n]
        mass = r.sum(-1)
        if self.num_experts < 2**self.num_bits:
            r = r / mass.clamp_min(1e-6)[..., None]
        return r, mass

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        r, mass = self.selector_distributions(x)
        alpha_logits = self.alpha_proj(x) if self.per_example else self.alpha.expand(x.shape[0], -1)
        mix = torch.softmax(alpha_logits, dim=-1)  # [T, k]
        weights = (mix[..., None] * r).sum(1)  # [T, n]
        aux = {}
        if self.training and x.shape[0] > 0:
            if self.entropy_weight > 0:
                aux["entropy"] = self.entropy_weight * entropy(r).sum(-1).mean()
            if self.num_experts < 2**self.num_bits and self.unreachable_weight > 0:
                aux["unreachable"] = self.unreachable_weight * (1.0 / (mass + 1e-6) - 1.0).sum(-1).mean()
        return Routing.from_dense(weights, aux_losses=aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gamma={self.gamma}, entropy_weight={self.entropy_weight}, "
            f"per_example={self.per_example}"
        )
