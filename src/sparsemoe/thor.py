"""THOR (Zuo et al., ICLR 2022): stochastic experts trained to agree.

A THOR layer is a :class:`sparsemoe.MoE` with the ``random`` gate and no router. Training runs the
model twice on the same batch, with independent expert draws and dropout on, and minimises
:func:`consistency_loss`. At evaluation the experts can be picked at random (per token or per
sentence), fixed to one expert, or averaged (:func:`thor_inference`); THOR's claim is that the
experts agree so well that the cheap random choice loses little against the n-times dearer mean.

What follows the official code (``microsoft/Stochastic-Mixture-of-Experts``) rather than the paper:

* training draws ONE expert per layer per forward pass for the whole batch (``granularity="batch"``);
* the two passes are independent draws, not forced to differ;
* label smoothing is fairseq's: the target gets ``1 - ε`` and every other class ``ε / (V - 1)``
  (``torch.nn.functional.cross_entropy`` would give the target ``1 - ε + ε / V``);
* the KL term is computed on the raw model distributions (not smoothed), in float32, with no
  stop-gradient on either side, and every term is a sum over non-pad target tokens divided by
  their count (fairseq divides the summed loss by ``ntokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice, check_float
from .gates import Gate, RandomGate, build
from .layers import MoE

#: inference modes accepted by :func:`thor_inference` / :meth:`ThorModes.set`
INFERENCE_MODES = ("train", "random-token", "random-sentence", "fixed", "mean")


# ----------------------------------------------------------------------------------------- loss
@dataclass(frozen=True)
class ConsistencyTerms:
    """The parts of THOR's loss, each already divided by the number of non-pad target tokens."""

    total: torch.Tensor  # ce_1 + ce_2 + alpha * kl
    ce_1: torch.Tensor  # label-smoothed cross-entropy of pass 1
    ce_2: torch.Tensor
    kl: torch.Tensor  # ½ [KL(p1‖p2) + KL(p2‖p1)] per token
    num_tokens: int


def _non_pad(target: torch.Tensor, pad_id: int | None, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """``BoolTensor`` like ``target``: True where the token counts."""
    if (pad_id is None) == (pad_mask is None):
        raise ValueError("pass exactly one of pad_id= (the padding token) or pad_mask= (True at padding)")
    if pad_mask is not None:
        if pad_mask.shape != target.shape or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask must be a bool tensor shaped like target {tuple(target.shape)}")
        return ~pad_mask
    assert pad_id is not None
    return target != pad_id


def label_smoothed_nll(log_probs: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-token fairseq label-smoothed NLL: ``(1-ε-ε/(V-1))·nll + ε/(V-1)·Σ_v -log p_v``.

    Shape: ``log_probs [..., V]``, ``target [...]`` -> ``[...]``.
    """
    vocab = log_probs.shape[-1]
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if epsilon == 0.0:
        return nll
    eps_i = epsilon / (vocab - 1)
    return (1.0 - epsilon - eps_i) * nll - eps_i * log_probs.sum(-1)


def symmetric_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``½ [KL(p‖q) + KL(q‖p)] = ½ Σ_v (p - q)(log p - log q)`` of two log-distributions.

    The project's one symmetric KL (THOR's consistency term, the agreement measures, MoEBERT's
    distillation): it takes log-probabilities, so callers that also need them for a cross-entropy
    compute the log-softmax once, and it does not reduce, so each caller sums or averages as its
    loss defines. Shape: ``[..., V] -> [...]``.
    """
    return 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)


def consistency_terms(
    logits_1: torch.Tensor,
    logits_2: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    *,
    pad_id: int | None = None,
    pad_mask: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
) -> ConsistencyTerms:
    """THOR's loss and its parts; see :func:`consistency_loss`."""
    alpha = check_float("alpha", alpha, low=0.0)
    label_smoothing = check_float("label_smoothing", label_smoothing, low=0.0)
    if label_smoothing >= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits_1.shape != logits_2.shape or logits_1.shape[:-1] != target.shape:
        raise ValueError(
            f"logits_1 {tuple(logits_1.shape)} and logits_2 {tuple(logits_2.shape)} must both be "
            f"target.shape + (V,) with target {tuple(target.shape)}"
        )
    keep = _non_pad(target, pad_id, pad_mask)
    num_tokens = int(keep.sum())
    denom = max(num_tokens, 1)
    lp1 = F.log_softmax(logits_1.float()[keep], dim=-1)  # [N, V]
    lp2 = F.log_softmax(logits_2.float()[keep], dim=-1)
    tgt = target[keep]
    ce_1 = label_smoothed_nll(lp1, tgt, label_smoothing).sum() / denom
    ce_2 = label_smoothed_nll(lp2, tgt, label_smoothing).sum() / denom
    kl = symmetric_kl(lp1, lp2).sum() / denom
    return ConsistencyTerms(ce_1 + ce_2 + alpha * kl, ce_1, ce_2, kl, num_tokens)


def consistency_loss(
    logits_1: torch.Tensor,
    logits_2: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    *,
    pad_id: int | None = None,
    pad_mask: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """``(CE_ls(p1, y) + CE_ls(p2, y) + α · ½ Σ_t [KL(p1_t‖p2_t) + KL(p2_t‖p1_t)]) / #non-pad``.

    Every term is summed over the non-pad target tokens and divided by their count, as the official
    code does through fairseq's ``sample_size``. Label smoothing uses fairseq's ``ε / (V - 1)`` form
    (see the module docstring); the KL uses the raw, unsmoothed distributions, with gradient
    through both passes.

    Args:
        logits_1, logits_2: the two stochastic passes' logits. Shape: ``[..., V]``.
        target: gold token ids. Shape: ``[...]``.
        alpha: weight of the consistency term (5 in THOR's IWSLT recipe, 1 the code default).
        pad_id / pad_mask: exactly one; the padding token id, or a bool mask True at padding.
        label_smoothing: ``ε`` (0.1 in THOR).
    """
    return consistency_terms(
        logits_1, logits_2, target, alpha, pad_id=pad_id, pad_mask=pad_mask, label_smoothing=label_smoothing
    ).total


def thor_training_loss(
    forward: Callable[[], torch.Tensor],
    target: torch.Tensor,
    alpha: float,
    *,
    pad_id: int | None = None,
    pad_mask: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
) -> ConsistencyTerms:
    """Run ``forward()`` twice (two independent expert draws, dropout on) and return the THOR loss.

    ``forward`` computes the model's logits ``[..., V]`` for the batch, e.g.
    ``lambda: model(src, tgt_in)``; the model must be in training mode so that its random gates
    redraw and its dropout differs between the calls. Backpropagate ``terms.total`` (plus any aux
    loss of learned gates in the model).
    """
    logits_1 = forward()
    logits_2 = forward()
    return consistency_terms(
        logits_1, logits_2, target, alpha, pad_id=pad_id, pad_mask=pad_mask, label_smoothing=label_smoothing
    )


# ----------------------------------------------------------------------------------------- inference modes
def thor_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of ``model`` whose gate is a training :class:`RandomGate` (a THOR layer), by name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, MoE) and isinstance(m.gate, RandomGate) and not m.gate.inference_only
    ]


