"""Token-choice gates: each input picks its experts (noisy top-k, Switch top-1)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from types import MappingProxyType
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_choice, check_float
from ..routing import Routing
from .balance import GlobalBalance, LossFreeBalance, choice_fraction, switch_balance_loss
from .base import Gate, linear_batch, with_z_loss, z_loss_trait


def _cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last dimension, the balance penalty of Shazeer et al. (2017).

    Uses the population variance (divide by ``n``), as the reference implementation does. Several
    vectors stacked as ``[m, n]`` give ``[m]`` penalties in one pass (fewer ops for small models).
    Half precision is computed in float32 (the squares of loads overflow float16); float32 and
    float64 keep their precision.
    """
    if v.shape[-1] <= 1:
        return v.new_zeros(v.shape[:-1])
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    var, mean = torch.var_mean(v, dim=-1, correction=0)
    return var / (mean**2 + 1e-10)


def _smooth_load(
    clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_kp1: torch.Tensor, k: int
) -> torch.Tensor:
    """Expected number of inputs per expert under the noise: a differentiable load, ``[G, n]``.

    ``clean, noisy, noise_std: [T, G, n]``; ``top_kp1: [T, G, k+1]`` holds the ``k + 1`` largest noisy
    logits of each row, in order.
    """
    kth, next_ = top_kp1[..., k - 1 : k], top_kp1[..., k : k + 1]
    # An expert in the top k (noisy >= the k-th value) must beat the (k+1)-th value to stay there;
    # one outside must beat the k-th to get in.
    threshold = torch.where(noisy >= kth, next_, kth)
    return torch.special.ndtr((clean - threshold) / noise_std).sum(0)


BALANCE_LOSSES = ("cv2", "switch")


def _check_balance_form(balance_loss: object, balance_scope: object) -> str:
    """``balance_loss``, checked against ``balance_scope`` (a global batch needs the ``f·P`` form)."""
    form = check_choice("balance_loss", balance_loss, BALANCE_LOSSES)
    if balance_scope == "global" and form == "cv2":
        raise ValueError(
            "balance_scope='global' needs balance_loss='switch' (α·n·Σ f_i P_i): the CV² loss has no token "
            "fraction f to count over a global batch"
        )
    return form


