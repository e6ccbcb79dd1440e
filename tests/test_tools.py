"""The repository tools (tools/, not installed): README sections filled from result files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import comet_readme, readme, rerender

from conftest import needs_data

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


def _stat(mean: float, sem: float) -> dict[str, float]:
    return {"mean": mean, "sem": sem, "std": sem * 5**0.5, "n": 5}


def test_claim_verdicts_follow_the_standard_error() -> None:
    def gate(auc: float, sem: float, saturated: float | None = None, learned: bool = False) -> dict:
        entry = {part: {"auc": _stat(auc, sem)} for part in ("top5", "best")}
        if learned:
            entry["saturated"] = None if saturated is None else {"test": {"auc": _stat(saturated, sem)}}
        return entry

    summary = {
        "comet+": gate(0.80, 0.005, saturated=0.78, learned=True),
        "topk": gate(0.70, 0.005),  # 0.10 apart, 14 SE: confirmed
        "hash": gate(0.79, 0.005),  # 0.01 apart, 1.4 SE: inconclusive
        "dselect_k": gate(0.90, 0.005, learned=True),  # better, and no trial reached k
    }
    tuning = {
        "trials_per_gate": 100,
        "config": {"scores": {"val_auc": "best val ROC-AUC (T1)"}},
        "reach": [
            {
                "score": "val_auc",
                "pair": ["topk", "topk+"],
                "target_from": "topk",
                "trials_needed": {"topk": 100, "topk+": 20},
                "ratio": 5.0,
                "ratio_5_95": [1.5, 9.0],
            },
            {
                "score": "val_auc",
                "pair": ["hash", "hash+"],
                "target_from": "hash",
                "trials_needed": {"hash": 100, "hash+": None},
                "ratio": 0.0,
                "ratio_5_95": [0.0, 0.5],
            },
            {
                "score": "val_auc",
                "pair": ["hash", "hash+"],
                "target_from": "hash+",
                "trials_needed": {"hash": None, "hash+": 100},
            },
        ],
    }
    rows = comet_readme.claim_rows({"comet-movielens": {"summary": summary}, "comet-tuning": tuning})
    verdicts = {(row[0], row[2]): row[-1] for row in rows}
    assert verdicts[("COMET+ vs topk ROC-AUC", "best config, seeds")] == "confirmed"
    assert verdicts[("COMET+ vs hash ROC-AUC", "top-5% trials (± SE)")] == "inconclusive"
    assert verdicts[("COMET+ vs dselect_k ROC-AUC", "best config, seeds")] == "not confirmed"
    # At the same compute COMET+ uses its saturated pick (0.78) against top-k, which is always at k.
    assert verdicts[("COMET+ vs topk ROC-AUC", "best config reaching k experts/input, seeds")] == "confirmed"
    assert ("COMET+ vs dselect_k ROC-AUC", "best config reaching k experts/input, seeds") not in verdicts
    summary["hash"]["top5"]["auc"] = {"mean": 0.5, "sem": 0.0, "std": 0.0, "n": 1}  # one trial: no SE
    rows_one = comet_readme.claim_rows({"comet-movielens": {"summary": summary}})
    assert {
        row[-1] for row in rows_one if row[:3] == ["COMET+ vs hash ROC-AUC", "comet-movielens", "top-5% trials (± SE)"]
    } == {"inconclusive"}
    budget = [row for row in rows if "trials to reach" in row[0]]
    assert [row[-1] for row in budget] == ["confirmed", "not confirmed"]
    assert "not reached" in budget[1][4]
    assert not [row for row in rows if row[0].startswith("PLE")]  # no PLE row in these results
    summary["ple"], summary["softmax"] = gate(0.75, 0.002), gate(0.74, 0.002)  # 3.5 SE apart
    ple = {row[2]: row[-1] for row in comet_readme.claim_rows({"comet-movielens": {"summary": summary}})
           if row[0] == "PLE vs MMoE (softmax gates) ROC-AUC"}  # fmt: skip
    assert ple == {"top-5% trials (± SE)": "confirmed", "best config, seeds": "confirmed"}


def _copy_records(folders: list[str], to: Path) -> None:
    for name in folders:
        (to / name).mkdir()
        (to / name / "results.json").write_text((ROOT / "results" / name / "results.json").read_text())


# Every committed study but thor-multi30k, whose record predates ``test_sentences`` (redrawing it
# counts them in the data; the test below). router-lm-claim is a second --out of router-lm: the
# record, not the folder, names the study.
RECORD_ONLY = [
    "demo", "gate-saturation", "comet-movielens", "comet-multimnist", "comet-tuning", "moebert-sst2",
    "router-lm", "router-lm-claim", "upcycle-smollm2", "thor-convergence",
]  # fmt: skip


def test_rerender_redraws_every_committed_table_and_plot_byte_for_byte(tmp_path: Path) -> None:
    # The committed tables and PNGs are what each study's write_report (also called by its run)
    # makes of the committed results.json, so a report change is redrawn without training.
    _copy_records(RECORD_ONLY, tmp_path)
    (tmp_path / "notes").mkdir()  # a folder no study wrote is left alone
    (tmp_path / "notes" / "results.json").write_text(json.dumps({"name": "scratch"}))
    written = rerender.rerender(tmp_path)
    assert {p.parent.name for p in written} == set(RECORD_ONLY)
    for path in written:
        assert path.read_bytes() == (ROOT / "results" / path.parent.name / path.name).read_bytes(), path
    with pytest.raises(ValueError, match=re.escape("folders: cannot redraw {'notes': 'scratch'}")):
        rerender.rerender(tmp_path, ["notes"])
    with pytest.raises(FileNotFoundError, match="run those studies first"):
        rerender.rerender(tmp_path, ["thor-multi30k"])


@needs_data("multi30k")
def test_rerender_counts_the_test_sentences_an_older_record_lacks(tmp_path: Path) -> None:
    _copy_records(["thor-multi30k"], tmp_path)
    written = rerender.rerender(tmp_path, ["thor-multi30k"])
    assert written[0].read_text() == (ROOT / "results" / "thor-multi30k" / "table.md").read_text()


def test_leader_rows_split_gates_at_two_standard_errors_in_the_metric_direction() -> None:
    def entry(auc: float, mse: float, sem: float = 0.01, n: int = 5) -> dict:
        stats = {"auc": {"mean": auc, "sem": sem, "n": n}, "mse": {"mean": mse, "sem": sem, "n": n}}
        return {"top5": stats, "best": stats}

    summary = {
        "softmax": entry(0.80, 1.00),
        "topk": entry(0.79, 0.95),  # 0.01 / (0.01·√2) = 0.71 SE from the AUC leader; the MSE leader (lower)
        "hash": entry(0.70, 1.10),  # 7.07 SE below on AUC
        "comet": entry(0.75, 1.00, n=1),  # one sample: no standard error
    }
    rows = comet_readme.leader_rows({"comet-movielens": {"summary": summary}})
    auc = next(r for r in rows if r[1].startswith("best") and "ROC-AUC" in r[2])
    assert auc[3:] == ["softmax", "topk (0.71 SE)", "hash (7.07 SE), comet (one sample: no SE)"]
    mse = next(r for r in rows if r[1].startswith("best") and "MSE" in r[2])
    assert mse[3:5] == ["topk", "none"]
    assert mse[5].startswith("softmax (3.54 SE), hash (10.61 SE)")


def test_standard_errors_quoted_in_prose_come_from_the_generated_tables() -> None:
    # The readings quote a few distances ("2.38 standard errors"); each must be one the tools printed.
    generated = (ROOT / "docs" / "results-comet.md").read_text()
    quoted = set()
    for doc in (ROOT / "docs" / "comet-reading.md", ROOT / "README.md"):
        quoted |= set(re.findall(r"(\d+\.\d+)\s+(?:standard errors|SE)\b", doc.read_text()))
    assert quoted, "the readings quote standard errors; this test must see them"
    assert all(f"{value} SE" in generated for value in quoted), sorted(v for v in quoted if f"{v} SE" not in generated)
