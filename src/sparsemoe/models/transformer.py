"""A compact pre-norm encoder-decoder Transformer whose FFNs can be any module, MoE included.

``torch.nn.TransformerEncoderLayer`` hard-wires its FFN, so an MoE Transformer is usually written
by hand. :class:`TransformerEncoderBlock` and :class:`TransformerDecoderBlock` take the FFN as an
argument instead: a dense :class:`FeedForward`, or a :class:`sparsemoe.MoE` with any gate. The
blocks pass the ids a gate reads (token ids for the ``hash`` gate, the sentence index for the
``random`` gate's ``"sequence"`` granularity) and run the FFN on non-pad positions only, so
padding takes no expert capacity and no compute.

:class:`Seq2SeqTransformer` stacks them with tied source/target/output embeddings over a joint
vocabulary (Press & Wolf, 2017), sinusoidal positions and ``scaled_dot_product_attention``; the
FFN of every ``moe_every``-th layer (0, 2, 4, ... as in THOR's code) of both stacks is dense or an
MoE with any gate (a spec such as ``"switch"`` or ``"random"``, a parsed spec, or a factory): with
a top-1 gate (Switch, THOR's random experts) every model has the same active FFN compute per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_float, check_int
from ..gates import Gate, GateSpec, accepts_option
from ..layers import MoE

#: the MoE FFNs' gate as :class:`Seq2SeqTransformer` takes it: a spec (``"switch"``, ``"comet+"``), a
#: parsed :class:`~sparsemoe.gates.GateSpec`, or a factory ``(layer index) -> Gate``
GateChoice = str | GateSpec | Callable[[int], Gate]

#: a decoder layer's incremental-decoding state: self-attention keys/values so far, cross K/V
LayerCache = dict[str, torch.Tensor]


class FeedForward(nn.Module):
    """Dense FFN ``W2 relu(W1 x + b1) + b2``; ``ids`` is accepted and ignored. Shape: ``[..., d]``."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MultiHeadAttention(nn.Module):
    """Multi-head attention on ``F.scaled_dot_product_attention``.

    Shape: ``query [B, Tq, d]``, ``source [B, Tk, d]`` -> ``[B, Tq, d]``; ``mask`` is a bool
    ``[B, 1, Tq|1, Tk]`` (True = may attend) or None.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # [B, h, T, d/h]

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, h, Tk, d/h]`` keys and values of ``source`` (cached for cross-attention)."""
        k, v = self.kv_proj(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(
        self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        q = self._heads(self.q_proj(query))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        b, h, t, dh = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * dh))


def apply_ffn(
    ffn: nn.Module,
    h: torch.Tensor,
    keep: torch.Tensor | None,
    token_ids: torch.Tensor | None,
    sentence_ids: torch.Tensor | None,
) -> torch.Tensor:
    """``ffn`` on the positions where ``keep`` is True (all if None); zeros elsewhere.

    The FFN gets the ids its gate reads: ``sentence_ids`` (``[B]``) broadcast over positions for
    the random gate and THOR's sentence draw (default: the row index), ``token_ids`` (``[B, T]``)
    otherwise (hash gate).
    Shape: ``h [B, T, d]``, ``keep [B, T]`` -> ``[B, T, d]``.
    """
    b, t, d = h.shape
    ids: torch.Tensor | None = None
    gate = getattr(ffn, "gate", None)
    kind = gate.id_kind() if isinstance(gate, Gate) else None
    if kind == "sequence":
        if sentence_ids is None:
            sentence_ids = torch.arange(b, device=h.device)
        ids = sentence_ids.view(b, 1).expand(b, t)
    elif kind == "token":
        ids = token_ids
    if keep is None:
        flat_ids = None if ids is None else ids.reshape(-1)
        return ffn(h.reshape(b * t, d), flat_ids).view(b, t, d) if flat_ids is not None else ffn(h)
    out = h.new_zeros(b, t, d)
    rows = h[keep]  # [N, d]
    out[keep] = ffn(rows, ids[keep]) if ids is not None else ffn(rows)
    return out