class TopKGate(GlobalBalance, LossFreeBalance, Gate):
    """Noisy top-k gating (Shazeer et al., 2017).

    ``h = W x + b (+ ε · softplus(W_noise x) while training)``; keep the ``k`` largest and softmax
    over them (``normalize=True``, the paper's form), or weight each chosen expert by its softmax
    probability over all ``n`` (``normalize=False``, Switch-style). The balance loss (``aux_losses["load_balance"]``) is
    ``balance_weight · (CV²(importance) + CV²(load))``, with the smooth load estimator when noise is
    on (importance only otherwise); CV² uses the population variance. ``balance_loss="switch"``
    makes it ``balance_weight · n · Σ_i f_i P_i`` instead (GShard/Switch, and Hugging Face's Mixtral
    and Qwen-MoE ``load_balancing_loss_func``: ``f_i`` choices of expert ``i`` per input, ``P_i`` its
    mean softmax probability over all ``n``), whose ``f`` may be counted over the global batch
    (``balance_scope="global"``, Qwen3-MoE, see :class:`~sparsemoe.gates.balance.GlobalBalance`). The router z-loss
    ``z_loss_weight · mean logsumexp(W x + b)²`` (``aux_losses["z_loss"]``) is off by default.

    Args:
        k: experts per input.
        noisy: add the learned Gaussian noise in training. The COMET paper runs without it.
        balance_weight: weight of the balance loss; 0 switches it off (as in the COMET paper).
        normalize: softmax over the ``k`` chosen logits (weights sum to 1). With ``k=1`` that weight
            is always exactly 1, so the task loss gives the router no gradient at all (only the
            balance loss trains it): pass ``normalize=False`` there, which keeps the chosen
            experts' probabilities over all ``n`` experts (as Switch does) and so their gradient.
        z_loss_weight: weight of the router z-loss (ST-MoE uses 1e-3); 0 is off.
        balance_loss: ``"cv2"`` (Shazeer et al.) or ``"switch"`` (``n · Σ_i f_i P_i``).
        balance_scope: which inputs ``f`` counts with ``balance_loss="switch"``: ``"batch"`` (this
            forward) or ``"global"`` (every micro-batch and rank since the last
            :func:`sparsemoe.update_balance`).
        bias_update_rate: loss-free balancing (Wang et al. 2024, see :mod:`sparsemoe.gates.balance`):
            select by ``logits + b`` but weight by the unbiased logits, ``b`` moved by
            :func:`sparsemoe.update_balance`; 0 (the default) is off.
    """

    aux_losses = MappingProxyType(
        {
            "load_balance": 'CV² of importance and load, or α·n·Σᵢ fᵢPᵢ with `balance_loss="switch"` '
            '(fᵢ over the micro-batch or, `balance_scope="global"`, the global batch), times `balance_weight`',
            **z_loss_trait("Wx+b"),
        }
    )
    summary = (
        "noisy top-k (Shazeer et al. 2017); `noisy=`, `balance_weight=` switch noise/loss off; "
        "`normalize=False`: Switch-style weights (a router gradient at k=1)"
    )

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        noisy: bool = True,
        balance_weight: float = 1e-2,
        normalize: bool = True,
        z_loss_weight: float = 0.0,
        balance_loss: str = "cv2",
        balance_scope: str = "batch",
        bias_update_rate: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_float("bias_update_rate", bias_update_rate, low=0.0)
        check_choice("balance_scope", balance_scope, ("batch", "global"))
        form = _check_balance_form(balance_loss, balance_scope)
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight)
        self._init_balance(num_experts, bias_update_rate, device, keep_bias=False)
        self._init_balance_scope(num_experts, balance_scope, device)
        self.balance_loss = form
        self.noisy = bool(noisy)
        self.normalize = bool(normalize)
        self.balance_weight = check_float("balance_weight", balance_weight, low=0.0)
        self.proj = nn.Linear(d_in, num_experts, device=device, dtype=dtype)
        self.noise_proj = nn.Linear(d_in, num_experts, device=device, dtype=dtype) if self.noisy else None
        if self.noise_proj is not None:
            nn.init.zeros_(self.noise_proj.weight)
            nn.init.zeros_(self.noise_proj.bias)

    def batch_key(self) -> Hashable:
        biased = self.balance_bias is not None
        form = (self.balance_loss, self.balance_scope)
        return (self.noisy, self.balance_weight, *form, self.normalize, biased, self.proj.weight.dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        return self.route_batch([self], x, ids)[0]

    @classmethod
    def route_batch(cls, gates: Sequence[Gate], x: torch.Tensor, ids: torch.Tensor | None) -> list[Routing]:
        topks = cast(Sequence[TopKGate], gates)
        first, rows, num_gates = topks[0], x.shape[0], len(topks)
        n, k = first.num_experts, first.k
        clean = linear_batch(x, [g.proj for g in topks]).view(rows, num_gates, n)  # [T, G, n]
        logits, noise_std = clean, None
        if first.noisy and first.training:
            noise_proj = [cast(nn.Linear, g.noise_proj) for g in topks]
            noise_std = F.softplus(linear_batch(x, noise_proj).view_as(clean)) + 1e-2
            logits = clean + torch.randn_like(clean) * noise_std
        balance = first.balance_weight > 0 and first.training and rows > 0
        smooth_load = balance and first.balance_loss == "cv2" and noise_std is not None and k < n
        z_loss = first._z_loss(clean)  # [G] or None
        select = logits
        biased = first.balance_bias is not None
        if biased:  # loss-free balancing: select by logits + b, weight by the logits
            bias = torch.stack([cast(torch.Tensor, g.balance_bias) for g in topks]).to(logits.dtype)  # [G, n]
            select, clean = logits + bias, clean + bias
        # The smooth load needs the (k+1)-th value too: one topk serves both.
        top_values, top_idx = select.topk(k + 1 if smooth_load else k, dim=-1)  # [T, G, k(+1)]
        top_idx = top_idx[..., :k]
        for g, gate in enumerate(topks):
            gate._count_load(top_idx[:, g])
        if biased and first.normalize:
            weights = torch.softmax(logits.gather(-1, top_idx), dim=-1)  # [T, G, k], unbiased
        elif first.normalize:
            weights = torch.softmax(top_values[..., :k], dim=-1)  # [T, G, k]
        else:  # each chosen expert's (unbiased) probability over all n
            weights = torch.softmax(logits, dim=-1).gather(-1, top_idx)  # [T, G, k]
        aux: list[dict[str, torch.Tensor]] = [{} for _ in topks]
        if balance and first.balance_loss == "switch":
            fraction = choice_fraction(topks, top_idx, n)  # [G, n], no gradient
            penalty = switch_balance_loss(fraction, torch.softmax(logits, dim=-1))  # [G]
            aux = [{"load_balance": first.balance_weight * p} for p in penalty.unbind(0)]
        elif balance:
            # Gate g's expert e is cell g·n + e of one [G·n] sum (one gate: the same sum, in the same order).
            cells = top_idx if num_gates == 1 else top_idx + n * torch.arange(num_gates, device=x.device)[:, None]
            importance = logits.new_zeros(num_gates * n).index_add(0, cells.flatten(), weights.flatten())
            importance = importance.view(num_gates, n)
            if smooth_load:
                assert noise_std is not None
                load = _smooth_load(clean, select, noise_std, top_values, k)  # [G, n]
                penalty = _cv_squared(torch.stack([importance, load], dim=1)).sum(-1)  # [G]
            else:
                penalty = _cv_squared(importance)
            aux = [{"load_balance": first.balance_weight * p} for p in penalty.unbind(0)]
        aux = with_z_loss(aux, z_loss)
        return [Routing.from_topk(top_idx[:, g], weights[:, g], n, aux_losses=aux[g]) for g in range(num_gates)]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, noisy={self.noisy}, balance_weight={self.balance_weight}, "
            f"normalize={self.normalize}, z_loss_weight={self.z_loss_weight}, balance_loss={self.balance_loss!r}, "
            f"balance_scope={self.balance_scope!r}, bias_update_rate={self.bias_update_rate}"
        )


