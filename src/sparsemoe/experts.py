"""Experts: ``n`` feed-forward networks whose weights are stacked for grouped matmuls."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice, check_int
from .kernels import Backend, expert_offsets, grouped_matmul, resolve_backend, weighted_combine

EXPERT_KINDS = ("mlp", "swiglu", "linear")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,
    "silu": F.silu,
    "identity": lambda t: t,
}
__all__ = [
    "ACTIVATIONS",
    "EXPERT_KINDS",
    "ExpertBank",
    "ModuleExperts",
    "StackedExperts",
]


class ExpertBank(nn.Module):
    """Interface of a set of experts as the dispatcher sees it.

    ``forward_sorted(xs, counts)`` runs rows already sorted by expert (``counts[e]`` rows for expert
    ``e``, in order); the default loops over :meth:`forward_expert`, so any list of modules (CNN
    experts, say) works. Banks with stacked weights override it with one grouped matmul.

    Attributes:
        num_experts: number of experts ``n``.
        d_out: width of each expert's output (its last dimension), or ``None`` if unknown.
        input_dims: how many trailing dimensions of the layer input one row of an expert takes
            (1 for vectors; 3 for ``[C, H, W]`` images); the dimensions before them are leading
            (batch) dimensions that the layer flattens.

    Shape:
        ``forward_sorted(xs [N, *in], counts LongTensor[n]) -> [N, *out]``.
    """

    num_experts: int
    d_out: int | None = None
    input_dims: int = 1

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Apply expert ``expert`` to the rows ``x``: the plain reference path."""
        raise NotImplementedError

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        chunks = xs.split(counts.tolist())
        outputs = [self.forward_expert(e, chunk) for e, chunk in enumerate(chunks) if chunk.shape[0]]
        if not outputs:  # no rows at all: ask expert 0 for the output shape
            return self.forward_expert(0, xs)
        return torch.cat(outputs)

    def forward_combined(
        self, x: torch.Tensor, token: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, num_inputs: int
    ) -> torch.Tensor:
        """Gather, experts and combine: what the dispatcher calls for one routing.

        ``token`` and ``weight`` are the pairs' input rows and combine weights sorted by expert,
        ``counts[e]`` pairs for expert ``e``. The default gathers the rows, runs
        :meth:`forward_sorted` and combines; banks with kernels that fuse these steps override it.

        Shape: ``x [T, *in]``, ``token LongTensor[N]``, ``counts LongTensor[n]``, ``weight [N]`` ->
        ``[T, *out]`` with ``T = num_inputs``.
        """
        ys = self.forward_sorted(x.index_select(0, token), counts)  # [N, *out], grouped by expert
        return weighted_combine(ys, token, weight, num_inputs)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``x: [T, *in] -> [n, T, *out]`` (the dense path of a softmax gate).

        The default goes through :meth:`forward_sorted` (rows repeated once per expert), the one
        bulk interface every bank has (expert-parallel banks compute rows only in bulk).
        """
        n, num_rows = self.num_experts, x.shape[0]
        counts = torch.full((n,), num_rows, dtype=torch.long, device=x.device)
        ys = self.forward_sorted(x.repeat(n, *([1] * (x.dim() - 1))), counts)  # [n·T, *out], expert-major
        return ys.view(n, num_rows, *ys.shape[1:])


class ModuleExperts(ExpertBank):
    """Experts given as arbitrary modules (one per expert), run one after another.

    Args:
        experts: one module per expert, each mapping ``[rows, *in] -> [rows, *out]``.
        d_out: width of their output (what towers after a multi-task layer are sized from).
        input_dims: number of trailing input dimensions one expert row takes (3 for images).
    """

    def __init__(self, experts: Sequence[nn.Module], *, d_out: int | None = None, input_dims: int = 1) -> None:
        super().__init__()
        if len(experts) < 1:
            raise ValueError("experts must hold at least one module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)
        self.d_out = None if d_out is None else check_int("d_out", d_out, low=1)
        self.input_dims = check_int("input_dims", input_dims, low=1)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[expert](x)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul on ``x``'s device in, or ``None`` outside autocast."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


class StackedExperts(ExpertBank):
    """``n`` experts of the same shape with weights stacked as ``[n, d_in, d_hidden]`` tensors.

    Kinds:
        ``mlp``: ``act(x W1 + b1) W2 + b2``.
        ``swiglu``: ``(silu(x Wg) * (x Wu)) W2`` (Wg and Wu stored side by side in ``w1``).
        ``linear``: ``act(x W1 + b1)``, a single layer as in the COMET paper's experts.

    Args:
        num_experts: ``n``.
        d_in: input width.
        d_hidden: hidden width (``mlp``/``swiglu``); ignored by ``linear``.
        d_out: output width (default ``d_in``; for ``linear`` the layer's width).
        kind: one of ``mlp``, ``swiglu``, ``linear``.
        activation: ``gelu``, ``gelu_tanh``, ``relu``, ``silu`` or ``identity`` (``mlp``/``linear``).
        bias: learn biases.
        device, dtype: where and in which dtype to create the weights (as ``torch.nn.Linear``).

    Under ``torch.autocast`` the grouped matmuls run in the autocast dtype (the weights are cast
    per call, as autocast does for ``torch.nn.Linear``).

    Shape:
        ``forward_sorted(xs [N, d_in], counts LongTensor[n]) -> [N, d_out]``.
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_hidden: int | None = None,
        d_out: int | None = None,
        *,
        kind: str = "mlp",
        activation: str = "gelu",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = check_int("num_experts", num_experts, low=1)
        self.d_in = check_int("d_in", d_in, low=1)
        self.kind = check_choice("expert", kind, EXPERT_KINDS)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.d_out = check_int("d_out", d_out if d_out is not None else d_in, low=1)
        if kind == "linear":
            self.d_hidden = self.d_out
            self.w1 = nn.Parameter(torch.empty(num_experts, d_in, self.d_out, device=device, dtype=dtype))
            self.w2 = None
        else:
            if d_hidden is None:
                raise ValueError(f"d_hidden is required for expert={kind!r}")
            self.d_hidden = check_int("d_hidden", d_hidden, low=1)
            width1 = 2 * d_hidden if kind == "swiglu" else d_hidden
            self.w1 = nn.Parameter(torch.empty(num_experts, d_in, width1, device=device, dtype=dtype))
            self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, self.d_out, device=device, dtype=dtype))
        self.b1 = (
            nn.Parameter(torch.zeros(num_experts, self.w1.shape[-1], device=device, dtype=dtype)) if bias else None
        )
        self.b2 = (
            nn.Parameter(torch.zeros(num_experts, self.d_out, device=device, dtype=dtype))
            if bias and self.w2 is not None
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per-expert ``nn.Linear``-style init: ``U(±1/sqrt(fan_in))``."""
        with torch.no_grad():
            for w in (self.w1, self.w2):
                if w is not None:
                    bound = 1 / math.sqrt(w.shape[1])
                    w.uniform_(-bound, bound)
            for b, w in ((self.b1, self.w1), (self.b2, self.w2)):
                if b is not None and w is not None:
                    bound = 1 / math.sqrt(w.shape[1])
                    b.uniform_(-bound, bound)

    def _hidden(
        self,
        x: torch.Tensor,
        matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        bias: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """First layer and activation (all of a ``linear`` expert), written once for every path."""
        h = matmul(x, self.w1)
        if self.b1 is not None:
            h = h + bias(self.b1)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return ACTIVATIONS[self.activation](h)

    def _forward(
        self,
        x: torch.Tensor,
        matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        bias: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The expert network, written once for both the grouped and the single-expert path."""
        h = self._hidden(x, matmul, bias)
        if self.w2 is None:
            return h
        y = matmul(h, self.w2)
        if self.b2 is not None:
            y = y + bias(self.b2)
        return y

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, lambda rows, w: rows @ w[expert], lambda b: b[expert])

    def forward_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        compute = _autocast_dtype(xs)
        if compute is not None:  # the custom matmul is not on autocast's op list: cast here, as autocast would
            xs = xs.to(compute)
        offsets = expert_offsets(counts)
        return self._forward(
            xs,
            lambda rows, w: grouped_matmul(rows, w if compute is None else w.to(compute), offsets),
            lambda b: (b if compute is None else b.to(compute)).repeat_interleave(
                counts, dim=0, output_size=xs.shape[0]
            ),
        )

    def forward_combined(
        self,
        x: torch.Tensor,
        token: torch.Tensor,
        counts: torch.Tensor,
        weight: torch.Tensor,
        num_inputs: int,
        *,
        backend: Backend | None = None,
    ) -> torch.Tensor:
        """The gather inside the first grouped GEMM and the combine inside the last, by the kernel backend.

        ``backend`` defaults to :func:`sparsemoe.kernels.resolve_backend`'s choice for ``x`` (the
        ``"torch"`` kernels unless another backend was chosen and takes the call); tests pass their
        own (the Triton kernels in Triton's CPU interpreter). The expert boundaries stay on the
        device. ``linear`` experts (the activation follows their only GEMM) and a second-layer bias
        (it sits between the product and the combine weight) keep the plain combine after the last GEMM.

        Shape: as :meth:`ExpertBank.forward_combined`.
        """
        compute = _autocast_dtype(x)  # the custom matmuls are not on autocast's op list: cast, as autocast would
        ops = backend if backend is not None else resolve_backend(x, compute)
        offsets = expert_offsets(counts)  # [n], on the device: no host read

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if compute is None else t.to(compute)

        def rows_bias(b: torch.Tensor) -> torch.Tensor:
            return cast(b).repeat_interleave(counts, dim=0, output_size=token.shape[0])

        h = self._hidden(x, lambda rows, w: ops.gather_matmul(rows, token, cast(w), offsets, compute), rows_bias)
        if self.w2 is None:
            return weighted_combine(h, token, weight, num_inputs)
        if self.b2 is not None:
            y = grouped_matmul(h, cast(self.w2), offsets) + rows_bias(self.b2)
            return weighted_combine(y, token, weight, num_inputs)
        return ops.matmul_combine(h, cast(self.w2), offsets, token, weight, num_inputs)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, d_in] -> [n, T, d_out]`` as batched GEMMs, with no sorting or gathering."""
        return self._forward(x, torch.matmul, lambda b: b.unsqueeze(1))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_in={self.d_in}, d_hidden={self.d_hidden}, "
            f"d_out={self.d_out}, kind={self.kind!r}, activation={self.activation!r}, "
            f"bias={self.b1 is not None}"
        )
