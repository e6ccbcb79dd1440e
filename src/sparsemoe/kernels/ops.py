"""The grouped matmul and the weighted combine of the dispatch, as autograd Functions and custom ops.

``grouped_matmul``: ``xs[rows of e] @ weight[e]`` for rows sorted by expert; ``weighted_combine``:
the weighted scatter-add of expert outputs back to their inputs. Each is written once as a plain
kernel (``*_kernel``, no autograd) and exposed twice:

- **eager**: a ``torch.autograd.Function`` (``*Fn``; about 7 µs less per call than a custom op,
  which counts for small models). Its backward calls the kernels directly; when a higher-order
  graph is requested (``create_graph=True``, i.e. grad mode is on inside backward) it calls the
  differentiable custom ops instead, so double backward (gradient penalties, MAML inner loops) gets
  real gradients. The Functions are in the ``setup_context`` form with vmap rules (one kernel call
  per sample), so ``torch.func.grad``/``vmap`` (per-sample gradients) work; under those transforms
  their backward differentiates through the Functions again (custom ops' registered autograd does
  not support ``torch.func``).
- **graphs**: a ``torch.library.custom_op`` (``*_op``) with a fake (shape-only) implementation and
  a registered backward. The entry points take it while ``torch.compile`` or ``torch.jit.trace``
  records a graph. The expert boundaries travel as an ``offsets`` tensor on the device, so a traced
  graph holds no host synchronisation; only the CPU kernel reads them on the host, inside the
  opaque op. No output size depends on data.

This module imports nothing from the package above it (the kernels sit at the bottom of the import
graph). Shape notes use ``N`` rows (pairs), ``n`` experts, ``d`` input and ``h`` output width, ``T``
inputs.
"""

from __future__ import annotations

