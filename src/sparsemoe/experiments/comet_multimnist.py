"""COMET paper on MultiMNIST (from mnist-5k): two digit tasks, CNN experts, nine gates tuned.

The paper's MultiMNIST setup (36x36 overlaid digits, CNN experts conv(5,10)+pool -> conv(5,20)+pool
-> Dense(50) -> Dense(50), gates on the raw image, a tower per task) and tuning protocol, scaled
down for a shared 2-core CPU: fewer experts, fewer images, a few epochs, ~10 trials per gate. Every
such choice is in ``DEFAULTS`` and in ``results/comet-multimnist/results.json``.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..data import MultiMNIST, load_multimnist
from ..models import VisionMMoE
from ..training import fit
from .tuning import Problem, add_tuning_arguments, gate_options, run_experiment, sample, trial_record

NAME = "comet-multimnist"
DEFAULTS: dict[str, Any] = {
    "num_experts": 8,  # paper: 16 (n = 5 in some official configs)
    "k": 2,  # paper: 4
    "images": [2000, 500, 1000],  # train/val/test pairs; paper: 100k/20k/20k (we have 5,000 digits)
    "batch_size": 128,  # paper: 512
    "epochs": 3,  # paper: 200 (early stopping, patience 25)
    "patience": 1,
    "data_seed": 0,
    "lr_range": [1e-3, 1e-2],  # paper: [1e-4, 1e-3], over ~100x more optimiser steps
    "gamma_grid": [0.001, 0.01, 0.1, 1.0, 5.0, 10.0],
    "comet_plus_gamma": 0.01,
    "entropy_grid": [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0],
    "perm_epochs_grid": [1, 2],  # paper: 1..10 of 200 epochs (log-uniform share 1-5% in the code)
    "trials": 10,
    "seeds": 5,
}
QUICK: dict[str, Any] = {"images": [512, 256, 256], "epochs": 1, "trials": 1, "seeds": 1, "perm_epochs_grid": [1]}
TASKS = ("top-left digit", "bottom-right digit")


@functools.lru_cache(maxsize=2)
def _data(seed: int, sizes: tuple[int, int, int]) -> dict[str, MultiMNIST]:
    return load_multimnist(seed, sizes)


def _logits(model: VisionMMoE, images: torch.Tensor, batch: int = 1000) -> list[torch.Tensor]:
    outs = [model(chunk) for chunk in images.split(batch)]
    return [torch.cat([o[t] for o in outs]) for t in range(len(TASKS))]


def _loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([F.cross_entropy(lg, labels[:, t]) for t, lg in enumerate(logits)]).mean()


def train(config: dict[str, Any], gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one model; val loss = mean cross-entropy of the two tasks on the validation split."""
    torch.manual_seed(seed)
    data = _data(config["data_seed"], tuple(config["images"]))
    tr = data["train"]
    steps_per_epoch = -(-len(tr) // config["batch_size"])
    model = VisionMMoE(
        gate,
        num_experts=config["num_experts"],
        num_tasks=len(TASKS),
        local_search_steps=params.get("perm_epochs", 1) * steps_per_epoch,
        **gate_options(gate, params, config["k"]),
    )
    result = fit(
        model,
        lambda rows: _loss(model(tr.images[rows]), tr.labels[rows]) + model.aux_loss(),
        len(tr),
        lambda: _loss(_logits(model, data["val"].images), data["val"].labels).item(),
        epochs=config["epochs"],
        lr=params["lr"],
        batch_size=config["batch_size"],
        seed=seed,
        patience=config["patience"],
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
    return trial_record(result, metrics, model.moe.last_routing)


def problem(config: dict[str, Any]) -> Problem:
    return Problem(
        NAME,
        functools.partial(sample, config),
        functools.partial(train, config),
        [("accuracy", "accuracy (mean of 2 tasks) ↑", True), ("auc", "macro ROC-AUC (mean of 2 tasks) ↑", True)],
        config,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_tuning_arguments(parser, trials=DEFAULTS["trials"], seeds=DEFAULTS["seeds"], out=f"results/{NAME}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_experiment(args, problem, DEFAULTS, QUICK)
