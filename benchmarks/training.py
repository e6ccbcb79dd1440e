"""End-to-end training throughput of the demo's MMoE (``sparsemoe demo``), per gate."""

from __future__ import annotations

from pathlib import Path

from sparsemoe import gates
from sparsemoe.experiments import demo

from . import report
from .report import Section
from .timing import Stat


def throughput(epochs: int, repeats: int, out_dir: Path) -> Section:
    """Training examples per second of ``demo.train_one`` (its fit loop, validation included), gates interleaved."""
    config = {**demo.DEFAULTS, "epochs": epochs, "gate_kwargs": demo.GATE_KWARGS}
    rows_per_epoch = len(demo.load_two_task_digits(0)["train_x"])
    names = gates.available()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names:
            result = demo.train_one(name, rep, config)
            samples[name].append(rows_per_epoch * epochs / result["seconds"])
    stats = {name: Stat.of(v) for name, v in samples.items()}
    rows = [[name, f"{s.median:,.0f} [{s.low:,.0f}–{s.high:,.0f}]"] for name, s in stats.items()]
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    med = [stats[n].median for n in names]
    err = [[stats[n].median - stats[n].low for n in names], [stats[n].high - stats[n].median for n in names]]
    ax.bar(names, med, yerr=err, capsize=3, color="tab:green")
    ax.set_ylabel("training examples / s")
    ax.set_title(f"Demo MMoE training throughput ({config['num_experts']} experts, batch {config['batch_size']})")
    ax.tick_params(axis="x", rotation=35)
    fig_name = report.save(fig, out_dir, "training_throughput.png")
    body = (
        f"`sparsemoe.experiments.demo.train_one` (the demo's MMoE on two-task digits: {config['num_experts']} "
        f"experts of width {config['d_expert']}, batch {config['batch_size']}, Adam) for {epochs} epochs, "
        f"{rows_per_epoch} training rows per epoch; throughput = rows × epochs ÷ the fit loop's seconds "
        f"(per-epoch validation included). Median [min–max] of {repeats} runs, gates interleaved.\n\n"
        + report.table(["gate", "examples / s"], rows)
        + f"\n![throughput]({fig_name})\n"
    )
    return Section("End-to-end training throughput (demo MMoE)", body, [fig_name])
