"""Modern routers: the sigmoid gate (DeepSeek-V3), loss-free balancing, shared experts, load statistics."""

from __future__ import annotations

import json
import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsemoe
from sparsemoe import MoE, gates
from sparsemoe.gates import SigmoidGate, TopKGate
from sparsemoe.routing import Routing, max_violation

D, N = 8, 8


def _one_hot_gate(num_experts: int = 4, **options) -> SigmoidGate:
    """A gate whose input ``e_i`` (scaled) scores expert ``i`` highest: routings are known by hand."""
    gate = SigmoidGate(num_experts, num_experts, k=1, dtype=torch.float64, **options)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.eye(num_experts, dtype=torch.float64) * 4.0)
    return gate


def _rows(experts: list[int], num_experts: int = 4) -> torch.Tensor:
    return torch.eye(num_experts, dtype=torch.float64)[experts]


# ------------------------------------------------------------------ loss-free balancing


def test_bias_update_matches_a_hand_computed_example() -> None:
    gate = _one_hot_gate(bias_update_rate=0.1).train()
    gate(_rows([0, 0, 3]))
    gate(_rows([0, 2, 2]))  # counted too: every training forward since the last update
    gate.eval()(_rows([1, 1, 1, 1]))  # evaluation is not counted
    assert gate.balance_counts.tolist() == [3, 0, 2, 1]
    assert sparsemoe.update_balance(gate) == 1
    # mean load 1.5: b_i += 0.1 * sign(1.5 - load_i)
    torch.testing.assert_close(gate.balance_bias, torch.tensor([-0.1, 0.1, -0.1, 0.1]))
    assert gate.balance_counts.tolist() == [0, 0, 0, 0]
    gate.train()(_rows([1, 1, 2, 3]))  # counts [0, 2, 1, 1], mean 1: expert 0 up, 1 down, 2 and 3 unchanged
    sparsemoe.update_balance(gate)
    torch.testing.assert_close(gate.balance_bias, torch.tensor([0.0, 0.0, -0.1, 0.1]), atol=1e-7, rtol=0)


def test_rate_zero_leaves_the_bias_alone_and_update_finds_no_gate() -> None:
    gate = _one_hot_gate(bias_update_rate=0.0).train()
    gate(_rows([0, 0, 1]))
    assert gate.balance_counts is None and sparsemoe.update_balance(gate) == 0
    assert gate.balance_bias.tolist() == [0.0] * 4


def test_bias_selects_but_weights_stay_unbiased() -> None:
    gate = _one_hot_gate(normalize=False).eval()
    x = _rows([0, 1, 2])
    with torch.no_grad():
        gate.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 wins every selection
    r = gate(x)
    assert r.expert.tolist() == [3, 3, 3]
    scores = torch.sigmoid(gate.proj(x))
    torch.testing.assert_close(r.weight, scores[:, 3])  # s_3, not s_3 + b_3
    assert not gate.balance_bias.requires_grad and "balance_bias" not in dict(gate.named_parameters())


def test_update_balance_moves_loads_towards_the_mean() -> None:
    torch.manual_seed(0)
    gate = SigmoidGate(D, N, k=2, bias_update_rate=0.01)
    with torch.no_grad():
        gate.proj.weight[0] += 1.0  # expert 0 scores high for inputs with x_0 > 0 ...
    x = torch.randn(512, D).abs()  # ... which is all of them
    gate.eval()
    before = gate(x).load().float()
    gate.train()
    for _ in range(200):
        gate(x)
        sparsemoe.update_balance(gate)
    after = gate.eval()(x).load().float()
    assert after.max() / after.mean() < before.max() / before.mean() - 0.5


def test_topk_loss_free_bias_selects_and_weights_unbiased() -> None:
    gate = TopKGate(D, N, k=2, noisy=False, balance_weight=0.0, bias_update_rate=1e-3).eval()
    assert TopKGate(D, N, k=2).balance_bias is None  # no bias, no new state_dict key, by default
    x = torch.randn(20, D)
    with torch.no_grad():
        gate.balance_bias.copy_(torch.zeros(N).index_fill(0, torch.tensor([5]), 100.0))
    r = gate(x)
    chosen = r.expert.view(20, 2)
    assert (chosen == 5).any(1).all()
    logits = gate.proj(x)
    torch.testing.assert_close(r.weight.view(20, 2), torch.softmax(logits.gather(1, chosen), dim=-1))
    gate.train()(x)
    counts = gate.balance_counts.clone()
    assert int(counts.sum()) == 40 and int(counts[5]) == 20
    sparsemoe.update_balance(gate)
    assert float(gate.balance_bias[5]) == pytest.approx(100.0 - 1e-3)


