"""The MoEBERT SST-2 study's per-model details, table and accuracy/throughput plot.

``config``: the study's ``Config`` (not imported: the study imports this module).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from .common import fmt_value, markdown_table, pyplot, save_figure

NAME = "moebert-sst2"

QUICK_ROWS = {"train": 128, "test": 32}


def details(summary: dict[str, dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: accuracy minus the teacher's, how many seeds miss MoEBERT's goal (more than 1 point
    below the teacher: a mean within it can hide single seeds that are not), experts computed per
    token, training time over its seeds."""
    teacher = summary.get("dense", {}).get("accuracy")
    out: dict[str, dict[str, Any]] = {}
    for name, row in summary.items():
        runs = [r for r in records if r["model"] == name]
        per_layer = [statistics.fmean(r["active_experts_per_token"]) for r in runs if r.get("active_experts_per_token")]
        out[name] = {
            "vs_teacher": None if teacher is None or name == "dense" else row["accuracy"] - teacher,
            "seeds_over_1_point_below": None
            if teacher is None or name == "dense"
            else sum(r["test_accuracy"] < teacher - 1 for r in runs),
            "experts_per_token": statistics.fmean(per_layer) if per_layer else None,
            "train_minutes": sum(r["train_seconds"] for r in runs) / 60,
        }
    return out


def table(config: Any, summary: dict[str, dict[str, Any]], details: dict[str, dict[str, Any]]) -> str:
    title = f"# {NAME}{' (quick smoke run: numbers mean nothing)' if config.quick else ''}\n\n"
    headers = [
        "model",
        "test accuracy % (mean ± std)",
        "− teacher",
        "seeds",
        "seeds > 1 point below teacher",
        "params",
        "active params / token",
        "experts / token",
        "sentences/s",
        "train min (all seeds)",
    ]
    rows = [
        [
            name,
            f"{s['accuracy']:.2f} ± {fmt_value(s['accuracy_std'])}",
            "" if details[name]["vs_teacher"] is None else f"{details[name]['vs_teacher']:+.2f}",
            s["seeds"],
            ""
            if details[name]["seeds_over_1_point_below"] is None
            else f"{details[name]['seeds_over_1_point_below']}/{s['seeds']}",
            f"{s['params'] / 1e6:.2f}M",
            f"{s['active_params_per_token'] / 1e6:.2f}M",
            fmt_value(details[name]["experts_per_token"]),
            fmt_value(s["sentences_per_second"], 1),
            f"{details[name]['train_minutes']:.1f}",
        ]
        for name, s in summary.items()
    ]
    total = sum(d["train_minutes"] for d in details.values())
    note = (
        f"\nSST-2 test.tsv (GLUE validation, {QUICK_ROWS['test'] if config.quick else 872} sentences); "
        f"dense = the fine-tuned all-MiniLM-L6-v2 teacher ({config.teacher_steps} steps); students: "
        f"{config.num_experts} experts x {config.expert_dim} neurons ({config.shared} shared), k={config.k}, "
        f"{config.student_steps} distillation steps, std over seeds. Throughput: inference over test.tsv in "
        f"batches of 64, models interleaved in one process, median of {config.throughput_rounds} rounds. "
        f"Experts / token: experts computed per real token, averaged over the MoE layers (4 = all). "
        f"Single-thread training time of the whole study: {total:.0f} min (each run's training time on one thread, "
        f"added up; runs in parallel processes overlap in wall clock).\n"
    )
    return title + markdown_table(headers, rows) + note


def plot(config: Any, summary: dict[str, dict[str, Any]], threads: int, path: Path) -> None:
    plt = pyplot()

    names = list(summary)
    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    acc = [summary[n]["accuracy"] for n in names]
    std = [summary[n]["accuracy_std"] or 0.0 for n in names]
    colors = ["0.4" if n == "dense" else f"C{i}" for i, n in enumerate(names)]
    for x, (a, e, c) in enumerate(zip(acc, std, colors, strict=True)):
        ax_acc.errorbar([x], [a], yerr=[e], fmt="o", color=c, capsize=5, markersize=7)
    if "dense" in summary:
        teacher = summary["dense"]["accuracy"]
        ax_acc.axhline(teacher, color="0.4", ls="--", lw=1, label="dense teacher")
        ax_acc.axhspan(teacher - 1, teacher, color="0.4", alpha=0.12, label="within 1 point below the teacher (goal)")
    low, high = min(a - e for a, e in zip(acc, std, strict=True)), max(a + e for a, e in zip(acc, std, strict=True))
    ax_acc.set_ylim(low - 2, high + 2)
    ax_acc.set_xticks(range(len(names)), names)
    ax_acc.set_xlim(-0.5, len(names) - 0.5)
    ax_acc.set_ylabel("SST-2 test accuracy (%)")
    ax_acc.set_title("accuracy (bars: std over seeds; dense: one run)")
    ax_acc.grid(axis="y", alpha=0.3)
    speed = [summary[n]["sentences_per_second"] or math.nan for n in names]
    ax_speed.bar(names, speed, color=colors)
    ax_speed.set_ylabel("sentences / s (inference, in-process)")
    ax_speed.set_title(f"throughput ({threads} thread(s))")
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle(f"MoEBERT on SST-2, MiniLM-L6, 4 experts{' (quick smoke run)' if config.quick else ''}")
    save_figure(fig, path, dpi=120)
