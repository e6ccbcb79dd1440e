"""Every gate: shapes, weights, sparsity, saturation, and the smooth-step's calculus."""

from __future__ import annotations

import pytest
import torch

from sparsemoe import MoE, gates
from sparsemoe.gates import smooth_step

from conftest import EXACT_K_GATES, NORMALISED_GATES, gate_kwargs

T, D, N = 37, 12, 6


def route(name: str, x: torch.Tensor, n: int = N, train: bool = True):
    gate = gates.build(name, x.shape[1], n, **gate_kwargs(name, n))
    gate.train(train)
    return gate, gate(x)


def test_registry_lists_required_gates() -> None:
    required = {"softmax", "topk", "switch", "hash", "random", "expert_choice", "dselect_k", "comet"}
    assert required <= set(gates.available())


def test_routing_shapes_and_ranges(gate_name: str) -> None:
    _, r = route(gate_name, torch.randn(T, D))
    assert r.token.shape == r.expert.shape == r.weight.shape
    assert r.token.dtype == r.expert.dtype == torch.long
    assert r.num_inputs == T and r.num_experts == N
    assert int(r.token.min()) >= 0 and int(r.token.max()) < T
    assert int(r.expert.min()) >= 0 and int(r.expert.max()) < N
    assert bool((r.weight >= 0).all())
    # a (token, expert) cell appears at most once
    keys = r.token * N + r.expert
    assert keys.unique().numel() == keys.numel()


