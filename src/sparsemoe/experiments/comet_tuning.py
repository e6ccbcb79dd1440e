"""COMET paper's tuning-budget claim: Top-k vs Top-k+ and Hash vs Hash+ as a function of random-search trials.

Reuses the MovieLens random-search trials of ``comet-movielens`` (no new training when they exist):
the expected best validation metric after ``m`` trials is the bootstrap expectation over the ``N``
trials run, i.e. draw ``m`` of them with replacement, keep the one with the lowest validation loss,
report its validation ROC-AUC. The expectation is computed exactly from the order statistics
(``P(rank i wins) = ((N-i+1)/N)^m - ((N-i)/N)^m``); a 5-95% band comes from resampling.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import comet_movielens
from .progress import console, progress
from .report import markdown_table
from .store import write_json
from .tuning import config_tag, run_gate_study

NAME = "comet-tuning"
PAIRS = (("topk", "topk+"), ("hash", "hash+"))
METRIC = ("val", "auc")  # the validation metric whose expected best is reported
BOOTSTRAP = 2000


def expected_best(records: list[dict[str, Any]], budgets: np.ndarray) -> np.ndarray:
    """``E[metric of the lowest-val-loss trial among m drawn with replacement]`` for each ``m`` in ``budgets``."""
    ranked = sorted((r for r in records if math.isfinite(r["val_loss"])), key=lambda r: r["val_loss"])
    # Diverged trials count as draws that never win (as if their loss were +inf).
    n = len(records)
    values = np.array([r[METRIC[0]][METRIC[1]] for r in ranked])
    i = np.arange(len(ranked))[None, :]  # rank 0 = best
    m = budgets[:, None].astype(float)
    win = ((n - i) / n) ** m - ((n - i - 1) / n) ** m  # [budgets, ranked]
    return (win * values).sum(1) / win.sum(1)


def bootstrap_band(records: list[dict[str, Any]], budgets: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[2, len(budgets)]``: 5th and 95th percentile of the best-of-m metric over resamples."""
    rng = np.random.default_rng(seed)
    loss = np.array([r["val_loss"] for r in records])
    value = np.array([r[METRIC[0]][METRIC[1]] if math.isfinite(r["val_loss"]) else np.nan for r in records])
    band = np.empty((2, len(budgets)))
    for j, m in enumerate(budgets):
        draws = rng.integers(0, len(records), size=(BOOTSTRAP, int(m)))
        best = value[draws[np.arange(BOOTSTRAP), np.argmin(loss[draws], axis=1)]]
        band[:, j] = np.nanpercentile(best, [5, 95])
    return band


def budget_to_reach(curve: np.ndarray, budgets: np.ndarray, target: float) -> int | None:
    """Smallest ``m`` whose expected best metric is at least ``target`` (``None``: never within the trials)."""
    hits = np.flatnonzero(curve >= target - 1e-12)
    return int(budgets[hits[0]]) if hits.size else None


