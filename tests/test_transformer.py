"""The seq2seq Transformer: shapes, causality, incremental decoding, beam search, MoE FFNs, overfitting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from sparsemoe import MoE
from sparsemoe.gates import CometGate, GateSpec, HashGate, RandomGate, SwitchGate, TopKGate
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


#: the thor-multi30k models' FFNs: dense, Switch, and THOR's random expert per layer per pass
FFNS: dict[str, dict[str, Any]] = {
    "dense": {},
    "switch": {"gate": "switch", "gate_options": {"balance_weight": 0.01, "z_loss_weight": 0.0}},
    "thor": {"gate": "random", "gate_options": {"granularity": "batch"}},
}


def _model(ffn: str = "dense", **kw: Any) -> Seq2SeqTransformer:
    return _build(**FFNS[ffn], **kw)


def _build(gate: Any = None, **kw: Any) -> Seq2SeqTransformer:
    """A small model; ``gate`` is the model's gate argument, ``gate_spec`` the config's ``gate``."""
    torch.manual_seed(0)
    sizes: dict[str, Any] = {"d_model": 16, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 2, "d_hidden": 32}
    if "gate_spec" in kw:
        kw["gate"] = kw.pop("gate_spec")
    cfg = TransformerConfig(vocab_size=20, pad_id=PAD, dropout=0.0, **{**sizes, **kw})
    return Seq2SeqTransformer(cfg, gate=gate)


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
            **FFNS[ffn],
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
    with pytest.raises(ValueError, match="unknown gate 'moe'"):
        TransformerConfig(vocab_size=10, gate="moe")
    with pytest.raises(ValueError, match="eval_capacity_limit"):
        TransformerConfig(vocab_size=10, gate="switch", eval_capacity_limit=0.0)
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(vocab_size=10, d_model=30, num_heads=4)
    with pytest.raises(TypeError, match="unexpected option"):
        Seq2SeqTransformer(TransformerConfig(vocab_size=10, d_model=8, gate="switch", gate_options={"k": 2, "kk": 1}))


def _moe_layers(model: Seq2SeqTransformer) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@pytest.mark.parametrize(
    ("spec", "cls"), [("topk", TopKGate), ("hash", HashGate), ("comet+", CometGate), ("random", RandomGate)]
)
def test_any_gate_spec_builds_the_moe_ffns(spec: str, cls: type) -> None:
    model = _build(gate_spec=spec, num_experts=4, gate_options={"k": 1} if spec != "hash" else {})
    layers = _moe_layers(model)
    assert len(layers) == 2 and all(type(m.gate) is cls for m in layers)  # layer 0 of each stack
    assert all(m.gate.k == 1 for m in layers)
    assert all((m.search is not None) == spec.endswith("+") for m in layers)  # "+": local search
    tgt = torch.tensor([[BOS, 3, 4], [BOS, 5, PAD], [BOS, 6, 7]])
    out = model(_src(), tgt)
    assert out.shape == (3, 3, 20) and bool(torch.isfinite(out).all())
    routers = sum(p.numel() for m in layers for p in m.parameters()) - sum(
        p.numel() for m in layers for p in m.experts.parameters()
    )  # the gates (and the local search)
    assert model.parameter_counts()["active_per_token"] == _model().parameter_counts()["active_per_token"] + routers


def test_seeded_gates_get_one_seed_per_layer_unless_given() -> None:
    seeds = [m.gate.seed for m in _moe_layers(_build(gate_spec="random", gate_seed=3, encoder_layers=3))]
    assert seeds == [3000, 3002, 3003]  # encoder layers 0 and 2, decoder layer 0 (index 3)
    fixed = _moe_layers(_build(gate_spec="hash", gate_options={"seed": 11}))
    assert len(fixed) == 2 and all(torch.equal(m.gate.table, HashGate(16, 2, seed=11).table) for m in fixed)


def test_gate_argument_takes_a_parsed_spec_or_a_factory() -> None:
    spec = _build(GateSpec.parse("topk", k=1, noisy=False), num_experts=4)
    assert all(isinstance(m.gate, TopKGate) and not m.gate.noisy and m.gate.k == 1 for m in _moe_layers(spec))
    made: list[int] = []

    def factory(index: int) -> SwitchGate:
        made.append(index)
        return SwitchGate(16, 3, z_loss_weight=0.0)

    model = _build(factory, num_experts=3)
    assert made == [0, 2] and [type(m.gate) for m in _moe_layers(model)] == [SwitchGate, SwitchGate]
    assert model(_src(), torch.tensor([[BOS, 3], [BOS, 4], [BOS, 5]])).shape == (3, 2, 20)
    with pytest.raises(TypeError, match="factory must return"):
        _build(lambda i: "switch")
    with pytest.raises(TypeError, match="not a built gate"):
        _build(SwitchGate(16, 2))


def test_capacity_is_the_layers_limit_with_its_own_evaluation_value() -> None:
    model = _model("switch", capacity_limit=0.5, eval_capacity_limit=2.0)
    layers = _moe_layers(model)
    assert all(m.capacity_limit == 0.5 and not hasattr(m.gate, "capacity_factor") for m in layers)
    with torch.no_grad():  # equal logits: expert 0 gets every token, so a limit below 1 drops pairs in training
        for m in layers:
            m.gate.proj.weight.zero_()
    tgt = torch.tensor([[BOS, 3, 4], [BOS, 5, PAD], [BOS, 6, 7]])
    model.train()(_src(), tgt)
    assert all(m.routing_stats()["dropped_fraction"] > 0 for m in layers)
    model.eval()(_src(), tgt)
    assert all(m.capacity_limit == 2.0 and m.routing_stats()["dropped_fraction"] == 0 for m in layers)
    assert all(not hasattr(m.gate, "capacity_factor") for m in layers)  # the gate has no capacity of its own
    model.train()
    assert all(m.capacity_limit == 0.5 for m in layers)
    dropless = _model("switch")
    assert all(m.capacity_limit is None for m in _moe_layers(dropless.eval()))


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny matrices: one thread is fastest, and keeps a shared machine usable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