@pytest.mark.parametrize("name", NORMALISED_GATES)
def test_weights_sum_to_one_per_input(name: str) -> None:
    _, r = route(name, torch.randn(T, D))
    sums = torch.zeros(T).index_add(0, r.token, r.weight.detach())
    torch.testing.assert_close(sums, torch.ones(T), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", EXACT_K_GATES)
def test_exactly_k_experts_per_input(name: str) -> None:
    _, r = route(name, torch.randn(T, D))
    assert bool((r.active_per_input() == 2).all())


def test_switch_is_top1_of_softmax() -> None:
    gate, r = route("switch", torch.randn(T, D))
    probs = torch.softmax(gate.proj(torch.randn(0, D)), -1)  # exercises T=0 too
    assert probs.shape == (0, N)
    x = torch.randn(T, D)
    r = gate(x)
    full = torch.softmax(gate.proj(x), -1)
    torch.testing.assert_close(r.to_dense().max(-1).values, full.max(-1).values)
    assert set(r.aux_losses) == {"load_balance", "z_loss"}


def test_switch_capacity_is_the_layers_limit() -> None:
    moe = MoE(D, 8, 4, gate="switch", capacity_limit=0.5)
    x = torch.randn(64, D)
    moe(x)
    r = moe.last_routing
    assert r is not None
    capacity = 8  # ceil(0.5 * 64 / 4)
    assert int(r.load().max()) == capacity and r.num_pairs < 64
    assert r.dropped_fraction == pytest.approx(1 - r.num_pairs / 64)
    torch.testing.assert_close(r.to_dense(), moe.gate(x).with_capacity(0.5).to_dense())
    with pytest.raises(TypeError, match=r"capacity_factor.*the layer's capacity_limit="):
        gates.build("switch", D, 4, capacity_factor=0.5)


def test_expert_choice_balanced_load() -> None:
    _, r = route("expert_choice", torch.randn(40, D), n=4)
    assert r.load().tolist() == [20, 20, 20, 20]  # C = ceil(1.0 * 40 * 2 / 4)


def test_topk_noise_and_balance_are_switchable() -> None:
    gate = gates.build("topk", D, N, k=2, noisy=False, balance_weight=0.0)
    x = torch.randn(T, D)
    a, b = gate(x), gate(x)
    torch.testing.assert_close(a.weight, b.weight)  # no noise: deterministic in training
    assert a.aux_losses == {}
    noisy = gates.build("topk", D, N, k=2)
    assert "load_balance" in noisy(x).aux_losses


def test_hash_is_fixed_and_balanced() -> None:
    gate = gates.build("hash", D, 4, num_ids=1000)
    ids = torch.arange(1000)
    r = gate(torch.randn(1000, D), ids)
    assert r.load().tolist() == [250, 250, 250, 250]
    again = gate(torch.randn(1000, D), ids)
    assert torch.equal(r.expert, again.expert)
    # reloading the state dict restores the same table
    clone = gates.build("hash", D, 4, num_ids=1000, seed=123)
    clone.load_state_dict(gate.state_dict())
    assert torch.equal(clone(torch.randn(1000, D), ids).expert, r.expert)


def test_hash_without_ids_hashes_rows() -> None:
    gate = gates.build("hash", D, 8)
    x = torch.randn(500, D)
    r1, r2 = gate(x), gate(x.clone())
    assert torch.equal(r1.expert, r2.expert)
    assert (r1.load() > 0).all()  # random rows spread over all experts


def test_random_gate_is_seeded_and_respects_granularity() -> None:
    x = torch.randn(30, D)
    a = gates.build("random", D, N, k=2, seed=7)(x)
    b = gates.build("random", D, N, k=2, seed=7)(x)
    assert torch.equal(a.expert, b.expert)
    batch = gates.build("random", D, N, k=2, granularity="batch")(x).expert.view(30, 2)
    assert bool((batch == batch[0]).all())
    seq = torch.arange(30) // 10
    per_seq = gates.build("random", D, N, k=1, granularity="sequence")(x, seq).expert.view(3, 10)
    assert bool((per_seq == per_seq[:, :1]).all())


@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
def test_comet_and_dselect_any_number_of_experts(n: int) -> None:
    x = torch.randn(T, D)
    for name in ("comet", "dselect_k"):
        gate = gates.build(name, D, n, k=1)
        r = gate(x)
        dense = r.to_dense()
        assert dense.shape == (T, n)
        torch.testing.assert_close(dense.sum(-1), torch.ones(T), atol=1e-5, rtol=0)


def test_comet_reach_probabilities_are_distributions() -> None:
    gate = gates.build("comet", D, 7, k=3)
    reach = gate.reach_probabilities(torch.randn(T, D))
    assert reach.shape == (T, 7, 3)
    torch.testing.assert_close(reach.sum(1), torch.ones(T, 3))


def test_saturated_comet_tree_routes_to_one_leaf() -> None:
    gate = gates.build("comet", D, 8, k=1, gamma=1.0)
    with torch.no_grad():
        gate.split.weight.zero_()
        gate.split.bias.copy_(torch.tensor([5.0, -5.0, 5.0, 5.0, 5.0, 5.0, 5.0]))  # root left, node 1 right
    r = gate(torch.randn(T, D))
    # root -> left child (node 1) -> right child (node 4): leaves in DFS order 0..7, node 4 has leaves 2, 3
    # node 4 goes left => leaf index 2
    assert r.expert.unique().tolist() == [2]


def _toy_task(name: str, steps: int = 500) -> tuple[torch.nn.Module, torch.Tensor]:
    """Experts are fixed values; the target (±1 by the sign of x₀) is best met by hard choices."""
    torch.manual_seed(0)
    n, k = 8, 2
    x = torch.randn(256, D)
    targets = torch.tensor([1.0, -1.0, 0.3, -0.3, 0.5, -0.5, 0.1, -0.1])[:, None]
    y = (x[:, :1] > 0).float() * 2 - 1
    gate = gates.build(name, D, n, k=k, gamma=1.0, entropy_weight=1.0)
    opt = torch.optim.Adam(gate.parameters(), lr=0.2)
    for _ in range(steps):
        r = gate(x)
        pred = r.to_dense() @ targets
        loss = (pred - y).pow(2).mean() + r.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gate.eval(), x


@pytest.mark.parametrize("name", ["dselect_k", "comet"])
def test_sparse_gates_saturate_to_at_most_k_experts(name: str) -> None:
    gate, x = _toy_task(name)
    r = gate(x)
    assert int(r.active_per_input().max()) <= gate.k
    assert r.num_pairs < x.shape[0] * gate.num_experts / 2  # far from dense
    # every emitted weight is a real (non-zero) weight: zeros are left out, not computed
    assert bool((r.weight > 0).all())


def test_smooth_step_values() -> None:
    t = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 2.0])
    s = smooth_step(t, 1.0)
    assert s[0] == 0 and s[1] == 0 and s[-1] == 1 and s[-2] == 1
    assert s[2] == 0.5
    torch.testing.assert_close(smooth_step(-t, 1.0), 1 - s)


