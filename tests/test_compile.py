"""``torch.compile(moe, fullgraph=True, dynamic=True)``: no graph break, same forward and backward as eager.

Compiling costs ~10 s per gate on a quiet CPU (inductor's C++ code generation), so the shapes are tiny.
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


def _step(module: torch.nn.Module, moe: sparsemoe.MoE, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    moe.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(1)  # the top-k gate's noise
    if isinstance(moe.gate, sparsemoe.gates.RandomGate):
        moe.gate.manual_seed(1)  # the same expert draws in the compiled and the eager step
    y = module(x)
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
