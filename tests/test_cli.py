"""The command line: gate listing, the demo end to end, resuming, and error messages."""

from __future__ import annotations

import json

import pytest

from sparsemoe import gates
from sparsemoe.cli import main
from sparsemoe.experiments import demo


def test_gates_command_lists_every_gate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gates"]) == 0
    out = capsys.readouterr().out
    for name in gates.available():
        assert name in out


def test_demo_quick_writes_results_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    args = ["demo", "--quick", "--out", str(tmp_path), "--gates", "topk", "comet"]
    assert main(args) == 0
    out_dir = tmp_path / "quick"
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["summary"]) == {"topk", "comet"}
    for gate, summary in results["summary"].items():
        assert 0.5 < summary["mean_auc"]["mean"] <= 1.0, gate
    assert (out_dir / "demo.png").stat().st_size > 1000
    table = (out_dir / "table.md").read_text()
    assert "| comet |" in table and "| topk |" in table

    # A second call finds both runs saved and trains nothing.
    def must_not_train(*_args, **_kwargs):
        raise AssertionError("a saved run was trained again")

    monkeypatch.setattr(demo, "train_one", must_not_train)
    assert main(args) == 0
    assert json.loads((out_dir / "results.json").read_text())["summary"] == results["summary"]


def test_errors_are_reported_not_raised(tmp_path, capsys) -> None:
    assert main(["demo", "--quick", "--out", str(tmp_path), "--gates", "nope"]) == 2
    assert "unknown gate 'nope'" in capsys.readouterr().err
