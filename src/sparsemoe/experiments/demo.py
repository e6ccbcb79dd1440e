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
from ..atomic import atomic_write_text
from ..distributed import all_ranks, data_parallel, join_torchrun
from ..layers import MultiTaskMoE
from ..models import MMoE
from ..training import fit
from .config import ConfigError, validate
from .progress import console, progress
from .reporting import mean_std
from .reporting.demo import TASKS, plot, table
from .store import RunStore, write_json

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    pass

NAME = "demo"
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
    expert_parallel: bool = field(
        default=False,
        metadata={"help": "under torchrun: shard each MMoE's experts over the ranks (data-parallel otherwise)"},
    )

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
    # under torchrun: DDP (the trainer gives each rank its shard of every batch); one process: model
    net = data_parallel(model, experts=config.get("expert_parallel", False))

    def task_loss(x: torch.Tensor, y: torch.Tensor, through: torch.nn.Module = model) -> torch.Tensor:
        logits = torch.cat(through(x), dim=1)
        return F.binary_cross_entropy_with_logits(logits, y)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        return task_loss(data["train_x"][rows], data["train_y"][rows], net) + model.aux_loss()

    result = fit(
        net,
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


def run(config: Config) -> dict[str, Any]:
    """Train every (gate, seed) not saved yet, then write results.json, table.md and demo.png.

    Returns the results dict written to results.json (config, per-gate summary, every run).
    """
    rank, world = join_torchrun()
    writer = rank == 0  # several processes (torchrun): rank 0 writes the runs and results, every rank trains
    console.quiet = not writer  # and rank 0 alone logs
    gate_names = list(config.gates)
    seeds, epochs = config.seed_count, config.epoch_count
    settings: dict[str, Any] = {
        **DEFAULTS,
        "epochs": epochs,
        "seeds": seeds,
        "gates": gate_names,
        "quick": config.quick,
        "gate_kwargs": GATE_KWARGS,
        "processes": world,
        "expert_parallel": config.expert_parallel and world > 1,
    }
    out = config.out / "quick" if config.quick else config.out
    if config.fresh and writer:
        RunStore(out).clear()
    all_ranks(True)  # several processes: the others read the store after rank 0 cleared it
    selection = ("quick", "out", "seeds", "gates", "fresh", "epochs", "expert_parallel")
    store = RunStore(out, asdict(config) if writer else None, selection=selection)
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
                if not all_ranks(record is not None):  # train together unless every rank has the run
                    record = None
                if record is None:
                    bar.update(task, description=f"demo: {gate} (seed {seed})")
                    record = train_one(gate, seed, settings)
                    if writer:
                        store.put(key, record)
                    bar.console.log(
                        f"{gate} seed {seed}: mean ROC-AUC {record['mean_auc']:.4f}, "
                        f"{record['active_experts']:.2f} experts/input, {record['seconds']:.1f}s"
                    )
                records.append(record)
                bar.advance(task)
    summary = summarise(records, gate_names)
    out = store.out_dir
    if not writer:
        return {"experiment": NAME, "config": settings, "summary": summary, "runs": records}
    results = {
        "experiment": NAME,
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch_threads": torch.get_num_threads(),
        "processes": world,
        "config": settings,
        "summary": summary,
        "runs": records,
    }
    write_json(out / "results.json", results)
    write_report(results, out)
    print(table(summary))
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'demo.png'}", soft_wrap=True)
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and demo.png into ``folder`` from ``results`` alone; returns their paths."""
    settings = results["config"]
    command = "sparsemoe demo" + (" --quick" if settings["quick"] else "")
    quick = " (quick run)" if settings["quick"] else ""
    atomic_write_text(
        folder / "table.md",
        f"# sparsemoe demo{quick}: MMoE on two-task digits\n\nTasks: {', '.join(TASKS)}; "
        f"{settings['num_experts']} experts; {settings['seeds']} seed(s); {settings['epochs']} epochs. "
        f"Produced by `{command}`.\n\n{table(results['summary'])}",
    )
    plot(results["summary"], results["runs"], settings, folder / "demo.png")
    return [folder / "table.md", folder / "demo.png"]
