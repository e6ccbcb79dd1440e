"""The fast dispatch equals the one-pair-at-a-time definition, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from sparsemoe import MoE, Routing, StackedExperts, reference_dispatch
from sparsemoe.dispatch import dispatch
from sparsemoe.kernels import expert_offsets, grouped_matmul, grouped_mm_supported
from sparsemoe.kernels.ops import _GroupedMatmulFn, _WeightedCombineFn

from conftest import gate_kwargs


def random_routing(num_inputs: int, num_experts: int, k: int, seed: int, dtype: torch.dtype) -> Routing:
    """``k`` distinct random experts per input with random positive weights; some experts stay empty."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(num_inputs, num_experts, generator=g).topk(k, dim=-1).indices
    weights = torch.rand(num_inputs, k, generator=g, dtype=dtype).requires_grad_()
    return Routing.from_topk(experts, weights, num_experts)


def grads(y: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if not y.requires_grad:  # no pairs at all: the reference output is a constant
        return [None] * len(tensors)
    upstream = torch.randn_like(y)
    return list(torch.autograd.grad((y * upstream).sum(), tensors, allow_unused=True, retain_graph=True))


def assert_same_forward_backward(
    x: torch.Tensor, routing: Routing, experts: StackedExperts, upstream: list[torch.Tensor] = ()
) -> None:
    """Forward and gradients of the fast path equal the definition's.

    A routing read from a dense matrix may take the dense path, which reaches the weights through
    ``routing.dense`` rather than ``routing.weight``: there the gradient is compared on the pairs'
    cells of that matrix (and, through ``upstream``, on whatever produced it).
    """
    weights = routing.weight if routing.dense is None else routing.dense
    params = [t for t in (x, weights, *experts.parameters(), *upstream) if t.requires_grad]
    torch.manual_seed(1)
    fast = dispatch(x, routing, experts)
    g_fast = grads(fast, params)
    ref = reference_dispatch(x, routing, experts)
    torch.manual_seed(1)
    g_ref = grads(ref, params)
    if routing.dense is not None and routing.dense.requires_grad:
        i = next(j for j, t in enumerate(params) if t is routing.dense)
        pairs = torch.zeros_like(routing.dense, dtype=torch.bool)
        pairs[routing.token, routing.expert] = True
        g_fast[i], g_ref[i] = (None if g is None else g * pairs for g in (g_fast[i], g_ref[i]))
    tol = {"atol": 1e-5, "rtol": 1e-4} if x.dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    torch.testing.assert_close(fast, ref, **tol)
    for a, b in zip(g_fast, g_ref, strict=True):
        if a is None or b is None:
            assert (a is None and b is None) or (a if a is not None else b).abs().sum() == 0
        else:
            torch.testing.assert_close(a, b, **tol)


@settings(max_examples=60, deadline=None)
@given(
    num_inputs=st.integers(0, 9),
    num_experts=st.integers(1, 6),
    k_frac=st.floats(0, 1),
    kind=st.sampled_from(["mlp", "swiglu", "linear"]),
    width=st.sampled_from([3, 4, 8]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_dispatch_matches_reference(num_inputs, num_experts, k_frac, kind, width, dtype, bias, seed) -> None:
    k = 1 + int(k_frac * (num_experts - 1))
    torch.manual_seed(seed)
    experts = StackedExperts(num_experts, width, 2 * width, kind=kind, bias=bias).to(dtype)
    x = torch.randn(num_inputs, width, dtype=dtype, requires_grad=True)
    assert_same_forward_backward(x, random_routing(num_inputs, num_experts, k, seed, dtype), experts)


def test_grouped_mm_path_is_taken_and_exact() -> None:
    x = torch.randn(20, 8)
    w = torch.randn(4, 8, 16)
    counts = torch.tensor([5, 0, 11, 4])
    assert grouped_mm_supported(x, w)
    expected = torch.cat([x[:5] @ w[0], x[5:16] @ w[2], x[16:] @ w[3]])
    torch.testing.assert_close(grouped_matmul(x, w, expert_offsets(counts)), expected)
    assert not grouped_mm_supported(x.double(), w.double())  # float64 takes the loop


def test_backward_from_plain_sum() -> None:
    """``y.sum()`` hands back a stride-0 gradient, which grouped_mm's backward rejects unless fixed."""
    moe = MoE(16, 32, 4, gate="topk", k=2)
    x = torch.randn(10, 16, requires_grad=True)
    moe(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_every_gate_fast_equals_reference(gate_name: str) -> None:
    moe = MoE(8, 12, 5, gate=gate_name, **gate_kwargs(gate_name, 5))
    x = torch.randn(13, 8, requires_grad=True)
    moe(x)
    assert_same_forward_backward(x, moe.last_routing, moe.experts, upstream=list(moe.gate.parameters()))


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_forward_expert_is_the_reference_network(kind: str) -> None:
    experts = StackedExperts(3, 4, 6, kind=kind, activation="relu")
    x = torch.randn(5, 4)
    h = x @ experts.w1[1]
    if kind == "swiglu":
        gate, up = h.chunk(2, -1)
        h = torch.nn.functional.silu(gate) * up
    else:
        h = torch.relu(h)
    torch.testing.assert_close(experts.forward_expert(1, x), h @ experts.w2[1])


# ----------------------------------------------------------------------------- the fast path's autograd Functions
def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)


@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0, 2], [1, 1, 1], [0, 0, 0]])
def test_grouped_matmul_gradcheck(counts: list[int]) -> None:
    torch.manual_seed(0)
    xs = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(counts), 4, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, w: _GroupedMatmulFn.apply(a, w, _offsets(counts)), (xs, weight))


