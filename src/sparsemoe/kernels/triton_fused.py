"""Fused Triton kernels for the CUDA dispatch path: gather into the first grouped GEMM, combine into the last.

**Unverified on a GPU, hence opt-in.** These kernels have been checked only in Triton's CPU
interpreter (tests/test_triton_kernels.py) and compiled for Hopper; no run on a real GPU has yet
compared them with the reference dispatch (float32 and bf16) or timed them. The ``"triton"`` kernel
backend (:mod:`sparsemoe.kernels.backends`) that uses them is off by default: choose it with
``sparsemoe.kernels.set_backend("triton")`` or ``SPARSEMOE_KERNELS=triton``.

Why: the eager path materialises ``x[token]`` (``[N, d]``) before the first grouped matmul and the
expert outputs (``[N, d]``) plus their weighted copy before the scatter-add. Here the first GEMM
reads its input rows through the index (``x[token[i]] @ W[e]``, nothing gathered in memory) and
the last GEMM multiplies each row by its combine weight and adds it straight into ``y[token[i]]``.
The idea is ScatterMoE's ``scatter2scatter`` (Tan et al., 2024); the code is our own.

**No host synchronisation.** Expert boundaries stay on the device as ``offsets: int32[n]`` (each
expert's end row). The launch grid is sized from shapes only: ``cdiv(N, BM) + n`` row blocks is an
upper bound on the blocks of ``n`` experts whose rows are padded to ``BM`` each; every program finds
its expert and rows from the offsets (a prefix sum of the per-expert block counts) and the ones
past the end return at once.

**Exactness.** Products accumulate in float32 (float64 for float64 inputs). ``tl.dot`` on float32
inputs defaults to TF32 (10-bit mantissa products); these kernels pass ``input_precision="ieee"``
(true float32 products) unless ``torch.backends.cuda.matmul.allow_tf32`` is set, as for
``torch.matmul``. The fused combine adds the ``k`` contributions of each input with float32 atomics
(then casts), so its result equals the eager path's up to summation order and is **not bitwise
deterministic** from run to run; the backend stands aside when
``torch.use_deterministic_algorithms(True)`` is on. Gradients of the combine weights are reduced per
column tile and summed in a fixed order (deterministic). Double backward (``create_graph=True``)
falls back to the differentiable custom ops of :mod:`sparsemoe.kernels.ops`.

This module imports ``triton`` and is imported lazily, by the ``"triton"`` backend's loader only.
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same kernels run on CPU
tensors, which is how the tests check them.

Shape notes: ``T`` inputs, ``N`` (input, expert) pairs sorted by expert, ``n`` experts, ``K`` the
reduced width, ``C`` the output width.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .ops import grouped_matmul_op, grouped_matmul_weight_grad_op

#: whether the kernels run in Triton's CPU interpreter (read when this module is imported, like triton.jit)
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

#: tile sizes (BM rows, BN columns, BK reduction) and launch options per element size; the GPU
#: values are untuned starting points (no GPU was available when this was written)
GPU_TILES: dict[int, dict[str, int]] = {
    2: {"BM": 128, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
    4: {"BM": 64, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 3},
    8: {"BM": 32, "BN": 64, "BK": 16, "num_warps": 4, "num_stages": 2},
}
#: the interpreter runs every program in numpy: the smallest tiles tl.dot accepts keep tests fast
#: and make small test shapes span several blocks
INTERPRETER_TILES: dict[str, int] = {"BM": 16, "BN": 16, "BK": 16}


def _tiles(dtype: torch.dtype) -> dict[str, int]:
    return dict(INTERPRETER_TILES) if INTERPRETED else dict(GPU_TILES[dtype.itemsize])


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 only where torch's matmul would use it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRETED:
        return "tf32"
    return "ieee"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ device code
@triton.jit
def _expert_block(offsets_ptr, num_experts, pid_m, BM: tl.constexpr, NP2: tl.constexpr):
    """The expert of row block ``pid_m`` and the block's first row and its expert's end row.

    Blocks are numbered expert after expert, ``cdiv(count_e, BM)`` for expert ``e``; a ``pid_m``
    past the last block gets expert ``num_experts`` (no work).
    """
    e = tl.arange(0, NP2)
    valid = e < num_experts
    ends = tl.load(offsets_ptr + e, mask=valid, other=0)
    starts = tl.load(offsets_ptr + e - 1, mask=valid & (e > 0), other=0)
    blocks = tl.where(valid, (ends - starts + BM - 1) // BM, 0)
    cum = tl.cumsum(blocks, 0)  # inclusive: blocks of experts 0..e
    expert = tl.sum((cum <= pid_m).to(tl.int32), 0)
    mine = e == expert
    first_block = tl.sum(tl.where(mine, cum - blocks, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_block) * BM
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, row_start, row_end


@triton.jit
def _grouped_matmul_kernel(
    x_ptr, stride_xr, stride_xk,
    w_ptr, stride_we, stride_wk, stride_wc,
    y_ptr, stride_yr, stride_yc,
    index_ptr, scale_ptr, other_ptr, stride_or, stride_oc, rowdot_ptr,
    offsets_ptr, num_experts, num_rows, K, C,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, HAS_SCALE: tl.constexpr, ROWDOT: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NP2: tl.constexpr,
):  # fmt: skip
    """One ``[BM, BN]`` tile of ``z_i = x[src_i] @ w[e_i]`` for the pairs ``i`` of one expert.

    ``src_i = index[i]`` if GATHER else ``i``. ROWDOT stores ``Σ_c z_ic · other_ic`` of this
    column tile in ``rowdot[pid_n, i]`` (before scaling). HAS_SCALE multiplies row ``i`` by
    ``scale[i]``. SCATTER atomically adds row ``i`` into ``y[index[i]]``, else stores it at ``y[i]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = _expert_block(offsets_ptr, num_experts, pid_m, BM, NP2)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BM)
    row_mask = rows < row_end
    rows64 = rows.to(tl.int64)
    target = tl.load(index_ptr + rows64, mask=row_mask, other=0).to(tl.int64) if GATHER or SCATTER else rows64
    src = target if GATHER else rows64
    cols = pid_n * BN + tl.arange(0, BN)
    col_mask = cols < C
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < K
        a = tl.load(
            x_ptr + src[:, None] * stride_xr + ks[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wc,
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    tile_mask = row_mask[:, None] & col_mask[None, :]
    if ROWDOT:
        other = tl.load(other_ptr + rows64[:, None] * stride_or + cols[None, :] * stride_oc, mask=tile_mask, other=0.0)
        tl.store(rowdot_ptr + pid_n.to(tl.int64) * num_rows + rows64, tl.sum(acc * other.to(ACC), 1), mask=row_mask)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows64, mask=row_mask, other=0.0).to(ACC)[:, None]
    if SCATTER:
        out = y_ptr + target[:, None] * stride_yr + cols[None, :] * stride_yc
        tl.atomic_add(out, acc.to(y_ptr.dtype.element_ty), mask=tile_mask, sem="relaxed")
    else:
        out = y_ptr + rows64[:, None] * stride_yr + cols[None, :] * stride_yc
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _grouped_matmul_weight_grad_kernel(
    a_ptr, stride_ar, stride_ac,
    b_ptr, stride_br, stride_bc,
    out_ptr, stride_oe, stride_oa, stride_ob,
    index_ptr, scale_ptr, offsets_ptr, DA, DB,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """One ``[BM, BN]`` tile of ``out[e] = Σ_{i of e} (scale_i · a[ia_i])^T b[ib_i]``.

    ``ia_i = index[i]`` if GATHER_A else ``i`` (same for b). An expert without rows gets zeros.
    """
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    tiles_b = tl.cdiv(DB, BN)
    pid_a = pid // tiles_b
    pid_b = pid % tiles_b
    end = tl.load(offsets_ptr + expert)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    ca = pid_a * BM + tl.arange(0, BM)
    cb = pid_b * BN + tl.arange(0, BN)
    ca_mask = ca < DA
    cb_mask = cb < DB
    acc = tl.zeros((BM, BN), dtype=ACC)
    for r0 in range(start, end, BK):
        rows = r0 + tl.arange(0, BK)
        row_mask = rows < end
        rows64 = rows.to(tl.int64)
        gathered = tl.load(index_ptr + rows64, mask=row_mask, other=0).to(tl.int64) if GATHER_A or GATHER_B else rows64
        ra = gathered if GATHER_A else rows64
        rb = gathered if GATHER_B else rows64
        a = tl.load(
            a_ptr + ra[None, :] * stride_ar + ca[:, None] * stride_ac,
            mask=row_mask[None, :] & ca_mask[:, None],
            other=0.0,
        )  # [BM, BK]: a^T
        b = tl.load(
            b_ptr + rb[:, None] * stride_br + cb[None, :] * stride_bc,
            mask=row_mask[:, None] & cb_mask[None, :],
            other=0.0,
        )  # [BK, BN]
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows64, mask=row_mask, other=0.0).to(ACC)
            a = (a.to(ACC) * scale[None, :]).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    out = out_ptr + expert.to(tl.int64) * stride_oe + ca[:, None] * stride_oa + cb[None, :] * stride_ob
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ca_mask[:, None] & cb_mask[None, :])


