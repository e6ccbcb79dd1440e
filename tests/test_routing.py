"""Routing: immutability, invariants checked on construction, capacity priority."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sparsemoe
from sparsemoe import routing as routing_module
from sparsemoe.routing import Routing, pair_grid


def _routing(token: list[int], expert: list[int], weight: list[float], n: int = 2, t: int = 3) -> Routing:
    return Routing(torch.tensor(token), torch.tensor(expert), torch.tensor(weight), n, t)


def test_routing_is_immutable() -> None:
    r = _routing([0, 1], [0, 1], [1.0, 1.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.dropped_fraction = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.aux_losses["x"] = torch.zeros(())  # type: ignore[index]
    extended = r.with_aux_losses(x=torch.ones(()))
    assert "x" in extended.aux_losses and "x" not in r.aux_losses


def test_transforms_return_new_objects() -> None:
    r = _routing([0, 1, 2], [0, 1, 1], [1.0, 1.0, 1.0])
    kept = r.with_capacity(2 / 3)  # ceil(2/3 * 3 / 2) = 1 per expert
    assert kept is not r and r.num_pairs == 3 and r.dropped_fraction == 0.0
    assert kept.num_pairs == 2 and kept.dropped_fraction == pytest.approx(1 / 3)
    assert r.relabel(torch.tensor([1, 0])).expert.tolist() == [1, 0, 0]
    assert r.expert.tolist() == [0, 1, 1]


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("token", torch.zeros(2, 1, dtype=torch.long), ValueError, "1-D"),
        ("expert", torch.zeros(3, dtype=torch.long), ValueError, "one entry per pair"),
        ("token", torch.zeros(2), TypeError, "integer dtype"),
        ("weight", torch.ones(2, dtype=torch.long), TypeError, "floating point"),
    ],
)
def test_invariants_checked_on_construction(field: str, value: torch.Tensor, error: type, match: str) -> None:
    parts = {"token": torch.tensor([0, 1]), "expert": torch.tensor([0, 1]), "weight": torch.ones(2)}
    parts[field] = value
    with pytest.raises(error, match=match):
        Routing(parts["token"], parts["expert"], parts["weight"], 2, 2)


def test_bounds_checked_only_in_debug_mode() -> None:
    bad = {"token": torch.tensor([0, 5]), "expert": torch.tensor([0, 1]), "weight": torch.ones(2)}
    Routing(**bad, num_experts=2, num_inputs=2)  # no sync by default
    routing_module.set_debug(True)
    try:
        with pytest.raises(ValueError, match="token must lie in"):
            Routing(**bad, num_experts=2, num_inputs=2)
    finally:
        routing_module.set_debug(False)


def test_with_capacity_keeps_first_inputs() -> None:
    r = Routing(torch.arange(6), torch.tensor([0, 1, 0, 0, 1, 0]), torch.ones(6), num_experts=2, num_inputs=6)
    kept = r.with_capacity(2 / 3)  # capacity ceil(2/3 * 6 / 2) = 2 per expert
    assert kept.token.tolist() == [0, 1, 2, 4]
    assert kept.dropped_fraction == pytest.approx(2 / 6)


def test_capacity_keeps_first_choices_before_second_choices() -> None:
    # Four inputs choose two experts each; input 3's FIRST choice is expert 0, which inputs 0-2 take
    # as their second choice. GShard priority: every first choice before any second choice.
    indices = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]])
    weights = torch.tensor([[0.6, 0.4]] * 4)
    r = Routing.from_topk(indices, weights, 2)
    kept = r.with_capacity(0.5)  # ceil(0.5 * 8 / 2) = 2 pairs per expert
    pairs = set(zip(kept.token.tolist(), kept.expert.tolist(), strict=True))
    assert (3, 0) in pairs  # input 3's first choice beats the earlier inputs' second choices
    assert pairs == {(0, 1), (1, 1), (3, 0), (0, 0)}


def test_choice_rank_orders_by_weight_within_input() -> None:
    r = _routing([0, 0, 1, 0], [0, 1, 0, 2], [0.2, 0.5, 1.0, 0.3], n=3, t=2)
    assert r.choice_rank().tolist() == [2, 0, 0, 1]


def test_aux_loss_sums_losses() -> None:
    r = _routing([0], [0], [1.0]).with_aux_losses(a=torch.tensor(1.5), b=torch.tensor(0.5))
    assert float(r.aux_loss()) == 2.0


def test_routing_pickles_and_deep_copies() -> None:
    import copy
    import pickle

    r = _routing([0], [1], [1.0]).with_aux_losses(a=torch.tensor(2.0))
    for clone in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        assert dict(clone.aux_losses) == {"a": torch.tensor(2.0)} and clone.expert.tolist() == [1]
        with pytest.raises(TypeError):
            clone.aux_losses["b"] = torch.zeros(())  # type: ignore[index]


def test_pair_grid_is_the_row_major_grid_and_shared() -> None:
    token, column = pair_grid(3, 4, torch.device("cpu"))
    assert token.tolist() == [t for t in range(3) for _ in range(4)]
    assert column.tolist() == [c for _ in range(3) for c in range(4)]
    again = Routing.from_dense(torch.rand(3, 4), keep_zeros=True)
    assert again.token is token and again.expert is column  # built once per size
    topk = Routing.from_topk(torch.tensor([[0, 1], [2, 3], [1, 0]]), torch.rand(3, 2), 4)
    assert topk.token.tolist() == [0, 0, 1, 1, 2, 2]


def test_pair_grid_first_built_under_inference_mode_still_trains() -> None:
    # The cached index tensors must not be inference tensors: training saves them for backward.
    with torch.inference_mode():
        first = pair_grid(11, 3, torch.device("cpu"))[0]  # a size no other test uses
    assert not first.is_inference()
    layer = sparsemoe.MoE(4, 8, 3, gate="softmax")
    x = torch.randn(11, 4)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())
