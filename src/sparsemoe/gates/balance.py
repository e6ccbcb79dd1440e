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
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from .._validation import check_float
from ..routing import count_per_expert


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


def balanced_gates(model: nn.Module) -> list[LossFreeBalance]:
    """The gates of ``model`` whose bias is updated (``bias_update_rate > 0``), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, LossFreeBalance) and m.balancing]


def update_balance(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Update the loss-free balancing bias of every such gate in ``model``; returns how many.

    Call it after each optimizer step (the project's training loop does). Loads are the inputs each
    expert received in every training forward since the last call; under an initialised
    ``torch.distributed`` they are summed over the ranks of ``group`` (default: the world) in one
    all-reduce first, so every rank holds the same bias. Counts are reset afterwards.
    """
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
