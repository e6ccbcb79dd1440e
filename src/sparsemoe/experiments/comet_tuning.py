"""COMET paper's tuning-budget claim: Top-k vs Top-k+ and Hash vs Hash+ as a function of random-search trials.

Reuses the MovieLens random-search trials of ``comet-movielens`` (no new training when they exist).
The expected best validation score after ``m`` trials is the bootstrap expectation over the ``N``
trials run: draw ``m`` of them with replacement and keep the best score (as in Dodge et al. 2019,
"expected validation performance"). Two scores: the validation loss the search minimises (both
tasks) and the validation ROC-AUC of task 1. The expectation is computed exactly from the order
statistics (``P(rank i is the best of m) = ((N-i)/N)^m - ((N-i-1)/N)^m``, ranks from 0); a 5-95%
band comes from resampling.
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
from .tuning import config_tag, experiment_config, run_gate_study

NAME = "comet-tuning"
PAIRS = (("topk", "topk+"), ("hash", "hash+"))
#: name -> (label, higher is better)
SCORES = {"val_auc": ("val ROC-AUC (T1)", True), "val_loss": ("val loss (both tasks)", False)}
BOOTSTRAP = 2000
#: trials per gate: twice comet-movielens' 50, so a budget ratio up to 100x is measurable at all
DEFAULT_TRIALS = 50


def scores(records: list[dict[str, Any]], name: str) -> np.ndarray:
    """``[N]`` validation scores of the trials; a diverged trial scores NaN (it never wins)."""
    out = []
    for r in records:
        ok = math.isfinite(r["val_loss"])
        out.append((r["val"]["auc"] if name == "val_auc" else r["val_loss"]) if ok else math.nan)
    return np.array(out, dtype=float)


def expected_best(values: np.ndarray, budgets: np.ndarray, higher: bool) -> np.ndarray:
    """``E[best of m values drawn with replacement]`` for each ``m`` in ``budgets`` (NaNs never win)."""
    n = len(values)
    finite = np.sort(values[np.isfinite(values)])
    ranked = finite[::-1] if higher else finite  # rank 0 = best
    i = np.arange(len(ranked))[None, :]
    m = budgets[:, None].astype(float)
    win = ((n - i) / n) ** m - ((n - i - 1) / n) ** m  # [budgets, ranked]
    return (win * ranked).sum(1) / win.sum(1)


def bootstrap_band(values: np.ndarray, budgets: np.ndarray, higher: bool, seed: int = 0) -> np.ndarray:
    """``[2, len(budgets)]``: 5th and 95th percentile of the best of ``m`` resampled values."""
    rng = np.random.default_rng(seed)
    band = np.empty((2, len(budgets)))
    for j, m in enumerate(budgets):
        draws = values[rng.integers(0, len(values), size=(BOOTSTRAP, int(m)))]
        best = (np.fmax if higher else np.fmin).reduce(draws, axis=1)  # NaN only if every draw is NaN
        band[:, j] = np.nanpercentile(best, [5, 95])
    return band


def budget_to_reach(curve: np.ndarray, budgets: np.ndarray, target: float, higher: bool) -> int | None:
    """Smallest ``m`` whose expected best score reaches ``target`` (``None``: never within the trials)."""
    hits = np.flatnonzero(curve >= target - 1e-12) if higher else np.flatnonzero(curve <= target + 1e-12)
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
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help=f"trials per gate (default {DEFAULT_TRIALS}, quick: as comet-movielens --quick); missing ones are run",
    )
    parser.add_argument("--movielens-out", type=Path, default=Path("results/comet-movielens"), help="MovieLens folder")
    parser.add_argument("--out", type=Path, default=Path(f"results/{NAME}"), help="output folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    args.seeds = None
    if args.trials is None and not args.quick:
        args.trials = DEFAULT_TRIALS
    config = experiment_config(args, comet_movielens.DEFAULTS, comet_movielens.QUICK)
    gates = [g for pair in PAIRS for g in pair]
    trials = load_trials(args, config, gates)
    n = min(len(t) for t in trials.values())
    budgets = np.arange(1, n + 1)
    curves: dict[str, dict[str, list[float]]] = {}
    bands: dict[str, dict[str, list[list[float]]]] = {}
    reach: list[dict[str, Any]] = []
    for score, (_, higher) in SCORES.items():
        values = {g: scores(trials[g][:n], score) for g in gates}
        curve = {g: expected_best(values[g], budgets, higher) for g in gates}
        curves[score] = {g: c.tolist() for g, c in curve.items()}
        bands[score] = {g: bootstrap_band(values[g], budgets, higher).tolist() for g in gates}
        for plain, plus in PAIRS:
            for owner in (plain, plus):
                target = float(curve[owner][-1])  # what `owner` reaches with the whole budget
                need = {g: budget_to_reach(curve[g], budgets, target, higher) for g in (plain, plus)}
                reach.append(
                    {
                        "score": score,
                        "pair": [plain, plus],
                        "target_from": owner,
                        "target": target,
                        "trials_needed": need,
                    }
                )
    out = args.out / "quick" if args.quick else args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = [m for m in (1, 2, 5, 10, 20, 50, 100, 200, 500) if m <= n]
    command = f"sparsemoe reproduce {NAME}" + (" --quick" if args.quick else f" --trials {n}")
    results = {
        "experiment": NAME,
        "command": command,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {"movielens_config": config, "scores": {k: v[0] for k, v in SCORES.items()}},
        "trials_per_gate": n,
        # Training time of the trials used; those also in comet-movielens (its first trials) are not extra cost.
        "cost": {"training_seconds_of_trials_used": sum(r["seconds"] for g in gates for r in trials[g][:n])},
        "expected_best": curves,
        "band_5_95": bands,
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
    parts = [
        f"# {NAME}: tuning budget on MovieLens\n\nProduced by `{results['command']}` ({results['written']}) from the "
        f"comet-movielens random-search trials ({n} per gate). Expected best validation score among m random-search "
        "trials (exact bootstrap expectation over the trials).\n"
    ]
    for score, (label, higher) in SCORES.items():
        curves = results["expected_best"][score]
        rows = [[g, *(f"{curves[g][m - 1]:.4f}" for m in checkpoints)] for g in curves]
        parts.append(f"\n## Expected best {label} ({'higher' if higher else 'lower'} is better)\n\n")
        parts.append(markdown_table(["gate", *(f"m={m}" for m in checkpoints)], rows))
    reach_rows = [
        [
            SCORES[r["score"]][0],
            f"{r['pair'][0]} vs {r['pair'][1]}",
            f"{r['target']:.4f} ({r['target_from']} at {n} trials)",
            *(_need(r["trials_needed"][g], n) for g in r["pair"]),
        ]
        for r in results["reach"]
    ]
    parts.append(
        "\n## Trials needed to reach a fixed target (the expected best score of one gate at the full budget)\n\n"
    )
    parts.append(markdown_table(["score", "pair", "target", "plain gate needs", "+ gate needs"], reach_rows))
    return "".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SCORES), len(PAIRS), figsize=(11, 7.5), squeeze=False)
    budgets = np.arange(1, results["trials_per_gate"] + 1)
    for row, (score, (label, _)) in enumerate(SCORES.items()):
        for ax, pair in zip(axes[row], PAIRS, strict=True):
            for g, colour in zip(pair, ("tab:blue", "tab:red"), strict=True):
                ax.plot(budgets, results["expected_best"][score][g], color=colour, label=g)
                lo, hi = results["band_5_95"][score][g]
                ax.fill_between(budgets, lo, hi, color=colour, alpha=0.15)
            ax.set_xscale("log")
            ax.set_xlabel("random-search trials m")
            ax.set_ylabel(f"expected best {label}")
            ax.set_title(f"{pair[0]} vs {pair[1]} (MovieLens)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
