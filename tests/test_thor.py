"""THOR: the consistency loss against a hand computation, the random gate, the inference gates and modes."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from sparsemoe import MoE, _validation, gates
from sparsemoe.gates import FixedGate, MeanGate, RandomGate, SentenceDrawGate, TokenDrawGate
from sparsemoe.gates import thor as thor_gates
from sparsemoe.thor import (
    ThorModes,
    consistency_loss,
    consistency_terms,
    symmetric_kl,
    thor_inference,
    thor_layers,
    thor_training_loss,
)


def _reference(
    l1: list[list[float]], l2: list[list[float]], target: list[int], keep: list[bool], alpha: float, eps: float
) -> float:
    """Plain-Python THOR loss: smoothed target q (1-ε on y, ε/(V-1) elsewhere), both CEs, symmetric KL."""
    total, n = 0.0, 0
    for a, b, y, k in zip(l1, l2, target, keep, strict=True):
        if not k:
            continue
        n += 1
        v = len(a)
        p = [math.exp(x) / sum(math.exp(z) for z in a) for x in a]
        q = [math.exp(x) / sum(math.exp(z) for z in b) for x in b]
        smooth = [1 - eps if j == y else eps / (v - 1) for j in range(v)]
        ce1 = -sum(s * math.log(pj) for s, pj in zip(smooth, p, strict=True))
        ce2 = -sum(s * math.log(qj) for s, qj in zip(smooth, q, strict=True))
        kl_pq = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True))
        kl_qp = sum(qj * math.log(qj / pj) for pj, qj in zip(p, q, strict=True))
        total += ce1 + ce2 + alpha * 0.5 * (kl_pq + kl_qp)
    return total / n


def test_loss_matches_hand_computation() -> None:
    l1 = [[1.0, -0.5, 0.2, 0.0], [0.3, 0.3, -1.0, 2.0], [5.0, 1.0, 1.0, 1.0]]
    l2 = [[0.1, 0.4, -0.2, 1.0], [1.3, -0.3, 0.0, 0.5], [0.0, 0.0, 9.0, 1.0]]
    target = [2, 3, 0]  # the last token is padding (id 0)
    expected = _reference(l1, l2, target, [True, True, False], alpha=5.0, eps=0.1)
    got = consistency_loss(
        torch.tensor([l1], dtype=torch.float64),
        torch.tensor([l2], dtype=torch.float64),
        torch.tensor([target]),
        5.0,
        pad_id=0,
        label_smoothing=0.1,
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_identical_passes() -> None:
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    target = torch.randint(1, 11, (2, 5))
    terms = consistency_terms(logits, logits.clone(), target, 3.0, pad_id=0)
    assert terms.kl.item() == pytest.approx(0.0, abs=1e-12)
    assert terms.total.item() == pytest.approx(2 * terms.ce_1.item())
    different = consistency_terms(logits, logits + torch.randn_like(logits), target, 3.0, pad_id=0)
    assert different.kl.item() > 1e-3


def test_padding_is_ignored_and_masks_agree() -> None:
    g = torch.Generator().manual_seed(0)
    l1, l2 = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    target = torch.randint(1, 9, (2, 6), generator=g)
    target[0, 4:] = 0
    target[1, 2:] = 0
    base = consistency_terms(l1, l2, target, 1.0, pad_id=0)
    assert base.num_tokens == 6
    pad = target == 0
    l1b, l2b = l1.clone(), l2.clone()
    l1b[pad] = 100.0 * torch.randn_like(l1b[pad])
    l2b[pad] = -7.0
    moved = consistency_terms(l1b, l2b, target, 1.0, pad_mask=pad)
    assert moved.total.item() == pytest.approx(base.total.item(), rel=1e-6)


def test_gradient_reaches_both_passes_and_arguments_are_checked() -> None:
    l1 = torch.randn(1, 3, 5, requires_grad=True)
    l2 = torch.randn(1, 3, 5, requires_grad=True)
    consistency_loss(l1, l2, torch.tensor([[1, 2, 3]]), 5.0, pad_id=0).backward()
    assert l1.grad is not None and l1.grad.abs().sum() > 0
    assert l2.grad is not None and l2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="exactly one"):
        consistency_loss(l1, l2, torch.tensor([[1, 2, 3]]), 1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        consistency_loss(l1, l2, torch.tensor([[1, 2, 3]]), 1.0, pad_id=0, label_smoothing=1.0)


def test_random_gate_is_reproducible_and_uniform() -> None:
    x = torch.zeros(6000, 4)
    draws = [RandomGate(4, 4, granularity="token", seed=7)(x).expert for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    counts = torch.bincount(draws[0], minlength=4).tolist()
    assert chisquare(counts).pvalue > 0.01  # fixed seed: a deterministic check of uniformity
    other = RandomGate(4, 4, granularity="token", seed=8)(x).expert
    assert not torch.equal(draws[0], other)
    # "batch": one expert per call for every row (THOR's official draw); uniform over calls.
    gate = RandomGate(4, 3, granularity="batch", seed=1)
    per_call = []
    for _ in range(3000):
        e = gate(torch.zeros(5, 4)).expert
        assert e.unique().numel() == 1
        per_call.append(int(e[0]))
    assert chisquare(torch.bincount(torch.tensor(per_call), minlength=3).tolist()).pvalue > 0.01
    # "sequence": rows of one sequence share their expert.
    ids = torch.arange(50).repeat_interleave(4)
    seq = RandomGate(4, 3, granularity="sequence", seed=2)(torch.zeros(200, 4), ids).expert.view(50, 4)
    assert bool((seq == seq[:, :1]).all()) and seq[:, 0].unique().numel() == 3


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = MoE(6, 8, 3, gate=RandomGate(6, 3, granularity="batch", seed=0), bias=True)
        self.b = MoE(6, 8, 3, gate=RandomGate(6, 3, granularity="batch", seed=1), bias=True)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.b(self.a(x, ids), ids)


def test_inference_modes_do_what_they_say() -> None:
    torch.manual_seed(0)
    model = _TwoLayer().eval()
    x = torch.randn(40, 6, dtype=torch.float32)
    sentence = torch.arange(10).repeat_interleave(4)
    layer = model.a
    fixed = []
    for j in range(3):
        with thor_inference(layer, "fixed", expert=j):
            out = layer(x)
        assert torch.allclose(out, layer.experts.forward_expert(j, x), atol=1e-6)
        fixed.append(out)
    with thor_inference(layer, "mean"):
        mean = layer(x)
    assert torch.allclose(mean, torch.stack(fixed).mean(0), atol=1e-6)
    # random-token: every row is one expert's output, and all experts occur
    with thor_inference(layer, "random-token", seed=3):
        rnd = layer(x)
    which = torch.stack([(rnd - f).abs().amax(-1) < 1e-6 for f in fixed], 1)  # [T, n]
    assert bool(which.any(1).all()) and bool(which.any(0).all())
    # random-sentence: the same expert for all rows of a sentence, and again on a second call
    with thor_inference(layer, "random-sentence", seed=3):
        s1, s2 = layer(x, sentence), layer(x[:8], sentence[:8])
    chosen = torch.stack([(s1 - f).abs().amax(-1) < 1e-6 for f in fixed], 1).float().argmax(1).view(10, 4)
    assert bool((chosen == chosen[:, :1]).all()) and chosen[:, 0].unique().numel() > 1
    assert torch.allclose(s2, s1[:8])
    # the training gates are back afterwards, with their generator untouched by the modes
    assert isinstance(layer.gate, RandomGate) and layer.gate.granularity == "batch"
    assert len(thor_layers(model)) == 2


def test_modes_switch_every_layer_by_plain_assignment_and_back() -> None:
    model = _TwoLayer()
    training = {name: layer.gate for name, layer in thor_layers(model)}
    keys = set(model.state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = ThorModes(model)
    modes.set("fixed", expert=1)
    assert modes.mode == "fixed"
    assert isinstance(model.a.gate, FixedGate) and isinstance(model.b.gate, FixedGate) and model.a.gate.expert == 1
    assert dict(model.a.named_children())["gate"] is model.a.gate  # an ordinary submodule
    model(torch.randn(4, 6))
    modes.set("mean")  # switching again keeps the training gates
    assert isinstance(model.a.gate, MeanGate)
    modes.set("random-sentence", seed=2)
    assert isinstance(model.b.gate, SentenceDrawGate)
    model(torch.randn(4, 6), torch.tensor([0, 0, 1, 1]))
    modes.set("random-token", seed=2)
    assert isinstance(model.a.gate, TokenDrawGate) and [g.seed for g in (model.a.gate, model.b.gate)] == [20014, 20015]
    assert thor_layers(model) == []  # a token-draw gate is no training gate
    model(torch.randn(4, 6))
    modes.set("train")
    assert model.a.gate is training["a"] and model.b.gate is training["b"]
    assert set(model.state_dict()) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the draws' streams untouched


def test_modes_reject_bad_arguments_before_changing_anything() -> None:
    model = _TwoLayer()
    training = (model.a.gate, model.b.gate)
    modes = ThorModes(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        modes.set("avg")
    with pytest.raises(ValueError, match="expert"):
        modes.set("fixed", expert=3)  # 3 experts: 0..2
    assert (model.a.gate, model.b.gate) == training and modes.mode == "train"
    with pytest.raises(ValueError, match="no THOR layer"):
        ThorModes(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no THOR layer"), thor_inference(nn.Linear(2, 2), "mean"):
        pass


def test_nested_modes_are_refused_and_the_outer_block_restores() -> None:
    model = _TwoLayer()
    training = (model.a.gate, model.b.gate)
    with thor_inference(model, "mean"):
        with pytest.raises(ValueError, match=r"a \(MeanGate\).*already run an inference gate"):
            ThorModes(model)
        assert isinstance(model.a.gate, MeanGate)
    assert (model.a.gate, model.b.gate) == training
    with thor_inference(model, "random-token"), pytest.raises(ValueError, match=r"TokenDrawGate"):
        ThorModes(model)
    assert (model.a.gate, model.b.gate) == training
    with pytest.raises(RuntimeError, match="boom"), thor_inference(model, "fixed"):
        raise RuntimeError("boom")
    assert (model.a.gate, model.b.gate) == training  # restored on errors too


def test_inference_gates_are_registered_and_inference_only() -> None:
    registered = {"fixed": FixedGate, "mean": MeanGate, "sentence_draw": SentenceDrawGate, "token_draw": TokenDrawGate}
    for name, cls in registered.items():
        assert gates.gate_class(name) is cls and cls.inference_only
        assert name in gates.available() and name not in gates.trainable()
    assert "random" in gates.trainable() and not RandomGate.inference_only
    assert gates.build("mean", 4, 3).k == 3 and gates.k_policy("mean") == "dense"
    assert gates.build("fixed", 4, 3, expert=2).expert == 2 and gates.k_policy("fixed") == "fixed"
    with pytest.raises(ValueError, match="has no k to choose"):
        gates.build("sentence_draw", 4, 3, k=2)
    draws = gates.build("token_draw", 4, 3, k=2, seed=4)
    assert isinstance(draws, RandomGate) and draws.granularity == "token" and draws.k == 2
    x = torch.zeros(50, 4)
    assert torch.equal(draws(x).expert, RandomGate(4, 3, k=2, granularity="token", seed=4)(x).expert)
    layer = MoE(4, 8, 3, gate="sentence_draw", seed=5)
    assert layer.gate.id_kind() == "sequence" and layer.gate.table.device.type == "cpu"


def test_sentence_draw_is_a_seeded_table_of_sentence_ids() -> None:
    x = torch.randn(6, 4)
    gate = SentenceDrawGate(4, 5, seed=3, max_sentences=100)
    ids = torch.tensor([7, 7, 42, 99, 0, 42])
    expected = torch.randint(5, (100,), generator=torch.Generator().manual_seed(3))[ids]
    assert torch.equal(gate(x, ids).expert, expected)
    assert torch.equal(SentenceDrawGate(4, 5, seed=3, max_sentences=100)(x, ids).expert, expected)  # same seed
    assert torch.equal(gate(x).expert, gate(x, torch.arange(6)).expert)  # no ids: each row its own sentence
    with pytest.raises(ValueError, match="max_sentences=100"):
        gate(x, torch.tensor([0, 1, 2, 3, 4, 100]))


def test_sentence_draw_reads_no_ids_on_the_host_in_device_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the CUDA (device-side) checks, the id bound is an asynchronous assert, not a host read."""
    gate = SentenceDrawGate(4, 3, max_sentences=10)
    x, ids = torch.randn(4, 4), torch.tensor([1, 9, 9, 0])
    expected = gate(x, ids).expert
    for module in (_validation, thor_gates):
        monkeypatch.setattr(module, "device_side_checks", lambda t: True)

    def refuse(self: torch.Tensor, *args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor's value was read on the host")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    assert torch.equal(gate(x, ids).expert, expected)
    with pytest.raises(RuntimeError, match="max_sentences=10"):  # on CPU, _assert_async raises at once
        gate(x, torch.tensor([1, 10, 2, 0]))


def test_symmetric_kl_is_the_mean_of_both_directions_per_row() -> None:
    log_p = torch.randn(3, 4, 5, dtype=torch.float64).log_softmax(-1)
    log_q = torch.randn(3, 4, 5, dtype=torch.float64).log_softmax(-1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.exp() * (a - b)).sum(-1)

    got = symmetric_kl(log_p, log_q)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, 0.5 * (kl(log_p, log_q) + kl(log_q, log_p)))


def test_training_loss_runs_two_different_passes() -> None:
    torch.manual_seed(0)
    model = _TwoLayer().train()
    head = nn.Linear(6, 7)
    x = torch.randn(3, 5, 6)
    target = torch.randint(1, 7, (3, 5))
    terms = thor_training_loss(lambda: head(model(x)), target, 5.0, pad_id=0)
    # two independent draws per layer: over a few steps some pair of passes must differ
    kls = [thor_training_loss(lambda: head(model(x)), target, 5.0, pad_id=0).kl.item() for _ in range(6)]
    assert max(kls) > 1e-6
    terms.total.backward()
    assert model.a.experts.w1.grad is not None
