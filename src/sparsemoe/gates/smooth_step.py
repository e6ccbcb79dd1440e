"""The smooth-step of Hazimeh et al. (2020): a C¹ sigmoid that reaches exactly 0 and 1.

Because it is exactly flat outside ``|t| < γ/2`` (value and gradient), gates built on it emit exact
zeros once trained, and the experts behind those zeros are never computed.

Cost until saturation (DSelect-k and COMET alike): while an input's smooth-steps are inside their
soft band (``|z| < γ/2``) its weights are non-zero on up to all ``n`` experts, and the layer computes
every one of them for that input (``n/k`` times the expert compute of a saturated layer). Sparsity
arrives during training; ``last_routing.num_pairs / num_inputs`` shows how far it has got.

Both gates' defaults (``gamma=1.0``, ``entropy_weight=0.1``) come from the seeded ``gate-saturation``
study (results/gate-saturation: 16 experts, k=2, one MoE layer on scikit-learn digits, Adam lr 1e-3,
2 seeds), whose rule (``sparsemoe.experiments.reporting.gate_saturation.choose_default``) picks them
on validation data. With ``γ = 1`` either gate computes k experts per validation input after 50
steps (``γ = 0.1``: 5-10 steps; ``γ = 10``: still above k after 1,000 steps), at a validation
accuracy within 0.01 of the best candidate's; the entropy weight (0.1 or 1) barely moved either.
``γ = 1`` keeps the widest soft band (the most gradient for the routing) among the candidates that
reach k within 5% of the steps, and is the official code's default. Saturation speed scales with
``|w·x|`` relative to ``γ``: inputs of a much smaller norm need a smaller ``γ``.
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
