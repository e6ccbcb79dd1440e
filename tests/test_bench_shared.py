"""The shared-experts benchmark compares equal functions: its fused prototype is the layer, rearranged."""

from __future__ import annotations

import torch

from benchmarks import shared_experts
from benchmarks.shared_experts import FusedShared, Shape


def test_fused_prototype_matches_the_layer_with_split_shared_experts() -> None:
    layers = shared_experts._layers(Shape(tokens=23, d_model=8, d_hidden=4, experts=6, k=2, shared_hidden=12))
    dense, fused = layers["dense"], layers["fused"]
    assert isinstance(fused, FusedShared) and fused.split == 3 and fused.bank.num_experts == 6 + 3
    x = torch.randn(23, 8, requires_grad=True)
    outputs, grads = [], []
    for layer in (dense, fused):
        y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        outputs.append(y.detach())
        grads.append(gx)
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert outputs[0].abs().sum() > 0


def test_quick_section_reports_both_implementations() -> None:
    section, numbers = shared_experts.measure(
        shared_experts.SharedConfig((Shape(32, 8, 4, 4, 2, 4),), repeats=1, min_time=0.0)
    )
    assert section.title == "Shared experts: dense vs fused" and len(numbers) == 1
    assert {"forward_ratio", "step_ratio"} == set(numbers[0]) and all(r > 0 for r in numbers[0].values())
    assert "| T=32, d=8, n=4, k=2, h=4, shared width 4 |" in section.body
