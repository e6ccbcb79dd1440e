"""COMET paper on MultiMNIST (from mnist-5k): two digit tasks, CNN experts, nine gates tuned.

The paper's MultiMNIST setup (36x36 overlaid digits, CNN experts conv(5,10)+pool -> conv(5,20)+pool
-> Dense(50) -> Dense(50), gates on the raw image, a tower per task) and tuning protocol, scaled
down for a shared 2-core CPU: fewer experts, fewer images. Every such choice is in ``SETTINGS`` and
in ``results/comet-multimnist/results.json``.

Training runs to convergence: up to ``epochs`` epochs with early stopping on the validation loss
(``patience``; best weights restored). The paper used 200 epochs and patience 25 on 100k images;
here 60 and 10 on 2,000 (16 steps per epoch), affordable for 40 trials per gate.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..data import MultiMNIST, data_dir, load_multimnist, multimnist
from ..models import VisionMMoE
from . import tuning
from .config import ConfigError
from .tuning import (
    PAPER_GATES,
    Problem,
    active_experts,
    check_study_config,
    command_line,
    fit_trial,
    gate_options,
    run_tuning,
    sample,
    study_settings,
    trial_record,
)

NAME = "comet-multimnist"
#: fixed settings of every trial (the Config fields add epochs and patience)
SETTINGS: dict[str, Any] = {
    "num_experts": 8,  # paper: 16 (n = 5 in some official configs)
    "k": 2,  # paper: 4
    "images": [2000, 500, 1000],  # train/val/test pairs; paper: 100k/20k/20k (we have 5,000 digits)
    "batch_size": 128,  # paper: 512
    "data_seed": 0,
    "lr_range": [1e-3, 1e-2],  # paper: [1e-4, 1e-3], over ~100x more optimiser steps
    "gamma_grid": [0.001, 0.01, 0.1, 1.0, 5.0, 10.0],  # paper's MultiMNIST grid
    "comet_plus_gamma": 0.01,  # fixed for COMET+ (paper supplement)
    "entropy_grid": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0],  # paper's MultiMNIST grid
    "perm_epochs_grid": [1, 2, 3, 4, 5],  # paper: 1..10 of 200 epochs (log-uniform share 1-5% in the code)
}
QUICK: dict[str, Any] = {"images": [512, 256, 256], "perm_epochs_grid": [1]}
QUICK_CAPS = {"trials": 1, "seeds": 1, "epochs": 1}
TASKS = ("top-left digit", "bottom-right digit")
METRICS = [("accuracy", "accuracy (mean of 2 tasks) ↑", True), ("auc", "macro ROC-AUC (mean of 2 tasks) ↑", True)]


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "tiny smoke run (CI): 512 images, 1 epoch, 1 trial/seed"})
    out: Path = field(default=Path(f"results/{NAME}"), metadata={"help": "output folder"})
    gates: list[str] = field(default_factory=lambda: list(PAPER_GATES), metadata={"help": "gates to tune"})
    trials: int = field(default=40, metadata={"help": "random-search trials per gate"})
    seeds: int = field(default=5, metadata={"help": "seeds for each gate's best configuration"})
    epochs: int = field(default=60, metadata={"help": "most epochs per model (paper: 200); early stopping"})
    patience: int = field(default=10, metadata={"help": "epochs without a better val loss before stopping (paper: 25)"})

    def __post_init__(self) -> None:
        check_study_config(self, PAPER_GATES)
        if self.trials < 1:
            raise ConfigError("trials", f"must be at least 1 (got {self.trials})")


@functools.lru_cache(maxsize=2)
def _data(seed: int, sizes: tuple[int, int, int]) -> dict[str, MultiMNIST]:
    return load_multimnist(seed, sizes)


def _logits(model: VisionMMoE, images: torch.Tensor, batch: int = 1000) -> list[torch.Tensor]:
    """Per-task logits in chunks of ``batch`` images (the 500-image validation split is one chunk)."""
    outs = [model(chunk) for chunk in images.split(batch)]
    return [torch.cat([o[t] for o in outs]) for t in range(len(TASKS))]


def _loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([F.cross_entropy(lg, labels[:, t]) for t, lg in enumerate(logits)]).mean()


def train(settings: dict[str, Any], gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one model; val loss = mean cross-entropy of the two tasks on the validation split."""
    torch.manual_seed(seed)
    data = _data(settings["data_seed"], tuple(settings["images"]))
    tr = data["train"]
    steps_per_epoch = -(-len(tr) // settings["batch_size"])
    model = VisionMMoE(
        gate,
        num_experts=settings["num_experts"],
        num_tasks=len(TASKS),
        local_search_steps=params.get("perm_epochs", 1) * steps_per_epoch,
        **gate_options(gate, params, settings["k"]),
    )
    active_per_epoch: list[float] = []

    def count_experts(epoch: int, val_loss: float) -> None:
        # fit calls this right after the validation loss, whose one eval-mode forward over the whole
        # validation split (the probe) left its routing in the layer: no second forward needed.
        routings = model.moe.last_routing
        assert routings is not None and routings[0].num_inputs == len(data["val"].images)
        active_per_epoch.append(active_experts(routings))

    result = fit_trial(
        model,
        lambda rows: _loss(model(tr.images[rows]), tr.labels[rows]) + model.aux_loss(),
        len(tr),
        lambda: _loss(_logits(model, data["val"].images), data["val"].labels).item(),
        settings,
        params,
        seed,
        count_experts,
    )
    metrics = {}
    with torch.no_grad():
        for part in ("val", "test"):
            split = data[part]
            logits = _logits(model, split.images)
            accs = [float((lg.argmax(1) == split.labels[:, t]).float().mean()) for t, lg in enumerate(logits)]
            aucs = [
                float(
                    roc_auc_score(
                        split.labels[:, t].numpy(), torch.softmax(lg, 1).numpy(), multi_class="ovr", average="macro"
                    )
                )
                for t, lg in enumerate(logits)
            ]
            metrics[part] = {
                "accuracy": float(np.mean(accs)),
                "auc": float(np.mean(aucs)),
                "accuracy_tasks": accs,
                "auc_tasks": aucs,
            }
    return trial_record(result, metrics, model.moe.last_routing, active_per_epoch)


def settings_of(config: Config) -> dict[str, Any]:
    """The fixed settings of ``config``'s trials (quick mode shrinks the data and the epochs)."""
    epochs = min(config.epochs, QUICK_CAPS["epochs"]) if config.quick else config.epochs
    return study_settings(config.quick, SETTINGS, QUICK, epochs=epochs, patience=config.patience)


def problem(settings: dict[str, Any]) -> Problem:
    return Problem(NAME, functools.partial(sample, settings), functools.partial(train, settings), METRICS, settings)


def run(config: Config) -> dict[str, Any]:
    """Tune every gate, retrain the best configurations, write results.json, table.md and plots."""
    data_dir(multimnist.NAME)  # the data check, before anything (an Optuna database) is written
    trials = min(config.trials, QUICK_CAPS["trials"]) if config.quick else config.trials
    seeds = min(config.seeds, QUICK_CAPS["seeds"]) if config.quick else config.seeds
    out = config.out / "quick" if config.quick else config.out
    counts = {g: trials for g in config.gates}
    return run_tuning(problem(settings_of(config)), config.gates, counts, seeds, out, command_line(NAME, config))


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the plots into ``folder`` from ``results`` alone; returns their paths."""
    return tuning.write_report(results, folder, METRICS)
