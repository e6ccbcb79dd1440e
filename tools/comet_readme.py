"""Render the README's COMET results section from the results files (no number is typed by hand).

    python -m tools.comet_readme [--results results] [--out docs/results-comet.md]
        [--reading docs/comet-reading.md]

The README includes the output between ``<!-- BEGIN docs/results-comet.md -->`` and
``<!-- END docs/results-comet.md -->`` markers, filled by ``python -m tools.readme``.

Reads ``results/comet-movielens``, ``results/comet-multimnist`` and ``results/comet-tuning``
(results.json + table.md), and writes the tables, what each full run cost, and the paper's claims
checked against our numbers. The qualitative reading is a hand-written file (``--reading``) that
states no number of its own.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from sparsemoe.atomic import atomic_write_text
from sparsemoe.experiments import comet_movielens, comet_multimnist
from sparsemoe.experiments.reporting import markdown_table

EXPERIMENTS = ("comet-movielens", "comet-multimnist", "comet-tuning")

#: the paper's headline claims (abstract of Ibrahim et al., KDD 2023)
CLAIMS = {
    "topk_hash": 0.13,  # COMET+ over Hash routing and Top-k: up to 13% ROC-AUC
    "dselect_k": 0.09,  # COMET+ over DSelect-k: up to 9% ROC-AUC
    "budget": 100.0,  # Top-k+/Hash+ need up to 100x fewer tuning trials
}


def _load(folder: Path) -> dict[str, Any] | None:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table_body(folder: Path) -> str:
    """table.md without its title line (the section has its own headings)."""
    lines = (folder / "table.md").read_text().splitlines()
    return "\n".join(line.replace("## ", "#### ") for line in lines[1:]).strip() + "\n"


#: a difference counts as real when it exceeds this many standard errors of the difference
SIGNIFICANT_SE = 2.0


def _stat(summary: dict[str, Any], gate: str, part: str, metric: str) -> dict[str, float] | None:
    """``mean``/``sem`` of ``metric`` for ``gate`` over the top-5% trials (``"top5"``), the best
    configuration's seeds (``"best"``) or, for a learned-sparse gate, the seeds of the best
    configuration that reached k experts per input (``"saturated"``; other gates are always at k)."""
    entry = summary.get(gate)
    if entry is None:
        return None
    if part != "saturated":
        return entry[part][metric]
    if "saturated" not in entry:
        return entry["best"][metric]
    pick = entry["saturated"]
    return None if pick is None else pick["test"][metric]


def verdict(diff: float, se: float) -> str:
    """Whether ``diff`` (claimed to be > 0) is: confirmed, not confirmed (< 0) or within noise."""
    if diff > SIGNIFICANT_SE * se:
        return "confirmed"
    if diff < -SIGNIFICANT_SE * se:
        return "not confirmed"
    return "inconclusive"


def _compare(
    claim: str, name: str, how: str, paper: str, better: dict[str, float], worse: dict[str, float]
) -> list[str]:
    diff = better["mean"] - worse["mean"]
    gain = f"{100 * diff / worse['mean']:+.2f}%"
    if min(better["n"], worse["n"]) < 2:  # a single trial or seed has no standard error
        return [claim, name, how, paper, f"{gain} ({diff:+.4f}, one sample: no SE)", "inconclusive"]
    se = math.hypot(better["sem"], worse["sem"])
    return [claim, name, how, paper, f"{gain} ({diff:+.4f} ± {se:.4f} SE; {diff / se:+.2f} SE)", verdict(diff, se)]


#: how each comparison is measured: (summary part, label)
PARTS = (
    ("top5", "top-5% trials (± SE)"),
    ("best", "best config, seeds"),
    ("saturated", "best config reaching k experts/input, seeds"),
)


def claim_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per (claim, experiment, comparison): the paper's number, ours with its standard error,
    and the verdict (the difference beyond ±2 SE either way, or within it)."""
    rows = []
    for name, metric in (("comet-movielens", "auc"), ("comet-multimnist", "auc")):
        res = results.get(name)
        if res is None:
            continue
        summary = res["summary"]
        for rival, claim in (("topk", "topk_hash"), ("hash", "topk_hash"), ("dselect_k", "dselect_k")):
            for part, label in PARTS:
                a, b = _stat(summary, "comet+", part, metric), _stat(summary, rival, part, metric)
                if a is not None and b is not None:
                    paper = f"up to +{100 * CLAIMS[claim]:.0f}%"
                    rows.append(_compare(f"COMET+ vs {rival} ROC-AUC", name, label, paper, a, b))
        for base in ("hash", "topk", "dselect_k", "comet"):
            for part, label in PARTS[:2]:
                a, b = _stat(summary, f"{base}+", part, metric), _stat(summary, base, part, metric)
                if a is not None and b is not None:
                    rows.append(_compare(f"local search: {base}+ vs {base} ROC-AUC", name, label, "gains", a, b))
        for part, label in PARTS[:2]:  # comet-movielens' PLE row, tuned at MMoE's budget and parameter count
            a, b = _stat(summary, "ple", part, metric), _stat(summary, "softmax", part, metric)
            if a is not None and b is not None:
                rows.append(_compare("PLE vs MMoE (softmax gates) ROC-AUC", name, label, "gains (Tang et al.)", a, b))
    tuning = results.get("comet-tuning")
    if tuning is not None:
        n = tuning["trials_per_gate"]
        for r in tuning["reach"]:
            plain, plus = r["pair"]
            if r["target_from"] != plain or "ratio" not in r:
                continue
            need_plain, need_plus = r["trials_needed"][plain], r["trials_needed"][plus]
            lo, hi = r["ratio_5_95"]
            ours = "not reached" if need_plus is None else f"{r['ratio']:.1f}x fewer trials"
            score = tuning["config"]["scores"][r["score"]]
            rows.append(
                [
                    f"{plus} vs {plain}: trials to reach {plain}'s {n}-trial expected {score}",
                    "comet-movielens",
                    f"{plain}: {need_plain}, {plus}: {need_plus if need_plus is not None else f'> {n}'}",
                    f"up to {CLAIMS['budget']:.0f}x fewer",
                    f"{ours} (5-95%: {lo:.1f}-{hi:.1f}x)",
                    "confirmed" if lo > 1.0 else "not confirmed" if hi < 1.0 else "inconclusive",
                ]
            )
    return rows


