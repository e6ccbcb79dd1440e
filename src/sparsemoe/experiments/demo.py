"""sparsemoe demo: every gate in an MMoE on a two-task problem from scikit-learn's digits.

Task 1: "the digit is >= 5"; task 2: "the digit is even". Both binary, scored by ROC-AUC on a
held-out test split. The data ships with scikit-learn, so the demo needs no download.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import gates as gate_registry
from .._atomic import atomic_write_text, save_figure
from ..layers import MultiTaskMoE
from ..models import MMoE
from ..training import fit
from .config import ConfigError, validate
from .progress import console, progress
from .report import fmt, markdown_table, mean_std
from .store import RunStore, write_json

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure

NAME = "demo"
TASKS = ("digit >= 5", "digit is even")
DEFAULTS: dict[str, Any] = {
    "epochs": 60,
    "batch_size": 64,
    "lr": 3e-3,
    "num_experts": 8,
    "d_expert": 32,
    "tower_hidden": 16,
}
QUICK: dict[str, Any] = {"epochs": 4}
#: per-gate options: k=2 where the gate has a k (hash: 1, as in Hash layers); top-k without noise
GATE_KWARGS: dict[str, dict[str, object]] = {
    "topk": {"k": 2, "noisy": False},
    "hash": {"k": 1},
    "random": {"k": 2},
    "expert_choice": {"k": 2},
    "dselect_k": {"k": 2},
    "comet": {"k": 2},
}


@dataclass
class Config:
    """Options of ``sparsemoe demo`` (each field is a command-line option of the same name)."""

    quick: bool = field(default=False, metadata={"help": "a few epochs and one seed (smoke test); writes to OUT/quick"})
    out: Path = field(
        default=Path("sparsemoe-out/demo"),
        metadata={"help": "output folder (untracked by git); --out results/demo regenerates the committed results"},
    )
    seeds: int = field(default=3, metadata={"help": "seeds per gate; --quick uses 1", "min": 1})
    gates: list[str] = field(
        default_factory=gate_registry.trainable, metadata={"help": "gates to run; NAME+ adds local search"}
    )
    epochs: int | None = field(
        default=None,
        metadata={
            "help": f"training epochs; default {DEFAULTS['epochs']}, or {QUICK['epochs']} with --quick",
            "min": 1,
        },
    )
    fresh: bool = field(default=False, metadata={"help": "train every run again instead of reusing saved runs"})

    def __post_init__(self) -> None:
        validate(self)
        if not self.gates:
            raise ConfigError("gates", f"name at least one gate; available: {' '.join(gate_registry.available())}")
        for name in self.gates:
            try:
                gate_registry.parse(name)  # unknown names fail before any training; "name+" adds local search
            except ValueError as err:
                raise ConfigError("gates", str(err)) from None
        if len(set(self.gates)) < len(self.gates):
            raise ConfigError("gates", f"lists a gate twice ({' '.join(self.gates)}); name each gate once")

    @property
    def seed_count(self) -> int:
        """Seeds actually run: one for a quick run."""
        return 1 if self.quick else self.seeds

    @property
    def epoch_count(self) -> int:
        """Epochs actually trained: ``epochs`` if given, else the (quick) default."""
        if self.epochs is not None:
            return self.epochs
        return QUICK["epochs"] if self.quick else DEFAULTS["epochs"]


def load_two_task_digits(seed: int) -> dict[str, torch.Tensor]:
    """Digits split 60/20/20 (stratified by digit), pixels scaled to [0, 1].

    Shape: ``*_x`` is ``[rows, 64]`` float32, ``*_y`` is ``[rows, 2]`` (one 0/1 column per task).
    """
    # scikit-learn is imported here, not at the top, so that ``sparsemoe demo --help`` stays fast
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = np.stack([digits.target >= 5, digits.target % 2 == 0], axis=1).astype(np.float32)
    idx = np.arange(len(x))
    train, rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=digits.target)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=digits.target[rest])
    return {
        f"{part}_{what}": torch.from_numpy(arr[rows])
        for part, rows in (("train", train), ("val", val), ("test", test))
        for what, arr in (("x", x), ("y", y))
    }


def train_one(gate: str, seed: int, config: dict[str, Any]) -> dict[str, Any]:
    """Train one MMoE with ``gate`` and return its test metrics.

    ``config`` holds ``DEFAULTS``' keys (with the epochs to train) and ``gate_kwargs``.
    """
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(seed)
    data = load_two_task_digits(seed)
    d_in = data["train_x"].shape[1]
    moe = MultiTaskMoE(
        d_in,
        config["d_expert"],
        config["num_experts"],
        len(TASKS),
        gate=gate,
        **config["gate_kwargs"].get(gate_registry.parse(gate).name, {}),
    )
    model = MMoE(moe, config["tower_hidden"], [1] * len(TASKS))

    def task_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.cat(model(x), dim=1)
        return F.binary_cross_entropy_with_logits(logits, y)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        return task_loss(data["train_x"][rows], data["train_y"][rows]) + model.aux_loss()

    result = fit(
        model,
        batch_loss,
        len(data["train_x"]),
        lambda: task_loss(data["val_x"], data["val_y"]).item(),
        epochs=config["epochs"],
        lr=config["lr"],
        batch_size=config["batch_size"],
        seed=seed,
    )
    with torch.no_grad():
        scores = torch.sigmoid(torch.cat(model(data["test_x"]), dim=1)).numpy()
    routings = model.moe.last_routing
    if routings is None:  # cannot happen after the forward above; narrows the type
        raise RuntimeError("the MMoE recorded no routing in its test forward")
    active = float(np.mean([r.num_pairs / r.num_inputs for r in routings]))
    aucs = [float(roc_auc_score(data["test_y"][:, t].numpy(), scores[:, t])) for t in range(len(TASKS))]
    return {
        "gate": gate,
        "seed": seed,
        "auc": aucs,
        "mean_auc": float(np.mean(aucs)),
        "active_experts": active,
        "seconds": result.seconds,
        "best_epoch": result.best_epoch,
    }


def summarise(records: list[dict[str, Any]], gate_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per gate: mean/std over seeds of each metric (gates without runs are left out)."""
    summary = {}
    for gate in gate_names:
        runs = [r for r in records if r["gate"] == gate]
        if runs:
            summary[gate] = {
                **{f"auc_task{t + 1}": mean_std([r["auc"][t] for r in runs]) for t in range(len(TASKS))},
                "mean_auc": mean_std([r["mean_auc"] for r in runs]),
                "active_experts": mean_std([r["active_experts"] for r in runs]),
                "seconds": mean_std([r["seconds"] for r in runs]),
            }
    return summary


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


