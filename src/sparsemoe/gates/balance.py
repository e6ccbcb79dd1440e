"""Loss-free load balancing (Wang et al. 2024): a per-expert bias on the selection scores only.

A gate that mixes in :class:`LossFreeBalance` selects its experts by ``score + b`` but weights them by
the unbiased score, and counts how many inputs each expert received in training. After each
optimizer step :func:`update_balance` moves every bias by ``u · sign(mean load − load_i)`` (an
overloaded expert becomes less attractive, an idle one more) and resets the counts, so the balance
needs no auxiliary loss and no gradient ever flows through ``b``.

The bias is a persistent buffer (saved in ``state_dict`` and so in checkpoints); the counts are a
non-persistent buffer that accumulates on the device without a host sync, over every training
forward (micro-batch) since the last update. Under ``torch.distributed`` the counts of all ranks
are summed in one all-reduce, so every rank moves its (replicated) bias identically.

:class:`GlobalBalance` is the other half of what MoE language models balance with: the auxiliary
balance loss ``α · n · Σ_i f_i P_i`` (Switch, GShard, Mixtral, Qwen-MoE) with ``f_i`` counted over the
*global batch* instead of the micro-batch (``balance_scope="global"``, Qwen3-MoE; Qiu et al. 2025,
"Demons in the Detail"). :func:`update_balance` ends a global batch for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.distributed as dist
from torch import nn

from .._validation import check_choice, check_float
from ..routing import count_per_expert

BalanceScope = Literal["batch", "global"]
BALANCE_SCOPES = ("batch", "global")


class LossFreeBalance(nn.Module):
    """Mixin of gates with a loss-free balancing bias; call :meth:`_init_balance` in ``__init__``.

    Buffers: ``balance_bias`` (``float32[n]``, persistent; keep it in float32: steps of ``u = 1e-3``
    vanish in bf16) and ``balance_counts`` (``int64[n]``,
    inputs per expert since the last :func:`update_balance`, not saved). Both are ``None`` (no
    ``state_dict`` key) when the rate is 0 and the gate does not ``keep_bias`` (so existing
    checkpoints of the gate keep loading); a gate that keeps it (sigmoid) selects with a fixed bias
    at rate 0, e.g. one loaded from a trained model.
    """

    balance_bias: torch.Tensor | None
    balance_counts: torch.Tensor | None
    bias_update_rate: float

    def _init_balance(
        self, num_experts: int, bias_update_rate: float, device: torch.device | str | None, *, keep_bias: bool
    ) -> None:
        self.bias_update_rate = check_float("bias_update_rate", bias_update_rate, low=0.0)
        has_bias = keep_bias or self.bias_update_rate > 0
        self.register_buffer("balance_bias", torch.zeros(num_experts, device=device) if has_bias else None)
        # int64: exact at any count, and untouched by a model-wide .to(dtype)
        counts = torch.zeros(num_experts, dtype=torch.long, device=device) if self.bias_update_rate > 0 else None
        self.register_buffer("balance_counts", counts, persistent=False)

    @property
    def balancing(self) -> bool:
        """Whether :func:`update_balance` moves this gate's bias (``bias_update_rate > 0``)."""
        return self.bias_update_rate > 0

    def _biased(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores [..., n] + b``: the selection scores (the bias is a buffer: no gradient)."""
        return scores if self.balance_bias is None else scores + self.balance_bias.to(scores.dtype)

    def _count_load(self, expert: torch.Tensor) -> None:
        """Add the chosen experts ``expert: LongTensor[...]`` to the counts (training only, no sync)."""
        if self.balance_counts is not None and self.training:
            with torch.no_grad():
                counts = count_per_expert(expert.reshape(-1), self.balance_counts.numel())
                self.balance_counts.add_(counts)

    def _apply_update(self, counts: torch.Tensor) -> None:
        """``b += u · sign(mean(counts) − counts)``, then reset the local counts."""
        assert self.balance_bias is not None and self.balance_counts is not None
        with torch.no_grad():
            load = counts.to(torch.float64)
            self.balance_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load).to(self.balance_bias.dtype))
            self.balance_counts.zero_()


class GlobalBalance(nn.Module):
    """Mixin of gates whose balance loss ``α · n · Σ_i f_i P_i`` may count ``f`` over the global batch.

    ``f_i`` is the number of (input, expert ``i``) choices per input (``Σ_i f_i = k``), without
    gradient; ``P_i`` the mean router probability of expert ``i`` over the *local* micro-batch, which
    carries the gradient. ``balance_scope`` says which inputs ``f`` counts:

    - ``"batch"``: the inputs of this forward (one micro-batch on one rank);
    - ``"global"`` (Qwen3-MoE): every input routed in training since the last
      :func:`update_balance` (every micro-batch of the gradient-accumulation step so far, this one
      included) on every rank: each training forward sums its counts over the ranks of
      ``balance_group`` (default: the world) in one all-reduce when ``torch.distributed`` is
      initialised, and adds them to the buffers. So at the last micro-batch of a step ``f`` is the
      global batch's; earlier micro-batches use the running count (as Megatron-Core's global
      auxiliary loss does). Call :func:`update_balance` after each optimizer step (the project's
      training loop does) to start the next global batch; without it ``f`` counts every input since
      the start. In eval the loss uses the batch's ``f`` and leaves the buffers alone.

    Buffers (``"global"`` only, not saved: a global batch ends at each step): ``balance_totals``
    (``float64[n]``, choices per expert) and ``balance_inputs`` (``float64[]``, inputs).
    """

    balance_scope: BalanceScope
    balance_totals: torch.Tensor | None
    balance_inputs: torch.Tensor | None
    #: process group whose ranks share one global batch (``None``: the world)
    balance_group: dist.ProcessGroup | None = None

    def _init_balance_scope(self, num_experts: int, scope: object, device: torch.device | str | None) -> None:
        self.balance_scope = cast(BalanceScope, check_choice("balance_scope", scope, BALANCE_SCOPES))
        is_global = self.balance_scope == "global"
        totals = torch.zeros(num_experts, dtype=torch.float64, device=device) if is_global else None
        inputs = torch.zeros((), dtype=torch.float64, device=device) if is_global else None
        self.register_buffer("balance_totals", totals, persistent=False)
        self.register_buffer("balance_inputs", inputs, persistent=False)

    def _reset_balance_scope(self) -> None:
        """Start a new global batch (zero the accumulated counts)."""
        if self.balance_totals is not None and self.balance_inputs is not None:
            self.balance_totals.zero_()
            self.balance_inputs.zero_()


def choice_fraction(gates: Sequence[GlobalBalance], expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``f: [G, n]``, choices of each expert per input, for the ``G`` gates of one batched call.

    ``expert: LongTensor[T, G, k]`` holds each gate's chosen experts. The gates share their scope
    and training mode (:meth:`Gate.batch_key`); in training with ``balance_scope="global"`` the
    counts are all-reduced and accumulated (see :class:`GlobalBalance`). Never carries a gradient.
    """
    rows, num_gates = expert.shape[0], expert.shape[1]
    with torch.no_grad():
        offsets = num_experts * torch.arange(num_gates, device=expert.device)[:, None]  # [G, 1]
        cells = (expert.transpose(0, 1).reshape(num_gates, -1) + offsets).flatten()
        counts = count_per_expert(cells, num_gates * num_experts).view(num_gates, num_experts).to(torch.float64)
        first = gates[0]
        if first.balance_scope == "batch" or not first.training:
            return counts / max(rows, 1)
        local = torch.cat([counts.flatten(), counts.new_full((1,), float(rows))])  # one collective for all G
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local, group=first.balance_group)
        summed = local[:-1].view(num_gates, num_experts)
        fractions = []
        for g, gate in enumerate(gates):
            totals, inputs = cast(torch.Tensor, gate.balance_totals), cast(torch.Tensor, gate.balance_inputs)
            totals.add_(summed[g])
            inputs.add_(local[-1])
            fractions.append(totals / inputs.clamp(min=1.0))
        return torch.stack(fractions)


