"""The two kernels of the fast dispatch path, as autograd Functions (eager) and custom ops (compile).

``grouped_matmul``: ``xs[rows of e] @ weight[e]`` for rows sorted by expert; ``combine``: the
weighted scatter-add of expert outputs back to their inputs. Each is written once as a plain kernel
(no autograd) and exposed twice:

- **eager**: a ``torch.autograd.Function`` (about 7 µs less per call than a custom op, which counts
  for small models). Its backward calls the kernels directly; when a higher-order graph is requested
  (``create_graph=True``, i.e. grad mode is on inside backward) it calls the differentiable custom
  ops instead, so double backward (gradient penalties, MAML inner loops) gets real gradients.
- **torch.compile**: ``torch.library.custom_op`` with a fake (shape-only) implementation and a
  registered backward. The expert boundaries travel as an ``offsets`` tensor on the device, so the
  traced graph holds no host synchronisation; only the CPU kernel reads them on the host, inside
  the opaque op. No output size depends on data.

Shape notes use ``N`` rows (pairs), ``n`` experts, ``d`` input and ``h`` output width, ``T`` inputs.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(xs: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` can take ``xs: [N, d]`` and ``weight: [n, d, h]``.

    It needs float32/bf16/fp16 and rows whose byte strides are multiples of 16.
    """
    return _supported(xs.dtype, weight.dtype, weight.shape[1:])


def _supported(dtype: torch.dtype, other: torch.dtype, dims: tuple[int, ...] | torch.Size) -> bool:
    if not hasattr(F, "grouped_mm") or dtype not in _GROUPED_MM_DTYPES or other != dtype:
        return False
    size = dtype.itemsize
    return all((dim * size) % 16 == 0 for dim in dims)


def _segments(offsets: torch.Tensor) -> list[tuple[int, slice]]:
    """``(expert, rows)`` of every non-empty expert from the end offsets (reads them on the host)."""
    bounds, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            bounds.append((expert, slice(start, end)))
        start = end
    return bounds


# ------------------------------------------------------------------------------------------ kernels
def grouped_mm_kernel(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[N, d] x [n, d, h] -> [N, h]``: one ``grouped_mm`` where supported, else a loop of ``mm``.

    ``offsets: int32[n]`` is the running end row of each expert (``cumsum`` of the counts).
    """
    if xs.shape[0] == 0:  # also spares grouped_mm the stride-0 views of empty gradients
        return xs.new_zeros(0, weight.shape[-1])
    if grouped_mm_supported(xs, weight):
        if not (weight.is_contiguous() or weight.transpose(1, 2).is_contiguous()):
            weight = weight.contiguous()  # e.g. the stride-0 gradient of a sum, in double backward
        return F.grouped_mm(xs, weight, offs=offsets)
    out = xs.new_empty(xs.shape[0], weight.shape[-1])
    for e, rows in _segments(offsets):
        torch.mm(xs[rows], weight[e], out=out[rows])
    return out


def zero_empty_groups(
    grad_weight: torch.Tensor, offsets: torch.Tensor, *, sync_free: bool | None = None
) -> torch.Tensor:
    """Set to 0, in place, the ``[d, h]`` slot of every expert with no rows.

    ``grouped_mm``'s weight gradient may leave zero-size groups uninitialised (reported on some
    GPUs). On the device this is one masked fill with no host sync; on CPU, where reading the
    offsets costs nothing, only the empty slots are written. ``sync_free`` picks the first way
    (default: on CUDA).
    """
    if grad_weight.is_cuda if sync_free is None else sync_free:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))  # [n]
        return grad_weight.masked_fill_((counts == 0).view(-1, *([1] * (grad_weight.dim() - 1))), 0)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end == start:
            grad_weight[expert].zero_()
        start = end
    return grad_weight


#: On CPU, ``grouped_mm``'s fused weight gradient beats the per-expert loop for small problems (one
#: call instead of ~5 ops per expert: 0.62x the loop's time at N=1000, d=100, h=16, n=8; 0.78x at
#: h=64) and ties it from ~10^8 multiply-adds up (0.98-1.03x at N=8192, d=512, h=2048, n=16; torch
#: 2.13, one thread), where the loop, which needs no zeroing pass, is kept.
CPU_FUSED_WEIGHT_GRAD_MACS = 2**25


def _use_fused_weight_grad(xs: torch.Tensor, grad: torch.Tensor) -> bool:
    """GPU: ``grouped_mm``'s weight gradient is one fused kernel. CPU: only for small problems."""
    if not _supported(xs.dtype, grad.dtype, (xs.shape[1], grad.shape[1])):
        return False
    return grad.is_cuda or xs.shape[0] * xs.shape[1] * grad.shape[1] <= CPU_FUSED_WEIGHT_GRAD_MACS


