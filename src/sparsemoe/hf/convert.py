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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import gates
from ..experts import StackedExperts
from ..layers import MoE

#: Hugging Face activation names (``hidden_act``, GPT-2's ``activation_function``) -> sparsemoe
#: expert activations (the same functions; ``gelu_new`` is the tanh form, equal to rounding)
_ACTIVATIONS = {
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


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
    """``act(x W1 + b1) W2 + b2`` of one layer, as a sparse MoE plus the shared ``b2``.

    Shape: ``[B, L, d] -> [B, L, d]``. In a BERT layer it stands in for ``BertIntermediate`` (the
    layer's ``output.dense`` becomes ``nn.Identity`` so ``BertOutput`` keeps only dropout + residual
    + LN); in a decoder block it is the block's ``mlp``.
    """

    def __init__(self, moe: MoE, bias: torch.Tensor | None, slot: _TokenIds, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = moe
        # b2 [d], added once per token (None: the dense FFN had none)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.dropout = dropout if dropout is not None else nn.Identity()  # the dense FFN's own (GPT-2)
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
        y = self.moe(hidden, ids=ids)
        return self.dropout(y if self.bias is None else y + self.bias)


@dataclass(frozen=True)
class DenseFFN:
    """One dense FFN's weights in ``nn.Linear`` layout (``[out, in]``), whatever the architecture stores.

    ``act(x up^T + up_bias) down^T + down_bias``, or with a ``gate`` the gated unit
    ``(silu(x gate^T + gate_bias) * (x up^T + up_bias)) down^T + down_bias`` (SwiGLU).

    Shapes: ``up``, ``gate [h, d]``; ``up_bias``, ``gate_bias [h]``; ``down [d, h]``; ``down_bias [d]``.
    """

    up: torch.Tensor
    up_bias: torch.Tensor | None
    gate: torch.Tensor | None
    gate_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    activation: str
    dropout: nn.Module | None = None  # applied after the FFN inside it (GPT-2), kept after the MoE

    @property
    def width(self) -> int:
        """``h``: the FFN's intermediate width."""
        return self.up.shape[0]


@dataclass(frozen=True)
class FFNFamily:
    """How to find, read and replace the FFN of one family of Hugging Face blocks.

    ``matches(block)`` says whether a module is such a block; ``read(model, block)`` returns its
    :class:`DenseFFN`; ``install(block, ffn)`` puts the sparse replacement in place of the dense FFN
    (converters call :meth:`replace`, which also sets the mode).
    """

    name: str
    examples: str
    matches: Callable[[nn.Module], bool]
    read: Callable[[nn.Module, Any], DenseFFN]
    install: Callable[[Any, nn.Module], None]

    def replace(self, block: nn.Module, ffn: nn.Module) -> None:
        """``install(block, ffn)``, then every module it added takes ``block``'s train/eval mode.

        A new module starts in training mode, so without this converting a model in eval mode
        would switch its new layers' dropout (and train-only routing) on.
        """
        before = set(block.modules())  # held (not their ids), so a module made by install cannot reuse a freed id
        self.install(block, ffn)
        for module in block.modules():
            if module not in before:
                module.training = block.training


def _is_linear(module: Any) -> bool:
    return isinstance(module, nn.Linear)


def _is_conv1d(module: Any) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``x @ weight + bias`` with ``weight [in, out]``."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)


def _activation(model: nn.Module, fn: nn.Module, key: str = "hidden_act") -> str:
    """The sparsemoe activation of a block: from ``config.<key>``, else from the module ``fn`` itself."""
    act = getattr(getattr(model, "config", None), key, None)
    if act is None:  # no config: recognise the module itself
        act = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu"}.get(type(fn), type(fn).__name__)
        act = {"GELUActivation": "gelu", "SiLUActivation": "silu", "NewGELUActivation": "gelu_new"}.get(act, act)
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"sparsemoe converts FFNs with the activations {sorted(_ACTIVATIONS)}; the model uses {act!r}")
    return _ACTIVATIONS[act]


def _bert_matches(module: nn.Module) -> bool:
    intermediate = getattr(module, "intermediate", None)
    output = getattr(module, "output", None)
    return (
        _is_linear(getattr(intermediate, "dense", None))
        and hasattr(intermediate, "intermediate_act_fn")
        and _is_linear(getattr(output, "dense", None))
        and hasattr(output, "LayerNorm")
    )


def _bert_read(model: nn.Module, layer: Any) -> DenseFFN:
    w1, w2 = layer.intermediate.dense, layer.output.dense
    act = _activation(model, layer.intermediate.intermediate_act_fn)
    return DenseFFN(w1.weight, w1.bias, None, None, w2.weight, w2.bias, act)


def _bert_install(layer: Any, ffn: nn.Module) -> None:
    # BertOutput keeps dropout + residual + LayerNorm; its dense layer is now inside ffn
    layer.intermediate = ffn
    layer.output.dense = nn.Identity()


def _llama_matches(module: nn.Module) -> bool:
    mlp = getattr(module, "mlp", None)
    return all(_is_linear(getattr(mlp, name, None)) for name in ("gate_proj", "up_proj", "down_proj"))


def _llama_read(model: nn.Module, block: Any) -> DenseFFN:
    mlp = block.mlp
    act = _activation(model, mlp.act_fn)
    if act != "silu":
        raise ValueError(f"gated MLPs are converted to SwiGLU experts, which need hidden_act='silu'; got {act!r}")
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    return DenseFFN(u.weight, u.bias, g.weight, g.bias, d.weight, d.bias, act)


def _gpt2_matches(module: nn.Module) -> bool:
    mlp = getattr(module, "mlp", None)
    return _is_conv1d(getattr(mlp, "c_fc", None)) and _is_conv1d(getattr(mlp, "c_proj", None))


def _gpt2_read(model: nn.Module, block: Any) -> DenseFFN:
    mlp = block.mlp
    act = _activation(model, mlp.act, key="activation_function")
    w1, w2 = mlp.c_fc, mlp.c_proj  # Conv1D: weight [in, out]
    return DenseFFN(w1.weight.t(), w1.bias, None, None, w2.weight.t(), w2.bias, act, getattr(mlp, "dropout", None))


def _mlp_install(block: Any, ffn: nn.Module) -> None:
    block.mlp = ffn


#: BERT-family encoder layers (``.intermediate.dense`` + ``.output.dense``): :func:`moefy`
BERT = FFNFamily("bert", "BertLayer, RobertaLayer, ElectraLayer", _bert_matches, _bert_read, _bert_install)
#: decoder blocks with a gated SwiGLU ``.mlp`` (``gate_proj``/``up_proj``/``down_proj``)
LLAMA = FFNFamily("llama", "Llama, Mistral, Qwen2, SmolLM2", _llama_matches, _llama_read, _mlp_install)
#: GPT-2 blocks (``.mlp.c_fc`` + ``.mlp.c_proj`` as ``Conv1D``)
GPT2 = FFNFamily("gpt2", "GPT-2", _gpt2_matches, _gpt2_read, _mlp_install)


def find_ffns(
    model: nn.Module, families: Sequence[FFNFamily], caller: str = "moefy"
) -> list[tuple[str, Any, FFNFamily]]:
    """``(name, block, family)`` of every block of ``model`` with an FFN of one of ``families``, in model order.

    The one model walker of :func:`moefy` and :func:`~sparsemoe.hf.upcycle`. Raises ``TypeError``
    naming the supported architectures when there is none.
    """
    found: list[tuple[str, Any, FFNFamily]] = []
    for name, module in model.named_modules():
        family = next((f for f in families if f.matches(module)), None)
        if family is not None:
            found.append((name, module, family))
    if not found:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        supported = "; ".join(f"{f.name} ({f.examples})" for f in families)
        raise TypeError(
            f"{caller} supports {supported}; {type(model).__name__}"
            f"{f' (model_type={kind!r})' if kind else ''} has no such FFN block"
        )
    return found


def ffn_blocks(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, layer)`` of every BERT-family layer (``.intermediate.dense`` + ``.output.dense``).

    Raises ``TypeError`` naming the architecture when there is none.
    """
    return [(name, block) for name, block, _ in find_ffns(model, (BERT,))]


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


def expert_bank(ffn: DenseFFN, neurons: torch.Tensor) -> StackedExperts:
    """Stacked experts, expert ``e`` holding the dense FFN's neurons ``neurons[e]``.

    Gated FFNs give ``swiglu`` experts (gate and up side by side in ``w1``), the others ``mlp``
    experts; biases of the first layer go with their neurons. The second layer's bias is not in the
    bank (``b2 is None``): :class:`MoEFFN` adds it once per token.

    Shape: ``neurons LongTensor[n, m]`` -> ``n`` experts of hidden width ``m``.
    """
    n, width = neurons.shape
    d_in, d_out = ffn.up.shape[1], ffn.down.shape[0]
    gated = ffn.gate is not None
    first_bias = ffn.up_bias is not None or ffn.gate_bias is not None
    kind = "swiglu" if gated else "mlp"
    bank = StackedExperts(n, d_in, width, d_out, kind=kind, activation=ffn.activation, bias=first_bias)
    bank.b2 = None  # the second bias is added once, by MoEFFN
    up = ffn.up.detach()
    with torch.no_grad():
        first = up[neurons]  # [n, m, d]
        if ffn.gate is not None:
            first = torch.cat([ffn.gate.detach()[neurons], first], dim=1)  # [n, 2m, d]: gate, then up
        bank.w1.copy_(first.transpose(1, 2))  # [n, d, m or 2m]
        assert bank.w2 is not None
        bank.w2.copy_(ffn.down.detach()[:, neurons].permute(1, 2, 0))  # [n, m, d]
        if bank.b1 is not None:
            zeros = torch.zeros(ffn.width, dtype=up.dtype, device=up.device)
            b_up = (ffn.up_bias if ffn.up_bias is not None else zeros).detach()[neurons]  # [n, m]
            if gated:
                b_gate = (ffn.gate_bias if ffn.gate_bias is not None else zeros).detach()[neurons]
                b_up = torch.cat([b_gate, b_up], dim=1)
            bank.b1.copy_(b_up)
    return bank.to(device=up.device, dtype=up.dtype)


def _vocab_size(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _word_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


def attach_token_ids(model: nn.Module, slot: _TokenIds, moe: MoE, gate_name: str) -> None:
    """Hook ``model`` so that ``slot`` holds the ``input_ids`` of each forward (for gates routing by token id)."""
    embeddings = _word_embeddings(model)
    if embeddings is None:
        if moe.gate.id_kind() == "token":
            raise TypeError(f"{gate_name} routing needs the model's word embeddings; {type(model).__name__} has none")
    else:
        model.register_forward_pre_hook(slot.clear)
        embeddings.register_forward_pre_hook(slot.capture)


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
    blocks = find_ffns(model, (BERT,))
    ffn = BERT.read(model, blocks[0][1]).width
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
        for index, (_, layer, family) in enumerate(blocks):
            scores = torch.arange(ffn, 0, -1, dtype=torch.float64) if importance is None else importance[index]
            if scores.numel() != ffn:
                raise ValueError(f"importance[{index}] has {scores.numel()} scores; the FFN has {ffn} neurons")
            dense = family.read(model, layer)
            bank = expert_bank(dense, expert_neurons(scores, num_experts, expert_dim, shared))
            options = dict(layer_options)
            if gates.accepts_option(spec.name, "seed"):  # hash tables, random draws: one per layer
                options.setdefault("seed", seed + index)
            d_model = dense.down.shape[0]
            moe = MoE(d_model, expert_dim, num_experts, gate=spec, k=k, expert=bank, **options)
            moe.to(device=dense.down.device)
            bias = dense.down_bias if dense.down_bias is not None else torch.zeros(d_model)
            family.replace(layer, MoEFFN(moe, bias, slot))
    finally:
        torch.set_rng_state(generator_state)
    attach_token_ids(model, slot, moe, spec.name)
    config = MoefyConfig(num_experts, expert_dim, shared, gate, k, dict(gate_options), seed)
    model.moefy_config = config  # type: ignore[assignment]
    return model