def run(config: Config) -> dict[str, Any]:
    """Train every (gate, seed) not saved yet, then write results.json, table.md and demo.png.

    Returns the results dict written to results.json (config, per-gate summary, every run).
    """
    gate_names = list(config.gates)
    seeds, epochs = config.seed_count, config.epoch_count
    settings: dict[str, Any] = {
        **DEFAULTS,
        "epochs": epochs,
        "seeds": seeds,
        "gates": gate_names,
        "quick": config.quick,
        "gate_kwargs": GATE_KWARGS,
    }
    out = config.out / "quick" if config.quick else config.out
    if config.fresh:
        RunStore(out).clear()
    store = RunStore(out, asdict(config), selection=("quick", "out", "seeds", "gates", "fresh", "epochs"))
    keys = [RunStore.key(gate=gate, seed=seed, epochs=epochs) for gate in gate_names for seed in range(seeds)]
    if note := store.reuse_note(keys, "--fresh to retrain"):
        console.print(note, soft_wrap=True)
    records = []
    with progress() as bar:
        task = bar.add_task("demo: training", total=len(gate_names) * seeds)
        for gate in gate_names:
            for seed in range(seeds):
                key = RunStore.key(gate=gate, seed=seed, epochs=epochs)
                record = store.get(key)
                if record is None:
                    bar.update(task, description=f"demo: {gate} (seed {seed})")
                    record = train_one(gate, seed, settings)
                    store.put(key, record)
                    bar.console.log(
                        f"{gate} seed {seed}: mean ROC-AUC {record['mean_auc']:.4f}, "
                        f"{record['active_experts']:.2f} experts/input, {record['seconds']:.1f}s"
                    )
                records.append(record)
                bar.advance(task)
    summary = summarise(records, gate_names)
    out = store.out_dir
    results = {
        "experiment": NAME,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch_threads": torch.get_num_threads(),
        "config": settings,
        "summary": summary,
        "runs": records,
    }
    write_json(out / "results.json", results)
    text = table(summary)
    command = "sparsemoe demo" + (" --quick" if config.quick else "")
    quick = " (quick run)" if config.quick else ""
    atomic_write_text(
        out / "table.md",
        f"# sparsemoe demo{quick}: MMoE on two-task digits\n\nTasks: {', '.join(TASKS)}; "
        f"{settings['num_experts']} experts; {seeds} seed(s); {epochs} epochs. Produced by `{command}`.\n\n{text}",
    )
    plot(summary, records, settings, out / "demo.png")
    print(text)
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'demo.png'}", soft_wrap=True)
    return results
