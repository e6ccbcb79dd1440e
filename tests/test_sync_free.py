"""The MoE forward on CUDA reads no tensor values on the host (no device synchronisation).

On CPU the checks keep raising clear ValueErrors at once. Without a GPU, the device-side forms are
checked by switching :func:`sparsemoe._validation.device_side_checks` on for CPU tensors (where
``torch._assert_async`` raises a RuntimeError immediately) and by making every Python-level host
read of a tensor (``bool``, ``int``, ``float``, ``.item()``, ``.tolist()``) fail during a forward.
The CUDA test at the end runs the forward under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

import sparsemoe
from sparsemoe import _validation, kernels
from sparsemoe._validation import check_ids, check_input, device_side_checks
from sparsemoe.dispatch import sort_by_expert
from sparsemoe.gates import hash as hash_gate
from sparsemoe.routing import count_per_expert

#: (gate, options) whose forward is sync-free on CUDA
SYNC_FREE_GATES = [
    ("topk", {"k": 2, "noisy": False}),
    ("topk", {"k": 2, "noisy": True}),
    ("switch", {}),
    ("hash", {"k": 1}),
    ("hash", {"k": 2, "num_ids": 50}),
    ("topk", {"k": 2, "noisy": False, "bias_update_rate": 1e-3}),  # loads counted on the device
    ("sigmoid", {"k": 2, "num_groups": 4, "topk_groups": 2, "shared_experts": 1, "shared_gate": True}),
    ("softmax", {}),  # dense: every (input, expert) pair, no nonzero (docs/host-syncs.md lists the gates that sync)
]


@pytest.fixture
def device_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checks take their CUDA (device-side) form for CPU tensors too."""
    monkeypatch.setattr(_validation, "device_side_checks", lambda t: True)
    monkeypatch.setattr(hash_gate, "device_side_checks", lambda t: True)


def _no_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor's value was read on the host")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_cpu_checks_stay_host_side_value_errors() -> None:
    assert not device_side_checks(torch.zeros(1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_input(torch.tensor([[1.0, float("nan")]]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        check_ids(torch.tensor([0, -1]), 2)
    gate = sparsemoe.gates.build("hash", 4, 3, num_ids=5)
    with pytest.raises(ValueError, match="num_ids=5"):
        gate(torch.randn(2, 4), torch.tensor([1, 5]))


@pytest.mark.usefixtures("device_checks")
def test_device_side_checks_assert_asynchronously() -> None:
    """The device-side forms are asserts (on CPU, ``_assert_async`` raises at once: a RuntimeError)."""
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        check_input(torch.tensor([[1.0, float("inf")]]), 2)
    with pytest.raises(RuntimeError, match="non-negative"):
        check_ids(torch.tensor([0, -1]), 2)
    gate = sparsemoe.gates.build("hash", 4, 3, num_ids=5)
    with pytest.raises(RuntimeError, match="num_ids=5"):
        gate(torch.randn(2, 4), torch.tensor([1, 5]))
    check_input(torch.randn(3, 2), 2)  # valid input passes


def test_count_per_expert_matches_bincount(monkeypatch: pytest.MonkeyPatch) -> None:
    expert = torch.tensor([3, 0, 3, 1, 3])
    want = torch.bincount(expert, minlength=6)
    assert torch.equal(count_per_expert(expert, 6), want)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the fixed-size (CUDA) form
    got = count_per_expert(expert, 6)
    assert torch.equal(got, want) and got.dtype == want.dtype
    assert torch.equal(count_per_expert(expert[:0], 6), torch.zeros(6, dtype=torch.long))


def test_every_pair_count_goes_through_count_per_expert(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads, pairs per input, choice ranks, capacity and both dispatch paths count with the one
    helper: with ``bincount`` (a host sync on CUDA) gone and the helper in its CUDA form, they agree."""
    torch.manual_seed(0)
    x = torch.randn(9, 6)
    routing = sparsemoe.Routing.from_topk(torch.randint(0, 5, (9, 2)), torch.rand(9, 2), 5)
    moe = sparsemoe.MultiTaskMoE(6, 4, 5, 2, gate="topk", k=2, noisy=False).eval()

    def counts() -> list[torch.Tensor]:
        order, per_expert = sort_by_expert(routing.expert, 5)
        capped = routing.with_capacity(0.5)
        return [routing.load(), routing.active_per_input(), routing.choice_rank(), capped.expert, per_expert, order]

    with torch.no_grad():
        expected, outputs = counts(), moe(x)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.bincount called: it reads the largest index on the host on CUDA")

    monkeypatch.setattr(torch, "bincount", refuse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the helper's fixed-size (CUDA) form
    for got, want in zip(counts(), expected, strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():
        for got, want in zip(moe(x), outputs, strict=True):
            torch.testing.assert_close(got, want)


@pytest.mark.usefixtures("device_checks")
@pytest.mark.parametrize(("gate", "options"), SYNC_FREE_GATES)
def test_forward_reads_no_values_on_the_host(gate: str, options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With device-side checks, the layer's forward (checks, gate, routing, dispatch) never reads a value."""
    torch.manual_seed(0)
    moe = sparsemoe.MoE(32, 48, 8, gate=gate, expert="swiglu", check_finite=True, **options)
    x = torch.randn(4, 10, 32)
    ids = torch.randint(0, 50, (4, 10))
    torch.manual_seed(1)  # the same noise both times (noisy top-k, in training mode)
    expected = moe(x, ids)
    torch.manual_seed(1)
    with monkeypatch.context() as patch:
        _no_host_reads(patch)
        y = moe(x, ids)
        aux = moe.aux_loss()
    assert aux.shape == ()
    torch.testing.assert_close(y, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize(("gate", "options"), SYNC_FREE_GATES)
def test_cuda_forward_does_not_synchronise(gate: str, options: dict, triton: bool) -> None:
    torch.manual_seed(0)
    moe = sparsemoe.MoE(64, 96, 8, gate=gate, expert="swiglu", device="cuda", dtype=torch.bfloat16, **options)
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 50, (4, 64), device="cuda")
    with kernels.use_backend("triton" if triton else "torch"):
        moe(x, ids)  # warm-up: lazy initialisation (cuBLAS handles, Triton compilation) may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe(x, ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
