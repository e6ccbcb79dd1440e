"""sparsemoe.kernels.ops: empty experts get zero weight gradients, double backward, and the custom ops' contracts."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from sparsemoe.dispatch import dispatch, reference_dispatch
from sparsemoe.experts import StackedExperts
from sparsemoe.gates.random import uniform_topk
from sparsemoe.kernels import grouped_matmul, ops, weighted_combine
from sparsemoe.routing import Routing


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)


@pytest.mark.parametrize("sync_free", [True, False])  # True: the masked fill used on CUDA
def test_zero_empty_groups_clears_exactly_the_empty_experts(sync_free: bool) -> None:
    grad = torch.full((4, 2, 3), float("nan"))
    grad[0] = grad[2] = 7.0
    ops.zero_empty_groups(grad, _offsets([5, 0, 2, 0]), sync_free=sync_free)
    assert (grad[0] == 7).all() and (grad[2] == 7).all()
    assert (grad[1] == 0).all() and (grad[3] == 0).all()


def test_fused_weight_grad_path_zeroes_groups_the_kernel_left_uninitialised(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU branch (fused ``grouped_mm`` weight gradient), forced on CPU with a kernel that leaves
    garbage in zero-size groups, as ``grouped_mm`` may on some GPUs."""
    calls = []

    def garbage_in_empty_groups(xs: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        out = torch.full((offsets.shape[0], xs.shape[1], grad.shape[1]), float("nan"))
        for e, rows in ops._segments(offsets):
            out[e] = xs[rows].t() @ grad[rows]
        return out

    monkeypatch.setattr(ops, "_use_fused_weight_grad", lambda xs, grad: True)
    monkeypatch.setattr(ops, "_fused_weight_grad", garbage_in_empty_groups)
    torch.manual_seed(0)
    counts = [3, 0, 5, 0]
    xs = torch.randn(8, 4, requires_grad=True)
    weight = torch.randn(4, 4, 8, requires_grad=True)
    grad_out = torch.randn(8, 8)
    grouped_matmul(xs, weight, _offsets(counts)).backward(grad_out)
    assert calls, "the fused branch was not taken"
    expected = torch.zeros(4, 4, 8)
    expected[0] = xs[:3].detach().t() @ grad_out[:3]
    expected[2] = xs[3:].detach().t() @ grad_out[3:]
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 2], [0, 0, 0]])
def test_grouped_matmul_gradgradcheck(counts: list[int]) -> None:
    torch.manual_seed(0)
    xs = torch.randn(sum(counts), 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(len(counts), 3, 4, dtype=torch.float64, requires_grad=True)
    offsets = _offsets(counts)
    assert gradgradcheck(lambda a, w: grouped_matmul(a, w, offsets), (xs, weight))


def test_weighted_combine_gradgradcheck() -> None:
    torch.manual_seed(0)
    ys = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(6, dtype=torch.float64, requires_grad=True)
    token = torch.tensor([0, 2, 2, 1, 0, 4])
    assert gradgradcheck(lambda y, w: weighted_combine(y, token, w, 5), (ys, weight))


@pytest.mark.parametrize("kind", ["mlp", "swiglu"])
def test_gradient_penalty_through_dispatch_matches_reference(kind: str) -> None:
    """``autograd.grad(create_graph=True)`` then a penalty on that gradient: the fast path must give the
    reference's second-order gradients (it used to give None under ``allow_unused``)."""
    torch.manual_seed(0)
    experts = StackedExperts(4, 5, 6, kind=kind, bias=True).double()
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    routing = Routing.from_topk(torch.randint(0, 3, (7, 2)), weight, 4)  # expert 3 stays empty
    params = [experts.w1, experts.w2, experts.b1]
    results = []
    for run in (dispatch, reference_dispatch):
        y = run(x, routing, experts)
        grads = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, [*params, x, weight]))
    for fast, slow in zip(*results, strict=True):
        torch.testing.assert_close(fast, slow)
    assert results[0][0][3].abs().sum() == 0  # the empty expert


def test_eager_functions_first_order_gradcheck() -> None:
    torch.manual_seed(0)
    xs = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda a, w: ops._GroupedMatmulFn.apply(a, w, _offsets([1, 0, 4])), (xs, weight))


