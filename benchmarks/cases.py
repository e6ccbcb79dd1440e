"""What is timed: one training step (forward + backward) of a layer on fixed data.

A :class:`Case` wraps a module and its input so that every implementation (ours, the
dense-equivalent, the peers) is measured the same way: gradients cleared (``set_to_none``, as
``optimizer.zero_grad()`` does), forward, backward with a fixed dense upstream gradient (a real
network never sends the stride-0 gradient of ``y.sum()``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sparsemoe


@dataclass
class Case:
    """A named fwd+bwd step.

    ``forward`` maps the stored input to ``(output, aux_loss or None)``; the auxiliary loss (load
    balancing, entropy) is part of a training step, so it is backpropagated too.
    """

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    x: torch.Tensor
    grad_out: torch.Tensor

    def step(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        out, aux = self.forward(self.x)
        outputs, grads = [out], [self.grad_out]
        if aux is not None and aux.requires_grad:
            outputs.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(outputs, grads)

    def param_grad_bytes(self) -> int:
        """Bytes of the parameter gradients one step creates (they are part of its peak)."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)


class DenseEquivalent(nn.Module):
    """The compute floor of a top-k MoE layer: ``T·k`` rows through ONE expert-sized network.

    Same active FLOPs as the MoE's experts, as plain GEMMs (``F.linear``) with no routing, sorting,
    gathering or combining. Its input is the ``[T·k, d]`` matrix of replicated rows.
    """

    def __init__(self, d: int, h: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w1 = nn.Linear(d, 2 * h if kind == "swiglu" else h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.w2(h)


def _data(rows: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g).to(dtype).requires_grad_()
    return x, torch.randn(rows, d, generator=g).to(dtype)


def dense_case(tokens: int, d: int, h: int, k: int, kind: str, seed: int = 0) -> Case:
    torch.manual_seed(seed)
    module = DenseEquivalent(d, h, kind)
    x, grad = _data(tokens * k, d, seed)
    return Case(f"dense-equivalent ({kind})", module, lambda inp: (module(inp), None), x, grad)


def sparsemoe_case(
    tokens: int, d: int, h: int, n: int, k: int, kind: str, gate: str = "topk", seed: int = 0, **gate_kwargs: object
) -> Case:
    """Our layer as a user builds it (default options: noisy top-k with its balance loss)."""
    torch.manual_seed(seed)
    module = sparsemoe.MoE(d, h, n, gate=gate, k=k, expert=kind, **gate_kwargs)
    x, grad = _data(tokens, d, seed)

    def forward(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = module(inp)
        return out, module.aux_loss()

    options = ", ".join(f"{key}={value}" for key, value in gate_kwargs.items())
    return Case(f"sparsemoe ({kind}{', ' + options if options else ''})", module, forward, x, grad)
