"""The fast dispatch equals the one-pair-at-a-time definition, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemoe import MoE, Routing, StackedExperts, dispatch, reference_dispatch
from sparsemoe.experts import grouped_matmul, grouped_mm_supported

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


def assert_same_forward_backward(x: torch.Tensor, routing: Routing, experts: StackedExperts) -> None:
    params = [t for t in (x, routing.weight, *experts.parameters()) if t.requires_grad]
    torch.manual_seed(1)
    fast = dispatch(x, routing, experts)
    g_fast = grads(fast, params)
    ref = reference_dispatch(x, routing, experts)
    torch.manual_seed(1)
    g_ref = grads(ref, params)
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
    torch.testing.assert_close(grouped_matmul(x, w, counts), expected)
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
    assert_same_forward_backward(x, moe.last_routing, moe.experts)


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