def test_smooth_step_gradcheck() -> None:
    t = torch.linspace(-0.7, 0.7, 29, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: smooth_step(v, 1.0), (t,))
    flat = torch.tensor([-3.0, 3.0], dtype=torch.float64, requires_grad=True)
    smooth_step(flat, 1.0).sum().backward()
    assert flat.grad.abs().sum() == 0  # exactly flat outside the band


@pytest.mark.parametrize("gamma", [0.01, 1.0, 7.0])
def test_smooth_step_is_the_papers_cubic(gamma: float) -> None:
    """The clamp form equals the piecewise definition; saturated inputs give exact 0/1 and zero gradient."""
    t = torch.cat([torch.linspace(-gamma, gamma, 201, dtype=torch.float64), torch.tensor([-gamma / 2, gamma / 2])])
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    piecewise = torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, cubic))
    torch.testing.assert_close(smooth_step(t, gamma), piecewise, rtol=0, atol=1e-12)
    knots = torch.tensor([-gamma / 2, gamma / 2, -gamma, gamma], requires_grad=True)  # float32
    s = smooth_step(knots, gamma)
    assert s.tolist() == [0.0, 1.0, 0.0, 1.0]
    s.sum().backward()
    assert knots.grad is not None and knots.grad.abs().sum() == 0


@pytest.mark.parametrize("name", ["dselect_k", "comet"])
@pytest.mark.parametrize("n", [4, 6])
def test_sparse_gate_weights_gradcheck(name: str, n: int) -> None:
    gate = gates.build(name, 5, n, k=2, gamma=4.0).double()
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: gate(v).to_dense(), (x,))


def test_dselect_static_variant_shares_weights() -> None:
    gate = gates.build("dselect_k", D, 5, k=2, per_example=False)
    dense = gate(torch.randn(T, D)).to_dense()
    torch.testing.assert_close(dense, dense[:1].expand(T, -1))


def test_gate_spec_parses_local_search_suffix() -> None:
    spec = gates.parse("comet+", k=2)
    assert (spec.name, spec.local_search, dict(spec.options)) == ("comet", True, {"k": 2})
    assert str(spec) == "comet+" and not gates.parse("topk").local_search
    assert gates.parse(spec, gamma=0.5).options == {"k": 2, "gamma": 0.5}
    with pytest.raises(ValueError, match=r"unknown gate 'nope\+'; available gates: comet"):
        gates.parse("nope+")
    with pytest.raises(TypeError, match="gate name"):
        gates.parse(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "policy"), [("softmax", "dense"), ("switch", "fixed"), ("topk", "choose")])
def test_gates_declare_their_k_policy(name: str, policy: str) -> None:
    assert gates.k_policy(name) == policy
    assert gates.takes_k(name) == (policy == "choose")
    assert gates.k_options(name, 3) == ({"k": 3} if policy == "choose" else {})


def test_gate_without_k_choice_rejects_other_k() -> None:
    assert gates.build("switch", D, N, k=1).k == 1
    with pytest.raises(ValueError, match="has no k to choose"):
        gates.build("softmax", D, N, k=2)


def test_every_gate_takes_device_and_dtype(gate_name: str) -> None:
    gate = gates.build(gate_name, D, N, **gate_kwargs(gate_name, N), device="cpu", dtype=torch.float64)
    floats = [p for p in gate.parameters() if p.is_floating_point()]
    assert all(p.dtype == torch.float64 for p in floats)
    r = gate(torch.randn(T, D, dtype=torch.float64))
    assert r.weight.dtype == torch.float64


def test_topk_balance_uses_population_variance() -> None:
    gate = gates.build("topk", D, N, k=2, noisy=False, balance_weight=1.0).train()
    x = torch.randn(T, D)
    r = gate(x)
    importance = r.to_dense().sum(0)
    expected = importance.var(correction=0) / importance.mean() ** 2
    torch.testing.assert_close(r.aux_losses["load_balance"], expected, rtol=1e-5, atol=1e-6)


