"""MoE and MultiTaskMoE: shapes, routing state, losses, capacity, and multi-task sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsemoe
from sparsemoe import ModuleExperts, MoE, MultiTaskMoE, StackedExperts, gates
from sparsemoe.dispatch import dispatch

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


# ----------------------------------------------------------------------------- symmetry of the two layers
def test_multitask_takes_any_leading_shape() -> None:
    mt = MultiTaskMoE(8, 6, 4, num_tasks=2, gate="topk", k=2)
    outputs = mt(torch.randn(2, 5, 8))
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 6), (2, 5, 6)]
    flat = mt(torch.randn(10, 8))
    assert [tuple(o.shape) for o in flat] == [(10, 6), (10, 6)]


def test_gate_input_with_other_row_count_is_an_error() -> None:
    mt = MultiTaskMoE(8, 6, 4, num_tasks=2, gate="topk", k=2, d_gate=3)
    with pytest.raises(ValueError, match="gate_input has 4 rows but x has 5"):
        mt(torch.randn(5, 8), gate_input=torch.randn(4, 3))


@pytest.mark.parametrize("layer", ["moe", "multitask"])
def test_layers_take_a_gate_by_spec_instance_or_factory(layer: str) -> None:
    if layer == "moe":
        by_spec = MoE(8, 16, 4, gate=gates.parse("topk+", k=1))
        assert by_spec.search is not None and by_spec.gate.k == 1
        instance = gates.build("comet", 8, 4, k=2)
        assert MoE(8, 16, 4, gate=instance).gate is instance
        with pytest.raises(ValueError, match="go to the gate itself"):
            MoE(8, 16, 4, gate=instance, gamma=0.5)
    else:
        listed = [gates.build("topk", 8, 4, k=1), gates.build("hash", 8, 4)]
        mt = MultiTaskMoE(8, 6, 4, num_tasks=2, gate=listed)
        assert list(mt.gates) == listed
        made = MultiTaskMoE(8, 6, 4, num_tasks=3, gate=lambda: gates.build("switch", 8, 4))
        assert len(made.gates) == 3 and made.gates[0] is not made.gates[1]
        with pytest.raises(TypeError, match="one gate per task"):
            MultiTaskMoE(8, 6, 4, num_tasks=2, gate=listed[0])
        with pytest.raises(ValueError, match="exactly num_tasks=3"):
            MultiTaskMoE(8, 6, 4, num_tasks=3, gate=listed)


def test_expert_choice_capacity_factor_reaches_the_gate() -> None:
    moe = MoE(8, 16, 4, gate="expert_choice", k=1, capacity_factor=2.0)
    assert moe.gate.capacity_factor == 2.0 and moe.capacity_limit is None
    moe(torch.randn(20, 8))
    assert int(moe.last_routing.load().max()) == 10  # ceil(2.0 * 20 * 1 / 4)
    with pytest.raises(TypeError, match="unexpected option"):
        MoE(8, 16, 4, gate="topk", capacity_factor=2.0)  # top-k has no capacity of its own


def test_module_experts_expose_d_out() -> None:
    bank = ModuleExperts([nn.Linear(4, 3) for _ in range(2)], d_out=3)
    assert bank.d_out == 3 and StackedExperts(2, 4, 8, 5).d_out == 5


# ----------------------------------------------------------------------------- dtypes and devices
@pytest.mark.parametrize("layer", ["moe", "multitask"])
def test_wrong_input_dtype_is_a_clear_error(layer: str) -> None:
    module = MoE(8, 16, 4) if layer == "moe" else MultiTaskMoE(8, 6, 4, 2)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the .* parameters are torch.float32"):
        module(torch.randn(3, 8, dtype=torch.float64))


def test_factory_arguments_and_float32_router() -> None:
    moe = MoE(8, 16, 4, gate="topk", k=2, dtype=torch.bfloat16, device="cpu")
    assert moe.experts.w1.dtype == torch.bfloat16
    assert moe.gate.proj.weight.dtype == torch.float32  # low-precision layers keep the router in float32
    y = moe(torch.randn(5, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and moe.last_routing.weight.dtype == torch.float32
    full = MoE(8, 16, 4, gate="topk", k=2, dtype=torch.float64)
    assert full.gate.proj.weight.dtype == torch.float64
    mixed = MultiTaskMoE(8, 6, 4, 2, gate="comet", k=2, dtype=torch.bfloat16, router_dtype=torch.float64)
    assert mixed.gates[0].split.weight.dtype == torch.float64


@pytest.mark.parametrize("name", gates.available())
def test_bf16_autocast_keeps_routing_and_is_close_to_float32(name: str) -> None:
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, gate=name, **gate_kwargs(name, 4)).eval()
    x = torch.randn(64, 16)

    def run() -> torch.Tensor:
        if isinstance(moe.gate, gates.RandomGate):
            moe.gate.manual_seed(0)  # the same draws in both passes
        return moe(x)

    reference = run()
    routing = moe.last_routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    assert low.dtype == torch.bfloat16  # the experts ran in bf16
    assert torch.equal(moe.last_routing.expert, routing.expert) and torch.equal(moe.last_routing.token, routing.token)
    torch.testing.assert_close(moe.last_routing.weight, routing.weight)  # gate logits stayed in float32
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.02)


def test_bf16_parameters_route_like_float32() -> None:
    torch.manual_seed(0)
    full = MoE(16, 32, 8, gate="topk", k=2).eval()
    low = MoE(16, 32, 8, gate="topk", k=2, dtype=torch.bfloat16).eval()
    low.load_state_dict(full.state_dict())  # experts rounded to bf16, router copied in float32
    x = torch.randn(64, 16).bfloat16()
    full(x.float())
    y = low(x)
    assert torch.equal(low.last_routing.expert, full.last_routing.expert)
    torch.testing.assert_close(y.float(), full(x.float()), rtol=0.05, atol=0.02)


# ----------------------------------------------------------------------------- model-wide helpers
def test_aux_loss_and_routing_stats_over_a_model() -> None:
    model = nn.Sequential(MoE(8, 16, 4, gate="switch"), nn.ReLU(), MoE(8, 16, 4, gate="topk", k=2)).train()
    assert float(sparsemoe.aux_loss(model)) == 0.0 and sparsemoe.routing_stats(model) == {}
    model(torch.randn(6, 8))
    expected = model[0].aux_loss() + model[2].aux_loss()
    torch.testing.assert_close(sparsemoe.aux_loss(model), expected)
    stats = sparsemoe.routing_stats(model)
    assert set(stats) == {"0", "2"} and stats["2"]["active_per_input"] == 2.0
    assert float(sparsemoe.aux_loss(nn.Linear(2, 2))) == 0.0


def test_layer_deep_copies_and_pickles_after_a_training_forward() -> None:
    import copy
    import pickle

    moe = MoE(8, 16, 4, gate="comet", k=2).train()
    moe(torch.randn(5, 8)).sum()  # the last routing holds an autograd graph
    for clone in (copy.deepcopy(moe), pickle.loads(pickle.dumps(moe))):
        assert clone.last_routing is None and moe.last_routing is not None
        torch.testing.assert_close(clone.eval()(torch.ones(2, 8)), moe.eval()(torch.ones(2, 8)))
        moe.train()
