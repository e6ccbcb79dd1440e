"""The router-lm study: a quick run end to end (and resumed), the summary schema and the verdict rule,
the decoder-only LM's causality, the LM corpus packing, and the RoutingMonitor callback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sparsemoe.data.lm_corpus import pack
from sparsemoe.data.multi30k import EOS_ID
from sparsemoe.experiments.reporting.router_lm import SUMMARY_KEYS, summary, verdict
from sparsemoe.layers import MoE
from sparsemoe.models import DecoderOnlyLM, TransformerConfig
from sparsemoe.training import RandomBatches, RoutingMonitor, TrainConfig, Trainer

from conftest import needs_data


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_data("multi30k", "sst2")
def test_quick_run_writes_the_promised_files_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsemoe.experiments import router_lm

    systems = ["dense", "topk_aux", "sigmoid_lossfree"]
    config = router_lm.Config(quick=True, out=tmp_path, seeds=1, systems=systems)
    results = router_lm.run(config)
    folder = tmp_path / "quick"
    for name in ("results.json", "summary.json", "table.md", "expert_load.png", "curves.png"):
        assert (folder / name).exists(), name
    saved = json.loads((folder / "summary.json").read_text())
    assert list(saved) == systems
    for entry in saved.values():
        assert set(entry) == set(SUMMARY_KEYS)
        assert entry["seeds"] == [0] and entry["val_ppl"] > 1.0 and entry["tokens_per_second"] > 0
    assert saved["dense"]["maxvio_global"] is None
    for name in ("topk_aux", "sigmoid_lossfree"):
        assert saved[name]["maxvio_global"] >= 0.0 and saved[name]["maxvio_batch"] >= 0.0
        # equal active parameters per token up to the router's weights
        extra = saved[name]["active_params_per_token"] - saved["dense"]["active_params_per_token"]
        assert 0 < extra < 0.02 * saved["dense"]["active_params_per_token"]
        assert saved[name]["params"] > saved[name]["active_params_per_token"]
    run = results["runs"][1]
    assert run["load_history"] and sum(run["load_history"][-1]["load"]["blocks.0.ffn"]) > 0
    assert run["history"][-1]["routing_max_violation"] is not None
    # a rerun trains nothing: every run is read back from the store
    monkeypatch.setattr(router_lm, "train_run", lambda *a, **k: pytest.fail("a saved run was retrained"))
    again = router_lm.run(config)
    assert again["summary"] == results["summary"]


def _run(system: str, seed: int, ppl: float, vio: float | None) -> dict[str, object]:
    return {
        "system": system, "seed": seed, "val_ppl": ppl, "maxvio_global": vio, "maxvio_batch": vio,
        "dead_experts": None if vio is None else 0, "experts_per_token": None if vio is None else 2.0,
        "tokens_per_second": 100.0, "params": 10, "active_params_per_token": 8,
    }  # fmt: skip


def test_summary_schema_and_verdict_rule() -> None:
    runs = [
        _run("dense", 0, 10.0, None),
        _run("dense", 1, 12.0, None),
        _run("topk_aux", 0, 10.0, 0.7),
        _run("topk_aux", 1, 10.2, 0.8),
        _run("topk_lossfree", 0, 9.0, 0.1),
        _run("topk_lossfree", 1, 9.2, 0.1),
        _run("sigmoid_lossfree", 0, 10.0, 0.1),
        _run("sigmoid_lossfree", 1, 10.4, 0.1),
    ]
    s = summary(runs)
    assert set(s["dense"]) >= set(SUMMARY_KEYS)
    assert s["dense"]["val_ppl"] == pytest.approx(11.0) and s["dense"]["val_ppl_std"] == pytest.approx(2**0.5)
    assert s["dense"]["seeds"] == [0, 1] and s["dense"]["maxvio_global"] is None
    assert s["topk_aux"]["maxvio_global"] == pytest.approx(0.75)
    v = verdict(s)
    assert v["topk_lossfree vs topk_aux"]["verdict"] == "confirmed"  # -1.0 beyond 2 SE ~0.28
    assert v["sigmoid_lossfree vs topk_aux"]["verdict"] == "inconclusive"  # +0.1 within the spread
    worse = summary([*runs[2:4], _run("topk_lossfree", 0, 9.0, 0.9), _run("topk_lossfree", 1, 9.1, 0.9)])
    assert verdict(worse)["topk_lossfree vs topk_aux"]["verdict"] == "not confirmed"  # worse balance
    one_seed = summary([runs[2], runs[4]])
    assert verdict(one_seed)["topk_lossfree vs topk_aux"]["verdict"] == "inconclusive"


def _lm(gate: str | None = "topk", **options: object) -> DecoderOnlyLM:
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=50, d_model=16, num_heads=2, decoder_layers=3, d_hidden=32, dropout=0.0, gate=gate,
        gate_options=dict(options), num_experts=4, expert_hidden=16, max_positions=12,
    )  # fmt: skip
    return DecoderOnlyLM(config).eval()


def test_decoder_only_lm_is_causal_with_moe_in_every_other_layer() -> None:
    model = _lm("topk", k=2, noisy=False)
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [True, False, True]
    assert model.blocks[0].ffn.experts.d_hidden == 16  # expert_hidden, dense layers keep d_hidden
    ids = torch.randint(4, 50, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(4, 50, (2, 4))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert a.shape == (2, 10, 50)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_causal_encoder_block_with_padding_matches_the_unpadded_prefix() -> None:
    block = _lm(None).blocks[0]
    x = torch.randn(1, 7, 16)
    pad = torch.tensor([[False] * 5 + [True] * 2])
    with torch.no_grad():
        padded = block(x, pad, causal=True)
        prefix = block(x[:, :5], causal=True)
    torch.testing.assert_close(padded[:, :5], prefix)


def test_shared_experts_reach_the_lm_moe_layers() -> None:
    model = _lm("sigmoid", k=1, normalize=False)
    model.config.shared_experts = 1  # the config is read at build time: rebuild with it
    model = DecoderOnlyLM(model.config)
    assert model.blocks[0].ffn.shared_expert is not None
    counts = model.parameter_counts()
    assert counts["total"] > counts["active_per_token"]


def test_pack_appends_eos_and_cuts_whole_blocks() -> None:
    blocks = pack([[5, 6], [7], [8, 9, 10]], seq_len=2)
    stream = [5, 6, EOS_ID, 7, EOS_ID, 8, 9, 10, EOS_ID]
    assert blocks.tolist() == [stream[0:3], stream[3:6], stream[6:9]]
    with pytest.raises(ValueError, match="seq_len"):
        pack([[5]], seq_len=0)
    with pytest.raises(ValueError, match="fewer than one block"):
        pack([[5]], seq_len=8)


def test_routing_monitor_records_the_window_load_at_each_evaluation() -> None:
    model = _lm("topk", k=2, noisy=False).train()
    data = torch.randint(4, 50, (12, 9))

    def loss(idx: torch.Tensor) -> torch.Tensor:
        logits = model(data[idx, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[idx, 1:].flatten())

    trainer = Trainer(
        model, loss, RandomBatches(12, 4, 0), TrainConfig(steps=6, lr=1e-3, eval_every=3),
        evaluate=lambda: {"zero": 0.0}, callbacks=[RoutingMonitor()],
    )  # fmt: skip
    result = trainer.run()
    assert [h["step"] for h in result.history] == [3, 6]
    for h in result.history:
        load = h["routing_load"]["blocks.0.ffn"] + h["routing_load"]["blocks.2.ffn"]
        assert sum(load) == 3 * 4 * 8 * 2 * 2  # 3 steps x 4 rows x 8 tokens x k=2, two MoE layers
        assert h["routing_max_violation"] >= 0.0 and 0 <= h["routing_dead_experts"] <= 8
