"""The repository tools (tools/, not installed): README sections filled from result files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools import comet_readme, readme

ROOT = Path(__file__).resolve().parents[1]


def test_readme_sections_are_filled_from_files_with_links_reanchored(tmp_path: Path) -> None:
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "table.md").write_text(
        "# Title dropped\n\n| a |\n|---|\n| 1 |\n\n![plot](x.png) [web](https://e.org) [top](#top)\n"
    )
    doc = tmp_path / "README.md"
    doc.write_text("intro\n<!-- BEGIN results/x/table.md -->\nstale\n<!-- END results/x/table.md -->\nend\n")
    assert readme.refresh(doc) == ["results/x/table.md"]
    text = doc.read_text()
    assert "stale" not in text and "Title dropped" not in text and "| 1 |" in text
    assert "![plot](results/x/x.png)" in text and "(https://e.org)" in text and "(#top)" in text
    assert text.startswith("intro\n<!-- BEGIN results/x/table.md -->\n")
    assert text.endswith("<!-- END results/x/table.md -->\nend\n")


def test_readme_refuses_a_missing_source(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text("<!-- BEGIN results/none.md -->\n<!-- END results/none.md -->\n")
    with pytest.raises(FileNotFoundError, match="run its experiment first"):
        readme.refresh(doc)


def test_comet_section_without_results_says_what_to_run(tmp_path: Path) -> None:
    text = comet_readme.render(tmp_path, "a reading")
    assert "python -m tools.comet_readme" in text
    for name in comet_readme.EXPERIMENTS:
        assert f"sparsemoe reproduce {name}" in text
    assert text.rstrip().endswith("a reading")


def test_tools_run_as_modules_from_the_repository_root(tmp_path: Path) -> None:
    out = tmp_path / "comet.md"
    args = ["--results", str(tmp_path), "--out", str(out), "--reading", str(tmp_path / "none.md")]
    subprocess.run([sys.executable, "-m", "tools.comet_readme", *args], cwd=ROOT, check=True, capture_output=True)
    assert "(no reading written yet)" in out.read_text()
