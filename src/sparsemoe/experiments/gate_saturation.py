"""How fast DSelect-k and COMET become sparse: experts computed per input against training steps.

Both gates are soft until their smooth-steps saturate (``|w·x + b| >= γ/2``); until then a layer
computes up to all ``n`` experts per input. This study trains one MoE layer (16 experts, k = 2,
MLP experts) plus a linear classifier on scikit-learn's bundled 8x8 digits (1,797 images, 64
features; no download) with Adam (lr 1e-3, batch 64) for a few thousand steps, for a grid of
candidate ``(gamma, entropy_weight)`` per gate over several seeds, and records the experts per
input on a validation set at about log-spaced steps (``EVAL_STEPS``).

Data (:func:`_splits`): a seed-0 shuffle of the 1,797 digits gives 1,400 training images; the other
397 are split per class, alternately, into a validation part (201) and a test part (196). Selection
(steps to k, validation accuracy) reads the validation part only; the table's test accuracy and
final experts per input on the test part are reported, never chosen on.

The gates' defaults (γ = 1, entropy weight 0.1) follow the rule of
:func:`.reporting.gate_saturation.choose_default`: the widest smooth-step band (largest γ) whose every
run reaches k within :data:`~.reporting.gate_saturation.REACH_WITHIN` of its steps, with a validation
accuracy within :data:`~.reporting.gate_saturation.ACCURACY_MARGIN` of the best candidate's; ties go
to the smaller entropy weight. A wider band keeps the router learning for longer; a gate that is at k after a handful
of steps (γ = 0.1 here) has fixed its routing close to initialisation. The choice reads validation
accuracy only (a run's ``val_accuracy``), never the test accuracy the table reports.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write_text
from ..layers import MoE
from ..training import Callback, RandomBatches, TrainConfig, Trainer, train
from .config import ConfigError
from .progress import console, progress
from .reporting import mean_std
from .reporting.gate_saturation import NAME, plot, render
from .store import RunStore, write_json

GATES = ("dselect_k", "comet")
#: steps after which experts per input are counted (about log-spaced; plus the last step)
EVAL_STEPS = (0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 2500, 3000, 4000, 5000)


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "tiny smoke run (CI): 200 steps, 1 seed, 2 candidates"})
    out: Path = field(default=Path(f"results/{NAME}"), metadata={"help": "output folder"})
    gates: list[str] = field(default_factory=lambda: list(GATES), metadata={"help": "gates to study"})
    gammas: list[float] = field(default_factory=lambda: [0.1, 1.0, 10.0], metadata={"help": "candidate gamma values"})
    entropy_weights: list[float] = field(
        default_factory=lambda: [0.1, 1.0], metadata={"help": "candidate entropy weights"}
    )
    seeds: int = field(default=2, metadata={"help": "seeds per candidate"})
    steps: int = field(default=3000, metadata={"help": "optimiser steps per run"})
    num_experts: int = field(default=16, metadata={"help": "experts in the layer"})
    k: int = field(default=2, metadata={"help": "the gates' k"})

    def __post_init__(self) -> None:
        bad = [g for g in self.gates if g not in GATES]
        if bad or not self.gates:
            raise ConfigError("gates", f"choose one or more of {' '.join(GATES)} (got {self.gates})")
        for name in ("seeds", "steps", "num_experts", "k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(name, f"must be an integer, at least 1 (got {getattr(self, name)!r})")
        if any(g <= 0 for g in self.gammas) or not self.gammas:
            raise ConfigError("gammas", f"give positive values (got {self.gammas})")
        if any(w < 0 for w in self.entropy_weights) or not self.entropy_weights:
            raise ConfigError("entropy_weights", f"give values >= 0 (got {self.entropy_weights})")
        self.out = Path(self.out)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: ``x [1797, 64]`` in [0, 1], ``y [1797]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def split_rows(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"train", "val", "test"}`` -> row indices into the digits: deterministic, seed 0.

    A seed-0 permutation puts 1,400 images in training; the held-out rest is split per class,
    alternately in permutation order, into validation (the even positions) and test (the odd
    ones), so both parts keep the class mix and share no image.
    """
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held_out = order[1400:]
    val, test = [], []
    for label in y.unique().tolist():
        rows = held_out[y[held_out] == label]  # this class's held-out images, in permutation order
        val.append(rows[0::2])
        test.append(rows[1::2])
    return {"train": order[:1400], "val": torch.cat(val).sort().values, "test": torch.cat(test).sort().values}


def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train", "val", "test"}`` -> ``(x [m, 64], y [m])`` by :func:`split_rows`."""
    x, y = _digits()
    return {name: (x[rows], y[rows]) for name, rows in split_rows(y).items()}