# ------------------------------------------------------------------------------------------ launchers
def _tl_dtype(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_grouped_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    gather: bool = False,
    scatter_rows: int | None = None,
    scale: torch.Tensor | None = None,
    rowdot: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z_i = scale_i · x[src_i] @ weight[e_i]`` for the ``N = len(index)`` (or ``len(x)``) pairs sorted by expert.

    ``gather``: ``src_i = index[i]`` (``x: [T, K]``), else ``src_i = i`` (``x: [N, K]``).
    ``scatter_rows=T``: returns ``y: [T, C]`` with ``y[index[i]] += z_i`` (float32 atomics), else
    ``z: [N, C]`` in pair order. ``rowdot: [N, C]``: also returns ``Σ_c (x[src_i] @ weight[e_i])_c ·
    rowdot_ic`` per pair (float32/float64, unscaled), else ``None``.

    Shape: ``weight: [n, K, C]`` (any strides), ``offsets: int32[n]`` end row of each expert,
    ``index: int[N]``, ``scale: [N]``.
    """
    if (gather or scatter_rows is not None) and index is None:
        raise ValueError("index is required to gather or scatter rows")
    num_rows = index.shape[0] if index is not None else x.shape[0]
    num_experts, depth, width = weight.shape
    acc_dtype = _acc_dtype(x.dtype)
    if scatter_rows is not None:
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else acc_dtype
        y = torch.zeros(scatter_rows, width, dtype=out_dtype, device=x.device)
    else:
        y = torch.empty(num_rows, width, dtype=x.dtype, device=x.device)
    tiles = _tiles(x.dtype)
    block_m, block_n = tiles.pop("BM"), tiles.pop("BN")
    col_tiles = triton.cdiv(width, block_n)
    dots = torch.empty(col_tiles, num_rows, dtype=acc_dtype, device=x.device) if rowdot is not None else None
    if num_rows and width:
        dummy = offsets
        grid = (triton.cdiv(num_rows, block_m) + num_experts, col_tiles)
        other = rowdot if rowdot is not None else x
        _grouped_matmul_kernel[grid](
            x, x.stride(0), x.stride(1),
            weight, weight.stride(0), weight.stride(1), weight.stride(2),
            y, y.stride(0), y.stride(1),
            index if index is not None else dummy, scale if scale is not None else dummy,
            other, other.stride(0), other.stride(1), dots if dots is not None else dummy,
            offsets, num_experts, num_rows, depth, width,
            GATHER=gather, SCATTER=scatter_rows is not None, HAS_SCALE=scale is not None, ROWDOT=rowdot is not None,
            ACC=_tl_dtype(x.dtype), PRECISION=_precision(x.dtype), BM=block_m, BN=block_n,
            NP2=triton.next_power_of_2(num_experts), **tiles,
        )  # fmt: skip
    elif dots is not None:
        dots.zero_()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, (None if dots is None else dots.sum(0))


def _launch_weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    gather_a: bool = False,
    gather_b: bool = False,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[e] = Σ_{pairs i of e} (scale_i · a[ia_i])^T b[ib_i]``: ``[n, Da, Db]`` in ``a``'s dtype.

    ``ia_i = index[i]`` with ``gather_a`` (``a: [T, Da]``), else ``i`` (``a: [N, Da]``); the same for
    ``b``. Experts without pairs get exact zeros.
    """
    if (gather_a or gather_b) and index is None:
        raise ValueError("index is required to gather rows")
    num_experts = offsets.shape[0]
    depth_a, depth_b = a.shape[1], b.shape[1]
    out = torch.empty(num_experts, depth_a, depth_b, dtype=a.dtype, device=a.device)
    tiles = _tiles(a.dtype)
    block_m, block_n, block_k = tiles.pop("BM"), tiles.pop("BN"), tiles.pop("BK")
    if depth_a and depth_b:
        grid = (triton.cdiv(depth_a, block_m) * triton.cdiv(depth_b, block_n), num_experts)
        _grouped_matmul_weight_grad_kernel[grid](
            a, a.stride(0), a.stride(1),
            b, b.stride(0), b.stride(1),
            out, out.stride(0), out.stride(1), out.stride(2),
            index if index is not None else offsets, scale if scale is not None else offsets, offsets,
            depth_a, depth_b,
            GATHER_A=gather_a, GATHER_B=gather_b, HAS_SCALE=scale is not None,
            ACC=_tl_dtype(a.dtype), PRECISION=_precision(a.dtype), BM=block_m, BN=block_n, BK=block_k, **tiles,
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ autograd
class _GatherGroupedMatmulFn(torch.autograd.Function):
    """``z_i = x[token_i] @ weight[e_i]``; saves ``x`` itself, not the ``[N, K]`` gathered rows."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, token, weight, offsets)
        return _launch_grouped_matmul(x, weight, offsets, token, gather=True)[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, token, weight, offsets = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops on the gathered rows
            xs = x.index_select(0, token)
            grad_x = grad_w = None
            if need_x:
                rows = grouped_matmul_op(grad.contiguous(), weight.transpose(1, 2), offsets)
                grad_x = x.new_zeros(x.shape).index_add(0, token, rows)
            if need_w:
                grad_w = grouped_matmul_weight_grad_op(xs, grad.contiguous(), offsets)
            return grad_x, None, grad_w, None
        grad_x = (
            _launch_grouped_matmul(grad, weight.transpose(1, 2), offsets, token, scatter_rows=x.shape[0])[0]
            if need_x
            else None
        )
        grad_w = _launch_weight_grad(x, grad, offsets, token, gather_a=True) if need_w else None
        return grad_x, None, grad_w, None


class _GroupedMatmulCombineFn(torch.autograd.Function):
    """``y[t] = Σ_{pairs i of t} w_i · (h_i @ weight[e_i])``, never holding the ``[N, C]`` products.

    Backward: ``u_i = ∂y[token_i] @ weight[e_i]^T`` is one gathered grouped GEMM; ``∂h_i = w_i u_i``
    and ``∂w_i = u_i · h_i`` come out of its epilogue, and ``∂weight[e] = Σ h_i^T (w_i ∂y[token_i])``
    gathers the output gradient inside the weight-gradient kernel.
    """

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        offsets: torch.Tensor,
        token: torch.Tensor,
        pair_weight: torch.Tensor,
        num_inputs: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(h, weight, offsets, token, pair_weight)
        return _launch_grouped_matmul(h, weight, offsets, token, scatter_rows=num_inputs, scale=pair_weight)[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight, offsets, token, pair_weight = ctx.saved_tensors
        need_h, need_w, need_pw = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops
            grad_rows = grad.index_select(0, token)  # [N, C]
            scaled = grad_rows * pair_weight.to(grad.dtype)[:, None]
            grad_h = grouped_matmul_op(scaled, weight.transpose(1, 2), offsets) if need_h else None
            grad_w = grouped_matmul_weight_grad_op(h, scaled, offsets) if need_w else None
            grad_pw = None
            if need_pw:
                grad_pw = (grad_rows * grouped_matmul_op(h, weight, offsets)).sum(1).to(pair_weight.dtype)
            return grad_h, grad_w, None, None, grad_pw, None
        grad_h = grad_pw = None
        if need_h or need_pw:
            grad_h, dots = _launch_grouped_matmul(
                grad, weight.transpose(1, 2), offsets, token, gather=True,
                scale=pair_weight, rowdot=h if need_pw else None,
            )  # fmt: skip
            grad_pw = None if dots is None else dots.to(pair_weight.dtype)
        grad_w = _launch_weight_grad(h, grad, offsets, token, gather_b=True, scale=pair_weight) if need_w else None
        return (grad_h if need_h else None), grad_w, None, None, grad_pw, None


def gather_grouped_matmul(
    x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``x[token[i]] @ weight[e_i]`` for pairs sorted by expert, without the gathered copy of ``x``.

    Shape: ``x: [T, K]``, ``token: int[N]``, ``weight: [n, K, C]``, ``offsets: int32[n]`` -> ``[N, C]``.
    Differentiable (twice, the second time through the custom ops of :mod:`sparsemoe.kernels.ops`).
    """
    return _GatherGroupedMatmulFn.apply(x, token, weight, offsets)


def grouped_matmul_combine(
    h: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    token: torch.Tensor,
    pair_weight: torch.Tensor,
    num_inputs: int,
) -> torch.Tensor:
    """``y[t] = Σ_{pairs i of t} pair_weight_i · (h_i @ weight[e_i])``: the last GEMM with the combine fused.

    Shape: ``h: [N, K]`` sorted by expert, ``weight: [n, K, C]``, ``token: int[N]``, ``pair_weight:
    [N]`` (any float dtype; its gradient comes back in it) -> ``[T, C]``, ``T = num_inputs``.
    """
    return _GroupedMatmulCombineFn.apply(h, weight, offsets, token, pair_weight, num_inputs)