class ThorModes:
    """Switches the THOR layers of ``model`` between their training gate and an inference mode.

    Built while the model holds its training gates, it keeps them; :meth:`set` assigns each layer's
    ``gate`` (an ordinary submodule assignment) to the mode's gate from :mod:`sparsemoe.gates`
    (``token_draw``, ``sentence_draw``, ``fixed``, ``mean``: all ``inference_only``), and
    ``set("train")`` puts the training gates back, their random streams untouched by the modes. Use
    one switcher per model at a time (:func:`thor_inference` is one for the length of a ``with``
    block): building a second one while layers run an inference gate raises.

    Modes: ``train`` (the training gate itself), ``random-token`` (a fresh uniform expert per token
    per layer), ``random-sentence`` (one expert per sentence per layer, ids = sentence ids),
    ``fixed`` (expert ``expert`` everywhere), ``mean`` (average of all experts' outputs, ``n``× the
    FFN compute). ``seed`` seeds the random modes (each layer gets its own stream).
    """

    def __init__(self, model: nn.Module) -> None:
        switched = [
            f"{name} ({type(m.gate).__name__})"
            for name, m in model.named_modules()
            if isinstance(m, MoE) and m.gate.inference_only
        ]
        if switched:
            raise ValueError(
                f"layers {', '.join(switched)} already run an inference gate; switch them back to their "
                "training gates (leave the thor_inference block, or call set('train')) first"
            )
        self.layers = thor_layers(model)
        if not self.layers:
            raise ValueError("model has no THOR layer (an MoE with the 'random' gate)")
        self.training_gates: list[RandomGate] = [cast(RandomGate, layer.gate) for _, layer in self.layers]
        self.mode = "train"

    def set(self, mode: str, *, expert: int = 0, seed: int = 0) -> None:
        """Run every THOR layer in ``mode`` (see the class docstring) from the next forward on."""
        mode = check_choice("mode", mode, INFERENCE_MODES)
        new = [
            base if mode == "train" else _mode_gate(base, index, mode, expert, seed, layer)
            for index, ((_, layer), base) in enumerate(zip(self.layers, self.training_gates, strict=True))
        ]
        for (_, layer), gate in zip(self.layers, new, strict=True):
            layer.gate = gate
        self.mode = mode


def _mode_gate(base: RandomGate, index: int, mode: str, expert: int, seed: int, layer: MoE) -> Gate:
    """The gate of ``mode`` for THOR layer number ``index`` (seeded ``seed * 10_007 + index``)."""
    layer_seed = seed * 10_007 + index
    choices: dict[str, tuple[str, dict[str, Any]]] = {
        "random-token": ("token_draw", {"k": base.k, "seed": layer_seed}),
        "random-sentence": ("sentence_draw", {"seed": layer_seed}),
        "fixed": ("fixed", {"expert": expert}),
        "mean": ("mean", {}),
    }
    name, options = choices[mode]
    device = next(layer.parameters()).device
    return build(name, base.d_in, base.num_experts, check_finite=base.check_finite, device=device, **options)


@contextmanager
def thor_inference(model: nn.Module, mode: str, *, expert: int = 0, seed: int = 0) -> Iterator[nn.Module]:
    """``with thor_inference(model, "mean"): ...`` runs every THOR layer in ``mode``, then restores.

    See :class:`ThorModes` for the modes.
    """
    modes = ThorModes(model)
    modes.set(mode, expert=expert, seed=seed)
    try:
        yield model
    finally:
        modes.set("train")
