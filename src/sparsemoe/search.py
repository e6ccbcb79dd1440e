"""Permutation local search (the COMET paper's "+" gates: Hash+, Top-k+, DSelect-k+, COMET+).

Gradient training of a gate can refine where a routing region sits but cannot move a whole region
from one expert to another. A permutation ``Π`` between the gate's output coordinates and the
experts can: gate coordinate ``j`` feeds expert ``σ(j)``. As in the official COMET code, ``Π`` is
learned jointly with the network through a Gumbel-Sinkhorn relaxation:

* trainable ``log α ∈ R^{n×n}``, init ``U(-0.05, 0.05)``;
* ``Π_soft = Sinkhorn(log α / τ)`` with ``τ`` annealed log-linearly ``1e-3 → 1e-7`` and the number
  of Sinkhorn iterations linearly ``20 → 150`` over the first ``steps`` training forwards;
* an entropy penalty ``1e-4 · (H(Π) + H(row-normalised Π))`` added as an auxiliary loss;
* the gate weights are multiplied by ``Π_soft`` and renormalised (at such low temperatures a
  finite Sinkhorn is not doubly stochastic, so the rows do not sum to one);
* at the first training forward after ``steps``, ``Π`` is hardened with the Hungarian algorithm
  (:func:`scipy.optimize.linear_sum_assignment`) and frozen. From then on it is a relabelling of
  the routing's expert indices (:meth:`Routing.relabel`): no ``n × n`` product, the routing stays
  exact-sparse and costs nothing. ``log α`` then gets an exact zero gradient (not ``None``): it
  keeps ``requires_grad``, so ``DistributedDataParallel`` with default settings, which waits for
  a gradient of every parameter it was built with, keeps working after hardening. (An optimiser
  with momentum or weight decay may still move ``log α``; nothing reads it once hardened.)

The step counter, the hardened flag and the hard permutation are buffers, so the schedule advances
with any training loop and a saved ``state_dict`` restores the exact state.

Eval mode before hardening uses the Hungarian assignment of the *current* soft ``Π`` (without
freezing it), so validation and test always see an exact-sparse routing, the one that training
would freeze if it hardened now.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ._validation import check_float, check_int
from .routing import Routing

#: name of the auxiliary loss this module adds to a routing
ENTROPY_LOSS = "permutation_entropy"


def sinkhorn(log_alpha: torch.Tensor, iterations: int, grad_iterations: int | None = None) -> torch.Tensor:
    """Alternate row and column normalisation in log space; returns ``exp`` of the result.

    Shape: ``log_alpha [..., n, n]`` -> ``[..., n, n]``; rows are the last-but-one dimension. The last
    normalisation is over columns, so column sums are exactly one and row sums need not be.

    Each half-step is one ``log_softmax`` (``x - logsumexp(x)`` as a single fused op, forward and
    backward), so backpropagating through all 150 iterations of the schedule's end costs ~1.7 ms
    for ``n = 16`` on one CPU thread instead of ~10 ms with ``logsumexp`` and a subtraction
    (``benchmarks/sinkhorn.py``). The gradient is that of the full unrolled iteration, as in the
    official code.

    ``grad_iterations``: an APPROXIMATION, off by default (``None``: backpropagate through every
    iteration). If set, only the last this many iterations are backpropagated; the earlier ones run
    without autograd and their accumulated row/column offsets are treated as constants. The forward
    value is identical but the gradient is not: at the schedule's temperatures it can have the wrong
    sign or be orders of magnitude too large (tests/test_search.py measures it).
    """
    x = log_alpha
    warm = 0 if grad_iterations is None else max(iterations - grad_iterations, 0)
    if warm:
        with torch.no_grad():
            y = x.detach()
            for _ in range(warm):
                y = torch.log_softmax(torch.log_softmax(y, dim=-1), dim=-2)
            offset = y - x.detach()  # accumulated row + column offsets
        x = x + offset
    for _ in range(iterations - warm):
        x = torch.log_softmax(x, dim=-1)  # rows: each row's entries over its columns
        x = torch.log_softmax(x, dim=-2)  # columns
    return x.exp()


def hungarian(soft: torch.Tensor) -> torch.Tensor:
    """The permutation ``σ`` (``LongTensor[n]``, ``σ[j]`` = expert of gate coordinate ``j``) closest to ``soft``."""
    from scipy.optimize import linear_sum_assignment  # imported here: scipy is slow to import

    rows, cols = linear_sum_assignment(-soft.detach().cpu().double().numpy())
    perm = torch.empty(soft.shape[0], dtype=torch.long)
    perm[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return perm.to(soft.device)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + 1e-6)).sum()


class PermutationSearch(nn.Module):
    """A learned expert permutation shared by one or more gates (see the module docstring).

    Args:
        num_experts: ``n``.
        steps: training forwards of the soft phase; the first training forward after that hardens.
            ``0`` hardens (to the Hungarian assignment of the random init) at the first training forward.
        tau_start, tau_end: Sinkhorn temperature at the first and the last soft step (log-linear).
        iters_start, iters_end: Sinkhorn iterations at the first and last soft step (linear).
        entropy_weight: ``ζ`` of the entropy penalty on ``Π`` (training only).
        noise: scale of the Gumbel noise added to ``log α`` in training (0 in every official config).
        grad_iterations: ``None`` (default): backpropagate through every Sinkhorn iteration, the
            exact gradient of the official code. An integer backpropagates through only the last
            that many: an approximation whose gradient can be wrong in sign and size (see :func:`sinkhorn`).
        init_bound: ``log α`` starts in ``U(-init_bound, init_bound)``.
        prune_below: in the soft phase, permuted weights below this (after renormalising) are set to
            exactly 0 and the rest renormalised. At the low temperatures used, ``Π_soft`` is nearly a
            permutation but none of its entries is exactly 0, so without pruning every expert would be
            computed for every input until hardening. Pruned entries carry < ``prune_below`` of an
            input's weight and a gradient of the same order; ``0`` keeps them all (dense, as the
            official code).
    """

    step: torch.Tensor  # buffers (declared for type checkers)
    hardened: torch.Tensor
    permutation: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        steps: int = 1000,
        *,
        tau_start: float = 1e-3,
        tau_end: float = 1e-7,
        iters_start: int = 20,
        iters_end: int = 150,
        entropy_weight: float = 1e-4,
        noise: float = 0.0,
        grad_iterations: int | None = None,
        init_bound: float = 0.05,
        prune_below: float = 1e-6,
    ) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.steps = check_int("steps", steps, low=0)
        self.tau_start = check_float("tau_start", tau_start, low=0.0, strict=True)
        self.tau_end = check_float("tau_end", tau_end, low=0.0, strict=True)
        self.iters_start = check_int("iters_start", iters_start, low=1)
        self.iters_end = check_int("iters_end", iters_end, low=1)
        self.entropy_weight = check_float("entropy_weight", entropy_weight, low=0.0)
        self.noise = check_float("noise", noise, low=0.0)
        self.prune_below = check_float("prune_below", prune_below, low=0.0)
        self.grad_iterations = None if grad_iterations is None else check_int("grad_iterations", grad_iterations, low=1)
        n = self.num_experts
        self.log_alpha = nn.Parameter(torch.empty(n, n).uniform_(-init_bound, init_bound))  # [n, n]
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))
        self.register_buffer("permutation", torch.arange(n))  # σ, valid once hardened

    # ------------------------------------------------------------------ schedule
    def schedule(self, step: int) -> tuple[float, int]:
        """``(τ, iterations)`` at soft step ``step`` (clamped to the last soft step)."""
        frac = min(step, max(self.steps - 1, 0)) / max(self.steps - 1, 1)
        log_tau = math.log10(self.tau_start) + frac * (math.log10(self.tau_end) - math.log10(self.tau_start))
        iters = round(self.iters_start + frac * (self.iters_end - self.iters_start))
        return 10.0**log_tau, iters

    def soft(self, step: int | None = None, *, noise: bool = False) -> torch.Tensor:
        """``Π_soft [n, n]`` at ``step`` (default: the current step); rows = gate coordinates."""
        tau, iters = self.schedule(int(self.step) if step is None else step)
        log_alpha: torch.Tensor = self.log_alpha
        if noise and self.noise > 0:
            uniform = torch.rand_like(log_alpha).clamp_(1e-10, 1 - 1e-10)
            log_alpha = log_alpha - self.noise * torch.log(-torch.log(uniform))
        return sinkhorn(log_alpha / tau, iters, self.grad_iterations)

    @torch.no_grad()
    def harden(self) -> torch.Tensor:
        """Freeze ``Π`` at the Hungarian assignment of the current soft ``Π``; returns ``σ``."""
        self.permutation.copy_(hungarian(self.soft()))
        self.hardened.fill_(True)
        self._hardened_seen = True
        return self.permutation

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._hardened_seen = bool(self.hardened)

    # ------------------------------------------------------------------ applying it
    def permute(self, routings: list[Routing]) -> list[Routing]:
        """Apply the same ``Π`` to every routing (one per task gate); one call = one schedule step.

        Training: soft ``Π`` while ``step < steps`` (the step counter then advances), then harden
        once and relabel. Eval: relabel by the hard ``Π`` (or by the Hungarian assignment of the
        current soft ``Π`` while the search is still running). The entropy penalty is attached to
        the first routing only, so a shared ``Π`` is penalised once, not once per task.
        """
        if not self._is_hardened():
            if not self.training:
                perm = hungarian(self.soft())
                return [r.relabel(perm.to(r.expert.device)) for r in routings]
            if int(self.step) >= self.steps:
                self.harden()
            else:
                pi = self.soft(noise=True)  # [n, n]
                self.step += 1
                penalty = self.entropy_weight * (_entropy(pi) + _entropy(pi / pi.sum(1, keepdim=True).clamp_min(1e-30)))
                out = [self._soft_permute(r, pi, self.prune_below) for r in routings]
                out[0] = out[0].with_aux_losses(**{ENTROPY_LOSS: penalty})
                return out
        out = [r.relabel(self.permutation.to(r.expert.device)) for r in routings]
        out[0] = replace(out[0], weight=self._tether(out[0].weight))
        return out

    def _tether(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` unchanged, but with ``log α`` in its graph: ``log α`` gets an exact zero gradient.

        Once hardened, ``log α`` no longer shapes the output; without this it would get no gradient
        at all, which ``DistributedDataParallel`` (default settings) reports as an error at the next
        step. Adding the sum of an empty slice adds exactly 0.0 and backpropagates zeros (no NaN,
        whatever the incoming gradient).
        """
        if not (self.log_alpha.requires_grad and torch.is_grad_enabled()):
            return weight
        return weight + self.log_alpha.reshape(-1)[:0].sum().to(weight.dtype)

    #: the hardened flag as last read on the host: torch.compile cannot read a buffer's value, so a
    #: compiled forward is specialised on this (hardening recompiles once)
    _hardened_seen: bool = False

    def _is_hardened(self) -> bool:
        """The hardened flag as a Python bool: eagerly the buffer; while compiling, its last host value.

        The soft phase cannot be compiled: its Sinkhorn schedule (temperature, iteration count) and
        the Hungarian assignment are computed on the host from the step counter.
        """
        if not torch.compiler.is_compiling():
            self._hardened_seen = bool(self.hardened)
        elif not self._hardened_seen:
            raise RuntimeError(
                "torch.compile reached PermutationSearch before it hardened: the soft phase of local "
                f"search (the first {self.steps} training forwards, and evaluation before hardening) "
                "runs eagerly. Run those forwards without torch.compile, then compile the model."
            )
        return self._hardened_seen

    @staticmethod
    def _soft_permute(routing: Routing, pi: torch.Tensor, prune_below: float) -> Routing:
        weights = routing.to_dense() @ pi.to(routing.weight.dtype)  # [T, n] gate coordinates -> experts
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        if prune_below > 0:
            weights = weights.masked_fill(weights < prune_below, 0.0)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return replace(
            Routing.from_dense(weights, aux_losses=routing.aux_losses), dropped_fraction=routing.dropped_fraction
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, steps={self.steps}, hardened={bool(self.hardened)}"
