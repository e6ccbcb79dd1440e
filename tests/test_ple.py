"""CGC (task-specific + shared experts, each task's gate over its own and the shared ones) and PLE."""

from __future__ import annotations

import pytest
import torch

from sparsemoe import CGC, aux_loss, routing_stats
from sparsemoe.models import PLE


@pytest.mark.parametrize("gate", ["softmax", "topk", "sigmoid"])
def test_each_task_gate_reaches_only_its_own_and_the_shared_experts(gate: str) -> None:
    layer = CGC(8, 6, num_tasks=3, task_experts=2, shared_experts=2, gate=gate, shared_gate=True)
    assert layer.num_experts == 3 * 2 + 2
    x = torch.randn(40, 8)
    outs = layer(x)
    assert len(outs) == 4 and all(o.shape == (40, 6) for o in outs)
    shared = {6, 7}
    for t, routing in enumerate(layer.last_routing or []):
        used = set(routing.expert.tolist())
        allowed = set(range(8)) if t == 3 else {2 * t, 2 * t + 1} | shared
        assert used <= allowed
        if gate == "softmax":  # dense gate: every allowed expert is used
            assert used == allowed
    stats = layer.routing_stats()
    assert [sum(s["load"][:6]) for s in stats[:3]] == [
        sum(s["load"][2 * t : 2 * t + 2]) for t, s in enumerate(stats[:3])
    ]


def test_cgc_task_output_is_the_mix_of_its_experts_on_its_own_input() -> None:
    layer = CGC(4, 3, num_tasks=2, task_experts=1, shared_experts=1, gate="softmax")
    inputs = [torch.randn(5, 4) for _ in range(3)]  # task 0, task 1, shared
    outs = layer(inputs)
    assert len(outs) == 2  # no shared gate: one output per task
    for t in range(2):
        weights = torch.softmax(layer.gates[t].proj(inputs[t]), -1)  # [5, 2]: own expert, shared expert
        own = layer.experts.forward_expert(t, inputs[t])
        shared = layer.experts.forward_expert(2, inputs[2])
        torch.testing.assert_close(outs[t], weights[:, :1] * own + weights[:, 1:] * shared)


def test_cgc_rejects_bad_arguments_before_building() -> None:
    with pytest.raises(ValueError, match="task_experts \\+ shared_experts"):
        CGC(4, 3, num_tasks=2, task_experts=0, shared_experts=0)
    with pytest.raises(TypeError, match="gate spec"):
        CGC(4, 3, num_tasks=2, task_experts=1, shared_experts=1, gate=object())  # type: ignore[arg-type]
    layer = CGC(4, 3, num_tasks=2, task_experts=1, shared_experts=1)
    with pytest.raises(ValueError, match="num_tasks \\+ 1 = 3"):
        layer([torch.randn(2, 4)] * 2)


def test_ple_shapes_and_gradients_reach_every_level() -> None:
    model = PLE(10, 8, [1, 3], levels=3, task_experts=2, shared_experts=1, gate="topk", k=2, tower_hidden=16)
    x = torch.randn(32, 10)
    outs = model(x)
    assert [o.shape for o in outs] == [(32, 1), (32, 3)]
    assert [len(level.gates) for level in model.levels] == [3, 3, 2]  # shared gate on all but the last level
    assert torch.equal(model.aux_loss(), aux_loss(model))
    (outs[0].sum() + outs[1].pow(2).sum() + model.aux_loss()).backward()
    for name, p in model.named_parameters():
        if "noise_proj" in name:
            continue  # the noise projections start at zero and are read in training only through the noise
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert len(routing_stats(model)) == 3


def test_ple_task_losses_stay_in_their_own_experts_at_the_last_level() -> None:
    model = PLE(6, 4, [1, 1], levels=1, task_experts=1, shared_experts=1, gate="softmax")
    outs = model(torch.randn(16, 6))
    outs[0].sum().backward()  # task 0's loss: task 1's expert and gate get no gradient
    level = model.levels[0]
    assert level.gates[1].proj.weight.grad is None or level.gates[1].proj.weight.grad.abs().sum() == 0
    grads = {n: p.grad for n, p in level.experts.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None, name
        assert grad[1].abs().sum() == 0 and grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0, name


def test_routing_window_sums_loads_since_the_last_reset() -> None:
    from sparsemoe import MoE

    layer = MoE(8, 16, 4, gate="topk", k=2, noisy=False)
    xs = [torch.randn(10, 8) for _ in range(3)]
    loads = []
    for x in xs:
        layer(x)
        loads.append(layer.routing_stats()["load"])
    total = [sum(col) for col in zip(*loads, strict=True)]
    window = layer.routing_stats(window=True)
    assert window["load"] == total and sum(total) == 3 * 10 * 2
    assert window["max_violation"] == pytest.approx(max(total) * 4 / sum(total) - 1)
    assert window["dead_experts"] == sum(c == 0 for c in total)
    layer.reset_routing_window()
    with pytest.raises(RuntimeError, match="since the last reset"):
        layer.routing_stats(window=True)
    layer(xs[0])
    assert layer.routing_stats(window=True)["load"] == loads[0]
    cgc = CGC(8, 4, num_tasks=2, task_experts=1, shared_experts=1, gate="softmax")
    cgc(xs[0])
    cgc(xs[1])
    assert [w["load"] for w in cgc.routing_stats(window=True)] == [[20, 0, 20], [0, 20, 20]]
