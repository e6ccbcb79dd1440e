"""MoE and MultiTaskMoE: shapes, routing state, losses, capacity, and multi-task sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsemoe import ModuleExperts, MoE, MultiTaskMoE, dispatch
from sparsemoe.routing import Routing

from conftest import gate_kwargs


@pytest.mark.parametrize("shape", [(7, 16), (2, 5, 16), (2, 3, 4, 16), (0, 16)])
def test_moe_any_leading_shape(shape: tuple[int, ...], gate_name: str) -> None:
    moe = MoE(16, 24, 4, gate=gate_name, **gate_kwargs(gate_name, 4))
    y = moe(torch.randn(*shape))
    assert y.shape == shape
    assert moe.last_routing.num_inputs == int(torch.tensor(shape[:-1]).prod())


def test_moe_trains_and_reports(gate_name: str) -> None:
    moe = MoE(8, 16, 4, gate=gate_name, expert="swiglu", **gate_kwargs(gate_name, 4))
    x = torch.randn(3, 6, 8)
    loss = moe(x).pow(2).mean() + moe.aux_loss()
    loss.backward()
    grads = [p.grad for p in moe.experts.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    stats = moe.routing_stats()
    assert len(stats["load"]) == 4 and sum(stats["load"]) == moe.last_routing.num_pairs
    assert stats["active_per_input"] == pytest.approx(moe.last_routing.num_pairs / 18)


def test_aux_loss_is_sum_of_gate_losses() -> None:
    moe = MoE(8, 16, 4, gate="switch")
    assert moe.aux_loss().item() == 0.0  # before any forward
    moe(torch.randn(10, 8))
    r = moe.last_routing
    torch.testing.assert_close(moe.aux_loss(), r.aux_losses["load_balance"] + r.aux_losses["z_loss"])


def test_capacity_limit_drops_pairs_and_outputs_zero_for_them() -> None:
    moe = MoE(8, 16, 2, gate="hash", k=1, capacity_limit=0.5)
    x = torch.randn(40, 8)
    y = moe(x)
    r = moe.last_routing
    assert int(r.load().max()) <= 10  # ceil(0.5 * 40 / 2)
    assert r.dropped_fraction == pytest.approx(1 - r.num_pairs / 40)
    dropped = torch.ones(40, dtype=torch.bool)
    dropped[r.token] = False
    assert bool((y[dropped] == 0).all())
    assert moe.routing_stats()["dropped_fraction"] == r.dropped_fraction


def test_with_capacity_keeps_first_inputs() -> None:
    r = Routing(torch.arange(6), torch.tensor([0, 1, 0, 0, 1, 0]), torch.ones(6), num_experts=2, num_inputs=6)
    kept = r.with_capacity(2 / 3)  # capacity ceil(2/3 * 6 / 2) = 2 per expert
    assert kept.token.tolist() == [0, 1, 2, 4]
    assert kept.dropped_fraction == pytest.approx(2 / 6)


def test_multitask_equals_separate_dispatch(gate_name: str) -> None:
    mt = MultiTaskMoE(12, 6, 5, num_tasks=3, gate=gate_name, **gate_kwargs(gate_name, 5))
    x = torch.randn(9, 12)
    outputs = mt(x)
    assert len(outputs) == 3
    for out, routing in zip(outputs, mt.last_routing, strict=True):
        torch.testing.assert_close(out, dispatch(x, routing, mt.experts))
    (sum(o.sum() for o in outputs) + mt.aux_loss()).backward()


def test_multitask_separate_gate_input_and_module_experts() -> None:
    cnn = [nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 5)) for _ in range(3)]
    mt = MultiTaskMoE(
        36, 5, 3, num_tasks=2, gate="topk", k=2, expert=ModuleExperts(cnn, d_out=5, input_dims=3), d_gate=36
    )
    images = torch.randn(4, 1, 6, 6)
    outputs = mt(images, gate_input=images.flatten(1))
    assert [o.shape for o in outputs] == [(4, 5), (4, 5)]
    assert len(mt.routing_stats()) == 2


def test_gate_instance_and_kwargs_pass_through() -> None:
    moe = MoE(8, 16, 6, gate="comet", k=3, gamma=0.5, entropy_weight=0.0)
    assert moe.gate.k == 3 and moe.gate.gamma == 0.5
    moe.train()
    moe(torch.randn(4, 8))
    assert moe.last_routing.aux_losses == {}


def test_state_dict_round_trip_reproduces_output() -> None:
    a = MoE(8, 16, 4, gate="dselect_k", k=2).eval()
    b = MoE(8, 16, 4, gate="dselect_k", k=2).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(a(x), b(x))