def test_dselect_k_never_leaves_an_input_without_expert() -> None:
    # n = 3 has a fourth code (binary 11) with no expert of its own. Saturate the only selector on it:
    # the input must still reach an expert (its alias), with a non-zero output and expert gradients.
    torch.manual_seed(0)
    moe = MoE(4, 8, 3, gate="dselect_k", k=1, gamma=1.0)
    with torch.no_grad():
        moe.gate.z_proj.weight.zero_()
        moe.gate.z_proj.bias.fill_(10.0)  # both bits saturate at 1: code 3
    x = torch.randn(5, 4)
    y = moe(x)
    r = moe.last_routing
    assert r.active_per_input().tolist() == [1] * 5
    assert r.expert.tolist() == [0] * 5  # code 3 aliases expert 0
    assert bool((y.abs().sum(-1) > 0).all())
    y.pow(2).sum().backward()
    assert moe.experts.w1.grad is not None and float(moe.experts.w1.grad[0].abs().sum()) > 0


@pytest.mark.parametrize("num_experts", [3, 5, 6, 7])
def test_dselect_k_weights_sum_to_one_for_any_n(num_experts: int) -> None:
    gate = gates.build("dselect_k", D, num_experts, k=2)
    with torch.no_grad():
        gate.z_proj.weight.mul_(1e3)  # saturate every selector somewhere, aliased codes included
    w = gate(torch.randn(64, D)).to_dense()
    torch.testing.assert_close(w.sum(-1), torch.ones(64))


def test_gate_rejects_input_of_another_dtype() -> None:
    gate = gates.build("topk", D, N, k=2)
    with pytest.raises(TypeError, match=r"TopKGate layer.s parameters are torch\.float32"):
        gate(torch.randn(T, D, dtype=torch.float64))


# ----------------------------------------------------------------------------- COMET/DSelect-k factor products
# They multiply their path/bit factors one by one for speed: the same numbers as ``prod``.
def _comet_reach_by_prod(gate: gates.Gate, x: torch.Tensor) -> torch.Tensor:
    """The textbook form: gather s along each root-to-leaf path, pick s or 1 - s, take the product."""
    s = smooth_step(gate.split(x), gate.gamma).view(x.shape[0], gate.num_experts - 1, gate.k)
    s = torch.cat([s, s.new_ones(x.shape[0], 1, gate.k)], dim=1)
    along = s[:, gate.path_nodes]
    return torch.where(gate.path_left[..., None], along, 1 - along).prod(2)