from collections.abc import Callable
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
def grouped_matmul_kernel(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
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


def grouped_matmul_weight_grad_kernel(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
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


def weighted_combine_kernel(
    ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int
) -> torch.Tensor:
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
@torch.library.custom_op("sparsemoe::grouped_matmul", mutates_args=())
def grouped_matmul_op(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Custom-op form of :func:`grouped_matmul_kernel` (opaque to the compiler, differentiable twice)."""
    return grouped_matmul_kernel(xs.contiguous(), weight, offsets)


@grouped_matmul_op.register_fake
def _(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return xs.new_empty(xs.shape[0], weight.shape[-1])


@torch.library.custom_op("sparsemoe::grouped_matmul_weight_grad", mutates_args=())
def grouped_matmul_weight_grad_op(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Custom-op form of :func:`grouped_matmul_weight_grad_kernel`."""
    return grouped_matmul_weight_grad_kernel(xs.contiguous(), grad.contiguous(), offsets)


@grouped_matmul_weight_grad_op.register_fake
def _(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return xs.new_empty(offsets.shape[0], xs.shape[1], grad.shape[1])


@torch.library.custom_op("sparsemoe::weighted_combine", mutates_args=())
def weighted_combine_op(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Custom-op form of :func:`weighted_combine_kernel`."""
    return weighted_combine_kernel(ys, token, weight, num_inputs)


@weighted_combine_op.register_fake
def _(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    return ys.new_empty(num_inputs, *ys.shape[1:])


def _save_inputs(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    """``setup_context`` of every op and Function here: save the tensor inputs (never the output)."""
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


def _grouped_mm_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    xs, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    return (
        grouped_matmul_op(grad, weight.transpose(1, 2), offsets),
        grouped_matmul_weight_grad_op(xs, grad, offsets),
        None,
    )


def _weight_grad_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    """``∂xs[rows of e] = grad_out[rows of e] @ G[e]^T`` and ``∂grad[rows of e] = xs[rows of e] @ G[e]``."""
    xs, grad_out, offsets = ctx.saved_tensors
    return grouped_matmul_op(grad_out, grad.transpose(1, 2), offsets), grouped_matmul_op(xs, grad, offsets), None


def _combine_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    ys, token, weight = ctx.saved_tensors
    grad_ys, grad_weight = _combine_grads(ys, token, weight, grad, True, True)
    return grad_ys, None, grad_weight, None


for _op, _backward in (
    (grouped_matmul_op, _grouped_mm_backward),
    (grouped_matmul_weight_grad_op, _weight_grad_backward),
    (weighted_combine_op, _combine_backward),
):
    _op.register_autograd(_backward, setup_context=_save_inputs)


# ------------------------------------------------------------------------------------------ eager Functions
def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ...) is running.

    Custom ops' registered autograd does not support these transforms, so there the Functions below
    run and differentiate themselves (never the ops); their vmap rules loop over the samples.
    """
    return torch._C._are_functorch_transforms_active()


def _vmap_by_sample(apply: Callable[..., torch.Tensor]) -> Callable[..., tuple[torch.Tensor, int]]:
    """A Function's vmap rule: ``apply`` once per sample, results stacked along dimension 0.

    The sizes depend on each sample's expert boundaries, so there is no batched kernel; this makes
    ``torch.func.vmap`` (per-sample gradients) work, at the speed of a Python loop over the samples.
    """

    def vmap(info: Any, in_dims: tuple, *args: Any) -> tuple[torch.Tensor, int]:
        outputs = [
            apply(*(a if dim is None else a.select(dim, b) for a, dim in zip(args, in_dims, strict=True)))
            for b in range(info.batch_size)
        ]
        return torch.stack(outputs), 0

    return vmap


class _GroupedMatmulFn(torch.autograd.Function):
    """Eager :func:`grouped_matmul_op`: saves only ``xs``, ``weight`` and the offsets.

    The input gradient is the same grouped product with the transposed weights; the weight gradient
    is :func:`grouped_matmul_weight_grad_kernel`. The incoming gradient is made contiguous
    (``grouped_mm`` rejects the stride-0 gradient of ``y.sum()``). In the ``setup_context`` form,
    with a vmap rule, so that ``torch.func`` works.
    """

    @staticmethod
    def forward(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_matmul_kernel(xs.contiguous(), weight, offsets)

    setup_context = staticmethod(_save_inputs)
    vmap = staticmethod(_vmap_by_sample(lambda *args: _GroupedMatmulFn.apply(*args)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        mm: Callable[..., torch.Tensor] = grouped_matmul_kernel
        wgrad: Callable[..., torch.Tensor] = grouped_matmul_weight_grad_kernel
        if functorch_active():  # differentiable and vmappable: these Functions again
            mm, wgrad = _GroupedMatmulFn.apply, _WeightGradFn.apply
        elif torch.is_grad_enabled():  # create_graph=True: build the gradient's own graph
            mm, wgrad = grouped_matmul_op, grouped_matmul_weight_grad_op
        grad_xs = mm(grad, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        grad_weight = wgrad(xs, grad, offsets) if ctx.needs_input_grad[1] else None
        return grad_xs, grad_weight, None


class _WeightGradFn(torch.autograd.Function):
    """:func:`grouped_matmul_weight_grad_kernel` under ``torch.func`` (elsewhere the kernel or the op run)."""

    @staticmethod
    def forward(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_matmul_weight_grad_kernel(xs.contiguous(), grad.contiguous(), offsets)

    setup_context = staticmethod(_save_inputs)
    vmap = staticmethod(_vmap_by_sample(lambda *args: _WeightGradFn.apply(*args)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, grad_out, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        return (
            _GroupedMatmulFn.apply(grad_out, grad.transpose(1, 2), offsets),
            _GroupedMatmulFn.apply(xs, grad, offsets),
            None,
        )


class _WeightedCombineFn(torch.autograd.Function):
    """Eager :func:`weighted_combine_op`. Autograd would keep the scaled copy's graph and allocate
    three ``[N, *out]`` gradients; this backward gathers the output gradient once and reuses it."""

    @staticmethod
    def forward(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
        return weighted_combine_kernel(ys, token, weight, num_inputs)

    setup_context = staticmethod(_save_inputs)
    vmap = staticmethod(_vmap_by_sample(lambda *args: _WeightedCombineFn.apply(*args)))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ys, token, weight = ctx.saved_tensors
        grad_ys, grad_weight = _combine_grads(ys, token, weight, grad, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return grad_ys, None, grad_weight, None


# ------------------------------------------------------------------------------------------ entry points
def recording_graph() -> bool:
    """Whether ``torch.compile`` or ``torch.jit.trace`` is recording a graph.

    There the entry points call the custom ops (opaque to the compiler, recorded by the tracer), and
    fused paths that only have an eager form must stand aside (as under :func:`functorch_active`).
    """
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def expert_offsets(counts: torch.Tensor) -> torch.Tensor:
    """``int32[n]`` end row of each expert from the rows per expert ``counts: [n]`` (on the device)."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_matmul(xs: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``xs[rows of e] @ weight[e]`` for rows sorted by expert: ``[N, d] x [n, d, h] -> [N, h]``.

    ``offsets: int32[n]`` holds each expert's end row (:func:`expert_offsets` of the counts). One
    ``torch.nn.functional.grouped_mm`` where supported (float32/bf16/fp16 with 16-byte aligned
    rows), else a loop of ``mm`` (float64, say). Differentiable (twice); traceable by
    ``torch.compile`` without graph breaks; works under ``torch.func.grad``/``vmap``.
    """
    if recording_graph():
        return grouped_matmul_op(xs, weight, offsets)
    return _GroupedMatmulFn.apply(xs.contiguous(), weight, offsets)


def weighted_combine(ys: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """``y[t] = Σ_{pairs i of t} weight[i] · ys[i]``: ``[N, *out] -> [T, *out]`` (``T = num_inputs``)."""
    if weight.dtype != ys.dtype:
        weight = weight.to(ys.dtype)
    if recording_graph():
        return weighted_combine_op(ys, token, weight, num_inputs)
    return _WeightedCombineFn.apply(ys, token, weight, num_inputs)
