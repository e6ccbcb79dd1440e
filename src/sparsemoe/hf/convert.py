"""Dense to MoE: turn each FFN of a pretrained Hugging Face encoder into a sparse MoE (MoEBERT).

A BERT-family layer computes ``LN(x + dropout(W2 act(W1 x + b1) + b2))``. :func:`moefy` replaces
``act(W1 x + b1) W2`` by an :class:`~sparsemoe.MoE` whose experts are slices of the dense FFN:
the ``shared`` most important neurons go to every expert and the rest are dealt round-robin by
rank, each expert keeping ``expert_dim`` neurons (Zuo et al., 2022). ``b2`` is added once, outside
the MoE, and the residual, dropout and LayerNorm of ``BertOutput`` stay where they are, so a
conversion that keeps every neuron in every expert computes exactly the dense model.

Gates that route by token id (``hash``) read the ``input_ids`` of the current forward: a forward
pre-hook on the word embeddings records them in a slot that every converted FFN of the model reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import gates
from ..experts import StackedExperts
from ..layers import MoE

#: Hugging Face ``hidden_act`` names -> sparsemoe expert activations (same functions)
_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


@dataclass
class MoefyConfig:
    """Everything needed to rebuild the structure of a converted model (saved with it)."""

    num_experts: int
    expert_dim: int
    shared: int
    gate: str
    k: int | None
    gate_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _TokenIds:
    """The ``input_ids`` of the forward in progress, shared by every converted FFN of one model.

    Its methods are the hooks (bound methods, so ``copy.deepcopy`` of the model copies the slot too).
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None

    def clear(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.ids = None

    def capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.ids = args[0] if args and isinstance(args[0], torch.Tensor) else None


class MoEFFN(nn.Module):
    """``act(x W1 + b1) W2 + b2`` of one encoder layer, as a sparse MoE plus the shared ``b2``.

    Shape: ``[B, L, d] -> [B, L, d]``. Stands in for ``BertIntermediate``; the layer's
    ``output.dense`` becomes ``nn.Identity`` so ``BertOutput`` keeps only dropout + residual + LN.
    """

    def __init__(self, moe: MoE, bias: torch.Tensor, slot: _TokenIds) -> None:
        super().__init__()
        self.moe = moe
        self.bias = nn.Parameter(bias.detach().clone())  # b2 [d], added once per token
        self._slot = slot

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        ids = None
        if self.moe.gate.id_kind() == "token":
            ids = self._slot.ids
            if ids is None or ids.shape != hidden.shape[:-1]:
                raise ValueError(
                    f"gate {type(self.moe.gate).__name__} routes by token id: call the model with input_ids "
                    f"(not inputs_embeds); got ids of shape {None if ids is None else tuple(ids.shape)} "
                    f"for hidden states {tuple(hidden.shape)}"
                )
        return self.moe(hidden, ids=ids) + self.bias


def ffn_blocks(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every BERT-family layer (``.intermediate.dense`` + ``.output.dense``).

    Raises ``TypeError`` naming the architecture when there is none.
    """
    blocks: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        intermediate = getattr(module, "intermediate", None)
        output = getattr(module, "output", None)
        if (
            isinstance(getattr(intermediate, "dense", None), nn.Linear)
            and hasattr(intermediate, "intermediate_act_fn")
            and isinstance(getattr(output, "dense", None), nn.Linear)
            and hasattr(output, "LayerNorm")
        ):
            blocks.append((name, module))
    if not blocks:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise TypeError(
            f"moefy supports BERT-family encoders (layers with .intermediate.dense and .output.dense, such as "
            f"BertLayer, RobertaLayer, ElectraLayer); {type(model).__name__}"
            f"{f' (model_type={kind!r})' if kind else ''} has no such layer"
        )
    return blocks


def expert_neurons(importance: torch.Tensor, num_experts: int, expert_dim: int, shared: int) -> torch.Tensor:
    """Neuron indices of each expert, ``LongTensor[num_experts, expert_dim]`` (MoEBERT's split).

    The ``shared`` highest-ranked neurons go to every expert; the others are dealt round-robin by
    rank (expert ``e`` gets ranks ``shared + e``, ``shared + e + n``, ...); each expert keeps its
    first ``expert_dim``. Ties in ``importance`` keep index order.

    Shape: ``importance [h]`` -> ``[n, expert_dim]``.
    """
    hidden = importance.numel()
    order = torch.argsort(importance.detach().cpu().double(), descending=True, stable=True)
    top, rest = order[:shared], order[shared:]
    experts = []
    for e in range(num_experts):
        own = torch.cat([top, rest[e::num_experts]])
        if own.numel() < expert_dim:
            raise ValueError(
                f"expert_dim={expert_dim} is more than the {own.numel()} neurons expert {e} can get "
                f"(shared={shared} + its round-robin share of the other {hidden - shared}); lower expert_dim or "
                "raise shared"
            )
        experts.append(own[:expert_dim])
    return torch.stack(experts)


def _activation(model: nn.Module, layer: Any) -> str:
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    if act is None:  # no config: recognise the module itself
        fn = layer.intermediate.intermediate_act_fn
        act = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}.get(type(fn), type(fn).__name__)
        if type(fn).__name__ == "GELUActivation":
            act = "gelu"
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"moefy supports the activations {sorted(_ACTIVATIONS)}; this model uses {act!r}")
    return _ACTIVATIONS[act]


def _expert_bank(layer: Any, neurons: torch.Tensor, activation: str) -> StackedExperts:
    """Stacked experts holding ``W1[idx], b1[idx], W2[:, idx]`` for each expert's neuron set."""
    w1 = layer.intermediate.dense.weight  # [h, d]
    b1 = layer.intermediate.dense.bias  # [h] or None
    w2 = layer.output.dense.weight  # [d, h]
    n, expert_dim = neurons.shape
    bank = StackedExperts(n, w1.shape[1], expert_dim, w2.shape[0], kind="mlp", activation=activation, bias=True)
    bank.b2 = None  # b2 is added once, by MoEFFN
    with torch.no_grad():
        bank.w1.copy_(w1[neurons].transpose(1, 2))  # [n, d, e]
        assert bank.b1 is not None and bank.w2 is not None
        bank.b1.copy_(b1[neurons] if b1 is not None else torch.zeros_like(bank.b1))
        bank.w2.copy_(w2[:, neurons].permute(1, 2, 0))  # [n, e, d]
    return bank.to(w1.dtype)


def _vocab_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _word_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def moefy(
    model: nn.Module,
    num_experts: int = 4,
    expert_dim: int | None = None,
    shared: int | None = None,
    gate: str = "hash",
    k: int | None = 1,
    importance: Sequence[torch.Tensor] | None = None,
    *,
    seed: int = 0,
    **gate_options: Any,
) -> nn.Module:
    """Replace every FFN of a BERT-family encoder by a sparse MoE built from its neurons, in place.

    Args:
        model: a Hugging Face BERT-family model (``BertModel``, ``BertForSequenceClassification``,
            RoBERTa, ELECTRA, MiniLM...). Converted in place and returned; ``copy.deepcopy`` it first
            to keep the dense model (the distillation teacher).
        num_experts: experts per layer.
        expert_dim: neurons per expert (default ``ffn / num_experts``, so the MoE holds as many FFN
            weights as the dense model, as MoEBERT).
        shared: top-ranked neurons given to every expert (default ``ffn / 6``: MoEBERT's 512 of 3072).
        gate: any sparsemoe gate spec (``"hash"``, ``"topk"``, ``"comet"``, ``"comet+"``...).
        k: experts per token (``None``: the gate's default).
        importance: one ``[ffn]`` score per converted layer, in model order
            (:func:`sparsemoe.hf.ffn_importance`); ``None`` ranks neurons by index (used when the
            weights are loaded afterwards, as :func:`load_moefied` does).
        seed: seeds the gates' initialisation; hash tables use ``seed + layer index``, so each
            layer routes a token differently (as MoEBERT's per-layer random tables).
        **gate_options: passed to the gate (``gamma=``, ``entropy_weight=``, ``local_search_steps=``...).

    Returns the model, with ``model.moefy_config`` (a :class:`MoefyConfig`) set.
    """
    if getattr(model, "moefy_config", None) is not None:
        raise ValueError("this model is already converted (it has moefy_config); convert the dense model")
    blocks = ffn_blocks(model)
    ffn = blocks[0][1].intermediate.dense.out_features
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    expert_dim = ffn // num_experts if expert_dim is None else expert_dim
    shared = ffn // 6 if shared is None else shared
    if not isinstance(expert_dim, int) or not 1 <= expert_dim <= ffn:
        raise ValueError(f"expert_dim must be an int in [1, {ffn}] (the FFN width), got {expert_dim!r}")
    if not isinstance(shared, int) or not 0 <= shared <= ffn:
        raise ValueError(f"shared must be an int in [0, {ffn}], got {shared!r}")
    if importance is not None and len(importance) != len(blocks):
        raise ValueError(f"importance has {len(importance)} scores; the model has {len(blocks)} FFN layers")
    spec = gates.parse(gate)
    layer_options = dict(gate_options)
    if gates.accepts_option(spec.name, "num_ids") and "num_ids" not in layer_options and _vocab_size(model) is not None:
        layer_options["num_ids"] = _vocab_size(model)
    slot = _TokenIds()
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        for index, (_, layer) in enumerate(blocks):
            scores = torch.arange(ffn, 0, -1, dtype=torch.float64) if importance is None else importance[index]
            if scores.numel() != ffn:
                raise ValueError(f"importance[{index}] has {scores.numel()} scores; the FFN has {ffn} neurons")
            neurons = expert_neurons(scores, num_experts, expert_dim, shared)
            bank = _expert_bank(layer, neurons, _activation(model, layer))
            options = dict(layer_options)
            if gates.accepts_option(spec.name, "seed"):  # hash tables, random draws: one per layer
                options.setdefault("seed", seed + index)
            dense_out = layer.output.dense
            moe = MoE(dense_out.out_features, expert_dim, num_experts, gate=spec, k=k, expert=bank, **options)
            moe.to(device=dense_out.weight.device)
            bias = dense_out.bias if dense_out.bias is not None else torch.zeros(dense_out.out_features)
            layer.intermediate = MoEFFN(moe, bias, slot)
            layer.output.dense = nn.Identity()
    finally:
        torch.set_rng_state(generator_state)
    embeddings = _word_embeddings(model)
    if embeddings is None:
        if moe.gate.id_kind() == "token":
            raise TypeError(f"{spec.name} routing needs the model's word embeddings; {type(model).__name__} has none")
    else:
        model.register_forward_pre_hook(slot.clear)
        embeddings.register_forward_pre_hook(slot.capture)
    config = MoefyConfig(num_experts, expert_dim, shared, gate, k, dict(gate_options), seed)
    model.moefy_config = config  # type: ignore[assignment]
    return model
