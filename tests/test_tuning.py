"""The tuning runner's picks: the protocol's best trial, and for learned-sparse gates the best trial at k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsemoe.experiments.reporting.tuning import SATURATED
from sparsemoe.experiments.tuning import Problem, run_tuning

K, SEEDS = 2, 2


def _problem(trained: list[tuple[str, dict[str, Any], int]]) -> Problem:
    """A fake study: the more experts a configuration computes, the lower its validation loss."""

    def sample(trial: Any, gate: str) -> dict[str, Any]:
        return {"experts": trial.suggest_categorical("experts", [2.0, 2.2, 3.0, 9.0])}

    def train(gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
        trained.append((gate, params, seed))
        experts = params["experts"]
        loss = 1.0 / experts + 0.001 * (seed % 10_000)
        return {
            "val_loss": loss,
            "val": {"mse": loss},
            "test": {"mse": loss + 0.5},
            "seconds": 0.0,
            "best_epoch": 0,
            "epochs_run": 1,
            "active_experts_per_epoch": [experts],
            "active_experts": experts,
        }

    return Problem("fake", sample, train, [("mse", "MSE", False)], {"k": K})


def test_learned_sparse_gate_also_reports_its_best_trial_at_k(tmp_path: Path) -> None:
    trained: list[tuple[str, dict[str, Any], int]] = []
    results = run_tuning(_problem(trained), ["comet", "topk"], {"comet": 12, "topk": 4}, SEEDS, tmp_path, "cmd")
    comet = results["summary"]["comet"]
    tried = {t["params"]["experts"] for t in results["trials"]["comet"]}
    # The protocol's pick is the lowest validation loss, here the configuration with the most experts.
    assert comet["best_params"]["experts"] == max(tried)
    pick = comet["saturated"]
    reaching = [e for e in tried if e <= SATURATED * K]
    assert reaching, "the fixed sampler seed should draw a configuration at k"
    assert pick["params"]["experts"] == max(reaching)  # the lowest loss among those at k (2.2 > 1.05 * 2 is out)
    assert pick["active_experts"]["mean"] <= SATURATED * K and not pick["same_as_best"]
    assert [r["seed"] for r in results["saturated_runs"]["comet"]] == list(range(SEEDS))
    # Each picked configuration was retrained over the seeds exactly once, and only comet gets the second pick.
    seed_runs = [(g, p["experts"], s) for g, p, s in trained if s >= 10_000]
    assert sorted(seed_runs) == sorted(
        [("comet", max(tried), 10_000 + s) for s in range(SEEDS)]
        + [("comet", max(reaching), 10_000 + s) for s in range(SEEDS)]
        + [("topk", results["summary"]["topk"]["best_params"]["experts"], 10_000 + s) for s in range(SEEDS)]
    )
    assert "saturated" not in results["summary"]["topk"] and "topk" not in results["saturated_runs"]
    table = (tmp_path / "table.md").read_text()
    assert "at most 1.05·k experts per input on the validation probe at their best epoch (k = 2)" in table
    rows = table.split("same compute")[1].splitlines()
    # test MSE at two experts: 1/2 + 0.5, plus 0.001 per seed
    assert [r for r in rows if r.startswith("| comet |")] == ["| comet | 1.0005 ± 0.0007 | 2.00 | no |"]


def test_gate_where_no_trial_reaches_k_says_so(tmp_path: Path) -> None:
    problem = _problem([])
    problem.sample = lambda trial, gate: {"experts": trial.suggest_categorical("experts", [3.0, 9.0])}
    results = run_tuning(problem, ["dselect_k"], {"dselect_k": 3}, 1, tmp_path, "cmd")
    assert results["summary"]["dselect_k"]["saturated"] is None
    assert results["saturated_runs"]["dselect_k"] is None
    assert "| dselect_k |  | no trial reached k |" in (tmp_path / "table.md").read_text()


def test_gamma_table_counts_trials_at_k_per_gamma() -> None:
    from sparsemoe.experiments.reporting.tuning import _gamma_table

    def trial(gamma: float, experts: float, loss: float = 1.0) -> dict[str, Any]:
        # validation probe at the best epoch (index 1) = experts; the test inputs' count differs and is not read
        per_epoch = [16.0, experts, 1.0]
        return {
            "params": {"gamma": gamma},
            "active_experts": 1.0,
            "active_experts_per_epoch": per_epoch,
            "val_loss": loss,
            "best_epoch": 1,
        }

    trials = [
        trial(0.01, 2.0),
        trial(0.01, 2.1),
        trial(10.0, 9.0, 0.5),
        trial(10.0, 2.0),
        trial(10.0, 3.0, float("nan")),
    ]
    results = {"config": {"k": K}, "trials": {"comet": trials, "topk": [trial(1.0, 2.0)]}}
    rows = [r for r in _gamma_table(results).splitlines() if r.startswith("| comet")]
    # gamma 0.01: both at <= 2.1 experts; gamma 10: the diverged trial is left out, one of two at k
    assert rows == [
        "| comet | 0.01 | 2 | 2.05 [2.00-2.10] | 2/2 | 2.0 | 1.0000 |",
        "| comet | 10 | 2 | 5.50 [2.00-9.00] | 1/2 | 2.0 | 0.5000 |",
    ]
    assert "topk" not in _gamma_table(results)


def test_same_compute_pick_reads_experts_per_input_on_validation_not_test(tmp_path: Path) -> None:
    # A study where the test inputs' count contradicts the validation probe's: the pick must follow validation.
    problem = _problem([])
    train = problem.train

    def contradicting(gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
        record = train(gate, params, seed)
        return {**record, "active_experts": 11.0 - params["experts"]}  # test: 2 <-> 9

    problem.sample = lambda trial, gate: {"experts": trial.suggest_categorical("experts", [2.0, 9.0])}
    problem.train = contradicting
    results = run_tuning(problem, ["comet"], {"comet": 6}, 1, tmp_path, "cmd")
    tried = {t["params"]["experts"] for t in results["trials"]["comet"]}
    assert tried == {2.0, 9.0}, "the fixed sampler seed should draw both configurations"
    assert results["summary"]["comet"]["saturated"]["params"] == {"experts": 2.0}


def test_a_run_of_other_gates_keeps_the_earlier_rows_and_only_with_equal_settings(tmp_path: Path) -> None:
    trained: list[tuple[str, dict[str, Any], int]] = []
    first = run_tuning(_problem(trained), ["comet"], {"comet": 6}, SEEDS, tmp_path, "cmd comet")
    trained.clear()
    merged = run_tuning(_problem(trained), ["topk"], {"topk": 3}, SEEDS, tmp_path, "cmd topk")
    assert {gate for gate, _, _ in trained} == {"topk"}  # comet is read back, not retrained
    assert list(merged["summary"]) == merged["config"]["gates"] == ["comet", "topk"]
    assert merged["summary"]["comet"] == first["summary"]["comet"]  # its saturated pick included
    assert merged["saturated_runs"]["comet"] == first["saturated_runs"]["comet"]
    assert merged["config"]["trials_per_gate"] == {"comet": 6, "topk": 3}
    assert merged["commands"] == ["cmd comet", "cmd topk"]
    assert "Produced by `cmd comet`, then `cmd topk`" in (tmp_path / "table.md").read_text()
    # other seeds: a different study, whose rows are not mixed in
    other = run_tuning(_problem([]), ["topk"], {"topk": 3}, SEEDS + 1, tmp_path, "cmd seeds")
    assert list(other["summary"]) == ["topk"] and other["commands"] == ["cmd seeds"]