def train_one(config: Config, gate: str, gamma: float, entropy_weight: float, seed: int, steps: int) -> dict[str, Any]:
    """One run: experts per input on the validation set after each of ``EVAL_STEPS``; final
    validation and test accuracy, and final experts per input on the test set."""
    torch.manual_seed(seed)
    splits = _splits()
    x, y = splits["train"]
    x_val, y_val = splits["val"]
    moe = MoE(64, 32, config.num_experts, gate=gate, k=config.k, gamma=gamma, entropy_weight=entropy_weight)
    head = nn.Linear(64, 10)
    curve: list[list[float]] = []
    started = time.perf_counter()

    def evaluate(inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """(experts per input, accuracy) of the current model on ``inputs``."""
        moe.eval()
        with torch.no_grad():
            logits = head(moe(inputs))
            routing = moe.last_routing
            assert routing is not None
        moe.train()
        return routing.num_pairs / routing.num_inputs, float((logits.argmax(1) == labels).float().mean())

    class Probe(Callback):
        """Experts per input on the validation set after each of ``EVAL_STEPS``."""

        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step in EVAL_STEPS or trainer.step == steps:
                curve.append([trainer.step, evaluate(x_val, y_val)[0]])

    def loss(rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(moe(x[rows])), y[rows]) + moe.aux_loss()

    curve.append([0, evaluate(x_val, y_val)[0]])
    train_config = TrainConfig(steps=steps, lr=1e-3, batch_size=64, seed=seed)
    train(nn.Sequential(moe, head), loss, RandomBatches(len(x), 64, seed), train_config, callbacks=[Probe()])
    _, val_accuracy = evaluate(x_val, y_val)
    test_experts, test_accuracy = evaluate(*splits["test"])
    reach = next((s for s, a in curve if a <= config.k + 1e-9), None)
    return {
        "gate": gate,
        "gamma": gamma,
        "entropy_weight": entropy_weight,
        "seed": seed,
        "curve": curve,
        "steps_to_k": reach,
        "final_experts": curve[-1][1],
        "val_accuracy": val_accuracy,
        "test_experts": test_experts,
        "test_accuracy": test_accuracy,
        "seconds": time.perf_counter() - started,
    }


def run(config: Config) -> dict[str, Any]:
    """Train every (gate, gamma, entropy weight, seed); write results.json, table.md and a plot."""
    steps = min(config.steps, 200) if config.quick else config.steps
    seeds = 1 if config.quick else config.seeds
    gammas = config.gammas[:1] if config.quick else config.gammas
    out = config.out / "quick" if config.quick else config.out
    store = RunStore(out, asdict(config), selection=("quick", "out", "seeds", "gates", "gammas", "entropy_weights"))
    grid = list(itertools.product(config.gates, gammas, config.entropy_weights, range(seeds)))
    keys = [
        RunStore.key(
            evals=len(EVAL_STEPS),
            gate=gate,
            gamma=gamma,
            entropy=weight,
            seed=seed,
            split="val-test",  # runs of the older single held-out set do not match
            steps=steps,
            n=config.num_experts,
            k=config.k,
        )
        for gate, gamma, weight, seed in grid
    ]
    if note := store.reuse_note(keys, "pass a new --out (or delete that folder) to retrain"):
        console.print(note, soft_wrap=True)
    runs = []
    with progress() as bar:
        task = bar.add_task(f"{NAME}: runs", total=len(grid))
        for (gate, gamma, weight, seed), key in zip(grid, keys, strict=True):
            record = store.get(key)
            if record is None:
                record = train_one(config, gate, gamma, weight, seed, steps)
                store.put(key, record)
            runs.append(record)
            bar.advance(task)
    summary = []
    for gate, gamma, weight in itertools.product(config.gates, gammas, config.entropy_weights):
        group = [r for r in runs if (r["gate"], r["gamma"], r["entropy_weight"]) == (gate, gamma, weight)]
        reached = [r["steps_to_k"] for r in group if r["steps_to_k"] is not None]
        summary.append(
            {
                "gate": gate,
                "gamma": gamma,
                "entropy_weight": weight,
                "runs_reaching_k": f"{len(reached)}/{len(group)}",
                "steps_to_k": mean_std(reached) if len(reached) == len(group) else None,
                "final_experts": mean_std([r["final_experts"] for r in group]),
                "val_accuracy": mean_std([r["val_accuracy"] for r in group]),
                "test_experts": mean_std([r["test_experts"] for r in group]),
                "test_accuracy": mean_std([r["test_accuracy"] for r in group]),
            }
        )
    results = {
        "experiment": NAME,
        "command": f"sparsemoe reproduce {NAME}" + (" --quick" if config.quick else ""),
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "config": {
            "quick": config.quick,
            "gates": config.gates,
            "gammas": gammas,
            "entropy_weights": config.entropy_weights,
            "seeds": seeds,
            "steps": steps,
            "eval_steps": [s for s in EVAL_STEPS if s < steps] + [steps],
            "num_experts": config.num_experts,
            "k": config.k,
            "task": "sklearn digits, 1400 train / 397 held out, split per class into 201 validation / 196 test; "
            "MoE(64, 32, n) + Linear(64, 10); "
            "Adam lr 1e-3, batch 64",
        },
        "summary": summary,
        "runs": runs,
    }
    write_json(out / "results.json", results)
    write_report(results, out)
    print(render(results))
    console.print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / (NAME + '.png')}")
    return results


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the plot into ``folder`` from ``results`` alone; returns their paths."""
    atomic_write_text(folder / "table.md", render(results))
    plot(results, folder / f"{NAME}.png")
    return [folder / "table.md", folder / f"{NAME}.png"]
