"""How studies choose and draw from stored runs: gate-saturation's default rule, sparsity plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sparsemoe.experiments import gate_saturation
from sparsemoe.experiments.reporting import gate_saturation as gate_saturation_report
from sparsemoe.experiments.reporting import tuning as tuning_report


def _saturation_results(val: dict[float, float] | None) -> dict[str, Any]:
    """Two seeds per gamma (entropy 0.1 and 1.0): gamma 0.1 at k after 5 steps, 1 after 50, 10 never."""
    reach = {0.1: 5, 1.0: 50, 10.0: None}
    runs = []
    for gamma, steps in reach.items():
        for weight in (0.1, 1.0):
            for seed in range(2):
                run = {"gate": "comet", "gamma": gamma, "entropy_weight": weight, "seed": seed, "steps_to_k": steps}
                run["test_accuracy"] = 0.99 if gamma == 0.1 else 0.5  # must never decide
                if val is not None:
                    run["val_accuracy"] = val[gamma]
                runs.append(run)
    summary = [
        {
            "gate": "comet",
            "gamma": gamma,
            "entropy_weight": weight,
            **{
                name: {"mean": sum(r[name] for r in group) / len(group), "std": 0.0}
                for name in ("val_accuracy", "test_accuracy")
                if name in group[0]
            },
        }
        for gamma in reach
        for weight in (0.1, 1.0)
        if (group := [r for r in runs if (r["gamma"], r["entropy_weight"]) == (gamma, weight)])
    ]
    config = {"steps": 3000, "gates": ["comet"], "gammas": list(reach), "entropy_weights": [0.1, 1.0]}
    return {"config": config, "runs": runs, "summary": summary}


def test_default_rule_takes_the_widest_band_that_reaches_k_early_on_validation_accuracy() -> None:
    results = _saturation_results({0.1: 0.97, 1.0: 0.97, 10.0: 0.975})
    # gamma 10 never reaches k; 1 and 0.1 both do within 5% of the steps: the wider band wins, then the smaller weight
    assert gate_saturation_report.choose_default(results, "comet") == {"gamma": 1.0, "entropy_weight": 0.1}
    # ... unless it loses more than the margin of validation accuracy against the best candidate
    worse = _saturation_results({0.1: 0.97, 1.0: 0.97 - 2 * gate_saturation_report.ACCURACY_MARGIN, 10.0: 0.97})
    assert gate_saturation_report.choose_default(worse, "comet") == {"gamma": 0.1, "entropy_weight": 0.1}


def test_default_rule_reads_validation_accuracy_never_test_accuracy() -> None:
    results = _saturation_results({0.1: 0.97, 1.0: 0.97 - 2 * gate_saturation_report.ACCURACY_MARGIN, 10.0: 0.97})
    pick = gate_saturation_report.choose_default(results, "comet")
    assert pick == {"gamma": 0.1, "entropy_weight": 0.1}
    # test accuracy that would favour gamma 1 (and sink gamma 0.1) changes nothing
    for run in results["runs"]:
        run["test_accuracy"] = 0.99 if run["gamma"] == 1.0 else 0.1
    assert gate_saturation_report.choose_default(results, "comet") == pick
    # the reading reports the pick's test accuracy and says it is not the library's default
    text = gate_saturation_report._choice_text(results)
    assert "comet: γ = 0.1, entropy weight 0.1, NOT the library's default (γ = 1, entropy weight 0.1" in text
    agreeing = gate_saturation_report._choice_text(_saturation_results({0.1: 0.97, 1.0: 0.97, 10.0: 0.97}))
    assert "comet: γ = 1, entropy weight 0.1, the library's default; its validation accuracy 0.970, test" in agreeing


def test_validation_and_test_digits_are_disjoint_stratified_and_fixed() -> None:
    _, y = gate_saturation._digits()
    rows = gate_saturation.split_rows(y)
    assert [len(rows[name]) for name in ("train", "val", "test")] == [1400, 201, 196]
    parts = [set(rows[name].tolist()) for name in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(range(len(y)))
    val, test = y[rows["val"]].bincount(minlength=10), y[rows["test"]].bincount(minlength=10)
    assert ((val - test).abs() <= 1).all()  # each class split in half
    assert all(torch.equal(a, b) for a, b in zip(rows.values(), gate_saturation.split_rows(y).values(), strict=True))


def test_default_rule_refuses_runs_without_validation_accuracy() -> None:
    results = _saturation_results(None)
    with pytest.raises(ValueError, match="record no val_accuracy"):
        gate_saturation_report.choose_default(results, "comet")
    assert "no choice from these runs" in gate_saturation_report._choice_text(results)


def test_sparsity_plot_gives_each_gate_a_panel_and_each_seed_a_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (drawn.append(fig), save(fig, *a, **kw))[1])
    runs = [{"active_experts_per_epoch": [2.0] * 10} for _ in range(3)]  # every seed on the same line
    results = {
        "experiment": "fake",
        "config": {"k": 2, "num_experts": 8},
        "best_runs": {"comet": runs, "dselect_k": runs, "topk": runs},
        "summary": {"comet": {"saturated": None}, "dselect_k": {"saturated": None}, "topk": {}},
        "saturated_runs": {},
    }
    tuning_report.plot_saturation(results, tmp_path / "sat.png")
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes] == ["comet", "dselect_k"]  # top-k is not learned-sparse
    for ax in fig.axes:
        seeds = [line for line in ax.get_lines() if line.get_label().startswith("seed")]
        assert len({line.get_marker() for line in seeds}) == 3  # equal curves stay apart by their markers
        assert len({str(line.get_markevery()) for line in seeds}) == 3  # ... placed at different epochs


def test_thor_curves_name_each_system_once_and_tell_the_seeds_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from sparsemoe.experiments import thor_multi30k
    from sparsemoe.experiments.reporting import thor

    drawn: list[Figure] = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (drawn.append(fig), save(fig, *a, **kw))[1])
    history = [{"step": s, "train_ce": 3.0, "val_ce": 2.0, "val_bleu_greedy": 30.0} for s in (200, 400)]
    runs = [{"model": m, "seed": s, "history": history} for m in ("dense", "thor") for s in (0, 1)]
    thor.plot(thor_multi30k.Config(quick=True), runs, tmp_path / "curves.png")
    (fig,) = drawn
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert len(labels) == len(set(labels)) and {"dense", "thor", "seed 0", "seed 1"} <= set(labels)
        by_run = {(line.get_color(), line.get_marker()) for line in ax.get_lines() if line.get_label().startswith("_")}
        assert len(by_run) == 4  # two systems x two seeds, each its own colour-marker pair


def test_thor_table_says_which_runs_were_trained_elsewhere_and_merged() -> None:
    from dataclasses import asdict

    from sparsemoe.experiments import thor_multi30k
    from sparsemoe.experiments.reporting import thor

    study = thor_multi30k.Config(out=Path("results/thor"))
    here = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(study).items()}
    runs = [
        {"model": "dense", "seed": 1, "config": here},
        {"model": "dense", "seed": 0, "config": {**here, "out": "/tmp/elsewhere", "models": ["dense"], "seeds": 1}},
        {"model": "thor", "seed": 0, "config": {**here, "out": "/tmp/other", "alpha": 1.0}},
    ]
    assert thor.merged_runs(study, runs) == [
        "dense seed 0 was trained with `--out /tmp/elsewhere` and its record merged into this study "
        "(every other setting is this study's).",
        "thor seed 0 was trained with `--out /tmp/other` and its record merged into this study "
        "(settings differ in alpha).",
    ]
