"""Redraw the committed results' tables and plots from their results.json, without training anything.

    python -m tools.rerender [--results results] [FOLDER ...]

For a change to how a study reports (a table's columns, a plot's axes) rather than to what it
trains: each ``results/FOLDER/results.json`` is read, and the ``write_report`` of the study that
wrote it (named in the record, so a second ``--out`` such as router-lm-claim works too) writes the
same files a full run does (table.md and PNGs, never results.json), with the same code. No number
is typed: everything comes from the stored records. Then ``python -m tools.readme`` and
``python -m tools.comet_readme`` carry the tables into the README and docs/results-comet.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sparsemoe import experiments
from sparsemoe.experiments import demo

#: every study whose results.json can be redrawn: ``sparsemoe demo`` and each ``sparsemoe reproduce NAME``
STUDIES = [demo.NAME, *experiments.EXPERIMENTS]


def study_name(results: dict[str, Any]) -> str | None:
    """The study that wrote ``results`` (older studies record it as ``experiment``, newer as ``name``)."""
    return results.get("name") or results.get("experiment")


def _write_report(study: str, results: dict[str, Any], folder: Path) -> list[Path]:
    module = demo if study == demo.NAME else experiments.load(study)
    return module.write_report(results, folder)


def rerender(results_dir: Path, folders: list[str] | None = None) -> list[Path]:
    """Redraw each of ``folders`` under ``results_dir`` (None: every folder a study here wrote);
    returns the files written."""
    if folders is None:
        records = {p.parent.name: json.loads(p.read_text()) for p in sorted(results_dir.glob("*/results.json"))}
        records = {folder: r for folder, r in records.items() if study_name(r) in STUDIES}
    else:
        missing = [f for f in folders if not (results_dir / f / "results.json").is_file()]
        if missing:
            raise FileNotFoundError(f"no results.json for {missing} under {results_dir}; run those studies first")
        records = {f: json.loads((results_dir / f / "results.json").read_text()) for f in folders}
        unknown = {f: study_name(r) for f, r in records.items() if study_name(r) not in STUDIES}
        if unknown:
            raise ValueError(f"folders: cannot redraw {unknown} (folder: study); redrawable: {' '.join(STUDIES)}")
    written: list[Path] = []
    for folder, results in records.items():
        written += _write_report(str(study_name(results)), results, results_dir / folder)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("folders", nargs="*", help="result folders to redraw (default: every one a study wrote)")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    for path in rerender(args.results, args.folders or None):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
