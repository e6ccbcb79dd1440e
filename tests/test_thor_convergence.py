"""The thor-convergence study: a quick run end to end, dense_rdrop's loss by hand, early stopping
keeping the best checkpoint, the summary schema and the verdict rule."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sparsemoe.experiments import thor_convergence as tc
from sparsemoe.experiments import thor_multi30k as tm
from sparsemoe.experiments.config import ConfigError
from sparsemoe.experiments.reporting import thor_convergence as report
from sparsemoe.training import Callback, Trainer
from tools import rerender

from conftest import needs_data

SUMMARY_KEYS = {
    "test_bleu",
    "test_bleu_std",
    "seeds",
    "best_update",
    "train_hours",
    "params",
    "active_params_per_token",
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_data("multi30k")
def test_quick_run_end_to_end_writes_the_promised_files_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tc.run(tc.Config(quick=True, out=tmp_path, systems=["dense", "dense_rdrop"]))
    folder = tmp_path / "quick"
    for name in ("results.json", "summary.json", "table.md", "curves.png"):
        assert (folder / name).stat().st_size > 0, name
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) == {"dense", "dense_rdrop"}
    for entry in summary.values():
        assert set(entry) >= SUMMARY_KEYS
        assert entry["seeds"] == [0] and 0.0 <= entry["test_bleu"] <= 100.0 and entry["train_hours"] > 0
        assert 4 <= entry["best_update"] <= 16
    # same architecture: the consistency term adds no parameter
    assert summary["dense"]["params"] == summary["dense_rdrop"]["params"]
    rdrop = next(r for r in results["runs"] if r["system"] == "dense_rdrop")
    assert all(p["train_kl"] > 0 for p in rdrop["history"])  # two dropout passes disagree
    assert all(p["train_kl"] == 0 for p in next(r for r in results["runs"] if r["system"] == "dense")["history"])
    assert rdrop["divergence"] == {} and "kl_dropout" in rdrop["agreement"]
    assert results["sacrebleu_signature"].startswith("nrefs:1")
    assert results["verdicts"] == [] and "quick smoke run" in (folder / "table.md").read_text()
    assert not list((folder / "checkpoints").glob("*"))  # finished runs leave no checkpoint behind
    table = (folder / "table.md").read_text()
    (folder / "table.md").unlink()
    assert rerender.rerender(tmp_path, ["quick"])[0] == folder / "table.md"
    assert (folder / "table.md").read_text() == table  # the record alone redraws the table

    def must_not_train(*args: Any) -> Any:
        raise AssertionError("a saved run was trained again")

    monkeypatch.setattr(tc, "train_run", must_not_train)
    again = tc.run(tc.Config(quick=True, out=tmp_path, systems=["dense", "dense_rdrop"]))
    assert [r["test_bleu"] for r in again["runs"]] == [r["test_bleu"] for r in results["runs"]]


def _tiny(**changes: Any) -> tc.Config:
    """The quick run's settings with ``changes`` applied after quick mode has set its own."""
    return replace(tc.effective(tc.Config(quick=True, out=Path("unused"))), **changes)


def test_dense_rdrop_loss_is_two_ces_plus_alpha_symmetric_kl_of_two_dropout_passes() -> None:
    c = _tiny(label_smoothing=0.0, alpha=3.0)
    model = tc.build_model(c, "dense_rdrop", vocab=40, seed=0)
    assert not tc._moe_layers(model)  # a dense model: only dropout differs between the passes
    model.train()
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(4, 40, (3, 7), generator=gen)
    tgt = torch.randint(4, 40, (3, 6), generator=gen)
    tgt[0, 4:] = 0  # padding is left out of every term
    tin, tout = tgt[:, :-1], tgt[:, 1:]

    torch.manual_seed(5)
    terms = tc.training_loss(model, "dense_rdrop", c, src, tin, tout)
    torch.manual_seed(5)
    with torch.no_grad():
        lp1 = F.log_softmax(model(src, tin), -1)[tout != 0]  # [N, V]
        lp2 = F.log_softmax(model(src, tin), -1)[tout != 0]
    gold = tout[tout != 0]
    ce1, ce2 = F.nll_loss(lp1, gold), F.nll_loss(lp2, gold)
    kl_12 = (lp1.exp() * (lp1 - lp2)).sum(-1).mean()
    kl_21 = (lp2.exp() * (lp2 - lp1)).sum(-1).mean()
    expected = ce1 + ce2 + 3.0 * 0.5 * (kl_12 + kl_21)
    assert kl_12 > 1e-4  # dropout 0.3 made the passes differ
    assert torch.allclose(terms["loss"], expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["kl"], 0.5 * (kl_12 + kl_21), rtol=1e-5, atol=1e-7)
    # plain dense: one pass, CE only
    torch.manual_seed(5)
    dense = tc.training_loss(model, "dense", c, src, tin, tout)
    assert torch.allclose(dense["loss"], ce1, rtol=1e-5, atol=1e-6) and float(dense["kl"].detach()) == 0.0


def test_official_recipe_is_the_default_and_the_old_one_a_switch() -> None:
    c = tc.effective(tc.Config())
    assert (c.dropout, c.weight_decay, c.warmup) == (0.3, 1e-4, 800)
    assert tc.lr_factor(799, c) == pytest.approx(1.0) and tc.lr_factor(3199, c) == pytest.approx(0.5)
    old = tc.effective(tc.Config(recipe="thor-multi30k", dropout=0.2))
    assert (old.dropout, old.weight_decay, old.warmup) == (0.2, 0.0, 300)
    assert tc.lr_factor(old.max_updates - 1, old) < 1e-5  # cosine to 0 at the cap
    assert tc.base_config(c, "thor_4experts").num_experts == 4 and tc.base_config(c, "thor").num_experts == 2


