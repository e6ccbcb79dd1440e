"""Smoke tests: each COMET ``reproduce`` command runs end to end on a tiny configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sparsemoe.experiments import comet_movielens, comet_multimnist, comet_tuning, tuning
from sparsemoe.models import RecsysMMoE

from conftest import needs_data


def _results(folder) -> dict:
    assert (folder / "table.md").exists()
    assert list(folder.glob("*.png"))
    return json.loads((folder / "results.json").read_text())


@needs_data("movielens-100k")
def test_comet_movielens_quick(tmp_path) -> None:
    config = comet_movielens.Config(quick=True, trials=1, seeds=1, out=tmp_path / "ml", gates=["topk", "comet+"])
    comet_movielens.run(config)
    results = _results(tmp_path / "ml" / "quick")
    assert set(results["summary"]) == {"topk", "comet+"}
    assert results["summary"]["topk"]["active_experts"]["mean"] == 2.0
    run = results["best_runs"]["comet+"][0]
    assert len(run["active_experts_per_epoch"]) == run["epochs_run"] == 1  # quick: one epoch
    assert (tmp_path / "ml" / "quick" / "comet-movielens-experts-per-input.png").exists()
    # Rerunning resumes: the trial and the seed run are loaded, nothing is trained again.
    comet_movielens.run(config)
    assert (
        _results(tmp_path / "ml" / "quick")["cost"]["training_seconds_total"]
        == results["cost"]["training_seconds_total"]
    )


@needs_data("movielens-100k")
def test_comet_movielens_adds_the_ple_row_and_keeps_the_others(tmp_path) -> None:
    base = {"quick": True, "trials": 1, "seeds": 1, "out": tmp_path / "ml"}
    comet_movielens.run(comet_movielens.Config(gates=["softmax"], **base))
    first = _results(tmp_path / "ml" / "quick")
    comet_movielens.run(comet_movielens.Config(gates=["ple"], **base))
    merged = _results(tmp_path / "ml" / "quick")
    assert list(merged["summary"]) == merged["config"]["gates"] == ["softmax", "ple"]
    for part in ("summary", "trials", "best_runs", "active_experts_per_epoch"):
        assert merged[part]["softmax"] == first[part]["softmax"]  # kept as it was, not retrained
    assert merged["commands"][0] == first["command"] and "--gates ple" in merged["commands"][1]
    ple_seconds = sum(r["seconds"] for r in merged["trials"]["ple"] + merged["best_runs"]["ple"])
    total = first["cost"]["training_seconds_total"] + ple_seconds
    assert math.isclose(merged["cost"]["training_seconds_total"], total)
    assert merged["summary"]["ple"]["active_experts"]["mean"] == 16.0  # dense softmax gates: every expert
    assert "`, then `" in (tmp_path / "ml" / "quick" / "table.md").read_text()


def test_ple_row_has_mmoes_parameters_and_experts() -> None:
    """Equal budget: PLE's 2 levels of 8 experts and its 5 gates hold exactly MMoE's parameter count."""
    s = comet_movielens.SETTINGS
    sizes = {k: s[k] for k in ("num_experts", "embed_dim", "expert_dim", "tower_hidden", "dropout")}
    mmoe = RecsysMMoE(30, 20, "softmax", **sizes)
    ple = comet_movielens.ple_model(30, 20, s)
    assert sum(p.numel() for p in ple.parameters()) == sum(p.numel() for p in mmoe.parameters())
    ple(torch.randint(0, 20, (9, 2)))
    assert comet_movielens.experts_per_input(ple) == s["num_experts"]


def test_rows_read_back_from_the_committed_results_summarise_as_committed() -> None:
    """Merging keeps a row by reading it from results.json: its summary must come out unchanged."""
    path = Path(__file__).resolve().parents[1] / "results" / "comet-movielens" / "results.json"
    results = json.loads(path.read_text())
    studies, best = tuning.rows_of(results)
    problem = comet_movielens.problem(comet_movielens.SETTINGS)
    assert tuning.summarise_rows(studies, best, problem) == results["summary"]


@needs_data("mnist-5k")
def test_comet_multimnist_quick(tmp_path) -> None:
    config = comet_multimnist.Config(quick=True, trials=1, seeds=1, out=tmp_path / "mm", gates=["hash+", "dselect_k"])
    comet_multimnist.run(config)
    results = _results(tmp_path / "mm" / "quick")
    assert 0.0 <= results["summary"]["hash+"]["best"]["accuracy"]["mean"] <= 1.0


@needs_data("movielens-100k")
def test_comet_tuning_quick(tmp_path) -> None:
    config = comet_tuning.Config(quick=True, trials=2, movielens_out=tmp_path / "ml", out=tmp_path / "tuning")
    comet_tuning.run(config)
    results = _results(tmp_path / "tuning" / "quick")
    assert results["trials_per_gate"] == 2
    assert set(results["expected"]) == {"val_loss", "val_auc", "picked_test_auc"}
    assert len(results["expected"]["picked_test_auc"]["topk+"]) == 2
    assert {r["target_from"] for r in results["reach"]} == {"topk", "topk+", "hash", "hash+"}


def test_configs_reject_bad_fields() -> None:
    with pytest.raises(ValueError, match="gates"):
        comet_movielens.Config(gates=["nope"])
    with pytest.raises(ValueError, match="seeds"):
        comet_multimnist.Config(seeds=0)
    with pytest.raises(ValueError, match="trials"):
        comet_tuning.Config(trials=-1)


def test_expected_best_matches_resampling() -> None:
    import numpy as np

    from sparsemoe.experiments.comet_tuning import bootstrap_band, budget_to_reach, expected_best

    rng = np.random.default_rng(0)
    values = np.append(rng.random(20), np.nan)  # one diverged trial, which never wins
    budgets = np.array([1, 3, 10])
    exact = expected_best(values, budgets, higher=True)
    assert exact[0] < exact[1] < exact[2] <= np.nanmax(values)
    draws = values[rng.integers(0, len(values), size=(20000, 3))]
    assert abs(np.nanmean(np.fmax.reduce(draws, axis=1)) - exact[1]) < 0.01  # given one finite draw
    lower = expected_best(values, budgets, higher=False)
    assert lower[0] > lower[1] > lower[2] >= np.nanmin(values)
    lo, hi = bootstrap_band(values, budgets, higher=True)
    assert np.all(lo <= hi)
    assert budget_to_reach(exact, budgets, float(exact[1]), higher=True) == 3
    assert budget_to_reach(lower, budgets, float(lower[2]) - 1.0, higher=False) is None


def test_expected_picked_test_metric_matches_resampling() -> None:
    """E[test score of the lowest-val-loss trial among m] (exact) against brute-force resampling."""
    import numpy as np

    from sparsemoe.experiments.comet_tuning import bootstrap_band, expected_at_pick

    rng = np.random.default_rng(1)
    val_loss = np.append(rng.random(15), np.nan)  # one diverged trial: never picked
    test = rng.random(16)
    test[-1] = 100.0  # a diverged trial's payoff must never count
    budgets = np.array([1, 4, 12])
    exact = expected_at_pick(val_loss, test, budgets, higher=False)
    for m, value in zip(budgets, exact, strict=True):
        draws = rng.integers(0, 16, size=(40000, m))
        keys = np.where(np.isnan(val_loss[draws]), np.inf, val_loss[draws])
        picked = draws[np.arange(40000), keys.argmin(1)]
        ok = np.isfinite(val_loss[picked])
        assert abs(test[picked][ok].mean() - value) < 0.01
    # A large budget picks the lowest-val-loss trial almost surely.
    best = int(np.nanargmin(val_loss))
    assert abs(expected_at_pick(val_loss, test, np.array([2000]), higher=False)[0] - test[best]) < 1e-6
    lo, hi = bootstrap_band(val_loss, budgets, False, test)
    assert np.all(lo <= hi) and np.all(hi < 100.0)


def test_trials_ratio_and_its_interval() -> None:
    """The "+" gate's advantage in trials: equal gates 1x, a uniformly better one up to N x, a worse one 0."""
    import numpy as np

    from sparsemoe.experiments.comet_tuning import ratio_band, trials_ratio

    rng = np.random.default_rng(2)
    auc = rng.random(30)
    budgets = np.arange(1, 31)
    same = (auc, auc)
    assert trials_ratio(same, same, budgets, key_higher=True, higher=True) == 1.0
    better = (auc + 1.0, auc + 1.0)  # its worst trial beats the plain gate's best
    assert trials_ratio(same, better, budgets, key_higher=True, higher=True) == 30.0
    worse = (auc - 1.0, auc - 1.0)
    assert trials_ratio(same, worse, budgets, key_higher=True, higher=True) == 0.0
    lo, hi = ratio_band(same, better, budgets, True, True, resamples=50)
    assert lo == hi == 30.0
    lo, hi = ratio_band(same, same, budgets, True, True, resamples=200)
    assert lo < 1.0 < hi  # identical gates: resampling puts the ratio on both sides of 1
    # Picked by val loss (lower is better), scored on test: the key decides which trial counts.
    loss = rng.random(30)
    test = -loss  # the lowest-loss trial has the best test score
    assert trials_ratio((loss, test), (loss - 1.0, test + 1.0), budgets, key_higher=False, higher=True) == 30.0


def test_gate_saturation_quick(tmp_path) -> None:
    from sparsemoe.experiments import gate_saturation

    config = gate_saturation.Config(quick=True, out=tmp_path / "gs", gates=["comet"], entropy_weights=[1.0])
    results = gate_saturation.run(config)
    assert _results(tmp_path / "gs" / "quick")["config"]["steps"] == 200
    (run,) = results["runs"]
    assert run["curve"][0] == [0, 16.0]  # untrained: every expert for every input (the init is soft)
    assert 1.0 <= run["final_experts"] <= 16.0 and 1.0 <= run["test_experts"] <= 16.0
    assert 0.0 <= run["val_accuracy"] <= 1.0 and 0.0 <= run["test_accuracy"] <= 1.0
    assert [s for s, _ in run["curve"]] == [0, 5, 10, 20, 30, 50, 75, 100, 150, 200]
    with pytest.raises(ValueError, match="gates"):
        gate_saturation.Config(gates=["topk"])
