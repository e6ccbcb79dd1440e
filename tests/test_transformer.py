"""The seq2seq Transformer: shapes, causality, incremental decoding, beam search, MoE FFNs, overfitting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sparsemoe import MoE
from sparsemoe.gates import HashGate, RandomGate, SwitchGate
from sparsemoe.models.decoding import beam_search, greedy_decode
from sparsemoe.models.transformer import (
    FeedForward,
    Seq2SeqTransformer,
    TransformerConfig,
    TransformerDecoderBlock,
    TransformerEncoderBlock,
)
from sparsemoe.thor import thor_inference

PAD, BOS, EOS = 0, 1, 2


def _model(ffn: str = "dense", **kw: Any) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=20,
        pad_id=PAD,
        d_model=16,
        num_heads=2,
        encoder_layers=2,
        decoder_layers=2,
        d_hidden=32,
        dropout=0.0,
        ffn=ffn,
        **kw,
    )
    return Seq2SeqTransformer(cfg)


def _src() -> torch.Tensor:
    return torch.tensor([[5, 6, 7, 8, EOS], [9, 10, EOS, PAD, PAD], [11, 12, 13, EOS, PAD]])


@pytest.mark.parametrize("ffn", ["dense", "switch", "thor"])
def test_shapes_and_equal_active_parameters(ffn: str) -> None:
    model = _model(ffn)
    tgt = torch.tensor([[BOS, 3, 4], [BOS, 5, PAD], [BOS, 6, 7]])
    assert model(_src(), tgt).shape == (3, 3, 20)
    counts, dense = model.parameter_counts(), _model("dense").parameter_counts()
    router = 0 if ffn != "switch" else 2 * 16 * 2  # two Switch routers (one MoE layer per stack), 16 x 2
    assert counts["active_per_token"] == dense["active_per_token"] + router
    if ffn != "dense":
        assert counts["total"] > counts["active_per_token"]


def test_decoder_is_causal() -> None:
    model = _model().eval()
    tgt = torch.tensor([[BOS, 3, 4, 5, 6]])
    changed = tgt.clone()
    changed[0, 3] = 9
    a, b = model(_src()[:1], tgt), model(_src()[:1], changed)
    assert torch.allclose(a[0, :3], b[0, :3], atol=1e-6)
    assert not torch.allclose(a[0, 3:], b[0, 3:], atol=1e-4)


def test_source_padding_does_not_change_the_output() -> None:
    model = _model().eval()
    tgt = torch.tensor([[BOS, 3, 4]])
    short = torch.tensor([[9, 10, EOS]])
    padded = torch.tensor([[9, 10, EOS, PAD, PAD, PAD]])
    assert torch.allclose(model(short, tgt), model(padded, tgt), atol=1e-5)


def test_incremental_decoding_matches_full_forward() -> None:
    model = _model("switch").eval()
    src, tgt = _src(), torch.tensor([[BOS, 3, 4, 5], [BOS, 6, 7, 8], [BOS, 9, 3, 4]])
    full = model(src, tgt)
    memory, pad = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, pad, cache=cache, start=t) for t in range(4)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("ffn", ["dense", "thor"])
def test_beam_one_equals_greedy(ffn: str) -> None:
    model = _model(ffn).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # make the untrained model prefer varied, EOS-containing outputs
        model.embed.weight.mul_(4.0)
    ctx = thor_inference(model, "fixed", expert=1) if ffn == "thor" else torch.no_grad()
    with ctx:
        greedy = greedy_decode(model, _src(), bos_id=BOS, eos_id=EOS)
        beam1 = beam_search(model, _src(), bos_id=BOS, eos_id=EOS, beam=1)
        beam5 = beam_search(model, _src(), bos_id=BOS, eos_id=EOS, beam=5)
    assert greedy == beam1
    assert len(beam5) == 3 and all(EOS not in h for h in beam5)


def test_encoder_block_with_moe_ffns_runs_forward_and_backward() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True], [False] * 4 + [True]])
    token_ids = torch.randint(0, 50, (3, 5))
    ffns = {
        "switch": MoE(16, 32, 4, gate=SwitchGate(16, 4), capacity_limit=1.25),
        "hash": MoE(16, 32, 4, gate=HashGate(16, 4)),
        "random": MoE(16, 32, 4, gate=RandomGate(16, 4, granularity="sequence")),
        "dense": FeedForward(16, 32),
    }
    for name, ffn in ffns.items():
        block = TransformerEncoderBlock(16, 2, ffn, dropout=0.1).train()
        y = block(x, pad, token_ids=token_ids, sentence_ids=torch.tensor([7, 8, 9]))
        assert y.shape == x.shape, name
        y.sum().backward()
        assert all(p.grad is not None for p in block.parameters() if p.requires_grad), name
        if isinstance(ffn, MoE):
            routing = ffn.last_routing
            assert routing is not None and routing.num_inputs == int((~pad).sum()), name  # padding never routed
    decoder = TransformerDecoderBlock(16, 2, MoE(16, 32, 2, gate="hash"))
    assert decoder(x, torch.randn(3, 4, 16), token_ids=token_ids).shape == x.shape


def test_hash_ids_are_the_token_ids() -> None:
    torch.manual_seed(0)
    gate = HashGate(16, 4)
    block = TransformerEncoderBlock(16, 2, MoE(16, 32, 4, gate=gate), dropout=0.0)
    token_ids = torch.tensor([[3, 3, 5, 5]])
    block(torch.randn(1, 4, 16), token_ids=token_ids)
    moe = block.ffn
    assert isinstance(moe, MoE)
    routing = moe.last_routing
    assert routing is not None
    experts = routing.expert.tolist()
    assert experts[0] == experts[1] and experts[2] == experts[3]


@pytest.mark.parametrize("ffn", ["dense", "thor"])
def test_tiny_model_overfits_a_few_pairs(ffn: str) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 20, (n,), generator=g).tolist()) for n in (4, 5, 6, 3)]
    src = [[*p, EOS] for p in pairs]
    tgt = [[BOS, *reversed(p), EOS] for p in pairs]  # translate = reverse the sentence

    def pad(rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(map(len, rows))), PAD)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
        return out

    s, t = pad(src), pad(tgt)
    model = Seq2SeqTransformer(
        TransformerConfig(
            vocab_size=20,
            pad_id=PAD,
            d_model=32,
            num_heads=2,
            encoder_layers=2,
            decoder_layers=2,
            d_hidden=64,
            dropout=0.0,
            ffn=ffn,
        )
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(250):
        logits = model(s, t[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 20), t[:, 1:].reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ctx = thor_inference(model, "mean") if ffn == "thor" else torch.no_grad()
    with ctx:
        out = greedy_decode(model, s, bos_id=BOS, eos_id=EOS)
    assert out == [list(reversed(p)) for p in pairs]


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="ffn"):
        TransformerConfig(vocab_size=10, ffn="moe")
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=10, d_model=30, num_heads=4)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is fastest, and keeps a shared machine usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
