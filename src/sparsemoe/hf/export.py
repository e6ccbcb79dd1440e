"""Export upcycled models to Hugging Face MoE layouts that plain ``transformers`` loads.

Mixtral (from Llama/Mistral) computes each MLP as ``Σ_{top-k e} softmax(x W_r)_e / Σ_{top-k}
softmax(x W_r) · E_e(x)`` with a bias-free router ``W_r`` and SwiGLU experts stored as
``gate_up_proj [n, 2h, d]`` (gate rows first) and ``down_proj [n, d, h]``: sparsemoe's ``topk``
gate with ``normalize=True`` and no router bias (``upcycle(..., router_bias=False)``) over
``swiglu`` experts, evaluated without noise (Mixtral's ``router_jitter_noise`` is 0). Every MLP
must be converted.

Qwen2-MoE (from Qwen2) has the same experts and router, with ``norm_topk_prob`` for either
``normalize`` setting, dense MLPs where ``mlp_only_layers`` says (so ``layers=`` subsets export),
and a shared expert with a sigmoid gate that sparsemoe's upcycled model does not have: it is
written with width 1 and all-zero weights, so it adds exactly 0.

The exporters check these conditions (``ValueError`` naming the block and the reason), so the
exported model computes the same logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..experts import StackedExperts
from ..gates.topk import TopKGate
from .convert import MoEFFN

#: dense causal LMs whose upcycled form is a Mixtral (same attention, norms, rotary embedding)
_MIXTRAL_SOURCES = ("llama", "mistral")
_QWEN2_MOE_SOURCES = ("qwen2",)
#: config fields copied unchanged from the dense model
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "sliding_window", "attention_dropout", "rope_parameters",
    "use_sliding_window", "max_window_layers", "layer_types",
)  # fmt: skip


def _check_layer(index: int, ffn: MoEFFN, target: str, normalized: bool | None) -> tuple[TopKGate, StackedExperts]:
    """The gate and experts of one converted block, if ``target`` can express them (else ``ValueError``).

    ``normalized``: the ``normalize`` the target needs (``None``: either).
    """
    gate, experts = ffn.moe.gate, ffn.moe.experts
    if not isinstance(gate, TopKGate) or (normalized is not None and gate.normalize != normalized):
        need = "gate='topk'" + ("" if normalized is None else f" with normalize={normalized}")
        raise ValueError(f"block {index}: {target} routes as {need}; got {gate!r}")
    if gate.proj.bias is not None and bool(gate.proj.bias.detach().any()):
        raise ValueError(f"block {index}: {target}'s router has no bias; upcycle with router_bias=False")
    if not isinstance(experts, StackedExperts) or experts.kind != "swiglu" or experts.b1 is not None:
        raise ValueError(f"block {index}: {target} experts are bias-free SwiGLU MLPs; got {experts!r}")
    if ffn.moe.search is not None or ffn.moe.capacity_limit is not None or ffn.bias is not None:
        raise ValueError(f"block {index}: local search, a capacity limit or an MLP bias have no {target} form")
    return gate, experts


def _source(model: nn.Module, sources: tuple[str, ...], exporter: str) -> tuple[Any, list[Any]]:
    """The config and decoder blocks of an upcycled model of one of ``sources`` (else ``ValueError``)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    upcycled = getattr(model, "upcycle_config", None) is not None
    if kind not in sources or not upcycled:
        raise ValueError(
            f"{exporter} takes a model upcycled from {', '.join(sources)}; got "
            f"{type(model).__name__} (model_type={kind!r}, upcycled={upcycled})"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(
            f"{exporter}: the target has no attention or MLP biases; this model sets attention_bias/mlp_bias"
        )
    decoder: Any = model.model  # the *ForCausalLM body
    return config, list(decoder.layers)


def _layout(
    model: nn.Module, layers: list[Any], target: str, normalized: bool | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[int]]:
    """Config fields, state dict (MoE blocks in the HF layout, the rest as they are) and the dense block indices."""
    state: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {}
    dense: list[int] = []
    routing: set[tuple[int, int | None, int, bool]] = set()
    for index, layer in enumerate(layers):
        if not isinstance(layer.mlp, MoEFFN):
            dense.append(index)
            continue
        gate, experts = _check_layer(index, layer.mlp, target, normalized)
        prefix = f"model.layers.{index}.mlp."
        state[prefix + "gate.weight"] = gate.proj.weight.detach().to(experts.w1.dtype)  # [n, d]
        state[prefix + "experts.gate_up_proj"] = experts.w1.detach().transpose(1, 2).contiguous()  # [n, 2h, d]
        assert experts.w2 is not None
        state[prefix + "experts.down_proj"] = experts.w2.detach().transpose(1, 2).contiguous()  # [n, d, h]
        routing.add((experts.num_experts, gate.k, experts.d_hidden, gate.normalize))
        fields.update(num_experts_per_tok=gate.k, _n=experts.num_experts, _h=experts.d_hidden, _norm=gate.normalize)
    if len(routing) > 1:
        raise ValueError(f"{target} has one expert count, k, width and normalisation for all blocks; got {routing}")
    converted = {f"model.layers.{i}.mlp." for i in range(len(layers)) if i not in dense}
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(prefix) for prefix in converted):
            state[name] = tensor
    return fields, state, dense


