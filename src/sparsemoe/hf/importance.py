"""First-order Taylor importance of each FFN neuron (MoEBERT, Zuo et al., 2022).

``I_j = Σ_examples | w1_j · ∇_{w1_j} L + w2_j · ∇_{w2_j} L |``, with ``w1_j`` the j-th row of the first
FFN weight and ``w2_j`` the j-th column of the second; biases ignored; the absolute value taken per
example, before summing. The dot products need no per-example weight gradients: with
``z = x W1ᵀ + b1`` the pre-activation and ``a = act(z)``, ``w1_j · ∇_{w1_j} L = Σ_t ∂L/∂z_tj (z_tj - b1_j)``
and ``w2_j · ∇_{w2_j} L = Σ_t a_tj ∂L/∂a_tj`` (sums over the tokens of the example). So one backward
of the summed per-example losses gives every example's score, as long as examples do not interact
(eval mode: no dropout, no batch statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .convert import ffn_blocks

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


def per_example_cross_entropy(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each example, ``[B]``: the default loss (sequence classification)."""
    return F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="none")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without ``labels``, so that the model does not compute its own mean loss."""
    return {k: v for k, v in batch.items() if k != "labels"}


def ffn_importance(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    loss_fn: LossFn | None = None,
) -> list[torch.Tensor]:
    """Importance of every FFN neuron of a BERT-family model, one ``[ffn]`` float64 tensor per layer.

    Args:
        model: the fine-tuned dense model (put in eval mode here, and restored afterwards).
        dataloader: batches of model inputs plus ``labels`` (dicts of tensors).
        loss_fn: ``loss_fn(outputs, batch) -> [B]`` per-example losses; default: cross-entropy of
            ``outputs.logits`` against ``batch["labels"]``.
    """
    loss_fn = loss_fn or per_example_cross_entropy
    blocks: list[Any] = [layer for _, layer in ffn_blocks(model)]
    totals = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.float64) for layer in blocks]
    captured: dict[int, dict[str, torch.Tensor]] = {}

    def keep(index: int, key: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            out.retain_grad()
            captured.setdefault(index, {})[key] = out

        return hook

    handles = []
    for i, layer in enumerate(blocks):
        handles.append(layer.intermediate.dense.register_forward_hook(keep(i, "z")))
        handles.append(layer.intermediate.intermediate_act_fn.register_forward_hook(keep(i, "a")))
    was_training = model.training
    model.eval()
    try:
        for batch in dataloader:
            captured.clear()
            model.zero_grad(set_to_none=True)
            losses = loss_fn(model(**model_inputs(batch)), batch)  # [B]
            losses.sum().backward()
            for i, layer in enumerate(blocks):
                z, a = captured[i]["z"], captured[i]["a"]  # [B, L, h]
                assert z.grad is not None and a.grad is not None
                b1 = layer.intermediate.dense.bias
                centred = z.detach() - b1.detach() if b1 is not None else z.detach()
                taylor = z.grad * centred + a.grad * a.detach()  # [B, L, h]
                totals[i] += taylor.double().sum(1).abs().sum(0).cpu()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return totals
