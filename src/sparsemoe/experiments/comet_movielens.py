"""COMET paper on MovieLens-100K: will-watch (ROC-AUC) + rating (MSE), 16 experts, k=2, nine gates tuned.

The paper's MovieLens architecture (embeddings as the shared bottom and the gate input; Dense+ReLU
experts; a tower per task) and its tuning protocol (random search per gate, top-5% report, best
configuration over seeds), scaled down to fit a shared 2-core CPU: see ``DEFAULTS`` and the notes in
``results/comet-movielens/results.json``.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..data import MovieLens, load_movielens
from ..models import RecsysMMoE
from ..training import fit
from .tuning import Problem, add_tuning_arguments, gate_options, run_experiment, sample, trial_record

NAME = "comet-movielens"
DEFAULTS: dict[str, Any] = {
    "num_experts": 16,
    "k": 2,
    "embed_dim": 32,  # paper: 128
    "expert_dim": 64,  # paper: 256
    "tower_hidden": 64,  # paper: 256
    "dropout": 0.5,
    "batch_size": 1024,  # paper: 512
    "epochs": 6,  # paper: 100 (early stopping, patience 25)
    "patience": 2,
    "task_weights": [0.5, 0.5],
    "data_seed": 0,
    "negatives_per_positive": 1,
    "split": [0.9, 0.05, 0.05],  # 10k val and 10k test rows
    "train_rows": 45000,  # of the 180k training rows (a seeded random subset); val/test are full
    "lr_range": [5e-4, 1e-2],  # paper: [5e-5, 5e-4], over ~100x more optimiser steps
    "gamma_grid": [0.01, 0.1, 1.0, 5.0, 10.0],
    "comet_plus_gamma": 10.0,
    "entropy_grid": [0.05, 0.1, 0.5, 1.0, 5.0, 10.0],
    "perm_epochs_grid": [1, 2],  # paper: 1..10 of 100 epochs
    "trials": 50,
    "seeds": 5,
}
QUICK: dict[str, Any] = {"epochs": 1, "train_rows": 8000, "trials": 2, "seeds": 2, "perm_epochs_grid": [1]}


@functools.lru_cache(maxsize=2)
def _data(seed: int, negatives: int, split: tuple[float, float, float]) -> dict[str, MovieLens]:
    return load_movielens(seed, negatives, split)


def _predict(model: RecsysMMoE, split: MovieLens, batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([split.user, split.item], 1)
    logits, ratings = [], []
    for rows in torch.arange(len(split)).split(batch):
        watch, rating = model(ids[rows])
        logits.append(watch.squeeze(1))
        ratings.append(rating.squeeze(1))
    return torch.cat(logits), torch.cat(ratings)


def train(config: dict[str, Any], gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one model; val loss = weighted BCE + masked MSE on the validation split."""
    torch.manual_seed(seed)
    data = _data(config["data_seed"], config["negatives_per_positive"], tuple(config["split"]))
    train_split = data["train"]
    if config["train_rows"]:
        train_split = train_split.subset(torch.arange(config["train_rows"]))
    mean_rating = float(train_split.rating[train_split.watched > 0].mean())  # the rating tower predicts offsets
    steps_per_epoch = -(-len(train_split) // config["batch_size"])
    model = RecsysMMoE(
        train_split.num_users,
        train_split.num_items,
        gate,
        num_experts=config["num_experts"],
        embed_dim=config["embed_dim"],
        expert_dim=config["expert_dim"],
        tower_hidden=config["tower_hidden"],
        dropout=config["dropout"],
        local_search_steps=params.get("perm_epochs", 1) * steps_per_epoch,
        **gate_options(gate, params, config["k"]),
    )
    w_watch, w_rating = config["task_weights"]

    def loss_on(split: MovieLens, rows: torch.Tensor | None = None) -> torch.Tensor:
        part = split if rows is None else split.subset(rows)
        if rows is None:
            logit, rating = _predict(model, part)
        else:
            out = model(torch.stack([part.user, part.item], 1))
            logit, rating = out[0].squeeze(1), out[1].squeeze(1)
        bce = F.binary_cross_entropy_with_logits(logit, part.watched)
        seen = part.watched > 0
        mse = F.mse_loss(rating[seen], part.rating[seen] - mean_rating) if seen.any() else bce.new_zeros(())
        return w_watch * bce + w_rating * mse

    result = fit(
        model,
        lambda rows: loss_on(train_split, rows) + model.aux_loss(),
        len(train_split),
        lambda: loss_on(data["val"]).item(),
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
            logit, rating = _predict(model, split)
            seen = split.watched > 0
            metrics[part] = {
                "auc": float(roc_auc_score(split.watched.numpy(), logit.numpy())),
                "mse": float(F.mse_loss(rating[seen] + mean_rating, split.rating[seen])),
            }
    return trial_record(result, metrics, model.moe.last_routing)


def problem(config: dict[str, Any]) -> Problem:
    return Problem(
        NAME,
        functools.partial(sample, config),
        functools.partial(train, config),
        [("auc", "T1 watch ROC-AUC ↑", True), ("mse", "T2 rating MSE ↓", False)],
        config,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_tuning_arguments(parser, trials=DEFAULTS["trials"], seeds=DEFAULTS["seeds"], out=f"results/{NAME}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    return run_experiment(args, problem, DEFAULTS, QUICK)
