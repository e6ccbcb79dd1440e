"""COMET/DSelect-k multiply their path/bit factors one by one for speed: same numbers as ``prod``."""

from __future__ import annotations

import pytest
import torch

from sparsemoe import gates
from sparsemoe.gates.smooth_step import smooth_step


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