def load_trials(args: argparse.Namespace, config: dict[str, Any], gates: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The MovieLens trials of ``gates``: from results.json if it matches the settings, else from (or by
    running) the Optuna studies of ``comet-movielens`` in the same folder."""
    folder = args.movielens_out / "quick" if args.quick else args.movielens_out
    tag = config_tag(config)
    found: dict[str, list[dict[str, Any]]] = {}
    results = folder / "results.json"
    if results.exists():
        saved = json.loads(results.read_text())
        if saved.get("config_tag") == tag:
            found = {g: saved["trials"][g] for g in gates if len(saved["trials"].get(g, [])) >= config["trials"]}
    missing = [g for g in gates if g not in found]
    if missing:
        console.print(
            f"{NAME}: no finished comet-movielens trials for {', '.join(missing)} in {folder}; running them "
            f"({config['trials']} trials each; resumable)"
        )
        problem = comet_movielens.problem(config)
        with progress() as bar:
            task = bar.add_task(f"{NAME}: MovieLens random search", total=len(missing) * config["trials"])
            for gate in missing:
                url = f"sqlite:///{(folder / f'optuna-{gate}-{tag}.db').resolve()}"
                folder.mkdir(parents=True, exist_ok=True)
                found[gate] = run_gate_study(problem, gate, config["trials"], url, lambda: bar.advance(task))
    return {g: found[g][: config["trials"]] for g in gates}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="use (or run) the quick MovieLens studies")
    parser.add_argument("--trials", type=int, default=None, help="trials per gate to use (default: as comet-movielens)")
    parser.add_argument("--movielens-out", type=Path, default=Path("results/comet-movielens"), help="MovieLens folder")
    parser.add_argument("--out", type=Path, default=Path(f"results/{NAME}"), help="output folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    args.seeds = None
    config = comet_movielens.make_config(args)
    gates = [g for pair in PAIRS for g in pair]
    trials = load_trials(args, config, gates)
    n = min(len(t) for t in trials.values())
    budgets = np.arange(1, n + 1)
    curves = {g: expected_best(trials[g][:n], budgets) for g in gates}
    bands = {g: bootstrap_band(trials[g][:n], budgets) for g in gates}
    reach: list[dict[str, Any]] = []
    for plain, plus in PAIRS:
        for owner in (plain, plus):
            target = float(curves[owner][-1])  # what `owner` reaches with the whole budget
            need = {g: budget_to_reach(curves[g], budgets, target) for g in (plain, plus)}
            reach.append({"pair": [plain, plus], "target_from": owner, "target": target, "trials_needed": need})
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = [m for m in (1, 2, 5, 10, 20, 50, 100, 200, 500) if m <= n]
    command = f"sparsemoe reproduce {NAME}" + (" --quick" if args.quick else "")
    results = {
        "experiment": NAME,
        "command": command,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {"movielens_config": config, "metric": "validation ROC-AUC (T1) of the best trial by val loss"},
        "trials_per_gate": n,
        "expected_best": {g: curves[g].tolist() for g in gates},
        "band_5_95": {g: bands[g].tolist() for g in gates},
        "reach": reach,
    }
    write_json(out / "results.json", results)
    text = render(results, checkpoints)
    (out / "table.md").write_text(text)
    plot(results, out / f"{NAME}.png")
    print(text)
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / (NAME + '.png')}")
    return results


def _need(m: int | None, n: int) -> str:
    return f"> {n} (not reached)" if m is None else str(m)


def render(results: dict[str, Any], checkpoints: list[int]) -> str:
    n = results["trials_per_gate"]
    curves = results["expected_best"]
    rows = [[g, *(f"{curves[g][m - 1]:.4f}" for m in checkpoints)] for g in curves]
    reach_rows = [
        [
            f"{r['pair'][0]} vs {r['pair'][1]}",
            f"{r['target']:.4f} ({r['target_from']} at {n} trials)",
            *(_need(r["trials_needed"][g], n) for g in r["pair"]),
        ]
        for r in results["reach"]
    ]
    return (
        f"# {NAME}: tuning budget on MovieLens\n\nProduced by `{results['command']}` ({results['written']}) from "
        f"the comet-movielens random-search trials ({n} per gate). Expected best validation ROC-AUC (T1) of the "
        f"trial with the lowest validation loss among m random-search trials (exact bootstrap expectation).\n\n"
        + markdown_table(["gate", *(f"m={m}" for m in checkpoints)], rows)
        + "\n## Trials needed to reach a fixed target (expected best val ROC-AUC)\n\n"
        + markdown_table(["pair", "target", "plain gate needs", "+ gate needs"], reach_rows)
    )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PAIRS), figsize=(11, 4))
    budgets = np.arange(1, results["trials_per_gate"] + 1)
    for ax, pair in zip(axes, PAIRS, strict=True):
        for g, colour in zip(pair, ("tab:blue", "tab:red"), strict=True):
            ax.plot(budgets, results["expected_best"][g], color=colour, label=g)
            lo, hi = results["band_5_95"][g]
            ax.fill_between(budgets, lo, hi, color=colour, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("random-search trials m")
        ax.set_ylabel("expected best val ROC-AUC (T1)")
        ax.set_title(f"{pair[0]} vs {pair[1]} (MovieLens)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