def test_balancing_topk_gates_of_a_multitask_layer_count_their_own_loads() -> None:
    layer = sparsemoe.MultiTaskMoE(D, 4, N, 2, gate="topk", k=2, noisy=False, bias_update_rate=1e-3)
    layer.train()(torch.randn(9, D))
    for gate, routing in zip(layer.gates, layer.last_routing, strict=True):
        assert gate.balance_counts.tolist() == routing.load().tolist()
    assert sparsemoe.update_balance(layer) == 2


def test_bias_is_saved_in_checkpoints(tmp_path: Path) -> None:
    moe = MoE(D, 16, N, gate="sigmoid", k=2)
    moe.train()(torch.randn(30, D))
    sparsemoe.update_balance(moe)
    assert moe.gate.balance_bias.abs().sum() > 0
    path = sparsemoe.save_checkpoint(tmp_path / "ckpt", moe)
    fresh = MoE(D, 16, N, gate="sigmoid", k=2)
    sparsemoe.load_checkpoint(path, fresh)
    assert torch.equal(fresh.gate.balance_bias, moe.gate.balance_bias)
    assert "gate.balance_counts" not in moe.state_dict()  # counts restart at each update anyway


# ------------------------------------------------------------------ the sigmoid gate


def _group_reference(biased: torch.Tensor, num_groups: int, topk_groups: int, k: int) -> list[set[int]]:
    """Per row, by loops: experts of the best groups (sum of top-2), then the top k among them."""
    n = biased.shape[1]
    size = n // num_groups
    chosen = []
    for row in biased.tolist():
        groups = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
        kept = sorted(range(num_groups), key=lambda g: -groups[g])[:topk_groups]
        allowed = [e for g in kept for e in range(g * size, (g + 1) * size)]
        chosen.append(set(sorted(allowed, key=lambda e: -row[e])[:k]))
    return chosen


