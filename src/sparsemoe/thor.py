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

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_float, check_int
from .gates.base import Gate, IdKind
from .gates.random import RandomGate
from .layers import MoE
from .routing import Routing

#: inference modes accepted by :func:`thor_inference` / :func:`set_thor_inference`
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
    """Per-row ``½ [KL(p‖q) + KL(q‖p)] = ½ Σ_v (p - q)(log p - log q)``. Shape: ``[..., V] -> [...]``."""
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


# ----------------------------------------------------------------------------------------- inference gates
class FixedGate(Gate):
    """Every input to one expert, weight 1: THOR's ``fixed`` inference mode."""

    def __init__(self, d_in: int, num_experts: int, *, expert: int = 0, check_finite: bool = True) -> None:
        super().__init__(d_in, num_experts, 1, check_finite=check_finite)
        self.expert = check_int("expert", expert, low=0, high=num_experts - 1)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        experts = torch.full((x.shape[0], 1), self.expert, dtype=torch.long, device=x.device)
        return Routing.from_topk(experts, x.new_ones(x.shape[0], 1), self.num_experts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, expert={self.expert}"


class MeanGate(Gate):
    """Every input to all ``n`` experts with weight ``1/n``: THOR's ``mean`` mode (costs ``n``×)."""

    def __init__(self, d_in: int, num_experts: int, *, check_finite: bool = True) -> None:
        super().__init__(d_in, num_experts, num_experts, check_finite=check_finite)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        experts = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
        weights = x.new_full((x.shape[0], self.num_experts), 1.0 / self.num_experts)
        return Routing.from_topk(experts, weights, self.num_experts)


class SentenceDrawGate(Gate):
    """One uniform expert per sentence, the same at every decoding step and for every beam.

    The expert of sentence ``i`` is ``table[i]``, a table drawn once from ``seed``; ``ids`` are the
    sentence ids (pass a corpus-wide index so that different batches get different draws). The
    official code instead redraws per hypothesis at every incremental decoding step in the decoder.

    Args:
        seed: seed of the table (use a different one per layer).
        max_sentences: table size; ``ids`` must be below it.
    """

    def id_kind(self) -> IdKind:
        return "sequence"

    def __init__(
        self, d_in: int, num_experts: int, *, seed: int = 0, max_sentences: int = 1 << 16, check_finite: bool = True
    ) -> None:
        super().__init__(d_in, num_experts, 1, check_finite=check_finite)
        generator = torch.Generator().manual_seed(check_int("seed", seed))
        size = check_int("max_sentences", max_sentences, low=1)
        self.register_buffer("table", torch.randint(num_experts, (size,), generator=generator), persistent=False)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> Routing:
        if ids is None:
            raise ValueError("SentenceDrawGate needs ids= (the sentence id of each row)")
        table: torch.Tensor = self.table  # type: ignore[assignment]
        if ids.numel() and int(ids.max()) >= table.numel():
            raise ValueError(f"sentence id {int(ids.max())} >= max_sentences={table.numel()}; build a larger table")
        experts = table.to(ids.device)[ids].unsqueeze(1)
        return Routing.from_topk(experts, x.new_ones(x.shape[0], 1), self.num_experts)


def thor_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of ``model`` whose gate is a :class:`RandomGate` (a THOR layer), by name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE) and _base_gate(m) is not None]


def _mode_gate(base: RandomGate, index: int, mode: str, expert: int, seed: int) -> Gate:
    d, n = base.d_in, base.num_experts
    layer_seed = seed * 10_007 + index
    if mode == "random-token":
        return RandomGate(d, n, k=base.k, granularity="token", seed=layer_seed, check_finite=base.check_finite)
    if mode == "random-sentence":
        return SentenceDrawGate(d, n, seed=layer_seed, check_finite=base.check_finite)
    if mode == "fixed":
        return FixedGate(d, n, expert=expert, check_finite=base.check_finite)
    return MeanGate(d, n, check_finite=base.check_finite)


def set_thor_inference(model: nn.Module, mode: str, *, expert: int = 0, seed: int = 0) -> dict[str, Gate]:
    """Switch every THOR layer of ``model`` to an inference ``mode``; returns the replaced gates.

    Modes: ``train`` (the training gate itself), ``random-token`` (a fresh uniform expert per token
    per layer), ``random-sentence`` (one expert per sentence per layer, ids = sentence ids),
    ``fixed`` (expert ``expert`` everywhere), ``mean`` (average of all experts' outputs, ``n``× the
    FFN compute). ``seed`` seeds the random modes (each layer gets its own stream). Restore with
    :func:`restore_gates`, or use the context manager :func:`thor_inference`.
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"mode must be one of {', '.join(INFERENCE_MODES)}; got {mode!r}")
    originals: dict[str, Gate] = {}
    layers = thor_layers(model)
    if not layers:
        raise ValueError("model has no THOR layer (an MoE with the 'random' gate)")
    for index, (name, layer) in enumerate(layers):
        base = _base_gate(layer)
        assert base is not None
        originals[name] = layer.gate
        if mode == "train":
            layer.gate = base
            continue
        new = _mode_gate(base, index, mode, expert, seed)
        new.__dict__["_thor_base"] = base  # a plain attribute: not a submodule, not in state_dict
        new.to(next(layer.parameters()).device)
        layer.gate = new
    return originals


def _base_gate(layer: MoE) -> RandomGate | None:
    """The layer's training RandomGate, also while an inference gate is swapped in."""
    base = layer.gate.__dict__.get("_thor_base")
    if base is None and isinstance(layer.gate, RandomGate):
        return layer.gate
    return base if isinstance(base, RandomGate) else None


def restore_gates(model: nn.Module, originals: dict[str, Gate]) -> None:
    """Put back the gates returned by :func:`set_thor_inference`."""
    modules = dict(model.named_modules())
    for name, gate in originals.items():
        layer = modules[name]
        assert isinstance(layer, MoE)
        layer.gate = gate


@contextmanager
def thor_inference(model: nn.Module, mode: str, *, expert: int = 0, seed: int = 0) -> Iterator[nn.Module]:
    """``with thor_inference(model, "mean"): ...`` runs every THOR layer in ``mode``, then restores."""
    originals = set_thor_inference(model, mode, expert=expert, seed=seed)
    try:
        yield model
    finally:
        restore_gates(model, originals)
