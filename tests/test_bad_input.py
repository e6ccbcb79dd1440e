"""Bad input found by fuzzing the public API: each call gets a clear error naming the argument.

One row per reproduction: ``Case(id, call, error type, message regex, setup)``. ``setup`` (optional)
builds what the call needs (a layer, say) before the state check; ``call(setup())`` must raise
``error`` matching the regex, and must leave torch's global RNG as it found it (the error comes
before anything is built or drawn). Inputs that are legitimate have their own tests below the table.
To add a case, append a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import sparsemoe
from sparsemoe import MoE, MultiTaskMoE, gates

INF = float("inf")


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Any], object]
    error: type[Exception]
    match: str
    setup: Callable[[], Any] | None = None


def _mmoe_with_float64_gate_input() -> tuple[MultiTaskMoE, torch.Tensor, torch.Tensor]:
    return MultiTaskMoE(6, 5, 4, 2, d_gate=7), torch.randn(4, 6), torch.randn(4, 7, dtype=torch.float64)


CASES: list[Case] = [
    # issue 28 item 1: capacity. inf is "no limit" where a capacity is a limit (tests below); NaN never is.
    Case("capacity_limit-nan", lambda _: MoE(6, 8, 4, capacity_limit=float("nan")), ValueError,
         r"capacity_limit must not be NaN"),
    Case("capacity_limit-zero", lambda _: MoE(6, 8, 4, capacity_limit=0.0), ValueError, r"capacity_limit must be > 0"),
    Case("switch-capacity_factor-moved", lambda _: MoE(6, 8, 4, gate="switch", capacity_factor=INF), TypeError,
         r"capacity_factor.*the layer's capacity_limit="),
    Case("expert_choice-capacity_factor-nan",
         lambda _: MoE(6, 8, 4, gate="expert_choice", capacity_factor=float("nan")), ValueError,
         r"capacity_factor must not be NaN"),
    # item 2: an infinite smooth-step width
    *(
        Case(f"{gate}-gamma-inf", lambda _, gate=gate: MoE(6, 8, 4, gate=gate, k=2, gamma=INF), ValueError,
             r"gamma must be finite")
        for gate in ("comet", "dselect_k", "comet+", "dselect_k+")
    ),
    # item 3: dtypes checked at construction
    Case("dtype-int64", lambda _: MoE(6, 8, 4, dtype=torch.int64), TypeError,
         r"dtype must be a floating-point dtype.*got torch.int64"),
    Case("router_dtype-int64", lambda _: MoE(6, 8, 4, router_dtype=torch.int64), TypeError,
         r"router_dtype must be a floating-point dtype"),
    Case("dtype-complex64", lambda _: MoE(6, 8, 4, dtype=torch.complex64), TypeError,
         r"dtype must be a floating-point dtype.*complex64"),
    Case("hash-dtype-int64", lambda _: MoE(6, 8, 4, gate="hash", dtype=torch.int64), TypeError,
         r"dtype must be a floating-point dtype"),
    Case("random-router_dtype-int64", lambda _: MoE(6, 8, 4, gate="random", router_dtype=torch.int64), TypeError,
         r"router_dtype must be a floating-point dtype"),
    Case("mmoe-dtype-int64", lambda _: MultiTaskMoE(6, 5, 4, 2, dtype=torch.int64), TypeError,
         r"dtype must be a floating-point dtype"),
    Case("build-dtype-int64", lambda _: gates.build("topk", 6, 4, dtype=torch.int64), TypeError,
         r"dtype must be a floating-point dtype"),
    *(
        Case(f"{cls.__name__}-dtype-int64", lambda _, cls=cls: cls(6, 4, dtype=torch.int64), TypeError,
             r"dtype must be a floating-point dtype")
        for cls in (gates.TopKGate, gates.SwitchGate, gates.SoftmaxGate, gates.CometGate, gates.DSelectKGate,
                    gates.ExpertChoiceGate, gates.HashGate, gates.RandomGate)
    ),
    # item 4: the gate input's dtype, as x's
    Case("mmoe-gate_input-float64",
         lambda args: args[0](args[1], gate_input=args[2]), TypeError,
         r"gate_input has dtype torch.float64 but .* parameters are torch.float32", _mmoe_with_float64_gate_input),
    # item 5: seeds and the hash table's size
    Case("hash-seed-2**70", lambda _: MoE(6, 8, 4, gate="hash", k=1, seed=2**70), ValueError, r"seed must be between"),
    Case("random-seed-2**70", lambda _: MoE(6, 8, 4, gate="random", k=1, seed=2**70), ValueError,
         r"seed must be between"),
    Case("random-manual_seed-str", lambda g: g.manual_seed("x"), TypeError, r"seed must be an int",
         lambda: gates.build("random", 6, 4)),
    Case("hash-num_ids-2**40", lambda _: MoE(6, 8, 4, gate="hash", k=1, num_ids=2**40), ValueError,
         r"num_ids=1099511627776 would need a table of 8,192 GiB; num_ids must be <= 2\*\*28"),
    # item 6: collectors given something that is not a model
    Case("aux_loss-None", lambda _: sparsemoe.aux_loss(None), TypeError, r"model must be a torch.nn.Module.*NoneType"),
    Case("aux_loss-str", lambda _: sparsemoe.aux_loss("topk"), TypeError, r"model must be a torch.nn.Module.*str"),
    Case("routing_stats-None", lambda _: sparsemoe.routing_stats(None), TypeError, r"model must be a torch.nn.Module"),
    # item 10: k=True is not k=1
    Case("switch-k-True", lambda _: MoE(3, 8, 7, gate="switch", k=True), TypeError, r"k must be an int, got bool"),
    Case("softmax-n1-k-True", lambda _: MoE(3, 8, 1, gate="softmax", k=True), TypeError, r"k must be an int, got bool"),
    Case("build-switch-k-True", lambda _: gates.build("switch", 3, 7, k=True), TypeError, r"k must be an int"),
    # item 11: infinite loss weights
    *(
        Case(f"{gate}-{option}-inf", lambda _, gate=gate, option=option: MoE(6, 8, 4, gate=gate, **{option: INF}),
             ValueError, rf"{option} must be finite")
        for gate, option in [
            ("topk", "balance_weight"), ("switch", "balance_weight"), ("switch", "z_loss_weight"),
            ("comet", "entropy_weight"), ("dselect_k", "entropy_weight"),
        ]
    ),
    # imprecise messages: name the layer's argument, with or without "+"
    Case("local_search_steps-comet+", lambda _: MoE(6, 8, 4, gate="comet+", local_search_steps=-1), ValueError,
         r"local_search_steps must be >= 0, got -1"),
    Case("local_search_steps-topk", lambda _: MoE(6, 8, 4, gate="topk", local_search_steps=-1), ValueError,
         r"local_search_steps must be >= 0"),
    Case("local_search_steps-str", lambda _: MultiTaskMoE(6, 5, 4, 2, local_search_steps="x"), TypeError,
         r"local_search_steps must be an int"),
    Case("mmoe-factory-returns-int", lambda _: MultiTaskMoE(6, 5, 4, 2, gate=lambda: 3), TypeError,
         r"the gate factory returned int, not a Gate"),
    Case("mmoe-list-of-ints", lambda _: MultiTaskMoE(6, 5, 4, 2, gate=[1, 2]), TypeError,
         r"gate must list Gate objects, got int"),
    # issue 23 item 1g: the spec and local_search= must agree; errors quote what was typed
    Case("comet+-local_search-False", lambda _: MoE(6, 8, 4, gate="comet+", local_search=False), ValueError,
         r"gate 'comet\+' asks for local search but local_search=False"),
    Case("parse-comet+-local_search-False", lambda _: gates.parse("comet+", local_search=False), ValueError,
         r"asks for local search but local_search=False"),
    Case("mmoe-topk+-local_search-False", lambda _: MultiTaskMoE(6, 5, 4, 2, gate="topk+", local_search=False),
         ValueError, r"asks for local search"),
    Case("comet++", lambda _: MoE(6, 8, 4, gate="comet++"), ValueError, r"gate 'comet\+\+' ends in more than one '\+'"),
    Case("unknown-with-plus", lambda _: gates.parse("nope+"), ValueError, r"unknown gate 'nope\+'"),
    Case("takes_k-unknown", lambda _: gates.takes_k("comet+x"), ValueError, r"unknown gate 'comet\+x'"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error_before_any_state_change(case: Case) -> None:
    target = case.setup() if case.setup is not None else None
    rng = torch.get_rng_state()
    with pytest.raises(case.error, match=case.match):
        case.call(target)
    assert torch.equal(torch.get_rng_state(), rng), "the failed call drew from the global RNG"


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------ legitimate input that works


def test_capacity_limit_inf_is_no_limit() -> None:
    x = torch.randn(3, 6)
    torch.manual_seed(1)
    limited = MoE(6, 8, 4, gate="topk", k=2, capacity_limit=INF)
    torch.manual_seed(1)
    dropless = MoE(6, 8, 4, gate="topk", k=2)
    assert limited.capacity_limit is None
    torch.testing.assert_close(limited.eval()(x), dropless.eval()(x))
    assert limited.routing_stats()["dropped_fraction"] == 0.0
    switch = MoE(6, 8, 4, gate="switch", capacity_limit=INF)
    switch(torch.randn(0, 6))  # zero rows too
    switch(x)
    assert switch.routing_stats()["dropped_fraction"] == 0.0


def test_expert_choice_capacity_factor_inf_takes_every_input() -> None:
    moe = MoE(6, 8, 4, gate="expert_choice", k=2, capacity_factor=INF)
    moe(torch.randn(5, 6))
    routing = moe.last_routing
    assert routing is not None and routing.load().tolist() == [5, 5, 5, 5]
    assert moe(torch.randn(0, 6)).shape == (0, 6)  # zero rows: capacity 0, not NaN


def test_local_search_may_be_named_twice_when_both_agree() -> None:
    assert MoE(6, 8, 4, gate="comet+", k=2, local_search=True).search is not None
    assert gates.parse("comet+", local_search=True).local_search
    assert MoE(6, 8, 4, gate="comet", k=2, local_search=True).search is not None
    assert MoE(6, 8, 4, gate="comet", k=2).search is None
