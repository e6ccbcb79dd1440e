"""The comet-tuning study's budget tables and expected-score curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import markdown_table, pyplot, save_figure

NAME = "comet-tuning"

PAIRS = (("topk", "topk+"), ("hash", "hash+"))

#: name -> (label, higher is better); what each curve reports at the trial picked among m
SCORES = {
    "val_loss": ("best val loss (both tasks)", False),
    "val_auc": ("best val ROC-AUC (T1)", True),
    "picked_test_auc": ("test ROC-AUC (T1) of the trial with the lowest val loss", True),
}

BOOTSTRAP = 2000

#: resamples of the N trials behind the interval of the trials-needed ratio
RATIO_BOOTSTRAP = 1000


def _need(m: int | None, n: int) -> str:
    return f"> {n} (not reached)" if m is None else str(m)


def _ratio_cell(reach: dict[str, Any]) -> str:
    if "ratio" not in reach:
        return ""
    lo, hi = reach["ratio_5_95"]
    return f"{reach['ratio']:.2f} [{lo:.2f}, {hi:.2f}]"


def render(results: dict[str, Any]) -> str:
    n = results["trials_per_gate"]
    checkpoints = [m for m in (1, 2, 5, 10, 20, 50, 100, 200, 500) if m <= n]  # table columns: m trials
    quick = " (quick)" if results["config"]["quick"] else ""
    parts = [
        f"# {NAME}{quick}: tuning budget on MovieLens\n\nProduced by `{results['command']}` ({results['written']}) "
        f"from the comet-movielens random-search trials ({n} per gate). Each value is the exact expectation over "
        "searches of m trials drawn with replacement from those run; in brackets, the 5-95% range of the same "
        f"quantity over {BOOTSTRAP} bootstrap resamples of m trials (how much one search of that size varies).\n"
    ]
    for score, (label, higher) in SCORES.items():
        curves, bands = results["expected"][score], results["band_5_95"][score]
        rows = [
            [g, *(f"{curves[g][m - 1]:.4f} [{bands[g][0][m - 1]:.4f}, {bands[g][1][m - 1]:.4f}]" for m in checkpoints)]
            for g in curves
        ]
        parts.append(f"\n## Expected {label} among m trials ({'higher' if higher else 'lower'} is better)\n\n")
        parts.append(markdown_table(["gate", *(f"m={m}" for m in checkpoints)], rows))
    reach_rows = [
        [
            SCORES[r["score"]][0],
            f"{r['pair'][0]} vs {r['pair'][1]}",
            f"{r['target']:.4f} ({r['target_from']} at {n} trials)",
            *(_need(r["trials_needed"][g], n) for g in r["pair"]),
            _ratio_cell(r),
        ]
        for r in results["reach"]
    ]
    parts.append(
        "\n## Trials needed to reach a fixed target (one gate's expected score at the full budget)\n\n"
        f"Ratio: trials the plain gate needs ÷ trials the + gate needs for the plain gate's target, with its 5-95% "
        f"interval over {results['config'].get('ratio_bootstrap_resamples', RATIO_BOOTSTRAP)} resamples of the "
        f"{n} trials of each gate (0: the + gate does not reach it).\n\n"
    )
    parts.append(
        markdown_table(["score", "pair", "target", "plain gate needs", "+ gate needs", "ratio [5-95%]"], reach_rows)
    )
    return "".join(parts)


def plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(len(SCORES), len(PAIRS), figsize=(11, 3.4 * len(SCORES)), squeeze=False)
    budgets = np.arange(1, results["trials_per_gate"] + 1)
    for row, (score, (label, _)) in enumerate(SCORES.items()):
        for ax, pair in zip(axes[row], PAIRS, strict=True):
            for g, colour in zip(pair, ("tab:blue", "tab:red"), strict=True):
                ax.plot(budgets, results["expected"][score][g], color=colour, label=f"{g} (expectation)")
                lo, hi = results["band_5_95"][score][g]
                ax.fill_between(budgets, lo, hi, color=colour, alpha=0.15, label=f"{g} 5-95% of resamples")
            ax.set_xscale("log")
            ax.set_xlabel("random-search trials m")
            ax.set_ylabel(label if len(label) < 30 else label.replace(" of the", "\nof the"), fontsize=8)
            ax.set_title(f"{pair[0]} vs {pair[1]} (MovieLens)", fontsize=9)
            ax.legend(fontsize=7, loc="best")
    quick = " (quick)" if results["config"]["quick"] else ""
    fig.suptitle(
        f"{NAME}{quick}: lines = exact expectation over searches of m trials; "
        f"bands = 5-95% over {BOOTSTRAP} bootstrap searches of m trials",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
