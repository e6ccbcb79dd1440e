"""The demo's table and figure: quality and sparsity per gate (from its results' summary and runs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import gates as gate_registry
from ...atomic import save_figure
from .common import fmt, markdown_table

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure

TASKS = ("digit >= 5", "digit is even")


def table(summary: dict[str, dict[str, Any]]) -> str:
    """The Markdown results table: one row per gate."""
    headers = ["gate", *(f"ROC-AUC: {t}" for t in TASKS), "mean ROC-AUC", "active experts / input", "train time (s)"]
    rows = [
        [
            gate,
            *(fmt(s[f"auc_task{t + 1}"]) for t in range(len(TASKS))),
            fmt(s["mean_auc"]),
            f"{s['active_experts']['mean']:.2f}",
            f"{s['seconds']['mean']:.1f}",
        ]
        for gate, s in summary.items()
    ]
    return markdown_table(headers, rows)


def figure(summary: dict[str, dict[str, Any]], records: list[dict[str, Any]], config: dict[str, Any]) -> Figure:
    """Quality and sparsity per gate, side by side.

    Quality is drawn as points (mean over seeds, whiskers ±1 std, each seed a small dot) on a range
    set by the data (every seed and whisker, plus a margin); read the axis, not the gaps, for sizes.
    When some gates trail far behind the rest (see :func:`_leaders`), a second quality panel zooms
    on the leading gates, whose differences would otherwise be squeezed into a few pixels. Sparsity
    bars start at 0, with each gate's ``k`` marked on its bar. Legends sit below the axes, clear of
    the data. A bare ``Figure`` (no pyplot) leaves matplotlib's process-wide backend alone.
    """
    from matplotlib.figure import Figure

    names = list(summary)
    seeds = config["seeds"]
    leaders = _leaders(summary)
    zoom = len(leaders) < len(names)
    fig = Figure(figsize=(16 if zoom else 11, 4.8))
    axes = list(fig.subplots(1, 3 if zoom else 2))
    spread = f"whiskers: ±1 std over {seeds} seeds" if seeds > 1 else "one seed: no spread shown"

    def quality(ax: Any, gates: list[str], title: str) -> None:
        x = np.arange(len(gates))
        for i, gate in enumerate(gates):
            per_seed = [r["mean_auc"] for r in records if r["gate"] == gate]
            ax.scatter(
                np.full(len(per_seed), i + 0.18),
                per_seed,
                s=10,
                color="grey",
                zorder=2,
                label="one seed" if i == 0 else None,
            )
        means = [summary[g]["mean_auc"]["mean"] for g in gates]
        stds = [summary[g]["mean_auc"]["std"] for g in gates]
        ax.errorbar(x, means, yerr=stds, fmt="o", color="tab:blue", capsize=4, zorder=3, label=f"mean ({spread})")
        values = [r["mean_auc"] for r in records if r["gate"] in gates]
        values += [m - s for m, s in zip(means, stds, strict=True)] + [m + s for m, s in zip(means, stds, strict=True)]
        low, high = min(values), max(values)
        margin = 0.08 * (high - low) or 0.005
        ax.set_ylim(low - margin, min(high + margin, 1.0 + margin / 2))
        ax.set_ylabel("test ROC-AUC, mean of the 2 tasks")
        ax.set_title(title)
        ax.set_xticks(x, gates, rotation=35, ha="right")

    quality(axes[0], names, "Quality")
    if zoom:
        quality(axes[1], leaders, "Quality, zoomed on the leading gates")
    ax2 = axes[-1]
    x = np.arange(len(names))
    active = [summary[g]["active_experts"]["mean"] for g in names]
    ax2.bar(x, active, color="tab:orange", label="experts computed per test input (mean over seeds)")
    ax2.axhline(config["num_experts"], color="grey", linestyle="--", label=f"all {config['num_experts']} experts")
    ks = [_gate_k(g, config) for g in names]
    ax2.hlines(ks, x - 0.4, x + 0.4, color="black", linewidth=2, label="the gate's k")
    ax2.set_ylim(0, config["num_experts"] * 1.1)
    ax2.set_ylabel("experts computed per input")
    ax2.set_title("Sparsity")
    ax2.set_xticks(x, names, rotation=35, ha="right")

    for ax in axes:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize="small", frameon=False)
    quick = " (quick run)" if config["quick"] else ""
    fig.suptitle(
        f"sparsemoe demo{quick}: MMoE on two-task digits, {config['num_experts']} experts, "
        f"{config['epochs']} epochs, {seeds} seed(s)"
    )
    return fig


def _leaders(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The gates whose mean ROC-AUC is within 10 median seed-stds (at least 0.005) of the best one:
    the cluster a zoomed panel shows, leaving out gates far behind it."""
    means = {g: s["mean_auc"]["mean"] for g, s in summary.items()}
    width = max(10 * float(np.median([s["mean_auc"]["std"] for s in summary.values()])), 0.005)
    best = max(means.values())
    return [g for g, m in means.items() if m >= best - width]


def _gate_k(gate: str, config: dict[str, Any]) -> int:
    """The ``k`` of ``gate`` as the demo built it (the softmax gate: all experts)."""
    spec = gate_registry.parse(gate)
    options = config["gate_kwargs"].get(spec.name, {})
    return int(gate_registry.build(spec.name, 8, config["num_experts"], **options).k)


def plot(summary: dict[str, dict[str, Any]], records: list[dict[str, Any]], config: dict[str, Any], path: Path) -> None:
    """Write :func:`figure` to ``path`` (PNG), cropped to its content so no label or legend is cut off."""
    save_figure(figure(summary, records, config), path, dpi=120, bbox_inches="tight")