@needs_data("multi30k")
def test_early_stopping_stops_after_patience_and_keeps_the_best_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = iter([5.0, 3.0, 4.0, 4.5, 1.0])  # best at the 2nd evaluation; patience 2 stops at the 4th
    monkeypatch.setattr(tm, "_val_loss", lambda *args: next(scripted))
    monkeypatch.setattr(tm, "_val_bleu_greedy", lambda *args: 0.0)
    c = _tiny(out=tmp_path, metric="val_ce", patience=2, eval_every=4, max_updates=40)
    corpus = tm._corpus(tc.base_config(c, "dense"))
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(Callback):
        def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
            snapshots[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    model, trainer = tc.make_trainer(c, corpus, "dense", 0, tmp_path / "ckpt.safetensors", [Snapshot()])
    result = trainer.run()
    assert (result.steps, result.best_step, result.stopped_early) == (16, 8, True)
    assert sorted(snapshots) == [4, 8, 12, 16]
    final = model.state_dict()
    assert all(torch.equal(final[k], snapshots[8][k]) for k in final)  # the best checkpoint, not the last
    assert not all(torch.equal(final[k], snapshots[16][k]) for k in final)


def _entry(bleu: float, std: float, seeds: int) -> dict[str, Any]:
    return {"test_bleu": bleu, "test_bleu_std": std, "seeds": list(range(seeds))}


def test_verdicts_need_separated_intervals_and_two_seeds() -> None:
    summary = {
        "thor": _entry(33.0, 0.2, 2),
        "switch": _entry(32.0, 0.3, 2),
        "dense": _entry(32.9, 0.2, 2),
        "dense_rdrop": _entry(33.5, 0.1, 1),
    }
    thor_switch, thor_dense, thor_rdrop, switch_dense = report.verdicts(summary)
    assert thor_switch.startswith("thor vs switch: thor beats switch") and "+1.00" in thor_switch
    assert "inconclusive, the mean ± std intervals overlap" in thor_dense
    assert "inconclusive, fewer than 2 seeds" in thor_rdrop
    assert "switch trails dense" in switch_dense
    assert report.verdicts({"thor": summary["thor"]}) == []


def test_summary_schema_and_system_order() -> None:
    def run(system: str, seed: int, bleu: float, best: int, curve: list[float]) -> dict[str, Any]:
        return {
            "system": system,
            "seed": seed,
            "test_bleu": bleu,
            "best_update": best,
            "train_seconds": 1800.0,
            "train_cpu_seconds": 1700.0,
            "capped": best == 4000,
            "inference_mode": "deterministic",
            "agreement": {"kl_dropout": 0.1},
            "divergence": {},
            "params": {"total": 10, "active_per_token": 8},
            "metric": "val_bleu_greedy",
            "history": [{"step": 400 * (i + 1), "val_bleu_greedy": v} for i, v in enumerate(curve)],
        }

    runs = [run("dense", 0, 30.0, 800, [20.0, 26.5, 26.25]), run("dense", 1, 32.0, 4000, [21.0])]
    by_system, summary = report.summaries(runs)
    assert set(summary["dense"]) >= SUMMARY_KEYS
    assert summary["dense"]["test_bleu"] == 31.0 and math.isclose(summary["dense"]["test_bleu_std"], math.sqrt(2))
    assert summary["dense"]["train_hours"] == 1.0 and summary["dense"]["best_update"] == 2400
    assert summary["dense"]["capped_seeds"] == [1] and summary["dense"]["best_updates"] == [800, 4000]
    assert by_system["dense"]["agreement"]["kl_dropout"]["mean"] == pytest.approx(0.1)
    assert summary["dense"]["last_interval_gains"] == [-0.25, None]  # levelled off; one evaluation: no gain


def test_bad_settings_name_the_option() -> None:
    with pytest.raises(ConfigError, match="systems"):
        tc.Config(systems=["thor", "moe"])
    with pytest.raises(ConfigError, match="seeds"):
        tc.Config(seeds=[0, 0])
    with pytest.raises(ConfigError, match="thor_mode"):
        tc.Config(thor_mode="fixed")


@needs_data("multi30k")
def test_an_interrupted_run_resumes_exactly_from_its_checkpoint(tmp_path: Path) -> None:
    c = _tiny(out=tmp_path, metric="val_ce", max_updates=12, eval_every=4, checkpoint_every=5)
    corpus = tm._corpus(tc.base_config(c, "thor"))
    ckpt = tmp_path / "ckpt.safetensors"
    straight = tc.train_run(c, corpus, "thor", 0, ckpt)  # leaves the checkpoint of update 10 behind
    assert ckpt.exists()
    resumed = tc.train_run(c, corpus, "thor", 0, ckpt)  # starts again from update 10
    assert [p["step"] for p in resumed["history"]] == [4, 8, 12]
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert (a["train_loss"], a["val_ce"]) == pytest.approx((b["train_loss"], b["val_ce"]), rel=1e-6)
    assert (resumed["best_update"], resumed["test_bleu"]) == (straight["best_update"], straight["test_bleu"])
    assert resumed["divergence"]["weight_distance"] == pytest.approx(straight["divergence"]["weight_distance"])
