"""The layers a user would pick instead of ours, built at the same shapes.

Peers come from the ``bench`` extra (``pip install -c constraints.txt -e '.[bench]'``); each builder
returns a :class:`~benchmarks.cases.Case`, or a string saying why it was skipped (not installed, or
no expert of that kind). Nothing here is imported by the library or its tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .cases import Case, _data

PeerBuilder = Callable[[int, int, int, int, int, str], "Case | str"]


def _mixtral(implementation: str) -> PeerBuilder:
    """Hugging Face ``MixtralSparseMoeBlock`` (SwiGLU experts, softmax top-k router) with one experts backend."""

    def build(tokens: int, d: int, h: int, n: int, k: int, kind: str) -> Case | str:
        if kind != "swiglu":
            return "Mixtral experts are SwiGLU only"
        try:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        except ImportError as err:
            return f"transformers not installed ({err.name})"
        config = MixtralConfig(
            hidden_size=d, intermediate_size=h, num_local_experts=n, num_experts_per_tok=k, router_jitter_noise=0.0
        )
        config._experts_implementation = implementation
        torch.manual_seed(0)
        block = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0.0, 0.02)  # the experts' tensors are created with torch.empty
        x, grad = _data(tokens, d, 0)
        x3, grad3 = x.detach().view(1, tokens, d).requires_grad_(), grad.view(1, tokens, d)
        return Case(f"HF Mixtral block ({implementation})", block, lambda inp: (block(inp), None), x3, grad3)

    return build


def _lucidrains_moe(tokens: int, d: int, h: int, n: int, k: int, kind: str) -> Case | str:
    """``mixture-of-experts`` (GShard top-2, einsum dispatch). Capacity 2.0 gives it T·k slots, our FLOPs."""
    if kind != "mlp" or k != 2:
        return "mixture-of-experts has GELU/ReLU MLP experts and top-2 routing only"
    try:
        from mixture_of_experts import MoE
    except ImportError as err:
        return f"mixture-of-experts not installed ({err.name})"
    torch.manual_seed(0)
    layer = MoE(
        dim=d,
        num_experts=n,
        hidden_dim=h,
        activation=nn.GELU,
        second_policy_train="all",
        capacity_factor_train=2.0,
    )
    x, grad = _data(tokens, d, 0)
    x3, grad3 = x.detach().view(1, tokens, d).requires_grad_(), grad.view(1, tokens, d)
    return Case("mixture-of-experts", layer, lambda inp: layer(inp), x3, grad3)


def _st_moe(tokens: int, d: int, h: int, n: int, k: int, kind: str) -> Case | str:
    """``st-moe-pytorch`` (top-n, GEGLU experts, einsum dispatch); threshold 0 and capacity 2.0 keep T·k pairs."""
    if kind != "swiglu":
        return "st-moe-pytorch experts are GEGLU (gated) only"
    try:
        from st_moe_pytorch import MoE
    except ImportError as err:
        return f"st-moe-pytorch not installed ({err.name})"
    mult = 3 * h / (2 * d)  # its hidden width is int(d * mult * 2 / 3)
    torch.manual_seed(0)
    layer = MoE(
        dim=d,
        num_experts=n,
        gating_top_n=k,
        expert_hidden_mult=mult,
        threshold_train=0.0,
        capacity_factor_train=2.0,
    )
    x, grad = _data(tokens, d, 0)
    x3, grad3 = x.detach().view(1, tokens, d).requires_grad_(), grad.view(1, tokens, d)

    def forward(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = layer(inp)
        return out.outputs if hasattr(out, "outputs") else out[0], out[1]

    return Case("st-moe-pytorch", layer, forward, x3, grad3)


PEERS: dict[str, PeerBuilder] = {
    "HF Mixtral block (eager)": _mixtral("eager"),
    "HF Mixtral block (grouped_mm)": _mixtral("grouped_mm"),
    "mixture-of-experts": _lucidrains_moe,
    "st-moe-pytorch": _st_moe,
}