@pytest.mark.parametrize("num_experts", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("scale", [1.0, 1e4])  # soft, and saturated (exact zeros)
def test_comet_reach_matches_prod(num_experts: int, scale: float) -> None:
    torch.manual_seed(0)
    gate = gates.build("comet", 6, num_experts, k=min(2, num_experts)).double()
    with torch.no_grad():
        gate.split.weight.mul_(scale * 30)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    fast, slow = gate.reach_probabilities(x), _comet_reach_by_prod(gate, x)
    torch.testing.assert_close(fast, slow)
    grad = torch.randn_like(fast)
    torch.testing.assert_close(torch.autograd.grad(fast, x, grad)[0], torch.autograd.grad(slow, x, grad)[0])


@pytest.mark.parametrize("num_experts", [2, 5, 8])  # n=1 fails in z_proj.view (pre-existing)
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_dselect_k_selectors_match_prod(num_experts: int, scale: float) -> None:
    torch.manual_seed(0)
    gate = gates.build("dselect_k", 6, num_experts, k=min(2, num_experts)).double()
    with torch.no_grad():
        gate.z_proj.weight.mul_(scale * 30)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    r = gate.code_distributions(x)
    z = gate.z_proj(x).view(-1, gate.k, 1, gate.num_bits)
    s = smooth_step(z, gate.gamma)
    expected = torch.where(gate.bits, s, 1 - s).prod(-1)
    torch.testing.assert_close(r, expected)
    grad = torch.randn_like(r)
    torch.testing.assert_close(torch.autograd.grad(r, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_random_gate_stream_is_part_of_its_state() -> None:
    gate = gates.build("random", D, N, k=2, seed=5)
    x = torch.randn(T, D)
    gate(x)  # advance the stream
    saved = {k: v.clone() for k, v in gate.state_dict().items()}
    expected = gate(x).expert
    restored = gates.build("random", D, N, k=2, seed=99)
    restored.load_state_dict(saved)
    assert torch.equal(restored(x).expert, expected)  # a reloaded gate continues the same draws
    assert torch.equal(gate.manual_seed(5)(x).expert, gates.build("random", D, N, k=2, seed=5)(x).expert)


def test_noisy_topk_load_is_shazeers_estimator() -> None:
    """The smooth load: P(expert e stays in the top k when only its own noise is redrawn), by brute force."""
    k = 2
    gate = gates.build("topk", D, N, k=k, noisy=True, balance_weight=1.0).train()
    with torch.no_grad():
        gate.noise_proj.weight.normal_(0, 0.3)
    x = torch.randn(T, D)
    torch.manual_seed(3)
    r = gate(x)
    torch.manual_seed(3)
    with torch.no_grad():
        clean = gate.proj(x)
        std = torch.nn.functional.softplus(gate.noise_proj(x)) + 1e-2
        noisy = clean + torch.randn_like(clean) * std
    load = torch.zeros(N)
    for t in range(T):
        for e in range(N):
            others = torch.cat([noisy[t, :e], noisy[t, e + 1 :]])
            kth_other = others.topk(k).values[-1]  # e is in the top k iff its value beats this
            load[e] += torch.distributions.Normal(0.0, 1.0).cdf((clean[t, e] - kth_other) / std[t, e])
    importance = r.to_dense().detach().sum(0)

    def cv2(v: torch.Tensor) -> torch.Tensor:
        return v.var(correction=0) / v.mean() ** 2

    torch.testing.assert_close(r.aux_losses["load_balance"].detach(), cv2(importance) + cv2(load), rtol=1e-4, atol=1e-6)


def _task_gates(name: str, count: int, **options: object) -> list[gates.Gate]:
    """``count`` gates of one kind in float64, their smooth-step projections scaled so some saturate."""
    built = []
    for seed in range(count):
        torch.manual_seed(seed)
        gate = gates.build(name, D, N, dtype=torch.float64, **{**gate_kwargs(name, N), **options})
        with torch.no_grad():
            for param_name, param in gate.named_parameters():
                if param_name.startswith(("split", "z")):
                    param.mul_(200)  # exact zeros in the routing, as after training
                if param_name.startswith("noise_proj"):
                    param.uniform_(-0.5, 0.5)  # zero at init: give the noise scale a gradient to check
        built.append(gate.train())
    return built


def _routing_and_grads(gs: list[gates.Gate], routings: list, upstream: list[torch.Tensor]):
    dense = [r.to_dense() for r in routings]
    loss = sum((d * u).sum() + r.aux_loss() for d, u, r in zip(dense, upstream, routings, strict=True))
    params = [p for g in gs for p in g.parameters()]
    return dense, [r.aux_loss() for r in routings], torch.autograd.grad(loss, params)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("comet", {}),
        ("dselect_k", {}),
        ("dselect_k", {"per_example": False}),
        ("topk", {}),
        ("topk", {"noisy": False}),
        ("topk", {"noisy": False, "balance_weight": 0.0}),
        ("topk", {"z_loss_weight": 1e-3, "bias_update_rate": 1e-3}),
    ],
)
def test_batched_task_gates_match_routing_one_by_one(name: str, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-task layer routes its task gates in one batched call: the same weights, losses and gradients.

    Top-k's noise draw differs between one batched draw and one per gate, so it is set to zero here;
    the learned noise scale still enters the smooth load estimator and its gradient is compared.
    """
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    gs = _task_gates(name, 3, **options)
    x = torch.randn(T, D, dtype=torch.float64)
    upstream = [torch.randn(T, N, dtype=torch.float64) for _ in gs]
    batched = gates.route_tasks(gs, x, None)
    alone = [g.route(x, None) for g in gs]
    assert [r.num_pairs for r in batched] == [r.num_pairs for r in alone]
    assert any(r.num_pairs < T * N for r in alone)  # some exact zeros were skipped
    for got, want in zip(
        _routing_and_grads(gs, batched, upstream), _routing_and_grads(gs, alone, upstream), strict=True
    ):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gates_route_alone_unless_batching_is_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Different settings, or a subclass that overrides ``route`` only, never go through a batched call."""
    calls: list[int] = []
    original = gates.CometGate.route_batch.__func__  # type: ignore[attr-defined]

    def spy(cls, gs, x, ids):
        calls.append(len(gs))
        return original(cls, gs, x, ids)

    monkeypatch.setattr(gates.CometGate, "route_batch", classmethod(spy))
    x = torch.randn(T, D, dtype=torch.float64)
    same = _task_gates("comet", 2)
    gates.route_tasks(same, x, None)
    assert calls == [2]

    calls.clear()
    mixed = [*_task_gates("comet", 1), *_task_gates("comet", 1, gamma=0.5)]
    gates.route_tasks(mixed, x, None)
    assert calls == [1, 1]  # each gate's own route (a batch of one)

    calls.clear()
    same[1].eval()  # the training mode is part of what must match
    gates.route_tasks(same, x, None)
    assert calls == [1, 1]

    class Doubled(gates.CometGate):
        def route(self, x, ids):
            routing = super().route(x, ids)
            return type(routing)(routing.token, routing.expert, 2 * routing.weight, self.num_experts, x.shape[0])

    doubled = [Doubled(D, N, k=2, dtype=torch.float64) for _ in range(2)]
    routings = gates.route_tasks(doubled, x, None)
    torch.testing.assert_close(routings[0].to_dense().sum(1), torch.full((T,), 2.0, dtype=torch.float64))


def test_multitask_layer_routes_its_gates_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsemoe import MultiTaskMoE

    calls: list[int] = []
    original = gates.DSelectKGate.route_batch.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        gates.DSelectKGate,
        "route_batch",
        classmethod(lambda cls, gs, x, ids: calls.append(len(gs)) or original(cls, gs, x, ids)),
    )
    layer = MultiTaskMoE(D, 4, N, 3, gate="dselect_k", k=2)
    outputs = layer(torch.randn(T, D))
    assert calls == [3] and len(outputs) == 3 and len(layer.last_routing) == 3


def test_repr_names_the_sizes(gate_name: str) -> None:
    gate, _ = route(gate_name, torch.randn(T, D))
    assert f"d_in={D}, num_experts={N}, k=" in repr(gate)


# ------------------------------------------------------------------ traits


# Losses off by default (weight 0), switched on for the trait test.
LOSSES_ON = {"sigmoid": {"seq_balance_weight": 1e-4}}


def test_aux_loss_trait_names_what_training_routings_hold(gate_name: str) -> None:
    """The ``aux_losses`` trait (and so the README's table) lists exactly the losses a gate emits."""
    options = dict(LOSSES_ON.get(gate_name, {}))
    if "z_loss" in gates.aux_loss_names(gate_name):  # the router z-loss is off by default
        options["z_loss_weight"] = 1e-3
    gate = gates.build(gate_name, D, N, **gate_kwargs(gate_name, N), **options).train()
    r = gate(torch.randn(T, D))
    assert set(r.aux_losses) == set(gates.aux_loss_names(gate_name))
    _, r = route(gate_name, torch.randn(T, D), train=False)
    assert set(r.aux_losses) <= set(gates.aux_loss_names(gate_name))


def test_sparsity_trait_matches_the_routing(gate_name: str) -> None:
    """At initialisation: dense gates give all n, learned-sparse ones more than k, sparse ones k (on average)."""
    k = min(2, N) if gates.takes_k(gate_name) else None
    _, r = route(gate_name, torch.randn(40, D), train=False)
    per_input = r.num_pairs / r.num_inputs
    trait = gates.sparsity(gate_name)
    if trait == "dense":
        assert per_input == N
    elif trait == "learned":
        assert per_input > 2 and gates.learns_sparsity(gate_name)
    else:
        assert per_input <= (k or 1) + 0.5 and not gates.learns_sparsity(gate_name)


def test_id_trait_says_whether_ids_change_the_routing(gate_name: str) -> None:
    options = {"granularity": "sequence"} if gate_name == "random" else {}
    gate = gates.build(gate_name, D, N, **gate_kwargs(gate_name, N), **options).eval()
    x = torch.randn(T, D)
    assert gate.id_kind() == gates.uses_ids(gate_name)
    torch.manual_seed(0)
    a = gate(x, torch.arange(T)).to_dense()
    if isinstance(gate, gates.RandomGate):  # random and token_draw: the same draws again
        gate.manual_seed(0)
    torch.manual_seed(0)
    b = gate(x, torch.zeros(T, dtype=torch.long)).to_dense()  # one id for every row
    assert torch.equal(a, b) == (gates.uses_ids(gate_name) is None)


def test_random_gate_reads_ids_only_per_sequence() -> None:
    assert gates.build("random", D, N).id_kind() is None
    assert gates.build("random", D, N, granularity="sequence").id_kind() == "sequence"


def test_trait_helpers_accept_every_spec_the_parser_accepts(gate_name: str) -> None:
    for spec in (gate_name + "+", gates.parse(gate_name), gates.parse(gate_name + "+")):
        assert gates.gate_class(spec) is gates.gate_class(gate_name)
        assert gates.takes_k(spec) == gates.takes_k(gate_name)
        assert gates.k_policy(spec) == gates.k_policy(gate_name)
        assert gates.k_options(spec, 2) == gates.k_options(gate_name, 2)
        assert gates.learns_sparsity(spec) == gates.learns_sparsity(gate_name)
        assert gates.aux_loss_names(spec) == gates.aux_loss_names(gate_name)
        assert gates.uses_ids(spec) == gates.uses_ids(gate_name)
        assert gates.accepts_option(spec, "check_finite")


def test_readme_gate_table_is_generated_from_the_traits() -> None:
    from pathlib import Path

    from tools import gate_table

    readme = Path(__file__).resolve().parents[1] / "README.md"
    assert gate_table.current(readme.read_text()) == gates.markdown_table(), (
        "the README's gate table is stale: run python -m tools.gate_table"
    )


def test_gate_table_tool_rewrites_a_stale_table(tmp_path) -> None:
    from tools import gate_table

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{gate_table.BEGIN}\n| old | table |\n{gate_table.END}\n\nafter\n")
    assert gate_table.refresh(readme)
    text = readme.read_text()
    assert gate_table.current(text) == gates.markdown_table() and text.endswith("\n\nafter\n")
    assert "| `topk` |" in text and "`load_balance`" in text and "old" not in text
    assert not gate_table.refresh(readme)  # current: nothing to do


# ------------------------------------------------------------------ top-k details (issue: auditor's defects)


def test_cv_squared_keeps_float64_and_lifts_half_precision() -> None:
    from sparsemoe.gates.topk import _cv_squared

    v = torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64)  # equal in float32
    expected = torch.var(v, correction=0) / v.mean() ** 2
    out = _cv_squared(v)
    assert out.dtype == torch.float64 and float(out) > 0
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    assert _cv_squared(torch.tensor([1.0, 3.0], dtype=torch.bfloat16)).dtype == torch.float32
    assert _cv_squared(torch.tensor([1.0, 3.0], dtype=torch.float16)).dtype == torch.float32


def test_topk_k1_router_gets_a_task_gradient_only_unnormalised() -> None:
    x = torch.randn(T, D)
    grads = {}
    for normalize in (True, False):
        torch.manual_seed(0)
        moe = MoE(D, 16, N, gate="topk", k=1, noisy=False, balance_weight=0.0, normalize=normalize)
        moe(x).square().sum().backward()
        grads[normalize] = moe.gate.proj.weight.grad
    assert grads[True] is not None and not bool(grads[True].any())  # softmax over one logit: weight 1
    assert grads[False] is not None and bool(grads[False].abs().sum() > 0)


def test_topk_unnormalised_weights_are_switch_style_probabilities() -> None:
    gate = gates.build("topk", D, N, k=2, noisy=False, normalize=False).eval()
    x = torch.randn(T, D)
    r = gate(x)
    probs = torch.softmax(gate.proj(x), -1)
    top = probs.topk(2, dim=-1)
    torch.testing.assert_close(r.to_dense().gather(-1, top.indices), top.values)
    assert bool((r.to_dense().sum(-1) < 1).all())
