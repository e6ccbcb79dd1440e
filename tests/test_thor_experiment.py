"""The thor-multi30k experiment: a quick run end to end, resuming, and an exact mid-run restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import needs_data


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_data("multi30k")
def test_quick_run_writes_the_promised_files_and_resumes(tmp_path: Path) -> None:
    from sparsemoe.experiments.thor_multi30k import THOR_MODES, Config, run

    results = run(Config(quick=True, out=tmp_path, seeds=2))
    folder = tmp_path / "quick"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) == {"dense", "switch", "thor"}
    for entry in summary.values():
        assert set(entry) >= {"test_bleu", "test_bleu_std", "seeds", "params", "active_params_per_token", "train_hours"}
        assert entry["seeds"] == [0, 1] and 0.0 <= entry["test_bleu"] <= 100.0
    assert summary["thor"]["active_params_per_token"] == summary["dense"]["active_params_per_token"]
    assert summary["thor"]["params"] > summary["dense"]["params"]
    assert set(results["summary"]["thor"]["bleu"]) == set(THOR_MODES)
    assert {"kl_dropout_and_experts", "kl_experts_only", "bleu_between_draws"} <= set(
        results["summary"]["thor"]["agreement"]
    )
    assert results["summary"]["dense"]["agreement"]["kl_dropout"]["mean"] > 0.0
    assert results["sacrebleu_signature"].startswith("nrefs:1")
    assert (folder / "curves.png").exists() and "quick" in (folder / "table.md").read_text()
    again = run(Config(quick=True, out=tmp_path, seeds=2))  # every run is loaded, none retrained
    assert again["runs"] == results["runs"]


@needs_data("multi30k")
def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    from sparsemoe.experiments.thor_multi30k import Config, _corpus, _effective, train_run

    c = _effective(Config(quick=True, out=tmp_path))
    c = replace(c, steps=14, eval_every=7, checkpoint_every=10)
    corpus = _corpus(c)
    ckpt = tmp_path / "ckpt.safetensors"
    straight = train_run(c, corpus, "thor", 0, ckpt)  # leaves the checkpoint of update 10 behind
    resumed = train_run(c, corpus, "thor", 0, ckpt)  # starts again from update 10
    assert [p["step"] for p in resumed["history"]] == [7, 14]
    assert resumed["history"][-1]["train_loss"] == pytest.approx(straight["history"][-1]["train_loss"], rel=1e-6)
    assert resumed["bleu"] == straight["bleu"]


def test_config_is_validated() -> None:
    from sparsemoe.experiments.thor_multi30k import Config

    with pytest.raises(ValueError, match="models"):
        Config(models=["moe"])
    with pytest.raises(ValueError, match="thor_mode"):
        Config(thor_mode="avg")


def test_cli_options_come_from_the_config() -> None:
    from sparsemoe import cli
    from sparsemoe.experiments.thor_multi30k import Config

    parser = cli.build_parser()
    args = parser.parse_args(
        ["reproduce", "thor-multi30k", "--quick", "--models", "dense", "thor", "--steps", "7", "--alpha", "1.5"]
    )
    config = cli.config_from_args(Config, args)
    assert config.quick and config.models == ["dense", "thor"] and config.steps == 7 and config.alpha == 1.5
    assert cli.config_from_args(Config, parser.parse_args(["reproduce", "thor-multi30k"])).steps == Config().steps
