"""Sparse upcycling: turn the MLPs of a pretrained Hugging Face causal LM into sparse MoEs.

Each converted block's MLP becomes a :class:`~sparsemoe.hf.MoEFFN` holding a
:class:`~sparsemoe.MoE` whose experts start from the dense MLP (Komatsuzaki et al., 2022), with a
new router. Supported: the Llama family (Llama, Mistral, Qwen2, SmolLM2: gated SwiGLU MLPs, which
become ``swiglu`` experts) and GPT-2 (``Conv1D`` MLPs, which become ``mlp`` experts). The blocks
are found by the same walker as :func:`~sparsemoe.hf.moefy` (:func:`~sparsemoe.hf.convert.find_ffns`).

Initialisations (``init=``):

- ``"copy"``: every expert is the dense MLP. With a gate whose weights over the chosen experts sum
  to 1 (``topk``'s default ``normalize=True``, ``softmax``), every token gets
  ``Σ_i w_i · MLP(x) = MLP(x)``: the upcycled model computes the dense model's logits.
- ``"drop"`` (Drop-Upcycling, Nakamura et al., 2025): as ``copy``, then in each expert a fraction
  ``drop_ratio`` of its intermediate neurons (rows of the gate and up projections, columns of the
  down projection, and their first-layer biases) is drawn afresh from a normal distribution with
  the mean and standard deviation of the dense matrix it came from. Expert ``c`` re-draws the
  neurons ``perm[c·q : (c+1)·q]`` (wrapping around) of one random permutation ``perm`` of its
  neurons, ``q = round(drop_ratio · width)``: different neurons per expert, disjoint while
  ``copies · q ≤ width``.

Fine-grained experts (``granularity=G``, as Megatron-Core's fine-grained upcycling): the dense MLP's
``h`` neurons are split into ``G`` consecutive shards of ``h/G``; ``num_experts`` and ``k`` count
these small experts, so there are ``num_experts / G`` copies of the whole MLP and each token uses
``k / G`` copies' worth (both must be multiples of ``G``). Expert ``c·G + g`` is shard ``g`` of copy
``c``; its down projection is multiplied by ``G``, and a gate with a linear router (``proj``: topk,
softmax, expert_choice...) gets the same router row for all shards of one copy. The ``k`` chosen
experts are then all ``G`` shards of ``k/G`` copies, each shard weighted ``p_c / G`` by a
normalised top-k gate (``Σ_c p_c = 1``), so the layer computes
``Σ_c p_c/G · Σ_g G·shard_g(x) = MLP(x)``: the dense output again. (The scaling goes to the down
projection because it is linear in the output; scaling a gated unit's gate would not be.)
The shard order and the tied router rows are Megatron-Core's (``upcycling_utils``); its weight
scaling, ``scaling="megatron"``, instead multiplies each of a gated unit's three matrices by
``G^(1/3)`` (each of the two layers by ``G^(1/2)`` otherwise), which balances the weights' scale
but equals ``G ·`` the shard only for a positively homogeneous activation, so with SiLU/GELU the
output at initialisation is close to, not equal to, the dense one.
Gates without a linear router (hash, random...) get the shards and scaling but no tied router,
and so no such promise.
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
from .convert import GPT2, LLAMA, DenseFFN, FFNFamily, MoEFFN, _TokenIds, attach_token_ids, expert_bank, find_ffns

#: the architectures :func:`upcycle` converts
UPCYCLE_FAMILIES: tuple[FFNFamily, ...] = (LLAMA, GPT2)
INITS = ("copy", "drop")
SCALINGS = ("down", "megatron")


@dataclass
class UpcycleConfig:
    """The :func:`upcycle` arguments that rebuild a converted model's structure (saved with it)."""

    num_experts: int
    k: int | None
    gate: str
    layers: list[int] | None
    init: str = "copy"
    drop_ratio: float = 0.5
    granularity: int = 1
    gate_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    router_bias: bool = True
    scaling: str = "down"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_args(
    num_experts: int,
    k: int | None,
    init: str,
    drop_ratio: float,
    granularity: int,
    scaling: str,
    blocks: int,
    layers: Any,
) -> list[int]:
    """Validate the arguments; returns the indices of the blocks to convert."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 1:
        raise ValueError(f"granularity must be a positive int, got {granularity!r}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_experts):
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")
    if granularity > 1:
        if num_experts % granularity:
            raise ValueError(
                f"num_experts={num_experts} counts the fine-grained experts: it must be a multiple of "
                f"granularity={granularity} (copies of the MLP times G)"
            )
        if k is None or k % granularity:
            raise ValueError(
                f"with granularity={granularity}, k counts fine-grained experts and must be a multiple of it "
                f"(k = G · copies per token); got k={k!r}"
            )
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(drop_ratio, (int, float)) or not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be a number in [0, 1], got {drop_ratio!r}")
    if layers is None:
        return list(range(blocks))
    chosen = list(layers)
    if not chosen or any(not isinstance(i, int) or isinstance(i, bool) for i in chosen):
        raise ValueError(f"layers must be a non-empty sequence of block indices (ints), got {layers!r}")
    if len(set(chosen)) != len(chosen) or not all(-blocks <= i < blocks for i in chosen):
        raise ValueError(
            f"layers must be distinct indices in [0, {blocks}) (the model has {blocks} MLP blocks), got {chosen}"
        )
    return sorted(i % blocks for i in chosen)


def _drop(bank: StackedExperts, dense: DenseFFN, ratio: float, granularity: int, seed: int) -> None:
    """Re-draw ``round(ratio · width)`` neurons of each expert from the dense matrices' statistics (in place)."""
    width = bank.d_hidden
    q = round(ratio * width)
    if q == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    copies = bank.num_experts // granularity
    gated = dense.gate is not None

    def draw(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        source = like.detach().double()
        mean, std = source.mean().item(), source.std().item() if source.numel() > 1 else 0.0
        return torch.normal(mean, std, shape, generator=generator).to(bank.w1)

    with torch.no_grad():
        for g in range(granularity):
            perm = torch.randperm(width, generator=generator)
            for c in range(copies):
                e = c * granularity + g
                idx = perm[(torch.arange(q) + c * q) % width].to(bank.w1.device)  # [q] local neurons
                assert bank.w2 is not None
                bank.w2[e, idx, :] = draw(dense.down, (q, bank.w2.shape[-1]))
                up_cols = idx + width if gated else idx  # swiglu's w1 holds [gate | up]
                bank.w1[e][:, up_cols] = draw(dense.up, (q, bank.d_in)).T
                if dense.gate is not None:
                    bank.w1[e][:, idx] = draw(dense.gate, (q, bank.d_in)).T
                if bank.b1 is not None:
                    if dense.up_bias is not None:
                        bank.b1[e, up_cols] = draw(dense.up_bias, (q,))
                    if dense.gate_bias is not None:
                        bank.b1[e, idx] = draw(dense.gate_bias, (q,))


def _scale(bank: StackedExperts, granularity: int, scaling: str) -> None:
    """Scale fine-grained experts so that ``G`` shards weighted ``1/G`` each add up to the dense MLP (in place).

    ``"down"``: the down projection times ``G`` (exact: the expert is linear in it). ``"megatron"``:
    Megatron-Core's split of the factor ``G`` over the matrices, ``G^(1/3)`` on gate, up and down of
    a gated unit, ``G^(1/2)`` on the two layers (and first bias) otherwise; exact only for
    positively homogeneous activations (ReLU), not for SiLU/GELU.
    """
    if granularity == 1:
        return
    assert bank.w2 is not None
    with torch.no_grad():
        if scaling == "down":
            bank.w2.mul_(granularity)
            return
        factor = granularity ** (1 / 3 if bank.kind == "swiglu" else 1 / 2)
        for tensor in (bank.w1, bank.b1, bank.w2):
            if tensor is not None:
                tensor.mul_(factor)


def _tie_router(moe: MoE, granularity: int) -> None:
    """Give every shard of one copy the router row of the copy's first shard (linear routers only)."""
    for name in ("proj", "noise_proj"):
        proj = getattr(moe.gate, name, None)
        if isinstance(proj, nn.Linear) and proj.out_features == moe.num_experts:
            with torch.no_grad():
                first = torch.arange(0, moe.num_experts, granularity, device=proj.weight.device)
                rows = first.repeat_interleave(granularity)  # [n]: expert c·G+g reads row c·G
                proj.weight.copy_(proj.weight[rows])
                if proj.bias is not None:
                    proj.bias.copy_(proj.bias[rows])


def _drop_router_bias(moe: MoE, gate_name: str) -> None:
    """Remove the bias of the gate's linear router (``router_bias=False``)."""
    proj = getattr(moe.gate, "proj", None)
    if not isinstance(proj, nn.Linear):
        raise ValueError(
            f"router_bias=False needs a gate with a linear router (topk, softmax...); {gate_name} has none"
        )
    proj.register_parameter("bias", None)


def upcycle(
    model: nn.Module,
    num_experts: int = 8,
    k: int | None = 2,
    gate: str = "topk",
    layers: Sequence[int] | None = None,
    init: str = "copy",
    *,
    drop_ratio: float = 0.5,
    granularity: int = 1,
    scaling: str = "down",
    seed: int = 0,
    router_bias: bool = True,
    **gate_options: Any,
) -> nn.Module:
    """Replace the MLPs of a Hugging Face causal LM by sparse MoEs started from them, in place.

    Args:
        model: a Llama-family (``LlamaForCausalLM``, Mistral, Qwen2, SmolLM2) or GPT-2 model.
            Converted in place and returned (same class: ``generate()`` and its KV cache work);
            ``copy.deepcopy`` it first to keep the dense model. Weights keep their dtype and device.
        num_experts: experts per converted layer (fine-grained ones when ``granularity > 1``).
        k: experts per token (``None``: the gate's default).
        gate: any sparsemoe gate spec (``"topk"``, ``"softmax"``, ``"comet"``, ``"hash"``...).
        layers: indices of the MLP blocks to convert, in model order (``range(0, L, 2)``: every other
            one); default all.
        init: ``"copy"`` or ``"drop"`` (see the module docstring for what each promises).
        drop_ratio: fraction of each expert's neurons re-drawn by ``init="drop"``.
        granularity: ``G`` shards of the MLP per copy (fine-grained experts; see the module docstring).
        scaling: how fine-grained experts are scaled: ``"down"`` (default, the dense output exactly) or
            ``"megatron"`` (Megatron-Core's ``G^(1/3)`` on each matrix of a gated unit; approximate).
        seed: seeds the routers (layer ``i`` with ``seed + i``) and the re-drawn neurons.
        router_bias: ``False`` removes the bias of the gate's linear router (``proj``), as Mixtral's
            router has none: needed by :func:`~sparsemoe.hf.export_mixtral`.
        **gate_options: passed to the gate (``normalize=``, ``balance_weight=``...).

    Returns the model, with ``model.upcycle_config`` (an :class:`UpcycleConfig`) set.
    Raises ``TypeError`` for an unsupported architecture and ``ValueError`` for bad arguments,
    before changing the model.
    """
    if getattr(model, "moefy_config", None) is not None or getattr(model, "upcycle_config", None) is not None:
        raise ValueError("this model is already converted; upcycle the dense model")
    blocks = find_ffns(model, UPCYCLE_FAMILIES, caller="upcycle")
    chosen = _check_args(num_experts, k, init, drop_ratio, granularity, scaling, len(blocks), layers)
    spec = gates.parse(gate)
    options = dict(gate_options)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if gates.accepts_option(spec.name, "num_ids") and "num_ids" not in options and vocab is not None:
        options["num_ids"] = vocab
    slot = _TokenIds()
    built: list[tuple[Any, FFNFamily, MoEFFN]] = []
    generator_state = torch.get_rng_state()
    try:
        for index in chosen:
            _, block, family = blocks[index]
            dense = family.read(model, block)
            if dense.width % granularity:
                raise ValueError(f"granularity={granularity} must divide the MLP width {dense.width} (block {index})")
            width = dense.width // granularity
            shards = torch.arange(dense.width).view(granularity, width)  # [G, h/G]
            neurons = shards.repeat(num_experts // granularity, 1)  # [n, h/G]: expert c·G+g = shard g
            bank = expert_bank(dense, neurons)
            if init == "drop":
                _drop(bank, dense, drop_ratio, granularity, seed + index)
            _scale(bank, granularity, scaling)
            layer_options = dict(options)
            if gates.accepts_option(spec.name, "seed"):
                layer_options.setdefault("seed", seed + index)
            torch.manual_seed(seed + index)
            weight = dense.down
            moe = MoE(
                weight.shape[0], width, num_experts, gate=spec, k=k, expert=bank,
                device=weight.device, dtype=weight.dtype, **layer_options,
            )  # fmt: skip
            if not router_bias:
                _drop_router_bias(moe, spec.name)
            if granularity > 1:
                _tie_router(moe, granularity)
            ffn = MoEFFN(moe, dense.down_bias, slot, dense.dropout)
            built.append((block, family, ffn))
    finally:
        torch.set_rng_state(generator_state)
    attach_token_ids(model, slot, built[0][2].moe, spec.name)
    for block, family, ffn in built:  # every check passed: now change the model
        family.replace(block, ffn)  # in the block's train/eval mode
    layer_list = None if layers is None else chosen
    model.upcycle_config = UpcycleConfig(  # type: ignore[assignment]
        num_experts,
        k,
        gate,
        layer_list,
        init,
        float(drop_ratio),
        granularity,
        dict(gate_options),
        seed,
        router_bias,
        scaling,
    )
    return model