@pytest.mark.parametrize(("num_groups", "topk_groups", "k"), [(4, 2, 3), (8, 3, 2), (2, 1, 4), (16, 5, 5)])
def test_group_limited_routing_stays_inside_its_groups(num_groups: int, topk_groups: int, k: int) -> None:
    n = 16
    gate = SigmoidGate(D, n, k=k, num_groups=num_groups, topk_groups=topk_groups, dtype=torch.float64).eval()
    with torch.no_grad():
        gate.balance_bias.normal_(0, 0.2)  # groups are chosen by the biased scores
    x = torch.randn(50, D, dtype=torch.float64)
    r = gate(x)
    biased = torch.sigmoid(gate.proj(x)) + gate.balance_bias.double()
    size = n // num_groups
    group_score = biased.view(50, num_groups, size).topk(min(2, size), -1).values.sum(-1)
    kept = group_score.topk(topk_groups, -1).indices
    chosen = r.expert.view(50, k)
    assert ((chosen // size)[:, :, None] == kept[:, None, :]).any(-1).all()  # never outside its groups
    assert [set(row) for row in chosen.tolist()] == _group_reference(biased, num_groups, topk_groups, k)


def test_group_limit_changes_the_choice_and_no_limit_is_plain_topk() -> None:
    x = torch.randn(200, D, dtype=torch.float64)
    torch.manual_seed(1)
    limited = SigmoidGate(D, 16, k=4, num_groups=4, topk_groups=1, dtype=torch.float64).eval()
    torch.manual_seed(1)
    plain = SigmoidGate(D, 16, k=4, num_groups=4, dtype=torch.float64).eval()
    a, b = limited(x).expert.view(-1, 4), plain(x).expert.view(-1, 4)
    assert ((a // 4) == (a[:, :1] // 4)).all()  # one group per row
    assert not torch.equal(a.sort(1).values, b.sort(1).values)
    torch.testing.assert_close(b, torch.sigmoid(plain.proj(x)).topk(4, -1).indices)


@pytest.mark.parametrize("route_scale", [1.0, 2.5])
def test_weights_are_normalised_over_k_times_the_scale(route_scale: float) -> None:
    x = torch.randn(30, D, dtype=torch.float64)
    torch.manual_seed(2)
    normed = SigmoidGate(D, N, k=3, route_scale=route_scale, dtype=torch.float64).eval()
    torch.manual_seed(2)
    raw = SigmoidGate(D, N, k=3, normalize=False, route_scale=route_scale, dtype=torch.float64).eval()
    a, b = normed(x), raw(x)
    assert torch.equal(a.expert, b.expert)
    scores = torch.sigmoid(normed.proj(x)).gather(1, a.expert.view(30, 3))
    torch.testing.assert_close(a.weight.view(30, 3), route_scale * scores / scores.sum(1, keepdim=True))
    torch.testing.assert_close(b.weight.view(30, 3), route_scale * scores)
    torch.testing.assert_close(a.to_dense().sum(1), torch.full((30,), route_scale, dtype=torch.float64))


def test_sigmoid_gate_gradcheck_float64() -> None:
    gate = SigmoidGate(D, N, k=3, num_groups=4, topk_groups=2, route_scale=1.5, dtype=torch.float64).eval()
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: gate(v).to_dense(), (x,))
    w = gate.proj.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda weight: torch.func.functional_call(gate, {"proj.weight": weight}, (x.detach(),)).to_dense(), (w,)
    )


def test_sigmoid_layer_dispatch_equals_reference_in_float64() -> None:
    moe = MoE(D, 12, N, gate="sigmoid", k=2, num_groups=2, topk_groups=1, dtype=torch.float64).eval()
    x = torch.randn(11, D, dtype=torch.float64)
    y = moe(x)
    torch.testing.assert_close(y, sparsemoe.reference_dispatch(x, moe.last_routing, moe.experts))


def test_bf16_layer_routes_in_float32() -> None:
    torch.manual_seed(0)
    low = MoE(D, 16, N, gate="sigmoid", k=2, dtype=torch.bfloat16).eval()
    assert low.gate.proj.weight.dtype == torch.float32 and low.gate.balance_bias.dtype == torch.float32
    x = torch.randn(40, D, dtype=torch.bfloat16)
    y = low(x)
    assert y.dtype == torch.bfloat16 and low.last_routing.weight.dtype == torch.float32
    scores = torch.sigmoid(x.float() @ low.gate.proj.weight.t())
    torch.testing.assert_close(low.last_routing.expert, scores.topk(2, -1).indices.reshape(-1))
    # a gate built in bf16 still scores in float32 (its weights upcast), returning weights in the input's dtype
    gate = SigmoidGate(D, N, k=2, dtype=torch.bfloat16).eval()
    xb = torch.randn(40, D, dtype=torch.bfloat16)
    r = gate(xb)
    expected = torch.sigmoid(xb.float() @ gate.proj.weight.float().t()).topk(2, -1).indices
    assert torch.equal(r.expert, expected.reshape(-1)) and r.weight.dtype == torch.bfloat16


def test_seq_balance_loss_per_sequence_by_hand() -> None:
    gate = SigmoidGate(D, 4, k=2, seq_balance_weight=0.5, dtype=torch.float64).train()
    assert gate.id_kind() == "sequence" and SigmoidGate(D, 4).id_kind() is None
    x = torch.randn(7, D, dtype=torch.float64)
    ids = torch.tensor([3, 3, 3, 9, 9, 9, 9])
    r = gate(x, ids)
    s = torch.sigmoid(gate.proj(x))
    chosen = r.expert.view(7, 2)
    expected = 0.0
    for rows in (slice(0, 3), slice(3, 7)):
        length = rows.stop - rows.start
        f = torch.zeros(4, dtype=torch.float64).index_add(0, chosen[rows].reshape(-1), torch.ones(2 * length).double())
        f = f * 4 / (2 * length)
        p = (s[rows] / s[rows].sum(1, keepdim=True)).mean(0)
        expected = expected + (f * p).sum() / 2
    torch.testing.assert_close(r.aux_losses["seq_balance"], 0.5 * expected)
    whole = gate(x).aux_losses["seq_balance"]  # without ids: the batch is one sequence
    assert not torch.allclose(whole, r.aux_losses["seq_balance"])
    whole.backward()
    assert gate.proj.weight.grad is not None and gate.proj.weight.grad.abs().sum() > 0
    assert "seq_balance" not in gate.eval()(x, ids).aux_losses


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_groups": 3}, ValueError, "num_groups=3 must divide num_experts=8"),
        ({"num_groups": 4, "topk_groups": 5}, ValueError, "topk_groups must be between 1 and 4"),
        ({"num_groups": 4, "topk_groups": 1, "k": 3}, ValueError, "k=3 exceeds the 2 experts"),
        ({"route_scale": 0.0}, ValueError, "route_scale must be > 0"),
        ({"bias_update_rate": -1.0}, ValueError, "bias_update_rate must be >= 0"),
        ({"seq_balance_weight": "x"}, TypeError, "seq_balance_weight must be a number"),
    ],
)
def test_sigmoid_gate_rejects_bad_options(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        gates.build("sigmoid", D, N, **options)


def test_update_balance_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        sparsemoe.update_balance("model")  # type: ignore[arg-type]


# ------------------------------------------------------------------ shared experts


@pytest.mark.parametrize("shared_gate", [False, True])
def test_shared_experts_add_to_the_routed_output(shared_gate: bool) -> None:
    moe = MoE(
        D, 12, N, gate="sigmoid", k=2, expert="swiglu", shared_experts=2, shared_hidden=5, shared_gate=shared_gate
    )
    assert moe.shared_expert.d_hidden == 10  # two experts of width 5, stored as one MLP of width 10
    x = torch.randn(3, 4, D)
    y = moe(x)
    rows = x.reshape(-1, D)
    routed = sparsemoe.reference_dispatch(rows, moe.last_routing, moe.experts)
    w1, w2 = moe.shared_expert.w1[0], moe.shared_expert.w2[0]
    g, u = (rows @ w1).chunk(2, dim=-1)
    shared = (torch.nn.functional.silu(g) * u) @ w2
    if shared_gate:
        shared = torch.sigmoid(rows @ moe.shared_expert_gate.weight.t()) * shared
    torch.testing.assert_close(y.reshape(-1, D), routed + shared)
    (y.pow(2).sum() + moe.aux_loss()).backward()
    for name, param in moe.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_shared_experts_default_width_and_checkpoint_round_trip(tmp_path: Path) -> None:
    moe = MoE(D, 12, N, gate="topk", k=2, shared_experts=1, shared_gate=True)
    assert moe.shared_expert.d_hidden == 12 and moe.shared_expert.kind == "mlp"
    assert {"shared_expert.w1", "shared_expert.w2", "shared_expert_gate.weight"} <= set(moe.state_dict())
    path = sparsemoe.save_checkpoint(tmp_path / "ckpt", moe)
    fresh = MoE(D, 12, N, gate="topk", k=2, shared_experts=1, shared_gate=True)
    sparsemoe.load_checkpoint(path, fresh)
    x = torch.randn(5, D)
    torch.testing.assert_close(fresh.eval()(x), moe.eval()(x))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"shared_experts": -1}, "shared_experts must be >= 0"),
        ({"shared_gate": True}, "need shared_experts >= 1"),
        ({"shared_hidden": 4}, "need shared_experts >= 1"),
        ({"shared_experts": 1, "expert": "linear"}, "shared_experts needs expert='mlp' or 'swiglu'"),
    ],
)
def test_shared_expert_options_are_checked(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoE(D, 12, N, **options)


def test_one_line_layers_of_the_readme() -> None:
    deepseek = MoE(D, 16, 16, gate="sigmoid", k=4, num_groups=4, topk_groups=2, route_scale=2.5, shared_experts=1)
    qwen = MoE(D, 16, 16, gate="topk", k=4, noisy=False, normalize=False, shared_experts=1, shared_gate=True)
    for moe in (deepseek, qwen):
        assert moe(torch.randn(2, 5, D)).shape == (2, 5, D)


# ------------------------------------------------------------------ statistics


def test_routing_stats_report_max_violation_dead_experts_and_entropy() -> None:
    token = torch.tensor([0, 0, 1, 2, 3, 3])
    expert = torch.tensor([0, 1, 0, 0, 0, 2])
    weight = torch.tensor([0.5, 0.5, 1.0, 1.0, 0.25, 0.75])
    stats = Routing(token, expert, weight, num_experts=4, num_inputs=4).stats()
    assert stats.load == [4, 1, 1, 0] and stats.dead_experts == 1
    assert stats.max_violation == pytest.approx(4 / 1.5 - 1)  # mean load 6/4
    assert max_violation([3, 3, 3]) == 0.0 and max_violation([0, 0]) == 0.0
    assert max_violation([4, 1, 1, 0]) + 1 == pytest.approx(4 / 1.5)
    per_input = [math.log(2), 0.0, 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert stats.router_entropy == pytest.approx(sum(per_input) / 4)
    moe = MoE(D, 12, N, gate="sigmoid", k=2)
    moe(torch.randn(16, D))
    reported = sparsemoe.routing_stats(moe)["<model>"]
    assert {"max_violation", "dead_experts", "router_entropy"} <= set(reported)
    assert 0 < reported["router_entropy"] <= math.log(2) + 1e-6


# ------------------------------------------------------------------ 2 gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _balance_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    model = torch.nn.Sequential(_one_hot_gate(bias_update_rate=0.1), _one_hot_gate(bias_update_rate=0.2)).train()
    rows = [[0, 0, 0], [1, 3]][rank]  # summed over ranks: [3, 1, 0, 1], mean 1.25
    for gate in model:
        gate(_rows(rows))
    updated = sparsemoe.update_balance(model)
    result = {"updated": updated, "bias": [g.balance_bias.tolist() for g in model], "expert_parallel": "ok"}
    try:
        _check_expert_parallel(rank)
    except Exception as error:  # reported by the test; the other rank must not wait on this one
        result["expert_parallel"] = repr(error)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _check_expert_parallel(rank: int) -> None:
    """Sigmoid gate + gated shared expert, experts sharded over 2 ranks: the unsharded layer's output and input
    gradient on this rank's tokens, and a bias that stays identical over the ranks after update_balance."""
    from sparsemoe.distributed import expert_parallel

    torch.manual_seed(0)  # the same layer on every rank
    moe = MoE(6, 8, 4, gate="sigmoid", k=2, shared_experts=1, shared_gate=True, dtype=torch.float64)
    ref = MoE(6, 8, 4, gate="sigmoid", k=2, shared_experts=1, shared_gate=True, dtype=torch.float64)
    ref.load_state_dict(moe.state_dict())
    layer = expert_parallel(moe)
    x = torch.randn(5 + 2 * rank, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    outputs = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.pow(2).sum().backward()
        outputs.append((y.detach(), xi.grad))
    sparsemoe.update_balance(layer)  # collective
    bias = layer.gate.balance_bias.clone()
    everyone = [torch.zeros_like(bias) for _ in range(2)]
    dist.all_gather(everyone, bias)
    (y, gx), (y_ref, gx_ref) = outputs
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    assert torch.equal(everyone[0], everyone[1]) and bias.abs().sum() > 0


def _global_balance_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    torch.manual_seed(0)  # the same gate on both ranks
    gate = TopKGate(D, N, k=2, noisy=False, balance_loss="switch", balance_scope="global", dtype=torch.float64)
    x = torch.randn(6 + 3 * rank, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    loss = gate.train()(x).aux_losses["load_balance"]
    result = {
        "totals": gate.balance_totals.tolist(),
        "inputs": float(gate.balance_inputs),
        "local_choices": _choices(gate, x).tolist(),
        "loss": float(loss),
        "loss_from_totals": float(_switch_loss(gate, x, gate.balance_totals / gate.balance_inputs)),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_global_balance_all_reduces_f_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_global_balance_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert found[0]["totals"] == found[1]["totals"] and found[0]["inputs"] == found[1]["inputs"] == 15
    union = [a + b for a, b in zip(found[0]["local_choices"], found[1]["local_choices"], strict=True)]
    assert found[0]["totals"] == union  # f over both ranks' inputs
    for r in found:  # each rank: the global f with its own P
        assert r["loss"] == pytest.approx(r["loss_from_totals"], rel=1e-12)
    assert found[0]["loss"] != pytest.approx(found[1]["loss"])


def test_update_balance_all_reduces_the_counts_over_ranks(tmp_path: Path) -> None:
    mp.spawn(_balance_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    found = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert found[0] == found[1]  # every rank holds the same bias
    assert found[0]["updated"] == 2
    assert found[0]["expert_parallel"] == "ok", found[0]["expert_parallel"]
    for bias, rate in zip(found[0]["bias"], (0.1, 0.2), strict=True):
        assert bias == pytest.approx([-rate, rate, rate, rate])


def test_compiled_forward_counts_loads_like_eager() -> None:
    torch._dynamo.reset()
    moe = MoE(D, 12, N, gate="sigmoid", k=2, num_groups=2, topk_groups=1).train()
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    x = torch.randn(13, D)
    compiled(x)
    compiled(x)
    assert moe.gate.balance_counts.tolist() == (2 * moe.last_routing.load()).tolist()


def test_topk_z_loss_is_the_st_moe_formula() -> None:
    gate = TopKGate(D, N, k=2, noisy=False, balance_weight=0.0, z_loss_weight=0.5, dtype=torch.float64).train()
    x = torch.randn(10, D, dtype=torch.float64)
    r = gate(x)
    assert set(r.aux_losses) == {"z_loss"}
    torch.testing.assert_close(r.aux_losses["z_loss"], 0.5 * torch.logsumexp(gate.proj(x), -1).pow(2).mean())
    assert "z_loss" not in TopKGate(D, N, k=2).train()(x.float()).aux_losses  # off by default


# The router logits each gate's z-loss reads, computed by hand from its modules.
Z_LOSS_LOGITS = {
    "softmax": lambda g, x: g.proj(x),
    "topk": lambda g, x: g.proj(x),
    "switch": lambda g, x: g.proj(x),
    "sigmoid": lambda g, x: g.proj(x),
    "expert_choice": lambda g, x: g.proj(x),
    "dselect_k": lambda g, x: g.alpha_proj(x),
    "comet": lambda g, x: (g.leaf(x).view(x.shape[0], N, -1) + g.reach_probabilities(x).log()).flatten(1),
}


def test_every_gate_with_router_logits_has_a_z_loss() -> None:
    """The trait lists ``z_loss`` exactly for the gates above (a new gate with logits must join them)."""
    assert {n for n in gates.available() if "z_loss" in gates.aux_loss_names(n)} == set(Z_LOSS_LOGITS)


@pytest.mark.parametrize("name", sorted(Z_LOSS_LOGITS))
def test_z_loss_is_the_st_moe_formula_on_each_gates_logits(name: str) -> None:
    options = {"noisy": False} if name == "topk" else {}
    gate = gates.build(name, D, N, **gates.k_options(name, 2), z_loss_weight=0.5, dtype=torch.float64, **options)
    x = torch.randn(10, D, dtype=torch.float64)
    z = gate.train()(x).aux_losses["z_loss"]
    torch.testing.assert_close(z, 0.5 * torch.logsumexp(Z_LOSS_LOGITS[name](gate, x), -1).pow(2).mean())
    grads = torch.autograd.grad(z, list(gate.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the loss trains the router
    assert "z_loss" not in gate.eval()(x).aux_losses  # training only
    if name != "switch":  # switch keeps ST-MoE's 1e-3; every other gate is off by default
        assert "z_loss" not in gates.build(name, D, N).train()(x.float()).aux_losses


@pytest.mark.parametrize("name", sorted(set(gates.available()) - set(Z_LOSS_LOGITS)))
def test_gates_without_router_logits_reject_a_z_loss(name: str) -> None:
    with pytest.raises(ValueError, match=r"z_loss_weight=0.001: \w+ learns no router logits"):
        gates.build(name, D, N, z_loss_weight=1e-3)
    gate = gates.build(name, D, N, z_loss_weight=0.0)  # 0 is every gate's default
    assert gate.z_loss_weight == 0.0
    with pytest.raises(ValueError, match="z_loss_weight"):
        MoE(D, 4, N, gate=name, z_loss_weight=1e-3)


def test_batched_task_gates_share_a_call_only_with_equal_z_loss_weights() -> None:
    layer = sparsemoe.MultiTaskMoE(D, 4, N, 2, gate="comet", k=2, z_loss_weight=1e-3).train()
    layer.gates[1].z_loss_weight = 0.0
    x = torch.randn(9, D)
    routings = gates.route_tasks(layer.gates, x, None)
    assert "z_loss" in routings[0].aux_losses and "z_loss" not in routings[1].aux_losses


# ------------------------------------------------------------------ global-batch balance loss

GLOBAL_GATES = {
    "switch": {},
    "topk": {"k": 2, "noisy": False, "balance_loss": "switch"},
}


def _switch_loss(gate, x: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """``α · n · Σ f_i P_i`` with ``P`` the mean softmax of ``x``'s router logits, by hand."""
    return gate.balance_weight * N * (fraction * torch.softmax(gate.proj(x), -1).mean(0)).sum()


def _choices(gate, x: torch.Tensor) -> torch.Tensor:
    """``[n]``: how often each expert is among the top-k logits of the rows ``x`` (no bias, no noise)."""
    top = gate.proj(x).topk(gate.k, dim=-1).indices
    return torch.zeros(N, dtype=x.dtype).index_add_(0, top.flatten(), torch.ones(top.numel(), dtype=x.dtype))


@pytest.mark.parametrize("name", sorted(GLOBAL_GATES))
def test_global_balance_on_one_micro_batch_is_the_batch_loss(name: str) -> None:
    torch.manual_seed(0)
    batch = gates.build(name, D, N, dtype=torch.float64, **GLOBAL_GATES[name]).train()
    torch.manual_seed(0)
    global_ = gates.build(name, D, N, dtype=torch.float64, balance_scope="global", **GLOBAL_GATES[name]).train()
    x = torch.randn(11, D, dtype=torch.float64)
    expected = batch(x).aux_losses["load_balance"]
    torch.testing.assert_close(global_(x).aux_losses["load_balance"], expected)
    torch.testing.assert_close(expected, _switch_loss(batch, x, _choices(batch, x) / 11))


@pytest.mark.parametrize("name", sorted(GLOBAL_GATES))
def test_global_balance_counts_f_over_every_micro_batch_since_the_update(name: str) -> None:
    gate = gates.build(name, D, N, dtype=torch.float64, balance_scope="global", **GLOBAL_GATES[name]).train()
    x = torch.randn(12, D, dtype=torch.float64)
    parts = x.split([5, 4, 3])
    for m, part in enumerate(parts):
        seen = torch.cat(parts[: m + 1])  # the micro-batches of the step so far
        loss = gate(part).aux_losses["load_balance"]
        torch.testing.assert_close(loss, _switch_loss(gate, part, _choices(gate, seen) / len(seen)))
    # the last micro-batch's f is the whole (concatenated) batch's; P stays the micro-batch's
    torch.testing.assert_close(loss, _switch_loss(gate, parts[-1], _choices(gate, x) / 12))
    assert not torch.allclose(loss, _switch_loss(gate, parts[-1], _choices(gate, parts[-1]) / 3))
    gate.eval()(x)  # eval: the batch's own f, nothing accumulated
    assert float(gate.balance_inputs) == 12
    sparsemoe.update_balance(gate)  # a new global batch
    assert float(gate.balance_inputs) == 0
    loss = gate.train()(parts[1]).aux_losses["load_balance"]
    torch.testing.assert_close(loss, _switch_loss(gate, parts[1], _choices(gate, parts[1]) / 4))


def test_batched_task_gates_count_their_own_global_f() -> None:
    options = GLOBAL_GATES["topk"]
    layer = sparsemoe.MultiTaskMoE(D, 4, N, 3, gate="topk", balance_scope="global", **options).double().train()
    x = torch.randn(10, D, dtype=torch.float64)
    routings = layer.route(x)
    for gate, routing in zip(layer.gates, routings, strict=True):
        assert gate.balance_totals.tolist() == _choices(gate, x).tolist()
        torch.testing.assert_close(routing.aux_losses["load_balance"], _switch_loss(gate, x, _choices(gate, x) / 10))


def test_global_balance_needs_the_f_p_form_and_a_known_scope() -> None:
    with pytest.raises(ValueError, match="balance_scope='global' needs balance_loss='switch'"):
        TopKGate(D, N, balance_scope="global")
    with pytest.raises(ValueError, match="balance_scope"):
        gates.build("switch", D, N, balance_scope="step")
    with pytest.raises(ValueError, match="balance_loss"):
        TopKGate(D, N, balance_loss="gshard")
    assert gates.build("switch", D, N).balance_totals is None  # batch scope keeps no buffers


def test_batched_topk_gates_keep_their_own_biases() -> None:
    layer = sparsemoe.MultiTaskMoE(D, 4, N, 3, gate="topk", k=2, noisy=False, bias_update_rate=1e-3).eval()
    with torch.no_grad():
        for gate in layer.gates:
            gate.balance_bias.normal_(0, 1.0)
    x = torch.randn(15, D)
    batched = gates.route_tasks(list(layer.gates), x, None)
    for gate, routing in zip(layer.gates, batched, strict=True):
        alone = gate.route(x, None)
        assert torch.equal(routing.expert, alone.expert)
        torch.testing.assert_close(routing.weight, alone.weight)
