"""Redraw the committed results' tables and plots from their results.json, without training anything.

    python -m tools.rerender [--results results] [NAME ...]

For a change to how a study reports (a table's columns, a plot's axes) rather than to what it
trains: each NAME's ``results/NAME/results.json`` is read and its report functions write the same
files a full run would (table.md and PNGs, never results.json; comet-tuning is not covered). No number
is typed: everything comes from the stored records. Then ``python -m tools.readme`` and
``python -m tools.comet_readme`` carry the tables into the README and docs/results-comet.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsemoe.atomic import atomic_write_text
from sparsemoe.experiments import (
    comet_movielens,
    comet_multimnist,
    gate_saturation,
    moebert_sst2,
    thor_multi30k,
)
from sparsemoe.experiments.reporting import demo as demo_report
from sparsemoe.experiments.reporting import gate_saturation as gate_saturation_report
from sparsemoe.experiments.reporting import moebert, thor
from sparsemoe.experiments.reporting import tuning as tuning_report


def _demo(results: dict[str, Any], folder: Path) -> list[Path]:
    path = folder / "demo.png"
    demo_report.plot(results["summary"], results["runs"], results["config"], path)
    return [path]


def _gate_saturation(results: dict[str, Any], folder: Path) -> list[Path]:
    atomic_write_text(folder / "table.md", gate_saturation_report.render(results))
    gate_saturation_report.plot(results, folder / f"{gate_saturation.NAME}.png")
    return [folder / "table.md", folder / f"{gate_saturation.NAME}.png"]


def _tuning(metrics: list[tuple[str, str, bool]]) -> Callable[[dict[str, Any], Path], list[Path]]:
    def rerender(results: dict[str, Any], folder: Path) -> list[Path]:
        name = results["experiment"]
        atomic_write_text(folder / "table.md", tuning_report.render_tables(results, metrics))
        tuning_report.plot_results(results, metrics, folder / f"{name}.png")
        tuning_report.plot_saturation(results, folder / f"{name}-experts-per-input.png")
        return [folder / "table.md", folder / f"{name}.png", folder / f"{name}-experts-per-input.png"]

    return rerender


def _moebert(results: dict[str, Any], folder: Path) -> list[Path]:
    config = moebert_sst2.Config(**{**results["config"], "out": folder})
    details = moebert.details(results["summary"], results["runs"])
    moebert.table(config, results["summary"], details)
    moebert.plot(config, results["summary"], results["throughput"]["threads"])
    return [folder / "table.md", folder / "accuracy_throughput.png"]


def _thor(results: dict[str, Any], folder: Path) -> list[Path]:
    """The table counts the test sentences, which results.json does not record: it needs the data."""
    import matplotlib

    from sparsemoe.data import data_dir, multi30k

    matplotlib.use("Agg")
    config = thor_multi30k.Config(**{**results["config"], "out": Path(results["config"]["out"])})
    num_test = len(multi30k.read_split(data_dir("multi30k"), "test")[0])
    by_model, summary = thor.summaries(config, results["runs"])
    table = thor.table(config, by_model, summary, results["sacrebleu_signature"], num_test, results["runs"])
    atomic_write_text(folder / "table.md", table)
    thor.plot(config, results["runs"], folder / "curves.png")
    return [folder / "table.md", folder / "curves.png"]


#: experiment name -> what redraws its files from results.json
RENDERERS: dict[str, Callable[[dict[str, Any], Path], list[Path]]] = {
    "demo": _demo,
    gate_saturation.NAME: _gate_saturation,
    comet_movielens.NAME: _tuning(comet_movielens.METRICS),
    comet_multimnist.NAME: _tuning(comet_multimnist.METRICS),
    thor_multi30k.NAME: _thor,
    moebert_sst2.NAME: _moebert,
}


def rerender(results_dir: Path, names: list[str]) -> list[Path]:
    """Redraw ``names`` under ``results_dir``; returns the files written."""
    unknown = [n for n in names if n not in RENDERERS]
    if unknown:
        raise ValueError(f"names: cannot redraw {unknown}; choose from {' '.join(RENDERERS)}")
    missing = [n for n in names if not (results_dir / n / "results.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no results.json for {missing} under {results_dir}; run those studies first")
    written: list[Path] = []
    for name in names:
        folder = results_dir / name
        written += RENDERERS[name](json.loads((folder / "results.json").read_text()), folder)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"studies to redraw (default: all of {' '.join(RENDERERS)})")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    for path in rerender(args.results, args.names or list(RENDERERS)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
