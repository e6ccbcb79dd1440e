"""``sparsemoe demo``: every gate in an MMoE on a two-task problem from scikit-learn's digits.

Task 1: "the digit is >= 5"; task 2: "the digit is even". Both binary, scored by ROC-AUC on a
held-out test split. The data ships with scikit-learn, so the demo needs no download.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from .. import gates
from ..layers import MultiTaskMoE
from ..models import MMoE
from ..training import fit
from .progress import console, progress
from .report import fmt, markdown_table, mean_std
from .store import RunStore, write_json

TASKS = ("digit >= 5", "digit is even")
DEFAULTS = {"epochs": 60, "batch_size": 64, "lr": 3e-3, "num_experts": 8, "d_expert": 32, "tower_hidden": 16}
QUICK = {"epochs": 4}
#: per-gate options: k=2 where the gate has a k (hash: 1, as in Hash layers); top-k without noise
GATE_KWARGS: dict[str, dict[str, object]] = {
    "topk": {"k": 2, "noisy": False},
    "hash": {"k": 1},
    "random": {"k": 2},
    "expert_choice": {"k": 2},
    "dselect_k": {"k": 2},
    "comet": {"k": 2},
}


def load_two_task_digits(seed: int) -> dict[str, torch.Tensor]:
    """Digits split 60/20/20 (stratified by digit), pixels scaled to [0, 1]."""
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
    """Train one MMoE with ``gate`` and return its test metrics."""
    torch.manual_seed(seed)
    data = load_two_task_digits(seed)
    d_in = data["train_x"].shape[1]
    moe = MultiTaskMoE(
        d_in, config["d_expert"], config["num_experts"], len(TASKS), gate=gate, **config["gate_kwargs"].get(gate, {})
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
    active = float(np.mean([r.num_pairs / r.num_inputs for r in model.moe.last_routing]))
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


def plot(summary: dict[str, dict[str, Any]], num_experts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    means = [summary[g]["mean_auc"]["mean"] for g in names]
    errs = [summary[g]["mean_auc"]["std"] for g in names]
    ax1.bar(names, means, yerr=errs, capsize=3, color="tab:blue")
    ax1.set_ylim(max(0.0, min(means) - 0.05), 1.0)
    ax1.set_ylabel("mean test ROC-AUC (2 tasks)")
    ax1.set_title("Quality (mean ± std over seeds)")
    ax2.bar(names, [summary[g]["active_experts"]["mean"] for g in names], color="tab:orange")
    ax2.axhline(num_experts, color="grey", linestyle="--", label=f"all {num_experts} experts")
    ax2.set_ylabel("experts computed per input (test)")
    ax2.set_title("Sparsity")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few epochs, one seed (smoke test)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per gate (default 3)")
    parser.add_argument(
        "--gates", nargs="+", default=None, help=f"gates to run (default all: {' '.join(gates.available())})"
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULTS['epochs']})")
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder")
    parser.add_argument("--fresh", action="store_true", help="ignore runs saved by an earlier call")


def run(args: argparse.Namespace) -> dict[str, Any]:
    gate_names = args.gates or gates.available()
    for name in gate_names:
        gates.gate_class(name)  # unknown names fail before any training
    torch.set_num_threads(1)  # the models are tiny: threads only add overhead (and contend on shared CPUs)
    seeds = 1 if args.quick else args.seeds
    config = {**DEFAULTS, **(QUICK if args.quick else {}), "seeds": seeds, "gates": gate_names, "quick": args.quick}
    if args.epochs is not None:
        config["epochs"] = args.epochs
    config["gate_kwargs"] = GATE_KWARGS
    store = RunStore(args.out / ("quick" if args.quick else ""))
    if args.fresh:
        store.clear()
    records = []
    with progress() as bar:
        task = bar.add_task("demo: training", total=len(gate_names) * seeds)
        for gate in gate_names:
            for seed in range(seeds):
                key = RunStore.key(gate=gate, seed=seed, epochs=config["epochs"])
                record = store.get(key)
                if record is None:
                    bar.update(task, description=f"demo: {gate} (seed {seed})")
                    record = train_one(gate, seed, config)
                    store.put(key, record)
                    bar.console.log(
                        f"{gate} seed {seed}: mean ROC-AUC {record['mean_auc']:.4f}, "
                        f"{record['active_experts']:.2f} experts/input, {record['seconds']:.1f}s"
                    )
                records.append(record)
                bar.advance(task)
    summary = summarise(records, gate_names)
    out = store.out_dir
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(
        out / "results.json",
        {"experiment": "demo", "written": started, "config": config, "summary": summary, "runs": records},
    )
    text = table(summary)
    command = "sparsemoe demo" + (" --quick" if args.quick else "")
    (out / "table.md").write_text(
        f"# sparsemoe demo: MMoE on two-task digits\n\nTasks: {', '.join(TASKS)}; {config['num_experts']} experts; "
        f"{seeds} seed(s); {config['epochs']} epochs. Produced by `{command}`.\n\n{text}"
    )
    plot(summary, config["num_experts"], out / "demo.png")
    print(text)
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'demo.png'}", soft_wrap=True)
    return summary
