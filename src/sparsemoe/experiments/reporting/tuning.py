"""The random-search studies' (comet-movielens, comet-multimnist) tables and plots, and what they read of a trial."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ... import gates
from .common import fmt, markdown_table, pyplot, save_figure

#: one trained model: ``{"val_loss": float, "val": {metric: v}, "test": {metric: v}, "seconds": float, ...}``
Record = dict[str, Any]

#: a trial "reaches k" if it computed at most this many times k experts per input at its best epoch
#: (on the validation probe: :func:`val_active_experts`)
SATURATED = 1.05


def learns_sparsity(gate: str) -> bool:
    """Whether ``gate`` reaches k only once its smooth-steps saturate (the gate's ``sparsity`` trait).

    A problem may tune models that are not registered gates; those do not.
    """
    try:
        return gates.learns_sparsity(gate)
    except ValueError:
        return False


def val_active_experts(record: Record) -> float:
    """Experts computed per input on the validation probe at the best epoch (the weights early stopping
    restored). Model choices read this, not ``record["active_experts"]``, which the last forward of the
    test evaluation left."""
    return float(record["active_experts_per_epoch"][record["best_epoch"]])


def plot_saturation(results: dict[str, Any], path: Path) -> None:
    """Experts computed per input after each epoch, each seed of the best configuration (and of the best
    configuration that reached k, where that is another one), for the learned sparse gates."""
    plt = pyplot()

    gates = [g for g in results["best_runs"] if learns_sparsity(g)]
    k = results["config"].get("k")
    # One panel per gate: gates whose curves coincide (all at k) would hide each other on one axis.
    # Within a panel each seed has its own colour and marker, so equal seeds stay visible too.
    fig, axes = plt.subplots(
        1, max(len(gates), 1), figsize=(3.6 * max(len(gates), 1) + 0.6, 4.2), sharey=True, squeeze=False
    )
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for ax, gate in zip(axes[0], gates, strict=False):
        pick = results["summary"][gate].get("saturated")
        groups = [("best configuration", "-", results["best_runs"][gate])]
        if pick is not None and not pick["same_as_best"]:
            groups.append(("best configuration reaching k", "--", results["saturated_runs"][gate]))
        for what, ls, runs in groups:
            for j, run in enumerate(runs):
                curve = run["active_experts_per_epoch"]
                ax.plot(
                    range(1, len(curve) + 1),
                    curve,
                    color=f"C{j}",
                    ls=ls,
                    marker=markers[j % len(markers)],
                    # staggered: seed j marks epochs j, j + stride, ..., so coinciding seeds keep their markers
                    markevery=(j % len(runs), len(runs) * max(1, round(len(curve) / (8 * len(runs))))),
                    fillstyle="full" if ls == "-" else "none",
                    ms=4,
                    alpha=0.85,
                    lw=1,
                    label=f"seed {j}" if ls == "-" else (what if j == 0 else None),
                )
        if k is not None:
            ax.axhline(k, color="black", ls=":", lw=1, label=f"k = {k}")
        ax.set_title(gate, fontsize=10)
        ax.set_xlabel("epoch")
        ax.legend(loc="upper right", fontsize=7)
    ax0 = axes[0][0]
    ax0.set_ylim(0, results["config"].get("num_experts", 16) + 0.5)
    ax0.set_ylabel("experts computed per input (validation probe)")
    quick = " (quick)" if results["config"].get("quick") else ""
    fig.suptitle(
        f"{results['experiment']}{quick}: sparsity during training, one line per seed\n"
        "solid: best configuration; dashed, hollow markers: best configuration reaching k, where that is another one",
        fontsize=9,
    )
    if not gates:
        ax0.text(
            0.5, 0.5, "no learned sparse gate (DSelect-k, COMET, +) in this run", ha="center", transform=ax0.transAxes
        )
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def _sem(stat: dict[str, float], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sem']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def _counts(trials: dict[str, int]) -> str:
    """``{"topk": 100, "comet": 50, ...}`` as ``100 (topk, ...), 50 (comet, ...)``."""
    groups: dict[int, list[str]] = {}
    for gate, n in trials.items():
        groups.setdefault(n, []).append(gate)
    return ", ".join(f"{n} ({', '.join(g)})" for n, g in groups.items())


def produced_by(results: dict[str, Any]) -> str:
    """The command(s) that wrote ``results``: each merged run's, in order (rows added by ``--gates``)."""
    return ", then ".join(f"`{c}`" for c in results.get("commands", [results["command"]]))


def render_tables(results: dict[str, Any], metrics: list[tuple[str, str, bool]]) -> str:
    """The Markdown of table.md: top-5% (mean ± SE) and best configuration over seeds (mean ± std)."""
    cfg, summary = results["config"], results["summary"]
    headers = ["gate", *(label for _, label, _ in metrics)]
    top = [[g, *(_sem(s["top5"][k]) for k, _, _ in metrics)] for g, s in summary.items()]
    best = [
        [
            g,
            *(fmt(s["best"][k]) for k, _, _ in metrics),
            f"{s['active_experts']['mean']:.2f}",
            f"{s['best_epoch']['mean']:.1f} / {s['epochs_run']['mean']:.1f}",
        ]
        for g, s in summary.items()
    ]
    n_top = {s["top5"]["n"] for s in summary.values()}
    hours = results["cost"]["training_seconds_total"] / 3600
    return (
        f"# {results['experiment']}\n\nProduced by {produced_by(results)} ({results['written']}); "
        f"random-search trials per gate: {_counts(cfg['trials_per_gate'])}; best configuration retrained over "
        f"{cfg['seeds']} seeds; total training time {hours:.2f} h (single thread).\n\n"
        f"## Test metrics over the top 5% of trials by validation loss (mean ± standard error, "
        f"{'/'.join(map(str, sorted(n_top)))} trials)\n\n"
        + markdown_table(headers, top)
        + f"\n## Test metrics at the best configuration, {cfg['seeds']} seeds (mean ± std)\n\n"
        + markdown_table([*headers, "experts / input (last test batch)", "best epoch / epochs run"], best)
        + _saturated_table(results, metrics)
        + _gamma_table(results)
    )


def _saturated_table(results: dict[str, Any], metrics: list[tuple[str, str, bool]]) -> str:
    """Learned-sparse gates at compute parity: the best trial among those that reached k."""
    summary, cfg = results["summary"], results["config"]
    rows = []
    for gate, s in summary.items():
        if "saturated" not in s:
            continue
        pick = s["saturated"]
        if pick is None:
            rows.append([gate, *("" for _ in metrics), "no trial reached k", ""])
            continue
        rows.append(
            [
                gate,
                *(fmt(pick["test"][key]) for key, _, _ in metrics),
                f"{pick['active_experts']['mean']:.2f}",
                "yes" if pick["same_as_best"] else "no",
            ]
        )
    if not rows:
        return ""
    return (
        f"\n## Learned-sparse gates at the same compute: the best trial among those that computed at most "
        f"{SATURATED:g}·k experts per input on the validation probe at their best epoch (k = {cfg.get('k')}), "
        f"{cfg['seeds']} seeds (mean ± std)\n\n"
        + markdown_table(
            [
                "gate",
                *(label for _, label, _ in metrics),
                "experts / input (last test batch)",
                "same as the best configuration",
            ],
            rows,
        )
    )


def _gamma_table(results: dict[str, Any]) -> str:
    """Why a learned-sparse gate does or does not reach k: its trials grouped by smooth-step gamma."""
    k = results["config"].get("k")
    rows = []
    for gate, trials in results["trials"].items():
        if not learns_sparsity(gate) or not k:
            continue
        groups: dict[float, list[Record]] = {}
        for t in trials:
            if "gamma" in t["params"] and math.isfinite(t["val_loss"]):
                groups.setdefault(t["params"]["gamma"], []).append(t)
        for gamma, group in sorted(groups.items()):
            active = [val_active_experts(t) for t in group]
            rows.append(
                [
                    gate,
                    f"{gamma:g}",
                    str(len(group)),
                    f"{np.mean(active):.2f} [{min(active):.2f}-{max(active):.2f}]",
                    f"{sum(a <= SATURATED * k for a in active)}/{len(group)}",
                    f"{np.mean([t['best_epoch'] + 1 for t in group]):.1f}",
                    f"{min(t['val_loss'] for t in group):.4f}",
                ]
            )
    if not rows:
        return ""
    return (
        "\n## Learned-sparse gates: trials by smooth-step gamma (experts per input on the validation probe at the "
        "best epoch)\n\n"
        + markdown_table(
            [
                "gate",
                "gamma",
                "trials",
                "experts / input, mean [min-max]",
                f"trials at <= {SATURATED:g}·k",
                "mean best epoch",
                "lowest val loss",
            ],
            rows,
        )
    )


def plot_results(results: dict[str, Any], metrics: list[tuple[str, str, bool]], path: Path) -> None:
    """Headline metric per gate (top-5% and best-config) and the validation-loss spread of all trials."""
    plt = pyplot()

    key, label, _ = metrics[0]
    summary, trials = results["summary"], results["trials"]
    names = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(names))
    top = [summary[g]["top5"][key] for g in names]
    bst = [summary[g]["best"][key] for g in names]
    ax1.bar(x - 0.2, [s["mean"] for s in top], 0.4, yerr=[s["sem"] for s in top], capsize=3, label="top 5% (± SE)")
    ax1.bar(x + 0.2, [s["mean"] for s in bst], 0.4, yerr=[s["std"] for s in bst], capsize=3, label="best cfg (± std)")
    lows = [s["mean"] for s in top + bst]
    ax1.set_ylim(min(lows) - 0.02 * abs(min(lows)) - 0.01, max(lows) + 0.02 * abs(max(lows)) + 0.01)
    ax1.set_xticks(x, names, rotation=35)
    ax1.set_ylabel(f"test {label}")
    ax1.legend()
    ax1.set_title(results["experiment"])
    losses = [[t["val_loss"] for t in trials[g] if math.isfinite(t["val_loss"])] for g in names]
    ax2.boxplot(losses, tick_labels=names)
    ax2.tick_params(axis="x", rotation=35)
    ax2.set_ylabel("validation loss of each trial")
    ax2.set_title("random-search trials")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