def test_weighted_combine_gradcheck() -> None:
    torch.manual_seed(0)
    ys = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 2, 2, 1, 0, 4])
    assert gradcheck(lambda y, w: _WeightedCombineFn.apply(y, token, w, 5), (ys, weight))


def test_grouped_matmul_float32_matches_loop_with_empty_experts() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 0])
    xs = torch.randn(16, 8, requires_grad=True)
    weight = torch.randn(4, 8, 16, requires_grad=True)
    grad = torch.randn(16, 16)
    out = grouped_matmul(xs, weight, expert_offsets(counts))
    expected = torch.cat([chunk @ weight[e] for e, chunk in enumerate(xs.split(counts.tolist()))])
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out, (xs, weight), grad)
    want = torch.autograd.grad(expected, (xs, weight), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_matmul_accepts_stride0_gradient() -> None:
    xs = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(2, 8, 16, requires_grad=True)
    grouped_matmul(xs, weight, _offsets([2, 4])).sum().backward()
    assert xs.grad is not None and weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "swiglu", "linear"])
@pytest.mark.parametrize("tokens", [0, 1, 9])
def test_dispatch_matches_reference_across_dtypes_and_kinds(dtype: torch.dtype, kind: str, tokens: int) -> None:
    torch.manual_seed(0)
    experts = StackedExperts(5, 8, 16, kind=kind, bias=True).to(dtype)
    x = torch.randn(tokens, 8, dtype=dtype, requires_grad=True)
    weight = torch.rand(tokens, 2, dtype=dtype, requires_grad=True)
    routing = Routing.from_topk(torch.randint(0, 3, (tokens, 2)), weight, 5)  # experts 3, 4 stay empty
    fast, slow = dispatch(x, routing, experts), reference_dispatch(x, routing, experts)
    torch.testing.assert_close(fast, slow)
    if tokens == 0:
        fast.sum().backward()  # must not fail on empty input
        return
    inputs = (x, weight, *experts.parameters())
    for a, b in zip(torch.autograd.grad(fast.sum(), inputs), torch.autograd.grad(slow.sum(), inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_dense_path_exactly_when_every_pair_is_covered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full coverage (softmax, or top-n) runs every expert on every input; anything less stays sparse."""
    calls: list[int] = []
    experts = StackedExperts(4, 8, 16, bias=True)
    original = experts.forward_all
    monkeypatch.setattr(experts, "forward_all", lambda x: calls.append(1) or original(x))
    x = torch.randn(6, 8, requires_grad=True)
    almost = torch.rand(6, 4)
    almost[2, 1] = 0  # one pair missing
    for weights, dense in ((almost, False), (torch.rand(6, 4), True)):
        routing = Routing.from_dense(weights.requires_grad_(), keep_zeros=False)
        calls.clear()
        fast, slow = dispatch(x, routing, experts), reference_dispatch(x, routing, experts)
        assert calls == ([1] if dense else [])
        torch.testing.assert_close(fast, slow)
        inputs = (x, weights, *experts.parameters())
        got = torch.autograd.grad(fast.sum(), inputs, retain_graph=True)
        for a, b in zip(got, torch.autograd.grad(slow.sum(), inputs), strict=True):
            torch.testing.assert_close(a, b)


def test_multitask_dense_path_matches_sparse_tasks() -> None:
    """Two tasks whose routings together cover every pair: dense mix equals each task dispatched alone."""
    from sparsemoe.dispatch import dispatch_tasks

    experts = StackedExperts(3, 5, 7)
    x = torch.randn(4, 5)
    first = Routing.from_topk(torch.tensor([[0, 1]] * 4), torch.rand(4, 2), 3)
    second = Routing.from_topk(torch.tensor([[2]] * 4), torch.rand(4, 1), 3)
    outputs = dispatch_tasks(x, [first, second], experts)
    for out, routing in zip(outputs, (first, second), strict=True):
        torch.testing.assert_close(out, reference_dispatch(x, routing, experts))


def test_dispatch_submodule_is_not_hidden_by_a_function() -> None:
    """``sparsemoe.dispatch`` is the module (a function of that name used to shadow it)."""
    import types

    import sparsemoe
    import sparsemoe.dispatch as dispatch_module

    assert isinstance(dispatch_module, types.ModuleType) and sparsemoe.dispatch is dispatch_module
    assert dispatch_module.dispatch is dispatch and sparsemoe.reference_dispatch is reference_dispatch
    x, routing = torch.randn(5, 4), random_routing(5, 3, 2, seed=0, dtype=torch.float32)
    experts = StackedExperts(3, 4, 6)
    expected = reference_dispatch(x, routing, experts)
    torch.testing.assert_close(sparsemoe.dispatch.dispatch(x, routing, experts), expected)
