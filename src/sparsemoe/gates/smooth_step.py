"""The smooth-step of Hazimeh et al. (2020): a C¹ sigmoid that reaches exactly 0 and 1.

Because it is exactly flat outside ``|t| < γ/2`` (value and gradient), gates built on it emit exact
zeros once trained, and the experts behind those zeros are never computed.
"""

from __future__ import annotations

import torch


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``S_γ(t)``: 0 for ``t <= -γ/2``, 1 for ``t >= γ/2``, ``-2t³/γ³ + 3t/(2γ) + 1/2`` between.

    Written as ``u²(3 - 2u)`` with ``u = clamp(t/γ + 1/2, 0, 1)`` (the same cubic): the clamp makes
    both flat parts exact (0 and 1 exactly, zero gradient, including at the knots where the cubic's
    slope is 0) in a third of the ops of two nested ``where``s.
    """
    u = (t / gamma + 0.5).clamp(0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)
