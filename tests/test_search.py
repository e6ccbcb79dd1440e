"""Permutation local search: hardening, the off switch, a toy problem it must solve, persistence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsemoe
from sparsemoe.experts import ModuleExperts
from sparsemoe.gates import route_tasks
from sparsemoe.search import ENTROPY_LOSS, PermutationSearch, sinkhorn


def _train_steps(search: PermutationSearch, steps: int) -> None:
    """Advance a standalone search through its schedule on a dummy routing."""
    search.train()
    routing = sparsemoe.Routing.from_topk(torch.tensor([[0], [1]]), torch.ones(2, 1), search.num_experts)
    for _ in range(steps):
        search.permute([routing])


def test_hardened_is_a_true_permutation() -> None:
    search = PermutationSearch(16, steps=5)
    _train_steps(search, 6)  # 5 soft steps, then the hardening forward
    assert bool(search.hardened)
    assert sorted(search.permutation.tolist()) == list(range(16))
    # frozen, yet still in the graph (DDP needs every parameter's gradient): an exact zero gradient
    log_alpha = search.log_alpha.detach().clone()
    routing = sparsemoe.Routing.from_topk(torch.tensor([[0], [1]]), torch.ones(2, 1), 16)
    (weight,) = (r.weight for r in search.permute([routing]))
    (weight * torch.tensor([2.0, float("inf")])).sum().backward()
    assert search.log_alpha.grad is not None and not search.log_alpha.grad.any()
    assert torch.equal(weight, routing.weight) and torch.equal(search.log_alpha, log_alpha)


def test_sinkhorn_truncated_gradient_keeps_the_forward_value() -> None:
    log_alpha = torch.randn(8, 8) * 30
    assert torch.allclose(sinkhorn(log_alpha, 60), sinkhorn(log_alpha, 60, grad_iterations=3), atol=1e-5)


def _sinkhorn_reference(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """The textbook unrolled iteration (``x - logsumexp``), differentiated by autograd."""
    for _ in range(iterations):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x.exp()


#: (temperature, Sinkhorn iterations) at the start, middle and end of the default schedule (1000 steps)
SCHEDULE_POINTS = [(1e-3, 20), (10**-5.002, 85), (1e-7, 150)]


def _linear_loss(n: int) -> torch.Tensor:
    return torch.randn(n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def test_schedule_points_are_the_default_schedule() -> None:
    search = PermutationSearch(8, steps=1000)
    for step, (tau, iters) in zip((0, 500, 999), SCHEDULE_POINTS, strict=True):
        got_tau, got_iters = search.schedule(step)
        assert got_iters == iters and got_tau == pytest.approx(tau, rel=1e-3)


@pytest.mark.parametrize(("tau", "iterations"), SCHEDULE_POINTS)
def test_sinkhorn_gradient_matches_central_differences(tau: float, iterations: int) -> None:
    """float64 d(loss)/d(log α) of ``Σ W ⊙ Sinkhorn(log α / τ)`` against central finite differences.

    At these temperatures ``log α ~ U(±0.05)`` (the init) puts ``log α / τ`` at ±50 to ±5e5, where
    the map is saturated beyond float64: every derivative underflows to exactly 0 (checked against
    autograd in the next test). Central differences are meaningful where ``log α / τ`` is O(1)
    (a near-tie, the entries the search is still deciding), so ``log α = τ · Z`` with ``Z ~ N(0, 2²)``
    and a step of ``τ · 1e-4``: a relative change of 1e-4 in ``Z``.
    """
    n = 8
    generator = torch.Generator().manual_seed(int(-math.log10(tau)))
    log_alpha = tau * 2.0 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    weights = _linear_loss(n)

    def loss(z: torch.Tensor) -> torch.Tensor:
        return (weights * sinkhorn(z / tau, iterations)).sum()

    x = log_alpha.clone().requires_grad_()
    loss(x).backward()
    h = tau * 1e-4
    numeric = torch.empty_like(log_alpha)
    with torch.no_grad():
        for i in range(n):
            for j in range(n):
                step = torch.zeros_like(log_alpha)
                step[i, j] = h
                numeric[i, j] = (loss(log_alpha + step) - loss(log_alpha - step)) / (2 * h)
    assert numeric.abs().max() > 1.0 / tau * 1e-2  # a non-trivial gradient (scale 1/τ)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-5, atol=1e-6 * float(numeric.abs().max()))


@pytest.mark.parametrize(("tau", "iterations"), SCHEDULE_POINTS)
@pytest.mark.parametrize("init", ["init", "near-tie"])
def test_sinkhorn_gradient_equals_full_unrolling(tau: float, iterations: int, init: str) -> None:
    """The default gradient is that of autograd through every textbook iteration, at every temperature."""
    n = 8
    generator = torch.Generator().manual_seed(3)
    if init == "init":
        log_alpha = torch.empty(n, n, dtype=torch.float64).uniform_(-0.05, 0.05, generator=generator)
    else:
        log_alpha = tau * 2.0 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    weights = _linear_loss(n)
    grads = []
    for fn in (sinkhorn, _sinkhorn_reference):
        x = log_alpha.clone().requires_grad_()
        (weights * fn(x / tau, iterations)).sum().backward()
        grads.append(x.grad)
    scale = float(grads[1].abs().max())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12 * scale)


def test_truncated_gradient_is_an_approximation() -> None:
    """Backpropagating through only the last iterations gives a different gradient (why it is off by default)."""
    tau, iterations, n = 1e-3, 20, 8  # the start of the schedule, at the init's scale
    log_alpha = torch.empty(n, n, dtype=torch.float64).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(3))
    weights = _linear_loss(n)
    grads = []
    for grad_iterations in (None, 5):
        x = log_alpha.clone().requires_grad_()
        (weights * sinkhorn(x / tau, iterations, grad_iterations)).sum().backward()
        grads.append(x.grad)
    assert (grads[0] - grads[1]).abs().max() > 0.5 * grads[0].abs().max(), grads


def test_search_backpropagates_through_every_iteration_by_default() -> None:
    search = PermutationSearch(8, steps=1000).double()
    assert search.grad_iterations is None
    for step, (tau, iters) in zip((0, 500, 999), SCHEDULE_POINTS, strict=True):
        search.log_alpha.grad = None
        search.log_alpha.data.copy_(tau * 2.0 * torch.randn(8, 8, dtype=torch.float64))
        (_linear_loss(8) * search.soft(step)).sum().backward()
        got = search.log_alpha.grad.clone()
        x = search.log_alpha.detach().clone().requires_grad_()
        (_linear_loss(8) * _sinkhorn_reference(x / search.schedule(step)[0], iters)).sum().backward()
        torch.testing.assert_close(got, x.grad, rtol=1e-9, atol=1e-12 * float(x.grad.abs().max()))


def test_hardened_routing_is_exact_sparse_relabelling() -> None:
    torch.manual_seed(0)
    moe = sparsemoe.MultiTaskMoE(6, 4, 8, 2, gate="topk+", k=2, noisy=False, local_search_steps=3)
    x = torch.randn(10, 6)
    for _ in range(4):
        moe.train()
        moe(x)
    assert bool(moe.search.hardened)
    moe.train()
    moe(x)
    routings = moe.last_routing
    assert all(r.num_pairs == 2 * 10 for r in routings)  # still exactly k pairs per input
    plain = route_tasks(list(moe.gates), x, None)  # the gates' own routing, as the layer computes it
    for r, p in zip(routings, plain, strict=True):
        assert torch.equal(r.expert, moe.search.permutation[p.expert])
        assert torch.equal(r.weight, p.weight)


def test_soft_phase_adds_entropy_loss_once() -> None:
    moe = sparsemoe.MultiTaskMoE(6, 4, 8, 3, gate="comet+", k=2, local_search_steps=10)
    moe.train()
    moe(torch.randn(5, 6))
    names = [name for r in moe.last_routing for name in r.aux_losses if name == ENTROPY_LOSS]
    assert names == [ENTROPY_LOSS]
    weights = [r.to_dense().sum(1) for r in moe.last_routing]
    assert all(torch.allclose(w, torch.ones_like(w), atol=1e-5) for w in weights)  # renormalised


@pytest.mark.parametrize("gate", ["softmax", "topk", "hash", "dselect_k", "comet"])
def test_local_search_off_leaves_the_layer_unchanged(gate: str) -> None:
    kwargs = {} if gate == "softmax" else {"k": 2}
    torch.manual_seed(1)
    a = sparsemoe.MultiTaskMoE(6, 4, 8, 2, gate=gate, **kwargs)
    torch.manual_seed(1)
    b = sparsemoe.MultiTaskMoE(6, 4, 8, 2, gate=gate, local_search=False, **kwargs)
    assert b.search is None
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()  # no gate noise
    x = torch.randn(7, 6)
    for ya, yb in zip(a(x), b(x), strict=True):
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("gate", ["topk+", "hash+", "dselect_k+", "comet+", "softmax+", "sigmoid+"])
def test_plus_gate_names_switch_local_search_on(gate: str) -> None:
    kwargs = {} if gate == "softmax+" else {"k": 2}
    moe = sparsemoe.MultiTaskMoE(6, 4, 8, 2, gate=gate, local_search_steps=2, **kwargs)
    single = sparsemoe.MoE(6, 12, 8, gate=gate, local_search_steps=2, **kwargs)
    assert isinstance(moe.search, PermutationSearch) and isinstance(single.search, PermutationSearch)
    x = torch.randn(5, 6)
    moe.train()
    single.train()
    for _ in range(3):
        loss = sum(y.sum() for y in moe(x)) + moe.aux_loss() + single(x).sum() + single.aux_loss()
        loss.backward()
    assert bool(moe.search.hardened) and bool(single.search.hardened)


def test_state_dict_round_trip_after_hardening() -> None:
    torch.manual_seed(0)
    moe = sparsemoe.MultiTaskMoE(6, 4, 8, 2, gate="topk+", k=2, noisy=False, local_search_steps=2)
    x = torch.randn(9, 6)
    moe.train()
    for _ in range(3):
        moe(x)
    moe.eval()
    expected = moe(x)
    torch.manual_seed(5)
    fresh = sparsemoe.MultiTaskMoE(6, 4, 8, 2, gate="topk+", k=2, noisy=False, local_search_steps=2)
    fresh.load_state_dict(moe.state_dict())
    fresh.eval()
    assert bool(fresh.search.hardened)
    assert torch.equal(fresh.search.permutation, moe.search.permutation)
    for ya, yb in zip(expected, fresh(x), strict=True):
        assert torch.equal(ya, yb)


class _Code(nn.Module):
    """A frozen expert that outputs the one-hot code of its own index."""

    def __init__(self, index: int, n: int) -> None:
        super().__init__()
        self.register_buffer("code", F.one_hot(torch.tensor(index), n).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code.expand(x.shape[0], -1)


def _toy_accuracy(local_search: bool, seed: int, n: int = 8, steps: int = 200) -> float:
    """Hash buckets must reach fixed experts in an unknown order: only a permutation can fix that.

    The experts are frozen and each id's hash bucket is fixed, so plain gradient training has
    nothing to learn: its accuracy is whatever the initial (bad) order gives.
    """
    torch.manual_seed(seed)
    experts = ModuleExperts([_Code(e, n) for e in range(n)], d_out=n)
    moe = sparsemoe.MultiTaskMoE(
        1, n, n, 1, gate="hash", k=1, expert=experts, num_ids=n, local_search=local_search, local_search_steps=steps
    )
    ids = torch.arange(n)
    target = torch.randperm(n, generator=torch.Generator().manual_seed(123))  # the expert id i should reach
    params = [p for p in moe.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.01) if params else None
    moe.train()
    for _ in range(steps + 1):
        out = moe(torch.zeros(n, 1), ids=ids)[0]
        loss = F.nll_loss(torch.log(out + 1e-6), target) + moe.aux_loss()
        if optimizer is not None and loss.requires_grad:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    moe.eval()
    with torch.no_grad():
        out = moe(torch.zeros(n, 1), ids=ids)[0]
    return float((out.argmax(1) == target).float().mean())


def test_local_search_fixes_a_bad_expert_order() -> None:
    seeds = range(4)
    without = sum(_toy_accuracy(False, s) for s in seeds) / len(seeds)
    with_search = sum(_toy_accuracy(True, s) for s in seeds) / len(seeds)
    # Measured (torch 2.13 CPU): 0.125 without, 0.41 with local search.
    assert with_search >= without + 0.2, (without, with_search)


def test_soft_phase_prunes_negligible_weights() -> None:
    """Pruning keeps the soft phase sparse and changes the output by less than its threshold allows."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    outputs, pairs = {}, {}
    for prune in (0.0, 1e-6):
        torch.manual_seed(1)
        moe = sparsemoe.MoE(16, 32, 8, gate="topk+", k=2, local_search_steps=100)
        moe.search.prune_below = prune
        moe.search.step.fill_(0)  # start of the soft phase: Π is diffuse, with no exact zero
        outputs[prune] = moe.train()(x)
        pairs[prune] = moe.last_routing.num_pairs
    assert pairs[0.0] == 64 * 8  # unpruned: every expert for every input
    assert pairs[1e-6] < 64 * 8 * 3 / 4  # pruned: measured 4.5 of 8 per input at this first step
    torch.testing.assert_close(outputs[1e-6], outputs[0.0], atol=1e-4, rtol=1e-4)
    weights = moe.last_routing.weight
    assert bool((weights >= 1e-6).all())