class SwitchGate(GlobalBalance, Gate):
    """Switch Transformer routing (Fedus et al., 2022): top-1 of ``softmax(W x)``.

    The weight is the chosen expert's probability. Losses: load balancing
    ``α · n · Σ_i f_i P_i`` (``aux_losses["load_balance"]``) and router z-loss
    ``β · mean(logsumexp(W x)²)`` (``aux_losses["z_loss"]``, Zoph et al., 2022).

    Switch's capacity (each expert takes at most ``ceil(c · T / n)`` inputs, the rest dropped and
    reported) is the layer's drop limit, the same for every gate: ``MoE(..., gate="switch",
    capacity_limit=1.25)``.

    Args:
        balance_weight: ``α`` (0.01 in the paper).
        z_loss_weight: ``β`` (1e-3 in ST-MoE).
        balance_scope: ``"batch"`` counts ``f`` over this forward; ``"global"`` over every
            micro-batch and rank since the last :func:`sparsemoe.update_balance` (Qwen3-MoE, see
            :class:`~sparsemoe.gates.balance.GlobalBalance`).
    """

    k_policy = "fixed"
    aux_losses = MappingProxyType(
        {
            "load_balance": 'α·n·Σᵢ fᵢPᵢ, fᵢ over the micro-batch or (`balance_scope="global"`) the global batch',
            **z_loss_trait("Wx"),
        }
    )
    summary = "top-1 of `softmax(Wx)` (Fedus et al.); its capacity is the layer's `capacity_limit=`"
    k_note = "1"

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        *,
        balance_weight: float = 1e-2,
        z_loss_weight: float = 1e-3,
        balance_scope: str = "batch",
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_choice("balance_scope", balance_scope, ("batch", "global"))
        super().__init__(d_in, num_experts, k=1, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight)
        self._init_balance_scope(num_experts, balance_scope, device)
        self.balance_weight = check_float("balance_weight", balance_weight, low=0.0)
        self.proj = nn.Linear(d_in, num_experts, bias=False, device=device, dtype=dtype)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        logits = self.proj(x)  # [T, n]
        probs = torch.softmax(logits, dim=-1)
        weight, expert = probs.max(dim=-1)  # [T]
        aux = {}
        if x.shape[0] > 0:
            fraction = choice_fraction([self], expert[:, None, None], self.num_experts)  # [1, n], no gradient
            aux["load_balance"] = self.balance_weight * switch_balance_loss(fraction, probs[:, None])[0]
        if (z_loss := self._z_loss(logits)) is not None:
            aux["z_loss"] = z_loss
        return Routing.from_topk(expert[:, None], weight[:, None], self.num_experts, aux_losses=aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, balance_weight={self.balance_weight}, z_loss_weight={self.z_loss_weight}, "
            f"balance_scope={self.balance_scope!r}"
        )