def switch_balance_loss(fraction: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``n · Σ_i f_i P_i`` per gate: ``fraction: [G, n]`` (no gradient), ``probs: [T, G, n]`` router probabilities.

    ``P`` is the mean of ``probs`` over the ``T`` local inputs; at a uniform routing the loss is ``k``.
    """
    n = probs.shape[-1]
    return n * (fraction.to(probs.dtype) * probs.mean(0)).sum(-1)


def balanced_gates(model: nn.Module) -> list[LossFreeBalance]:
    """The gates of ``model`` whose bias is updated (``bias_update_rate > 0``), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, LossFreeBalance) and m.balancing]


def discard_balance(model: nn.Module) -> None:
    """Forget the loads counted since the last :func:`update_balance` without moving any bias.

    For a step whose update is thrown away (the training loop's ``nan_policy="skip"``): its routing
    must not steer the next update. Purely local, no collective (every rank skips the same step).
    """
    for module in model.modules() if isinstance(model, nn.Module) else ():
        if isinstance(module, GlobalBalance):
            module._reset_balance_scope()
    for gate in balanced_gates(model):
        cast(torch.Tensor, gate.balance_counts).zero_()


def update_balance(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Update the loss-free balancing bias of every such gate in ``model``; returns how many.

    Call it after each optimizer step (the project's training loop does). Loads are the inputs each
    expert received in every training forward since the last call; under an initialised
    ``torch.distributed`` they are summed over the ranks of ``group`` (default: the world) in one
    all-reduce first, so every rank holds the same bias. Counts are reset afterwards, and so are the
    global-batch counts of gates with ``balance_scope="global"`` (:class:`GlobalBalance`).
    """
    for module in model.modules() if isinstance(model, nn.Module) else ():
        if isinstance(module, GlobalBalance):
            module._reset_balance_scope()
    found = balanced_gates(model)
    if not found:
        return 0
    counts = [cast(torch.Tensor, gate.balance_counts) for gate in found]
    if dist.is_available() and dist.is_initialized():
        flat = torch.cat(counts)  # one collective for every gate of the model
        dist.all_reduce(flat, group=group)
        counts = list(flat.split([c.numel() for c in counts]))
    else:
        counts = [c.clone() for c in counts]
    for gate, total in zip(found, counts, strict=True):
        gate._apply_update(total)
    return len(found)
