"""Bad input gets an error that names the argument and what would be accepted."""

from __future__ import annotations

import pytest
import torch

from sparsemoe import MoE, MultiTaskMoE, gates


def test_unknown_gate_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown gate 'nope'.*comet.*topk"):
        gates.build("nope", 4, 4)
    with pytest.raises(ValueError, match=r"available gates"):
        MoE(4, 8, 4, gate="nope")


@pytest.mark.parametrize("k", [0, -1, 5])
def test_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=r"k must be between 1 and 4"):
        gates.build("topk", 4, 4, k=k)


def test_k_must_be_int() -> None:
    with pytest.raises(TypeError, match=r"k must be an int"):
        gates.build("topk", 4, 4, k=2.0)


@pytest.mark.parametrize("n", [0, -3])
def test_num_experts_positive(n: int) -> None:
    with pytest.raises(ValueError, match=r"num_experts must be >= 1"):
        MoE(4, 8, n, gate="topk", k=1)


def test_k_for_gates_without_k() -> None:
    with pytest.raises(ValueError, match=r"gate 'softmax' has no k"):
        MoE(4, 8, 4, gate="softmax", k=2)
    with pytest.raises(ValueError, match=r"gate 'switch' has no k"):
        gates.build("switch", 4, 4, k=2)
    assert gates.build("switch", 4, 4, k=1).k == 1


def test_unknown_gate_argument_lists_accepted() -> None:
    with pytest.raises(TypeError, match=r"unexpected option\(s\) gama.*accepts: k, gamma"):
        gates.build("comet", 4, 4, gama=1.0)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"gamma must be > 0"):
        gates.build("comet", 4, 4, gamma=0.0)
    with pytest.raises(ValueError, match=r"granularity must be one of 'token', 'sequence', 'batch'"):
        gates.build("random", 4, 4, granularity="word")
    with pytest.raises(ValueError, match=r"expert must be one of 'mlp', 'swiglu', 'linear'"):
        MoE(4, 8, 4, expert="conv")


def test_wrong_width() -> None:
    moe = MoE(4, 8, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 4\].*got shape \(2, 5\)"):
        moe(torch.randn(2, 5))


def test_wrong_dtype() -> None:
    moe = MoE(4, 8, 4)
    with pytest.raises(TypeError, match=r"floating-point tensor.*torch.int64"):
        moe(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        moe([[1.0, 2.0, 3.0, 4.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(bad: float) -> None:
    x = torch.randn(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or infinite.*check_finite=False"):
        MoE(4, 8, 4)(x)
    MoE(4, 8, 4, check_finite=False)(x)  # the flag turns the check off


def test_failed_call_leaves_layer_unchanged() -> None:
    moe = MoE(4, 8, 4)
    moe(torch.randn(3, 4))
    before = moe.last_routing
    with pytest.raises(ValueError):
        moe(torch.full((3, 4), float("nan")))
    assert moe.last_routing is before


def test_ids_validated() -> None:
    gate = gates.build("hash", 4, 4, num_ids=10)
    with pytest.raises(ValueError, match=r"ids must be < num_ids=10"):
        gate(torch.randn(2, 4), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"one id per input row"):
        gate(torch.randn(2, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match=r"integer dtype"):
        gate(torch.randn(2, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match='granularity="sequence" needs ids'):
        gates.build("random", 4, 4, granularity="sequence")(torch.randn(2, 4))


def test_multitask_validation() -> None:
    with pytest.raises(ValueError, match=r"num_tasks must be >= 1"):
        MultiTaskMoE(4, 4, 4, num_tasks=0)
    with pytest.raises(ValueError, match=r"d_hidden is required"):
        MultiTaskMoE(4, 4, 4, num_tasks=2, expert="mlp")
