"""Smoke tests: each COMET ``reproduce`` command runs end to end on a tiny configuration."""

from __future__ import annotations

import json
import os

import pytest

from sparsemoe.cli import main

pytestmark = pytest.mark.skipif(
    not os.environ.get("SPARSEMOE_DATA_DIR"),
    reason="SPARSEMOE_DATA_DIR is not set (export SPARSEMOE_DATA_DIR=../shared/data to run the experiment smoke tests)",
)


def _results(folder) -> dict:
    assert (folder / "table.md").exists()
    assert list(folder.glob("*.png"))
    return json.loads((folder / "results.json").read_text())


def test_comet_movielens_quick(tmp_path) -> None:
    out = tmp_path / "ml"
    args = ["reproduce", "comet-movielens", "--quick", "--trials", "1", "--seeds", "1", "--out", str(out)]
    assert main([*args, "--gates", "topk", "comet+"]) == 0
    results = _results(out / "quick")
    assert set(results["summary"]) == {"topk", "comet+"}
    assert results["summary"]["topk"]["active_experts"]["mean"] == 2.0
    # Rerunning resumes: the trial and the seed run are loaded, nothing is trained again.
    assert main([*args, "--gates", "topk", "comet+"]) == 0
    assert _results(out / "quick")["cost"]["training_seconds_total"] == results["cost"]["training_seconds_total"]


def test_comet_multimnist_quick(tmp_path) -> None:
    out = tmp_path / "mm"
    args = ["reproduce", "comet-multimnist", "--quick", "--trials", "1", "--seeds", "1", "--out", str(out)]
    assert main([*args, "--gates", "hash+", "dselect_k"]) == 0
    results = _results(out / "quick")
    assert 0.0 <= results["summary"]["hash+"]["best"]["accuracy"]["mean"] <= 1.0


def test_comet_tuning_quick(tmp_path) -> None:
    args = ["reproduce", "comet-tuning", "--quick", "--trials", "2", "--movielens-out", str(tmp_path / "ml")]
    assert main([*args, "--out", str(tmp_path / "tuning")]) == 0
    results = _results(tmp_path / "tuning" / "quick")
    assert results["trials_per_gate"] == 2
    assert len(results["expected_best"]["val_auc"]["topk+"]) == 2
    assert {r["target_from"] for r in results["reach"]} == {"topk", "topk+", "hash", "hash+"}


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
