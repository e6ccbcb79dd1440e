"""Cases for the fused Triton kernels on CPU, in Triton's interpreter; run by tests/test_triton_kernels.py.

Not collected by a plain pytest run (the name does not start with ``test_``): ``TRITON_INTERPRET=1``
must be set before ``triton`` itself is imported (its standard library, ``tl.sum`` and friends,
is decorated then), which a test session that may already have imported triton (torch.compile
does) cannot guarantee. So the driver test runs this file in a fresh process with the variable set.
The interpreter stores bfloat16 as raw 16-bit integers and its ``tl.dot`` is then wrong, so bf16
is checked only on a GPU (the CUDA test in tests/test_triton_kernels.py).
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from sparsemoe.dispatch import reference_dispatch, sort_by_expert
from sparsemoe.experts import StackedExperts
from sparsemoe.kernels.backends import Backend, triton_backend
from sparsemoe.routing import Routing

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through tests/test_triton_kernels.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tk() -> ModuleType:
    from sparsemoe.kernels import triton_fused

    assert triton_fused.INTERPRETED
    return triton_fused


def _interpreted(tk: ModuleType) -> Backend:
    """The "triton" backend with the interpreted kernels, taking every call (CPU tensors included)."""
    return triton_backend(tk, accepts=lambda x, dtype: True)


def _pairs(counts: list[int], num_inputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert: ``token`` (random, repeats allowed), ``expert``, ``offsets``."""
    g = torch.Generator().manual_seed(seed)
    count_t = torch.tensor(counts)
    expert = torch.repeat_interleave(torch.arange(len(counts)), count_t)
    token = torch.randint(0, max(num_inputs, 1), (int(count_t.sum()),), generator=g)
    return token, expert, torch.cumsum(count_t, 0, dtype=torch.int32)


#: expert loads: empty experts among uneven ones, one expert, all pairs on one of many, no pairs, blocks of 16 exactly
COUNTS = {
    "uneven": [0, 5, 0, 33, 1, 18],
    "single": [23],
    "one-of-many": [0, 0, 40, 0],
    "empty": [0, 0, 0],
    "full-blocks": [16, 32],
}
TOL = {torch.float64: {"atol": 1e-11, "rtol": 1e-11}, torch.float32: {"atol": 2e-5, "rtol": 2e-5}}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual, expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_gather_grouped_mm_matches_definition(tk: ModuleType, case: str, dtype: torch.dtype) -> None:
    counts, num_inputs, d, h = COUNTS[case], 21, 24, 40  # widths neither powers of 2 nor tile multiples
    token, expert, offsets = _pairs(counts, num_inputs, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(num_inputs, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(len(counts), d, h, generator=g, dtype=dtype, requires_grad=True)
    out = tk.gather_grouped_matmul(x, token, weight, offsets)
    expected = torch.einsum("nd,ndh->nh", x[token], weight[expert])
    _close(out, expected, dtype)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, (x, weight), grad, allow_unused=True)
    want = torch.autograd.grad(expected, (x, weight), grad, allow_unused=True)
    for a, b in zip(got, want, strict=True):
        _close(a if a is not None else torch.zeros_like(b), b if b is not None else torch.zeros_like(a), dtype)
    for e, c in enumerate(counts):  # experts without pairs get exact zeros, not leftovers
        if c == 0:
            assert torch.equal(got[1][e], torch.zeros_like(got[1][e]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(COUNTS))
def test_grouped_mm_combine_matches_definition(tk: ModuleType, case: str, dtype: torch.dtype) -> None:
    counts, num_inputs, h, d = COUNTS[case], 19, 40, 24
    token, expert, offsets = _pairs(counts, num_inputs, seed=3)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(len(token), h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(len(counts), h, d, generator=g, dtype=dtype, requires_grad=True)
    pair_weight = torch.rand(len(token), generator=g, dtype=torch.float32).requires_grad_()  # router dtype
    out = tk.grouped_matmul_combine(hidden, weight, offsets, token, pair_weight, num_inputs)
    products = torch.einsum("nh,nhd->nd", hidden, weight[expert])
    expected = torch.zeros(num_inputs, d, dtype=dtype).index_add(0, token, pair_weight.to(dtype)[:, None] * products)
    assert out.shape == (num_inputs, d) and out.dtype == dtype
    _close(out, expected, dtype)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    got = torch.autograd.grad(out, (hidden, weight, pair_weight), grad)
    want = torch.autograd.grad(expected, (hidden, weight, pair_weight), grad)
    assert got[2].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), **TOL[torch.float32 if a.dtype == torch.float32 else dtype])


def test_launchers_reject_missing_index(tk: ModuleType) -> None:
    x, w, offsets = torch.randn(4, 16), torch.randn(1, 16, 16), torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="index is required"):
        tk._launch_grouped_matmul(x, w, offsets, gather=True)
    with pytest.raises(ValueError, match="index is required"):
        tk._launch_weight_grad(x, x, offsets, gather_b=True)


def _routing(num_inputs: int, num_experts: int, k: int, seed: int, dtype: torch.dtype) -> Routing:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_inputs, num_experts, generator=g)
    scores[:, 0] -= 2.0  # expert 0 never chosen: an empty expert
    top = scores.topk(k, dim=-1)
    weight = torch.softmax(top.values, -1).to(dtype).requires_grad_()
    token = torch.arange(num_inputs).repeat_interleave(k)
    return Routing(token, top.indices.reshape(-1), weight.reshape(-1), num_experts, num_inputs)


@pytest.mark.parametrize(
    ("kind", "bias", "dtype"),
    [("swiglu", False, torch.float64), ("mlp", False, torch.float64), ("linear", True, torch.float64),
     ("mlp", True, torch.float64), ("mlp", False, torch.float32)],
)  # fmt: skip
def test_fused_experts_match_reference_dispatch(tk: ModuleType, kind: str, bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    num_inputs, d, hidden, n, k = 13, 20, 36, 5, 2
    experts = StackedExperts(n, d, hidden, kind=kind, bias=bias, dtype=dtype)
    x = torch.randn(num_inputs, d, dtype=dtype, requires_grad=True)
    routing = _routing(num_inputs, n, k, seed=6, dtype=dtype)
    order, counts = sort_by_expert(routing.expert, n)
    token = routing.token[order]
    out = experts.forward_combined(x, token, counts, routing.weight[order], num_inputs, backend=_interpreted(tk))
    expected = reference_dispatch(x, routing, experts)
    tol = TOL[dtype]
    torch.testing.assert_close(out, expected, **tol)
    leaves = [x, routing.weight, *experts.parameters()]
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad), strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_double_backward_matches_reference(tk: ModuleType) -> None:
    """create_graph=True goes through the differentiable custom ops: a gradient penalty's gradient is exact."""
    torch.manual_seed(7)
    dtype = torch.float64
    experts = StackedExperts(4, 18, 20, kind="swiglu", dtype=dtype)
    x = torch.randn(9, 18, dtype=dtype, requires_grad=True)
    routing = _routing(9, 4, 2, seed=8, dtype=dtype)
    order, counts = sort_by_expert(routing.expert, 4)

    def penalty(run: bool) -> list[torch.Tensor]:
        if run:
            out = experts.forward_combined(
                x, routing.token[order], counts, routing.weight[order], 9, backend=_interpreted(tk)
            )
        else:
            out = reference_dispatch(x, routing, experts)
        (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), [x, routing.weight, *experts.parameters()]))

    for a, b in zip(penalty(True), penalty(False), strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
