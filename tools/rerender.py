"""Redraw the committed results' tables and plots from their results.json, without training anything.

    python -m tools.rerender [--results results] [FOLDER ...]

For a change to how a study reports (a table's columns, a plot's axes) rather than to what it
trains: each ``results/FOLDER/results.json`` is read, and the report functions of the study that
wrote it (named in the record, so a second ``--out`` such as router-lm-claim works too) write the
same files a full run would (table.md and PNGs, never results.json; comet-tuning is not covered).
No number is typed: everything comes from the stored records. Then ``python -m tools.readme`` and
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
    router_lm,
    thor_convergence,
    thor_multi30k,
    upcycle_smollm2,
)
from sparsemoe.experiments.reporting import demo as demo_report
from sparsemoe.experiments.reporting import gate_saturation as gate_saturation_report
from sparsemoe.experiments.reporting import moebert, thor
from sparsemoe.experiments.reporting import router_lm as router_lm_report
from sparsemoe.experiments.reporting import thor_convergence as thor_convergence_report
from sparsemoe.experiments.reporting import tuning as tuning_report
from sparsemoe.experiments.reporting import upcycle_smollm2 as upcycle_report


def _config(config_class: Any, results: dict[str, Any]) -> Any:
    """The study's Config as its results.json recorded it (``out`` back to a Path)."""
    return config_class(**{**results["config"], "out": Path(results["config"]["out"])})


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
    config = _config(thor_multi30k.Config, results)
    num_test = len(multi30k.read_split(data_dir("multi30k"), "test")[0])
    by_model, summary = thor.summaries(config, results["runs"])
    table = thor.table(config, by_model, summary, results["sacrebleu_signature"], num_test, results["runs"])
    atomic_write_text(folder / "table.md", table)
    thor.plot(config, results["runs"], folder / "curves.png")
    return [folder / "table.md", folder / "curves.png"]


def _thor_convergence(results: dict[str, Any], folder: Path) -> list[Path]:
    report = thor_convergence_report
    config = _config(thor_convergence.Config, results)
    by_system, summary = report.summaries(results["runs"])
    signature, num_test = results["sacrebleu_signature"], results["test_sentences"]
    table = report.table(config, by_system, summary, report.verdicts(summary), signature, num_test)
    atomic_write_text(folder / "table.md", table)
    report.plot(config, results["runs"], folder / "curves.png")
    return [folder / "table.md", folder / "curves.png"]


def _router_lm(results: dict[str, Any], folder: Path) -> list[Path]:
    config = _config(router_lm.Config, results)
    table = router_lm_report.table(config, results["summary"], results["verdict"], results["corpus"])
    atomic_write_text(folder / "table.md", table)
    router_lm_report.plot_load(results["runs"], folder / "expert_load.png")
    router_lm_report.plot_curves(results["runs"], folder / "curves.png")
    return [folder / "table.md", folder / "expert_load.png", folder / "curves.png"]


def _upcycle(results: dict[str, Any], folder: Path) -> list[Path]:
    atomic_write_text(folder / "table.md", upcycle_report.render(results))
    upcycle_report.plot(results, folder / f"{upcycle_smollm2.NAME}.png")
    return [folder / "table.md", folder / f"{upcycle_smollm2.NAME}.png"]


#: study name (as its results.json records it) -> what redraws its files from results.json
RENDERERS: dict[str, Callable[[dict[str, Any], Path], list[Path]]] = {
    "demo": _demo,
    gate_saturation.NAME: _gate_saturation,
    comet_movielens.NAME: _tuning(comet_movielens.METRICS),
    comet_multimnist.NAME: _tuning(comet_multimnist.METRICS),
    thor_multi30k.NAME: _thor,
    moebert_sst2.NAME: _moebert,
    router_lm.NAME: _router_lm,
    upcycle_smollm2.NAME: _upcycle,
    thor_convergence.NAME: _thor_convergence,
}


def study_name(results: dict[str, Any]) -> str | None:
    """The study that wrote ``results`` (older studies record it as ``experiment``, newer as ``name``)."""
    return results.get("name") or results.get("experiment")


def rerender(results_dir: Path, folders: list[str]) -> list[Path]:
    """Redraw each of ``folders`` under ``results_dir``; returns the files written."""
    missing = [f for f in folders if not (results_dir / f / "results.json").is_file()]
    if missing:
        raise FileNotFoundError(f"no results.json for {missing} under {results_dir}; run those studies first")
    records = {f: json.loads((results_dir / f / "results.json").read_text()) for f in folders}
    unknown = {f: study_name(r) for f, r in records.items() if study_name(r) not in RENDERERS}
    if unknown:
        raise ValueError(f"folders: cannot redraw {unknown} (folder: study); redrawable: {' '.join(RENDERERS)}")
    written: list[Path] = []
    for folder, results in records.items():
        written += RENDERERS[str(study_name(results))](results, results_dir / folder)
    return written


def redrawable(results_dir: Path) -> list[str]:
    """The folders under ``results_dir`` whose results.json a renderer here can redraw."""
    return sorted(
        path.parent.name
        for path in results_dir.glob("*/results.json")
        if study_name(json.loads(path.read_text())) in RENDERERS
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "folders", nargs="*", help=f"result folders to redraw (default: every one written by {' '.join(RENDERERS)})"
    )
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    for path in rerender(args.results, args.folders or redrawable(args.results)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