@pytest.mark.parametrize("counts", [[2, 0, 3], [0, 0, 0]])
def test_custom_ops_pass_opcheck(counts: list[int]) -> None:
    """Schema, fake (shape-only) implementation and registered autograd agree with the real kernels."""
    torch.manual_seed(0)
    offsets = _offsets(counts)
    n_rows = sum(counts)
    xs = torch.randn(n_rows, 4, requires_grad=True)
    weight = torch.randn(len(counts), 4, 8, requires_grad=True)
    grad = torch.randn(n_rows, 8, requires_grad=True)
    torch.library.opcheck(ops.grouped_matmul_op, (xs, weight, offsets))
    torch.library.opcheck(ops.grouped_matmul_weight_grad_op, (xs, grad, offsets))
    token = torch.randint(0, 3, (n_rows,))
    torch.library.opcheck(ops.weighted_combine_op, (grad, token, torch.rand(n_rows, requires_grad=True), 3))


def test_uniform_topk_draws_the_generator_stream_and_compiles() -> None:
    """The op a RandomGate can draw with under torch.compile: same stream as its torch.Generator."""
    generator = torch.Generator().manual_seed(3)
    state = torch.Generator().manual_seed(3).get_state()
    for rows in (4, 7):
        expected = torch.rand(rows, 5, generator=generator).topk(2, dim=-1).indices
        torch.testing.assert_close(uniform_topk(state, rows, 5, 2), expected)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, x: uniform_topk(s, x.shape[0], 5, 2), fullgraph=True, dynamic=True)
    expected = torch.rand(6, 5, generator=generator).topk(2, dim=-1).indices
    torch.testing.assert_close(compiled(state, torch.empty(6, 1)), expected)
    torch.testing.assert_close(state, generator.get_state())


def test_weight_grad_function_gradgradcheck() -> None:
    """The Function that differentiates the weight gradient under torch.func (elsewhere the op does)."""
    torch.manual_seed(0)
    xs = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    offsets = _offsets([2, 0, 3])
    assert gradgradcheck(lambda a, g: ops._WeightGradFn.apply(a, g, offsets), (xs, grad))


def test_grouped_matmul_and_combine_under_vmap_and_grad_match_a_loop() -> None:
    """Batched expert boundaries (one routing per sample): the vmap rules loop over the samples."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    xs, weight = torch.randn(3, 6, 4), torch.randn(3, 4, 5)
    offsets = torch.stack([_offsets(c) for c in ([2, 0, 4], [6, 0, 0], [1, 2, 3])])  # [B, n]
    token, pair_weight = torch.randint(0, 4, (3, 6)), torch.rand(3, 6)

    def loss(w: torch.Tensor, x: torch.Tensor, off: torch.Tensor, tok: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
        return weighted_combine(grouped_matmul(x, w, off), tok, pw, 4).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(weight, xs, offsets, token, pair_weight)  # [B, n, d, h]
    outputs = vmap(lambda x, off: grouped_matmul(x, weight, off))(xs, offsets)
    for b in range(3):
        w = weight.clone().requires_grad_()
        (want,) = torch.autograd.grad(loss(w, xs[b], offsets[b], token[b], pair_weight[b]), w)
        torch.testing.assert_close(got[b], want)
        torch.testing.assert_close(outputs[b], grouped_matmul(xs[b], weight, offsets[b]))


def test_kernels_sit_at_the_bottom_of_the_import_graph() -> None:
    """``sparsemoe.kernels`` imports nothing from the package above it; ``ops`` imports no sibling;
    ``triton_fused`` only ``ops`` (the backends import it lazily, by name)."""
    import ast
    from pathlib import Path

    package = Path(ops.__file__).parent
    imported: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from above the kernels package"
                if node.level == 1:
                    names.add(node.module or "")
                else:
                    assert not (node.module or "").startswith("sparsemoe"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("sparsemoe") for a in node.names), path.name
        imported[path.stem] = names
    assert imported["ops"] == set()
    assert imported["triton_fused"] == {"ops"}
    assert imported["backends"] == {"ops"}
    assert imported["__init__"] == {"ops", "backends"}
