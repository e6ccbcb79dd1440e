"""The smooth-step of Hazimeh et al. (2020): a C¹ sigmoid that reaches exactly 0 and 1.

Because it is exactly flat outside ``|t| < γ/2`` (value and gradient), gates built on it emit exact
zeros once trained, and the experts behind those zeros are never computed.
"""

from __future__ import annotations

import torch


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``S_γ(t)``: 0 for ``t <= -γ/2``, 1 for ``t >= γ/2``, ``-2t³/γ³ + 3t/(2γ) + 1/2`` between."""
    half = gamma / 2
    cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -half, torch.zeros_like(t), torch.where(t >= half, torch.ones_like(t), cubic))
