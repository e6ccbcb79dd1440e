"""The hand-written autograd Functions of the fast dispatch path: gradcheck and agreement with the reference."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from sparsemoe.dispatch import dispatch, reference_dispatch
from sparsemoe.experts import StackedExperts, grouped_matmul
from sparsemoe.kernels import _GroupedMatmul, _WeightedIndexAdd
from sparsemoe.routing import Routing


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)


@pytest.mark.parametrize("counts", [[3, 0, 4], [0, 0, 2], [1, 1, 1], [0, 0, 0]])
def test_grouped_matmul_gradcheck(counts: list[int]) -> None:
    torch.manual_seed(0)
    xs = torch.randn(sum(counts), 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(counts), 4, 5, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, w: _GroupedMatmul.apply(a, w, _offsets(counts)), (xs, weight))


def test_weighted_index_add_gradcheck() -> None:
    torch.manual_seed(0)
    ys = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 2, 2, 1, 0, 4])
    assert gradcheck(lambda y, w: _WeightedIndexAdd.apply(y, token, w, 5), (ys, weight))


def test_grouped_matmul_float32_matches_loop_with_empty_experts() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 11, 0])
    xs = torch.randn(16, 8, requires_grad=True)
    weight = torch.randn(4, 8, 16, requires_grad=True)
    grad = torch.randn(16, 16)
    out = grouped_matmul(xs, weight, counts)
    expected = torch.cat([chunk @ weight[e] for e, chunk in enumerate(xs.split(counts.tolist()))])
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out, (xs, weight), grad)
    want = torch.autograd.grad(expected, (xs, weight), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_grouped_matmul_accepts_stride0_gradient() -> None:
    xs = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(2, 8, 16, requires_grad=True)
    grouped_matmul(xs, weight, torch.tensor([2, 4])).sum().backward()
    assert xs.grad is not None and weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["mlp", "swiglu", "linear"])
@pytest.mark.parametrize("tokens", [0, 1, 9])
def test_dispatch_matches_reference(dtype: torch.dtype, kind: str, tokens: int) -> None:
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