#: each study's test metrics as ``(key, label, higher is better)``, the order of its tables
METRICS = {comet_movielens.NAME: comet_movielens.METRICS, comet_multimnist.NAME: comet_multimnist.METRICS}


def leader_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Per (study, report, metric): the gate with the best mean, the gates within
    :data:`SIGNIFICANT_SE` standard errors of it, and those further behind with their distance in
    standard errors of the difference (one-sample reports have no standard error: listed as such)."""
    rows = []
    for name, metrics in METRICS.items():
        res = results.get(name)
        if res is None:
            continue
        summary = res["summary"]
        for part, label in PARTS[:2]:
            for key, metric, higher in metrics:
                stats = {g: s[part][key] for g, s in summary.items()}
                leader = (max if higher else min)(stats, key=lambda g: stats[g]["mean"])
                near, behind = [], []
                for gate, stat in stats.items():
                    if gate == leader:
                        continue
                    gap = (stats[leader]["mean"] - stat["mean"]) * (1 if higher else -1)
                    if min(stat["n"], stats[leader]["n"]) < 2:
                        behind.append(f"{gate} (one sample: no SE)")
                        continue
                    se = math.hypot(stat["sem"], stats[leader]["sem"])
                    (near if gap <= SIGNIFICANT_SE * se else behind).append(f"{gate} ({gap / se:.2f} SE)")
                rows.append([name, label, metric, leader, ", ".join(near) or "none", ", ".join(behind) or "none"])
    return rows


#: config keys worth a line in the README, with the paper's value where ours is scaled down
PAPER_VALUES = {
    "num_experts": "16",
    "k": "2 MovieLens / 4 MultiMNIST",
    "embed_dim": "128",
    "expert_dim": "256",
    "batch_size": "512",
    "epochs": "100 MovieLens / 200 MultiMNIST, patience 25",
    "train_rows": "1.6M (MovieLens-1M)",
    "images": "100k/20k/20k",
    "lr_range": "[5e-5, 5e-4] MovieLens, [1e-4, 1e-3] MultiMNIST",
    "trials_per_gate": "500",
    "seeds": "-",
}


def _setup(config: dict[str, Any]) -> str:
    items = [f"{key}={config[key]} ({paper})" for key, paper in PAPER_VALUES.items() if key in config]
    return "; ".join(items) + "."


def _cost(res: dict[str, Any]) -> str:
    cost = res.get("cost", {})
    if "training_seconds_of_trials_used" in cost:
        return (
            f"{cost['training_seconds_of_trials_used'] / 60:.0f} min of single-thread training in the trials it uses "
            "(shared with comet-movielens, whose studies it extends when asked for more trials)"
        )
    if "training_seconds_total" not in cost:
        return "no training (reads the comet-movielens trials)"
    text = f"{cost['training_seconds_total'] / 60:.0f} min of single-thread training in total"
    if "wall_clock_span_seconds" in cost:
        sittings = len(res.get("commands", [])) > 1
        span = "summed over the commands' sittings" if sittings else "from first trial to last run"
        text += f", {cost['wall_clock_span_seconds'] / 60:.0f} min wall-clock {span}"
    return text


def render(results_dir: Path, reading: str) -> str:
    results = {name: res for name in EXPERIMENTS if (res := _load(results_dir / name)) is not None}
    parts = [
        "## Results: COMET reproduction\n",
        "Generated by `python -m tools.comet_readme` from `results/comet-*/results.json`; rerun the "
        "commands below to regenerate every number. All runs are CPU, one thread per model, on a 2-core machine "
        "shared with other jobs, and are **heavily scaled down** from the paper (see each results.json `config`).\n",
    ]
    for name in EXPERIMENTS:
        if name not in results:
            parts.append(f"### {name}\n\nNo results from the current code yet: `sparsemoe reproduce {name}`.\n")
            continue
        res = results[name]
        commands = ", then ".join(f"`{c}`" for c in res.get("commands", [res["command"]]))
        parts.append(f"### {name}\n\nCommand: {commands}. Cost: {_cost(res)}.\n")
        if name != "comet-tuning":
            parts.append("Setup (the paper's value in parentheses): " + _setup(res["config"]) + "\n")
        parts.append(_table_body(results_dir / name))
        parts.append(f"![{name}](../results/{name}/{name}.png)\n")
        if (results_dir / name / f"{name}-experts-per-input.png").exists():
            parts.append(f"![{name}: experts per input](../results/{name}/{name}-experts-per-input.png)\n")
    parts.append(
        "### The paper's claims against our numbers\n\nGains are relative differences of the mean test ROC-AUC "
        "(MovieLens: task 1; MultiMNIST: macro AUC averaged over the two tasks), with the absolute difference, "
        "its standard error and the difference in standard errors. A claim is *confirmed* when the difference is "
        f"above {SIGNIFICANT_SE:g} standard errors, "
        f"*not confirmed* when it is below -{SIGNIFICANT_SE:g}, and *inconclusive* in between; the tuning-budget "
        "ratio is confirmed when the 5% end of its bootstrap interval is above 1, not confirmed when the 95% end is "
        "below 1. The paper's sizes are maxima over its datasets, so a confirmed direction with a smaller size is "
        "consistent with it.\n"
    )
    parts.append(
        markdown_table(["claim", "experiment", "how measured", "paper", "ours", "verdict"], claim_rows(results))
        if results
        else "No results yet.\n"
    )
    leaders = leader_rows(results)
    if leaders:
        parts.append(
            "### Each study's leader and who is level with it\n\nPer report and metric: the gate with the best "
            f"mean, the gates within {SIGNIFICANT_SE:g} standard errors of the difference from it, and those further "
            "behind, each with its distance in standard errors (top-5% trials: SE over the trials; best "
            "configuration: SE over its seeds).\n"
        )
        parts.append(
            markdown_table(
                ["experiment", "how measured", "metric", "leader", f"within {SIGNIFICANT_SE:g} SE", "further behind"],
                leaders,
            )
        )
    parts.append("### Reading\n\n" + reading.strip() + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path("docs/results-comet.md"))
    parser.add_argument("--reading", type=Path, default=Path("docs/comet-reading.md"), help="qualitative reading")
    args = parser.parse_args(argv)
    reading = args.reading.read_text() if args.reading.exists() else "(no reading written yet)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, render(args.results, reading))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