def _fused_weight_grad(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(xs.t(), grad, offs=offsets)


def weight_grad_kernel(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``out[e] = xs[rows of e]^T @ grad[rows of e]``: ``[N, d], [N, h] -> [n, d, h]``.

    Experts without rows get exact zeros on every path. The CPU loop (large problems) writes each
    product straight into its slot.
    """
    if xs.shape[0] == 0:
        return xs.new_zeros(offsets.shape[0], xs.shape[1], grad.shape[1])
    if _use_fused_weight_grad(xs, grad):
        return zero_empty_groups(_fused_weight_grad(xs, grad, offsets), offsets)
    segments = _segments(offsets)
    out_shape = (offsets.shape[0], xs.shape[1], grad.shape[1])
    full = len(segments) == offsets.shape[0]
    out = xs.new_empty(out_shape) if full else xs.new_zeros(out_shape)
    for e, rows in segments:
        torch.mm(xs[rows].t(), grad[rows], out=out[e])
    return out


def combine_kernel(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """``out[token[i]] += weight[i] · ys[i]``: ``[N, *out] -> [T, *out]``."""
    scale = weight.view(-1, *([1] * (ys.dim() - 1)))
    return ys.new_zeros(num_inputs, *ys.shape[1:]).index_add_(0, token, ys * scale)


def _combine_grads(
    ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, need_ys: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(∂ys, ∂weight)``; the gathered gradient is reused in place unless a higher-order graph is built."""
    grad_rows = grad.index_select(0, token)  # [N, *out]: the gradient reaching each pair
    grad_weight = (grad_rows * ys).flatten(1).sum(1) if need_w else None
    if not need_ys:
        return None, grad_weight
    scale = weight.view(-1, *([1] * (ys.dim() - 1)))
    return (grad_rows * scale if torch.is_grad_enabled() else grad_rows.mul_(scale)), grad_weight


# ------------------------------------------------------------------------------------------ custom ops
@torch.library.custom_op("sparsemoe::grouped_mm", mutates_args=())
def grouped_mm_op(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Custom-op form of :func:`grouped_mm_kernel` (opaque to the compiler, differentiable twice)."""
    return grouped_mm_kernel(xs.contiguous(), weight, offsets)


@grouped_mm_op.register_fake
def _(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return xs.new_empty(xs.shape[0], weight.shape[-1])


@torch.library.custom_op("sparsemoe::grouped_mm_weight_grad", mutates_args=())
def weight_grad_op(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Custom-op form of :func:`weight_grad_kernel`."""
    return weight_grad_kernel(xs.contiguous(), grad.contiguous(), offsets)


@weight_grad_op.register_fake
def _(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return xs.new_empty(offsets.shape[0], xs.shape[1], grad.shape[1])


@torch.library.custom_op("sparsemoe::combine", mutates_args=())
def combine_op(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Custom-op form of :func:`combine_kernel`."""
    return combine_kernel(ys, token, weight, num_inputs)


@combine_op.register_fake
def _(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    return ys.new_empty(num_inputs, *ys.shape[1:])


def _save_inputs(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    ctx.save_for_backward(*tensors)


def _grouped_mm_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    xs, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    return grouped_mm_op(grad, weight.transpose(1, 2), offsets), weight_grad_op(xs, grad, offsets), None


def _weight_grad_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    """``∂xs[rows of e] = grad_out[rows of e] @ G[e]^T`` and ``∂grad[rows of e] = xs[rows of e] @ G[e]``."""
    xs, grad_out, offsets = ctx.saved_tensors
    return grouped_mm_op(grad_out, grad.transpose(1, 2), offsets), grouped_mm_op(xs, grad, offsets), None


def _combine_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    ys, token, weight = ctx.saved_tensors
    grad_ys, grad_weight = _combine_grads(ys, token, weight, grad, True, True)
    return grad_ys, None, grad_weight, None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_save_inputs)
weight_grad_op.register_autograd(_weight_grad_backward, setup_context=_save_inputs)
combine_op.register_autograd(_combine_backward, setup_context=_save_inputs)


# ------------------------------------------------------------------------------------------ eager Functions
class _GroupedMatmul(torch.autograd.Function):
    """Eager ``grouped_mm_op``: saves only ``xs``, ``weight`` and the offsets.

    The input gradient is the same grouped product with the transposed weights; the weight gradient
    is :func:`weight_grad_kernel`. The incoming gradient is made contiguous (``grouped_mm`` rejects
    the stride-0 gradient of ``y.sum()``).
    """

    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xs, weight, offsets)
        return grouped_mm_kernel(xs, weight, offsets)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        higher_order = torch.is_grad_enabled()  # create_graph=True: build the gradient's own graph
        mm: Callable[..., torch.Tensor] = grouped_mm_op if higher_order else grouped_mm_kernel
        wgrad: Callable[..., torch.Tensor] = weight_grad_op if higher_order else weight_grad_kernel
        grad_xs = mm(grad, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        grad_weight = wgrad(xs, grad, offsets) if ctx.needs_input_grad[1] else None
        return grad_xs, grad_weight, None


class _WeightedIndexAdd(torch.autograd.Function):
    """Eager ``combine_op``. Autograd would keep the scaled copy's graph and allocate three
    ``[N, *out]`` gradients; this backward gathers the output gradient once and reuses it."""

    @staticmethod
    def forward(
        ctx: Any,
        ys: torch.Tensor,
        token: torch.Tensor,
        weight: torch.Tensor,
        num_inputs: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(ys, token, weight)
        return combine_kernel(ys, token, weight, num_inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ys, token, weight = ctx.saved_tensors
        grad_ys, grad_weight = _combine_grads(ys, token, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_ys, None, grad_weight, None


# ------------------------------------------------------------------------------------------ entry points
def grouped_matmul_offsets(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``xs[rows of e] @ weight[e]`` for rows sorted by expert: ``[N, d] x [n, d, h] -> [N, h]``.

    ``offsets: int32[n]`` holds each expert's end row. Differentiable (twice); traceable by
    ``torch.compile`` without graph breaks.
    """
    if torch.compiler.is_compiling():
        return grouped_mm_op(xs, weight, offsets)
    return _GroupedMatmul.apply(xs.contiguous(), weight, offsets)


def weighted_combine(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """``y[t] = Σ_{pairs i of t} weight[i] · ys[i]``: ``[N, *out] -> [T, *out]`` (``T = num_inputs``)."""
    if weight.dtype != ys.dtype:
        weight = weight.to(ys.dtype)
    if torch.compiler.is_compiling():
        return combine_op(ys, token, weight, num_inputs)
    return _WeightedIndexAdd.apply(ys, token, weight, num_inputs)


# ------------------------------------------------------------------------------------------ Triton (CUDA only)
#: dtypes the fused Triton kernels take on CUDA
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_WANTED = os.environ.get("SPARSEMOE_TRITON", "1") != "0"


def set_triton(enabled: bool) -> bool:
    """Use the fused Triton kernels of :mod:`sparsemoe.triton_kernels` on CUDA (on by default).

    Returns the previous setting. The kernels give the eager path's results up to summation order
    (float32 accumulation, atomic adds in the combine), so they are on by default where they apply;
    switch them off here or with the environment variable ``SPARSEMOE_TRITON=0`` to compare or to
    debug. They never run on CPU.
    """
    global _TRITON_WANTED
    previous, _TRITON_WANTED = _TRITON_WANTED, bool(enabled)
    return previous


@functools.cache
def triton_kernels() -> ModuleType | None:
    """:mod:`sparsemoe.triton_kernels` compiled for the GPU, or ``None`` without a usable ``triton``.

    ``None`` too when the module was imported under ``TRITON_INTERPRET=1`` (CPU interpreter: far too
    slow for real work). Imported on first use and cached.
    """
    try:
        module = importlib.import_module("sparsemoe.triton_kernels")
    except ImportError:
        return None
    return None if module.INTERPRETED else module


def use_triton(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the dispatcher takes the fused Triton path for ``x`` computed in ``dtype`` (default its own).

    Only for CUDA tensors computed in a :data:`TRITON_DTYPES` dtype, with the kernels switched on, not while
    ``torch.compile`` traces (the compiler sees the custom ops instead), not under
    ``torch.use_deterministic_algorithms(True)`` (the fused combine adds with atomics), and only when
    ``triton`` imports. The first test is the device, so CPU calls cost one attribute read.
    """
    return (
        x.is_cuda
        and _TRITON_WANTED
        and (x.dtype if dtype is None else dtype) in TRITON_DTYPES
        and not torch.compiler.is_compiling()
        and not torch.are_deterministic_algorithms_enabled()
        and triton_kernels() is not None
    )


# ------------------------------------------------------------------------------------------ random draws
@torch.library.custom_op("sparsemoe::uniform_topk", mutates_args=("state",))
def uniform_topk(state: torch.Tensor, rows: int, num_experts: int, k: int) -> torch.Tensor:
    """``[rows, k]`` distinct uniform experts (the top-k of i.i.d. uniform scores), drawn from ``state``.

    ``state`` is a CPU generator's state (``torch.Generator().get_state()``, a ``uint8`` tensor) and
    is advanced in place, so a gate that keeps it as a buffer draws exactly the stream its own
    ``torch.Generator`` would, in eager mode and inside ``torch.compile`` (which cannot trace a
    ``Generator`` object).
    """
    generator = torch.Generator()
    generator.set_state(state.cpu())
    indices = torch.rand(rows, num_experts, generator=generator).topk(k, dim=-1).indices
    state.copy_(generator.get_state().to(state.device))
    return indices


@uniform_topk.register_fake
def _(state: torch.Tensor, rows: int, num_experts: int, k: int) -> torch.Tensor:
    return torch.empty(rows, k, dtype=torch.long)
