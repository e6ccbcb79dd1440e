"""DeepSeek-V3 routing: sigmoid scores, bias-balanced top-k selection, group-limited routing."""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from .._validation import check_float, check_int
from ..routing import Routing
from .balance import LossFreeBalance
from .base import Gate, IdKind, z_loss_trait

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class SigmoidGate(LossFreeBalance, Gate):
    """DeepSeek-V3 routing: top-k of ``sigmoid(Wx) + b``, weighted by the unbiased scores.

    ``s = sigmoid(W x)`` (computed in float32 when the gate or the input is fp16/bf16). The ``k``
    experts are **selected** by the largest ``s + b``, where ``b`` is the loss-free balancing bias
    (a buffer moved by :func:`sparsemoe.update_balance`, see :mod:`sparsemoe.gates.balance`); their
    **weights** are the unbiased ``s``, divided by their sum over the ``k`` (``normalize=True``) and
    multiplied by ``route_scale``.

    Group-limited routing (``num_groups > 1``): the ``n`` experts form ``num_groups`` equal groups;
    a group's score is the sum of its two largest biased scores, and only the experts of the
    ``topk_groups`` best groups of each input may be chosen (DeepSeek-V3 limits each token to few
    nodes this way).

    Args:
        k: experts per input. With ``k=1`` and ``normalize=True`` the weight is exactly 1, so the
            router learns nothing from the task loss: use ``normalize=False`` there.
        normalize: divide the ``k`` weights by their sum.
        route_scale: factor on the weights (DeepSeek-V3 uses 2.5 with 256 experts).
        num_groups: expert groups (must divide ``num_experts``); 1 is no group limit.
        topk_groups: groups kept per input (default: all, no limit).
        bias_update_rate: ``u`` of the bias update (1e-3 as DeepSeek-V3); 0 switches it off.
        seq_balance_weight: ``α`` of DeepSeek-V3's complementary sequence-wise balance loss
            ``α · Σ_i f_i P_i`` per sequence, averaged over sequences (``aux_losses["seq_balance"]``,
            training only); 0 (the default) is off, ~1e-4 when on. The sequences are the distinct
            ``ids`` (the gate then reads the sequence index, see :meth:`id_kind`; the Transformer
            blocks pass it); without ids the whole batch counts as one sequence. Finding the
            sequences costs one host sync per training forward.
        z_loss_weight: router z-loss on the logits ``W x`` before the sigmoid (in float32 like the
            scores; see :class:`~sparsemoe.gates.base.Gate`); 0 is off.
    """

    aux_losses = MappingProxyType(
        {"seq_balance": "α·Σᵢ fᵢPᵢ per sequence (DeepSeek-V3), with `seq_balance_weight=` > 0", **z_loss_trait("Wx")}
    )
    summary = (
        "DeepSeek-V3: top-k of `sigmoid(Wx) + b`, unbiased weights; loss-free balancing bias "
        "(`bias_update_rate=`, `sparsemoe.update_balance`), `num_groups=`/`topk_groups=`, `route_scale=`"
    )

    def __init__(
        self,
        d_in: int,
        num_experts: int,
        k: int = 2,
        *,
        normalize: bool = True,
        route_scale: float = 1.0,
        num_groups: int = 1,
        topk_groups: int | None = None,
        bias_update_rate: float = 1e-3,
        seq_balance_weight: float = 0.0,
        z_loss_weight: float = 0.0,
        check_finite: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        # every check before any state is built
        n = check_int("num_experts", num_experts, low=1)
        k = check_int("k", k, low=1, high=n)
        route_scale = check_float("route_scale", route_scale, low=0.0, strict=True)
        num_groups = check_int("num_groups", num_groups, low=1, high=n)
        if n % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide num_experts={n} (groups are of equal size)")
        topk_groups = num_groups if topk_groups is None else topk_groups
        topk_groups = check_int("topk_groups", topk_groups, low=1, high=num_groups)
        if k > topk_groups * (n // num_groups):
            raise ValueError(
                f"k={k} exceeds the {topk_groups * (n // num_groups)} experts of topk_groups={topk_groups} "
                f"groups of {n // num_groups}; lower k or raise topk_groups"
            )
        seq_balance_weight = check_float("seq_balance_weight", seq_balance_weight, low=0.0)
        check_float("bias_update_rate", bias_update_rate, low=0.0)
        super().__init__(d_in, num_experts, k, check_finite=check_finite, dtype=dtype, z_loss_weight=z_loss_weight)
        self.normalize = bool(normalize)
        self.route_scale = route_scale
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.seq_balance_weight = seq_balance_weight
        self.proj = nn.Linear(d_in, num_experts, bias=False, device=device, dtype=dtype)
        self._init_balance(num_experts, bias_update_rate, device, keep_bias=True)

    def id_kind(self) -> IdKind | None:
        """``"sequence"`` when the sequence-wise balance loss is on (it reads the sequences), else ``None``."""
        return "sequence" if self.seq_balance_weight > 0 else None

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        weight = self.proj.weight
        if weight.dtype in _LOW_PRECISION or x.dtype in _LOW_PRECISION:
            logits = x.float() @ weight.float().t()  # [T, n], the router in float32
        else:
            logits = self.proj(x)  # [T, n]
        scores = torch.sigmoid(logits)
        top_idx = self.select(scores)  # [T, k]
        weights = scores.gather(-1, top_idx)  # [T, k], unbiased
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        self._count_load(top_idx)
        aux = {}
        if self.training and self.seq_balance_weight > 0 and x.shape[0] > 0:
            aux["seq_balance"] = self.seq_balance_weight * self._seq_balance(scores, top_idx, ids)
        if (z_loss := self._z_loss(logits)) is not None:
            aux["z_loss"] = z_loss
        return Routing.from_topk(top_idx, weights.to(x.dtype), self.num_experts, aux_losses=aux)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """``LongTensor[T, k]``: the experts chosen for sigmoid ``scores: [T, n]`` (bias and groups applied)."""
        choice = self._biased(scores.detach())  # [T, n]; selection takes no gradient
        if self.num_groups > 1 and self.topk_groups < self.num_groups:
            rows, size = choice.shape[0], self.num_experts // self.num_groups
            grouped = choice.view(rows, self.num_groups, size)  # [T, G, n/G]
            group_score = grouped.topk(min(2, size), dim=-1).values.sum(-1)  # [T, G]
            kept = group_score.topk(self.topk_groups, dim=-1).indices  # [T, topk_groups]
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept, False)
            choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(rows, self.num_experts)
        return choice.topk(self.k, dim=-1).indices

    def _seq_balance(self, scores: torch.Tensor, top_idx: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Mean over sequences of ``Σ_i f_i P_i``.

        ``f_i = n/(k·L) · #inputs choosing i`` and ``P_i`` the mean of ``s_i / Σ_j s_j`` over the
        sequence's ``L`` inputs (DeepSeek-V3, eqs. 17-20); the gradient flows through ``P`` only.
        """
        rows, n = scores.shape
        if ids is None:
            seq, num_seq = torch.zeros(rows, dtype=torch.long, device=scores.device), 1
        else:
            uniq, seq = torch.unique(ids, return_inverse=True)  # one host sync (sizes the output)
            num_seq = uniq.numel()
        length = torch.bincount(seq, minlength=num_seq).to(scores.dtype)[:, None]  # [S, 1]
        chosen = torch.zeros_like(scores).scatter_(1, top_idx, 1.0)  # [T, n]
        probs = scores / scores.sum(-1, keepdim=True)  # [T, n]
        f = scores.new_zeros(num_seq, n).index_add(0, seq, chosen) * (n / self.k) / length  # [S, n]
        p = scores.new_zeros(num_seq, n).index_add(0, seq, probs) / length  # [S, n]
        return (f * p).sum(-1).mean()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalize={self.normalize}, route_scale={self.route_scale}, "
            f"num_groups={self.num_groups}, topk_groups={self.topk_groups}, "
            f"bias_update_rate={self.bias_update_rate}, seq_balance_weight={self.seq_balance_weight}"
        )