def mixtral_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The Mixtral config fields and state dict of an upcycled Llama/Mistral model (``ValueError`` if none)."""
    config, layers = _source(model, _MIXTRAL_SOURCES, "export_mixtral")
    found, state, dense = _layout(model, layers, "Mixtral", normalized=True)
    if dense:
        raise ValueError(f"block {dense[0]} is dense: Mixtral needs every MLP converted (upcycle with layers=None)")
    fields: dict[str, Any] = {f: getattr(config, f) for f in _SHARED_FIELDS if hasattr(config, f)}
    fields.update(
        num_local_experts=found["_n"], num_experts_per_tok=found["num_experts_per_tok"], intermediate_size=found["_h"]
    )
    return fields, state


def qwen2_moe_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The Qwen2-MoE config fields and state dict of an upcycled Qwen2 model (``ValueError`` if none)."""
    config, layers = _source(model, _QWEN2_MOE_SOURCES, "export_qwen2_moe")
    found, state, dense = _layout(model, layers, "Qwen2-MoE", normalized=None)
    fields: dict[str, Any] = {f: getattr(config, f) for f in _SHARED_FIELDS if hasattr(config, f)}
    fields.update(
        num_experts=found["_n"], num_experts_per_tok=found["num_experts_per_tok"], moe_intermediate_size=found["_h"],
        norm_topk_prob=found["_norm"], intermediate_size=config.intermediate_size, mlp_only_layers=dense,
        decoder_sparse_step=1, shared_expert_intermediate_size=1, qkv_bias=True,
    )  # fmt: skip
    d, dtype = config.hidden_size, next(iter(state.values())).dtype
    for index in range(len(layers)):
        if index not in dense:  # the shared expert Qwen2-MoE always has: width 1, all zeros, adds exactly 0
            prefix = f"model.layers.{index}.mlp.shared_expert"
            for name, shape in (("gate_proj", (1, d)), ("up_proj", (1, d)), ("down_proj", (d, 1))):
                state[f"{prefix}.{name}.weight"] = torch.zeros(shape, dtype=dtype)
            state[f"{prefix}_gate.weight"] = torch.zeros(1, d, dtype=dtype)
    return fields, state


def _write(
    cls_name: str, fields: dict[str, Any], state: dict[str, torch.Tensor], directory: str | Path, tokenizer: Any
) -> Path:
    import transformers

    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    exported: Any = getattr(transformers, cls_name)(config_cls(**fields))
    exported.to(next(iter(state.values())).dtype)
    exported.load_state_dict(state, strict=True)
    directory = Path(directory)
    exported.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def export_mixtral(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write an upcycled Llama/Mistral model as a ``MixtralForCausalLM`` folder (safetensors).

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` then loads it without sparsemoe.
    Raises ``ValueError`` naming the block and the reason when the model has no Mixtral form.
    """
    return _write("MixtralForCausalLM", *mixtral_state(model), directory, tokenizer)


def export_qwen2_moe(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write an upcycled Qwen2 model as a ``Qwen2MoeForCausalLM`` folder (safetensors); as :func:`export_mixtral`."""
    return _write("Qwen2MoeForCausalLM", *qwen2_moe_state(model), directory, tokenizer)
