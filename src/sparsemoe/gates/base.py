"""The gate interface: ``[T, d]`` inputs in, a :class:`~sparsemoe.routing.Routing` out."""

from __future__ import annotations

import warnings
from typing import ClassVar, Literal

import torch
from torch import nn

from .._validation import check_dtype, check_ids, check_input, check_int
from ..routing import Routing

KPolicy = Literal["choose", "dense", "fixed"]


class Gate(nn.Module):
    """Base class of every gate.

    Subclasses implement :meth:`route`; :meth:`forward` validates the input first, so every gate
    rejects bad input the same way. Layers validate once themselves and call :meth:`route`.

    A subclass declares how its ``k`` is set, so that callers never special-case gate names:
    ``k_policy = "choose"`` (the caller may pass ``k``; the constructor's default otherwise),
    ``"dense"`` (always all ``n`` experts) or ``"fixed"`` (the constructor sets it).

    Args:
        d_in: width of the gate input.
        num_experts: number of experts ``n``.
        k: experts per input, where the gate has such a knob (``1 <= k <= n``).
        check_finite: reject inputs with NaN/inf (one reduction; switch off for speed).

    Shape:
        ``forward(x [T, d_in], ids LongTensor[T] | None) -> Routing`` of ``T`` inputs.
    """

    k_policy: ClassVar[KPolicy] = "choose"

    def __init__(self, d_in: int, num_experts: int, k: int = 1, *, check_finite: bool = True) -> None:
        super().__init__()
        self.d_in = check_int("d_in", d_in, low=1)
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.k = check_int("k", k, low=1, high=num_experts)
        self.check_finite = check_finite

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Routing:
        """Route ``x: [T, d_in]``; ``ids: LongTensor[T]`` is read by gates that use ids."""
        check_input(x, self.d_in, check_finite=self.check_finite)
        check_dtype(x, self, layer=type(self).__name__)
        if x.dim() != 2:
            raise ValueError(f"x must have shape [T, {self.d_in}], got {tuple(x.shape)}")
        if ids is not None:
            ids = check_ids(ids, x.shape[0])
        return self.route(x, ids)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        """Route already validated input ``x: [T, d_in]`` (``ids`` already checked)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_experts={self.num_experts}, k={self.k}"


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy along ``dim`` with the ``+1e-6`` of the official DSelect-k/COMET code.

    The offset keeps the gradient finite at ``p = 0`` (where ``p log p`` has slope ``-inf``).
    """
    return -(p * torch.log(p + 1e-6)).sum(dim)


def uniform_(tensor: torch.Tensor, bound: float) -> torch.Tensor:
    """In-place ``U(-bound, bound)`` init without autograd tracking."""
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def uniform_linear(
    d_in: int,
    d_out: int,
    weight_bound: float,
    bias_bound: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Linear:
    """``nn.Linear`` initialised ``U(±weight_bound)``, ``U(±bias_bound)`` (the official gates' init).

    ``d_out`` may be 0 (a one-expert tree has no splits).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        layer = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    uniform_(layer.weight, weight_bound)
    uniform_(layer.bias, bias_bound)
    return layer