class TransformerEncoderBlock(nn.Module):
    """Pre-norm encoder block: ``x + drop(attn(LN x))``, then ``x + drop(ffn(LN x))``.

    With ``causal=True`` position ``t`` attends to positions ``<= t`` only: the block of a
    decoder-only language model (:class:`DecoderOnlyLM`).

    Args:
        ffn: any module mapping ``[N, d]`` (with optional ``ids [N]``) to ``[N, d]``: a
            :class:`FeedForward` or a :class:`sparsemoe.MoE` with any gate.
    Shape: ``x [B, T, d]``, ``pad_mask [B, T]`` (True at padding) -> ``[B, T, d]``.
    """

    def __init__(
        self, d_model: int, num_heads: int, ffn: nn.Module, dropout: float = 0.1, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        pad_mask: torch.Tensor | None = None,
        *,
        token_ids: torch.Tensor | None = None,
        sentence_ids: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        k, v = self.attn.keys_values(h)
        mask = None if pad_mask is None else ~pad_mask[:, None, None, :]  # [B, 1, 1, T]
        if causal and mask is not None:  # SDPA takes a mask or is_causal, not both: fold them
            t = x.shape[1]
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # [B, 1, T, T]
            causal = False
        x = x + self.drop(self.attn.attend(h, k, v, mask, causal=causal))
        keep = None if pad_mask is None else ~pad_mask
        return x + self.drop(apply_ffn(self.ffn, self.ffn_norm(x), keep, token_ids, sentence_ids))


class TransformerDecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention, FFN (any module).

    With ``cache`` (a dict, filled on the first call), ``x`` holds only the new positions and the
    keys/values of earlier ones are reused: incremental decoding.
    Shape: ``x [B, T, d]``, ``memory [B, S, d]``, ``memory_pad_mask [B, S]`` -> ``[B, T, d]``.
    """

    def __init__(
        self, d_model: int, num_heads: int, ffn: nn.Module, dropout: float = 0.1, attention_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, attention_dropout)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_pad_mask: torch.Tensor | None = None,
        *,
        pad_mask: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        sentence_ids: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h)
        if cache is not None and "self_k" in cache:
            k, v = torch.cat([cache["self_k"], k], 2), torch.cat([cache["self_v"], v], 2)
        # Padding sits after the real tokens, so the causal mask alone keeps real queries off it.
        causal = x.shape[1] > 1
        if cache is not None:
            cache["self_k"], cache["self_v"] = k, v
            if causal and k.shape[2] != x.shape[1]:
                raise ValueError("with a cache, feed the whole prefix on the first call, then one position at a time")
        x = x + self.drop(self.self_attn.attend(h, k, v, None, causal=causal))
        if cache is not None and "cross_k" in cache:
            ck, cv = cache["cross_k"], cache["cross_v"]
        else:
            ck, cv = self.cross_attn.keys_values(memory)
            if cache is not None:
                cache["cross_k"], cache["cross_v"] = ck, cv
        mask = None if memory_pad_mask is None else ~memory_pad_mask[:, None, None, :]
        x = x + self.drop(self.cross_attn.attend(self.cross_norm(x), ck, cv, mask, causal=False))
        keep = None if pad_mask is None else ~pad_mask
        return x + self.drop(apply_ffn(self.ffn, self.ffn_norm(x), keep, token_ids, sentence_ids))


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """``[length, d_model]`` sine/cosine position encodings (Vaswani et al., 2017)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div[: d_model // 2])
    return table


@dataclass
class TransformerConfig:
    """Size and FFNs of a :class:`Seq2SeqTransformer` (JSON-serialisable).

    ``gate`` is the gate spec of the MoE FFNs (``None``: dense FFNs everywhere), ``gate_options``
    its options (e.g. Switch's ``balance_weight``). Gates with a ``seed`` option (``random``,
    ``hash``) get ``gate_seed * 1000 + i`` in layer ``i`` (counting encoder then decoder layers)
    unless ``gate_options`` sets one. ``capacity_limit`` is the MoE layers' capacity
    (:class:`~sparsemoe.MoE`'s ``capacity_limit``, ``None``: dropless) in training mode and
    ``eval_capacity_limit`` the one in evaluation mode (``None``: the same).
    """

    vocab_size: int
    pad_id: int = 0
    d_model: int = 256
    num_heads: int = 4
    encoder_layers: int = 3
    decoder_layers: int = 3
    d_hidden: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    gate: str | None = None  # gate spec of the MoE FFNs ("switch", "random", "topk", ...); None: dense
    gate_options: dict[str, Any] = field(default_factory=dict)
    num_experts: int = 2
    moe_every: int = 2  # MoE FFN in layers 0, moe_every, 2*moe_every, ...
    capacity_limit: float | None = None  # MoE layers, training mode (None: dropless)
    eval_capacity_limit: float | None = None  # MoE layers, evaluation mode (None: capacity_limit)
    gate_seed: int = 0  # gates with a seed option: layer i is seeded gate_seed * 1000 + i
    max_positions: int = 256
    expert_hidden: int | None = None  # hidden width of each routed expert (None: d_hidden)
    shared_experts: int = 0  # MoE layers: experts every token uses (MoE's shared_experts=)
    shared_hidden: int | None = None  # their width (None: the routed experts' width)

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, low=2)
        check_int("d_model", self.d_model, low=2)
        check_int("num_heads", self.num_heads, low=1)
        check_int("num_experts", self.num_experts, low=1)
        check_int("moe_every", self.moe_every, low=1)
        check_int("shared_experts", self.shared_experts, low=0)
        for name in ("expert_hidden", "shared_hidden"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)
        if self.gate is not None:
            GateSpec.parse(self.gate)  # unknown names fail here, listing the available gates
        for name in ("capacity_limit", "eval_capacity_limit"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), low=0.0, strict=True)
        check_float("dropout", self.dropout, low=0.0)
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even and divisible by num_heads={self.num_heads}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _check_gate_choice(gate: object) -> None:
    if isinstance(gate, Gate):
        raise TypeError(
            "gate= takes a spec or a factory (layer index -> Gate), not a built gate: one gate "
            "instance cannot serve several layers; pass e.g. gate=lambda i: SwitchGate(d_model, num_experts)"
        )


