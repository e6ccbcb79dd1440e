"""``torch.compile(moe, fullgraph=True, dynamic=True)``: no graph break, same forward and backward as eager.

Compiling with inductor costs ~10 s per gate on a quiet CPU (its C++ code generation), so the shapes
are tiny and only four gates go through it; every registered gate, plain and "+", is compiled with
the ``aot_eager`` backend, which captures the same full forward and backward graphs (a graph break
fails ``fullgraph=True`` there too) without generating code.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config

import sparsemoe

GATES = {
    "topk": {"k": 2},  # noisy by default: inductor's fallback_random draws eager's noise
    "switch": {},
    "hash": {"k": 2},
    "random": {"k": 2},
    "sigmoid": {"k": 2, "num_groups": 2, "topk_groups": 1},  # counts loads in a buffer while training
}


def _step(
    module: torch.nn.Module, moe: sparsemoe.MoE, x: torch.Tensor, ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    moe.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(1)  # the top-k gate's noise
    if isinstance(moe.gate, sparsemoe.gates.RandomGate):
        moe.gate.manual_seed(1)  # the same expert draws in the compiled and the eager step
    y = module(x) if ids is None else module(x, ids)
    (y.pow(2).sum() + moe.aux_loss()).backward()
    grads = [p.grad for p in moe.parameters() if p.grad is not None]
    assert x.grad is not None
    return y.detach(), [x.grad, *grads]


@pytest.mark.parametrize(
    "gate",
    list(GATES),
)
@torch._inductor.config.patch(fallback_random=True)
def test_compiled_moe_matches_eager(gate: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = sparsemoe.MoE(16, 32, 4, gate=gate, expert="swiglu" if gate == "hash" else "mlp", **GATES[gate])
    compiled = torch.compile(moe, fullgraph=True, dynamic=True)
    for tokens in (10, 23):  # a second size must reuse the dynamic graph, not recompile
        x = torch.randn(tokens, 16, requires_grad=True)
        with torch._dynamo.config.patch(error_on_recompile=tokens != 10):
            y_compiled, g_compiled = _step(compiled, moe, x)
        y_eager, g_eager = _step(moe, moe, x)
        torch.testing.assert_close(y_compiled, y_eager)
        assert len(g_compiled) == len(g_eager)
        for a, b in zip(g_compiled, g_eager, strict=True):
            torch.testing.assert_close(a, b)
    if gate == "hash":  # check_finite becomes a device-side assert in the compiled graph
        with pytest.raises(RuntimeError, match="NaN or infinite"):
            compiled(torch.full((5, 16), float("nan")))
        x, ids = torch.randn(7, 16), torch.arange(7) * 5  # routing by ids: check_ids asserts on the device
        torch.testing.assert_close(compiled(x, ids), moe(x, ids))
        with pytest.raises(RuntimeError, match="non-negative"):
            compiled(x, -ids - 1)


ALL_SPECS = [*sparsemoe.gates.available(), *(name + "+" for name in sparsemoe.gates.available())]


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_gate_and_its_plus_variant_compiles_without_graph_breaks(spec: str) -> None:
    """``fullgraph=True`` for every registered gate and its local-search ("+") variant: forward and
    backward graphs captured whole, the same outputs and gradients as eager. A "+" gate compiles
    once its search has hardened; before, compiling it raises a clear error (the soft phase's
    schedule and Hungarian assignment run on the host)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    name = spec.removesuffix("+")
    options = {**sparsemoe.gates.k_options(name, 2), **({"local_search_steps": 1} if spec != name else {})}
    moe = sparsemoe.MoE(16, 32, 4, gate=spec, **options)
    compiled = torch.compile(moe, fullgraph=True, dynamic=True, backend="aot_eager")
    x, ids = torch.randn(10, 16, requires_grad=True), torch.arange(10)
    args = (x, ids) if name == "hash" else (x,)
    if spec != name:
        with pytest.raises(RuntimeError, match="before it hardened"):
            compiled(*args)
        for _ in range(2):  # one soft step, then the forward that hardens
            moe(*args)
        assert bool(moe.search.hardened)
    y_compiled, g_compiled = _step(compiled, moe, *args)
    y_eager, g_eager = _step(moe, moe, *args)
    torch.testing.assert_close(y_compiled, y_eager)
    assert len(g_compiled) == len(g_eager)
    for a, b in zip(g_compiled, g_eager, strict=True):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- torch.func and torch.jit
@pytest.mark.parametrize(("gate", "options"), [("topk", {"k": 2, "noisy": False}), ("hash", {"k": 2})])
def test_per_sample_gradients_with_torch_func_match_a_loop(gate: str, options: dict) -> None:
    """``vmap(grad(loss))`` over samples of a few tokens each: one autograd pass per sample, stacked."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    moe = sparsemoe.MoE(8, 16, 4, gate=gate, **options)
    params = {name: p.detach() for name, p in moe.named_parameters()}
    x, ids = torch.randn(5, 6, 8), torch.randint(0, 100, (5, 6))  # 5 samples of 6 tokens

    def loss(p: dict[str, torch.Tensor], xs: torch.Tensor, id_s: torch.Tensor) -> torch.Tensor:
        args = (xs, id_s) if gate == "hash" else (xs,)
        return functional_call(moe, p, args).pow(2).mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, ids)
    single = grad(loss)(params, x[2], ids[2])
    for i in range(x.shape[0]):
        expected = torch.autograd.grad(loss(dict(moe.named_parameters()), x[i], ids[i]), list(moe.parameters()))
        for (name, got), want in zip(per_sample.items(), expected, strict=True):
            assert got.shape == (x.shape[0], *want.shape)
            torch.testing.assert_close(got[i], want, msg=name)
            if i == 2:
                torch.testing.assert_close(single[name], want)


def test_jit_trace_works_at_the_traced_shape_and_script_is_unsupported() -> None:
    torch.manual_seed(0)
    moe = sparsemoe.MoE(8, 16, 4, gate="topk", k=2, noisy=False).eval()
    with pytest.warns(torch.jit.TracerWarning):  # sizes and checks become constants
        traced = torch.jit.trace(moe, (torch.randn(6, 8),), check_trace=False)
    assert "sparsemoe::grouped_matmul" in str(traced.graph)  # the custom ops are recorded, not inlined
    x = torch.randn(6, 8)
    torch.testing.assert_close(traced(x), moe(x))
    with pytest.raises(Exception):  # noqa: B017 - TorchScript's frontend raises several types
        torch.jit.script(moe)
