"""Export an upcycled Llama/Mistral model to the Hugging Face Mixtral layout (plain ``transformers`` loads it).

Mixtral computes each MLP as ``Σ_{top-k e} softmax(x W_r)_e / Σ_{top-k} softmax(x W_r) · E_e(x)``
with a bias-free router ``W_r`` and SwiGLU experts stored as ``gate_up_proj [n, 2h, d]`` (gate
rows first) and ``down_proj [n, d, h]``. That is sparsemoe's ``topk`` gate with ``normalize=True``
and no router bias (``upcycle(..., router_bias=False)``) over ``swiglu`` experts, evaluated without
noise (Mixtral's ``router_jitter_noise`` is 0): :func:`export_mixtral` checks these conditions, so
the exported model computes the same logits.
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
#: config fields copied unchanged from the dense model
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "tie_word_embeddings", "sliding_window", "attention_dropout", "rope_parameters",
)  # fmt: skip


def _check_layer(index: int, ffn: Any) -> tuple[TopKGate, StackedExperts]:
    """The gate and experts of one converted block, if Mixtral can express them (else ``ValueError``)."""
    if not isinstance(ffn, MoEFFN):
        raise ValueError(f"block {index} is dense: Mixtral needs every MLP converted (upcycle with layers=None)")
    gate, experts = ffn.moe.gate, ffn.moe.experts
    if not isinstance(gate, TopKGate) or not gate.normalize:
        raise ValueError(f"block {index}: Mixtral routes as gate='topk' with normalize=True; got {gate!r}")
    if gate.proj.bias is not None and bool(gate.proj.bias.detach().any()):
        raise ValueError(f"block {index}: Mixtral's router has no bias; upcycle with router_bias=False")
    if not isinstance(experts, StackedExperts) or experts.kind != "swiglu" or experts.b1 is not None:
        raise ValueError(f"block {index}: Mixtral experts are bias-free SwiGLU MLPs; got {experts!r}")
    if ffn.moe.search is not None or ffn.moe.capacity_limit is not None or ffn.bias is not None:
        raise ValueError(f"block {index}: local search, a capacity limit or an MLP bias have no Mixtral form")
    return gate, experts


def mixtral_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The Mixtral config fields and state dict of an upcycled Llama/Mistral model (``ValueError`` if none)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    upcycled = getattr(model, "upcycle_config", None) is not None
    if kind not in _MIXTRAL_SOURCES or not upcycled:
        raise ValueError(
            f"export_mixtral takes a model upcycled from {', '.join(_MIXTRAL_SOURCES)}; got "
            f"{type(model).__name__} (model_type={kind!r}, upcycled={upcycled})"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("Mixtral has no attention or MLP biases; this model has attention_bias or mlp_bias set")
    decoder: Any = model.model  # the *ForCausalLM body
    layers = decoder.layers
    state: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {f: getattr(config, f) for f in _SHARED_FIELDS if hasattr(config, f)}
    for index, layer in enumerate(layers):
        gate, experts = _check_layer(index, layer.mlp)
        prefix = f"model.layers.{index}.mlp."
        state[prefix + "gate.weight"] = gate.proj.weight.detach().to(experts.w1.dtype)  # [n, d]
        state[prefix + "experts.gate_up_proj"] = experts.w1.detach().transpose(1, 2).contiguous()  # [n, 2h, d]
        assert experts.w2 is not None
        state[prefix + "experts.down_proj"] = experts.w2.detach().transpose(1, 2).contiguous()  # [n, d, h]
        fields.update(
            num_local_experts=experts.num_experts, num_experts_per_tok=gate.k, intermediate_size=experts.d_hidden
        )
    for name, tensor in model.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    return fields, state


def export_mixtral(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write an upcycled Llama/Mistral model as a ``MixtralForCausalLM`` folder (safetensors).

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` then loads it without sparsemoe.
    Raises ``ValueError`` naming the block and the reason when the model has no Mixtral form.
    """
    import transformers

    fields, state = mixtral_state(model)
    mixtral: Any = transformers.MixtralForCausalLM(transformers.MixtralConfig(**fields))
    mixtral.to(next(iter(state.values())).dtype)
    mixtral.load_state_dict(state, strict=True)
    directory = Path(directory)
    mixtral.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