_Model = TypeVar("_Model", bound="_PluggableFFNModel")


class _PluggableFFNModel(nn.Module):
    """What the Transformers here share: tied token embedding + sinusoidal positions, FFN choice
    (dense or MoE per layer), the MoE layers' train/eval capacity, auxiliary losses, parameter counts."""

    config: TransformerConfig

    def _init_embedding(self, c: TransformerConfig) -> None:
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=c.pad_id)
        nn.init.normal_(self.embed.weight, std=c.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[c.pad_id].zero_()
        self.register_buffer("positions", sinusoidal_positions(c.max_positions, c.d_model), persistent=False)
        self.drop = nn.Dropout(c.dropout)

    def _ffn(self, depth: int, index: int, gate: GateChoice | None) -> nn.Module:
        c = self.config
        if gate is None or depth % c.moe_every:
            return FeedForward(c.d_model, c.d_hidden)
        options: dict[str, Any] = {}
        if isinstance(gate, (str, GateSpec)):
            spec = GateSpec.parse(gate, **c.gate_options)
            if accepts_option(spec.name, "seed") and "seed" not in spec.options:
                options["seed"] = c.gate_seed * 1000 + index
            built: str | GateSpec | Gate = spec
        else:
            built = gate(index)
            if not isinstance(built, Gate):
                raise TypeError(f"the gate factory must return a sparsemoe.gates.Gate, got {type(built).__name__}")
        return MoE(
            c.d_model,
            c.d_hidden if c.expert_hidden is None else c.expert_hidden,
            c.num_experts,
            gate=built,
            activation="relu",
            bias=True,
            capacity_limit=c.capacity_limit,
            shared_experts=c.shared_experts,
            shared_hidden=c.shared_hidden,
            **options,
        )

    def train(self: _Model, mode: bool = True) -> _Model:
        """Also set the MoE layers' ``capacity_limit`` to the config's training or evaluation value."""
        super().train(mode)
        c = self.config
        limit = c.capacity_limit if mode or c.eval_capacity_limit is None else c.eval_capacity_limit
        for module in self.modules():
            if isinstance(module, MoE):
                module.capacity_limit = limit
        return self

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        t = ids.shape[1]
        if start + t > self.config.max_positions:
            raise ValueError(f"sequence of {start + t} tokens exceeds max_positions={self.config.max_positions}")
        positions: torch.Tensor = self.positions  # type: ignore[assignment]
        x = self.embed(ids) * math.sqrt(self.config.d_model) + positions[start : start + t]
        return self.drop(x)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' auxiliary losses from the last forward (Switch load balancing)."""
        losses = [m.aux_loss() for m in self.modules() if isinstance(m, MoE)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def parameter_counts(self) -> dict[str, int]:
        """``total`` parameters and ``active_per_token``: those one token uses (``k`` experts per MoE)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for m in self.modules():
            if isinstance(m, MoE):
                expert_params = sum(p.numel() for p in m.experts.parameters())
                inactive += expert_params - expert_params * m.gate.k // m.num_experts
        return {"total": total, "active_per_token": total - inactive}


class Seq2SeqTransformer(_PluggableFFNModel):
    """Encoder-decoder Transformer with tied embeddings and pluggable FFNs.

    Args:
        config: sizes, and the MoE FFNs' gate spec and options.
        gate: the MoE FFNs' gate instead of ``config.gate``: a spec, a parsed
            :class:`~sparsemoe.gates.GateSpec`, or a factory called with the layer index (encoder
            layers first) that returns a built :class:`~sparsemoe.gates.Gate`.

    Shape: ``src [B, S]``, ``tgt_in [B, T]`` (token ids; ``pad_id`` pads) -> logits ``[B, T, V]``.
    ``sentence_ids [B]`` (optional) name each sentence for per-sentence expert draws.
    """

    def __init__(self, config: TransformerConfig, gate: GateChoice | None = None) -> None:
        super().__init__()
        _check_gate_choice(gate)
        self._init_embedding(config)
        c = config
        choice = gate if gate is not None else c.gate
        layer_index = iter(range(1_000_000))
        self.encoder = nn.ModuleList(
            TransformerEncoderBlock(
                c.d_model, c.num_heads, self._ffn(i, next(layer_index), choice), c.dropout, c.attention_dropout
            )
            for i in range(c.encoder_layers)
        )
        self.decoder = nn.ModuleList(
            TransformerDecoderBlock(
                c.d_model, c.num_heads, self._ffn(i, next(layer_index), choice), c.dropout, c.attention_dropout
            )
            for i in range(c.decoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(c.d_model)
        self.decoder_norm = nn.LayerNorm(c.d_model)

    def encode(self, src: torch.Tensor, sentence_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(memory [B, S, d], src_pad_mask [B, S])``."""
        pad = src == self.config.pad_id
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, pad, token_ids=src, sentence_ids=sentence_ids)
        return self.encoder_norm(x), pad

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        memory_pad_mask: torch.Tensor,
        sentence_ids: torch.Tensor | None = None,
        cache: list[LayerCache] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` for ``tgt_in [B, T]`` at positions ``start..start+T-1``."""
        pad = tgt_in == self.config.pad_id if cache is None else None
        x = self._embed(tgt_in, start)
        for i, block in enumerate(self.decoder):
            x = block(
                x,
                memory,
                memory_pad_mask,
                pad_mask=pad,
                token_ids=tgt_in,
                sentence_ids=sentence_ids,
                cache=None if cache is None else cache[i],
            )
        return self.decoder_norm(x) @ self.embed.weight.t()

    def forward(
        self, src: torch.Tensor, tgt_in: torch.Tensor, sentence_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        memory, pad = self.encode(src, sentence_ids)
        return self.decode(tgt_in, memory, pad, sentence_ids)

    def new_cache(self) -> list[LayerCache]:
        """An empty incremental-decoding cache, one dict per decoder layer."""
        return [{} for _ in self.decoder]


class DecoderOnlyLM(_PluggableFFNModel):
    """Decoder-only (GPT-style) language model: causal :class:`TransformerEncoderBlock` layers.

    ``config.decoder_layers`` blocks (``encoder_layers`` is not used) with tied input/output
    embeddings; the FFN of every ``moe_every``-th layer (0, 2, ...) is an MoE with the config's gate
    (or ``gate``: a spec or a factory ``layer index -> Gate``), the others dense. The hash gate
    reads the token ids. Sequences are packed text without padding (``pad_id`` is still never
    predicted, its embedding is zero).

    Shape: ``ids [B, T]`` -> next-token logits ``[B, T, V]``.
    """

    def __init__(self, config: TransformerConfig, gate: GateChoice | None = None) -> None:
        super().__init__()
        _check_gate_choice(gate)
        self._init_embedding(config)
        c = config
        choice = gate if gate is not None else c.gate
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(c.d_model, c.num_heads, self._ffn(i, i, choice), c.dropout, c.attention_dropout)
            for i in range(c.decoder_layers)
        )
        self.norm = nn.LayerNorm(c.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self._embed(ids)
        for block in self.blocks:
            x = block(x, token_ids=ids, causal=True)
        return self.norm(x) @ self.embed.weight.t()
