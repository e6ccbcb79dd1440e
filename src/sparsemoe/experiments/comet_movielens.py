"""COMET paper on MovieLens-100K: will-watch (ROC-AUC) + rating (MSE), 16 experts, k=2, nine gates and PLE tuned.

The paper's MovieLens architecture (embeddings as the shared bottom and the gate input; Dense+ReLU
experts; a tower per task) and its tuning protocol (random search per gate, top-5% report, best
configuration over seeds), scaled down to fit a shared 2-core CPU: see ``SETTINGS`` and the notes in
``results/comet-movielens/results.json``.

Training runs to convergence: up to ``epochs`` epochs with early stopping on the validation loss
(``patience`` epochs without improvement; the best epoch's weights are restored). The paper used
100 epochs and patience 25 on 1.6M rows; here 60 and 10 on 45k rows (44 steps per epoch), which the
validation loss reaches its minimum well within (see ``best epoch / epochs run`` in table.md) at a
cost this machine can pay for ~650 trials.

Besides the gates, the row ``ple`` is PLE (Tang et al., RecSys 2020; :class:`sparsemoe.models.PLE`)
with softmax gates, tuned under the same protocol as the MMoE rows (the ``softmax`` row is MMoE with
the same gate): the same 50 trials, the same search space (the learning rate over ``lr_range``; a
softmax gate has nothing else to tune), epochs, patience, seeds and data; the same embeddings,
expert width, towers and dropout. Its shape (``PLE_SHAPE``: two levels of 2 experts per task and 4
shared ones) gives it MMoE's 16 experts of the same width, and gates of the same total size (MMoE:
2 gates over 16 experts, 2·(64·16 + 16) = 2,080 weights; PLE: per level 2 task gates over 6
experts, plus a shared gate over 8 in the first level: 4·(64·6 + 6) + (64·8 + 8) = 2,080), so both
models have the same parameter count. ``--gates ple`` trains that row alone and merges it into an
existing ``results.json`` of the same settings (see :func:`~sparsemoe.experiments.tuning.run_tuning`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..data import MovieLens, data_dir, load_movielens, movielens
from ..distributed import data_parallel, join_torchrun, rank_output
from ..layers import CGC
from ..models import PLE, RecsysMMoE, UserItemEmbedding
from ..routing import Routing
from . import tuning
from .progress import console
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
    trials_per_gate,
)

NAME = "comet-movielens"
#: fixed settings of every trial (the Config fields add epochs and patience)
SETTINGS: dict[str, Any] = {
    "num_experts": 16,
    "k": 2,
    "embed_dim": 32,  # paper: 128
    "expert_dim": 64,  # paper: 256
    "tower_hidden": 64,  # paper: 256
    "dropout": 0.5,
    "batch_size": 1024,  # paper: 512
    "task_weights": [0.5, 0.5],
    "data_seed": 0,
    "negatives_per_positive": 1,
    "split": [0.9, 0.05, 0.05],  # 10k val and 10k test rows
    "train_rows": 45000,  # of the 180k training rows (a seeded random subset); val/test are full
    "lr_range": [5e-4, 1e-2],  # paper: [5e-5, 5e-4], over ~100x more optimiser steps
    "gamma_grid": [0.01, 0.1, 1.0, 5.0, 10.0],  # paper's MovieLens grid
    "comet_plus_gamma": 10.0,  # fixed for COMET+ (paper supplement)
    "entropy_grid": [0.05, 0.1, 0.5, 1.0, 5.0, 10.0],  # paper's MovieLens grid
    "perm_epochs_grid": [1, 2, 3, 4, 5],  # paper: 1..10 of 100 epochs
    "probe_rows": 2048,  # validation rows on which experts per input are counted after each epoch
}
QUICK: dict[str, Any] = {"train_rows": 8000, "perm_epochs_grid": [1]}
#: rows that are models rather than gates, with the gate they use: PLE with MMoE's softmax gate
MODEL_ROWS = {"ple": "softmax"}
#: PLE's levels and expert groups: 16 experts and 2,080 gate weights in all, as MMoE (see the module docs)
PLE_SHAPE = {"levels": 2, "task_experts": 2, "shared_experts": 4}
ROWS = (*PAPER_GATES, *MODEL_ROWS)
#: the issue's minimum trial counts: the tuning-budget study's gates get 100, the rest 50
TRIALS = {"topk": 100, "topk+": 100, "hash": 100, "hash+": 100}
DEFAULT_TRIALS = 50
QUICK_CAPS = {"trials": 2, "seeds": 2, "epochs": 1}
METRICS = [("auc", "T1 watch ROC-AUC ↑", True), ("mse", "T2 rating MSE ↓", False)]


@dataclass
class Config:
    quick: bool = field(default=False, metadata={"help": "tiny smoke run (CI): 8k rows, 1 epoch, <= 2 trials/seeds"})
    out: Path = field(default=Path(f"results/{NAME}"), metadata={"help": "output folder"})
    gates: list[str] = field(
        default_factory=lambda: list(ROWS),
        metadata={"help": "gates (and 'ple': PLE with softmax gates) to tune; other rows of results.json are kept"},
    )
    trials: int = field(
        default=0,
        metadata={"help": "random-search trials per gate (0: 100 for topk/topk+/hash/hash+, 50 for the rest)"},
    )
    seeds: int = field(default=5, metadata={"help": "seeds for each gate's best configuration"})
    epochs: int = field(default=60, metadata={"help": "most epochs per model (paper: 100); early stopping"})
    patience: int = field(default=10, metadata={"help": "epochs without a better val loss before stopping (paper: 25)"})
    expert_parallel: bool = field(
        default=False,
        metadata={"help": "under torchrun: shard each model's experts over the ranks (data-parallel otherwise)"},
    )

    def __post_init__(self) -> None:
        check_study_config(self, ROWS)


@functools.lru_cache(maxsize=2)
def _data(seed: int, negatives: int, split: tuple[float, float, float]) -> dict[str, MovieLens]:
    return load_movielens(seed, negatives, split)


def _predict(model: RecsysMMoE | PLE, split: MovieLens, batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([split.user, split.item], 1)
    logits, ratings = [], []
    for rows in torch.arange(len(split)).split(batch):
        watch, rating = model(ids[rows])
        logits.append(watch.squeeze(1))
        ratings.append(rating.squeeze(1))
    return torch.cat(logits), torch.cat(ratings)


def ple_model(num_users: int, num_items: int, settings: dict[str, Any], **gate_options: Any) -> PLE:
    """The ``ple`` row's model: MMoE's embeddings, Dense+ReLU experts, towers and dropout, PLE's levels."""
    return PLE(
        2 * settings["embed_dim"],
        settings["expert_dim"],
        [1, 1],
        levels=PLE_SHAPE["levels"],
        task_experts=PLE_SHAPE["task_experts"],
        shared_experts=PLE_SHAPE["shared_experts"],
        gate=MODEL_ROWS["ple"],
        tower_hidden=settings["tower_hidden"],
        bottom=UserItemEmbedding(num_users, num_items, settings["embed_dim"]),
        dropout=settings["dropout"],
        expert="linear",
        activation="relu",
        **gate_options,
    )


def experts_per_input(model: RecsysMMoE | PLE) -> float:
    """Experts computed per input in the last forward.

    MMoE: the mean over its task gates (every gate row of the study). PLE: per level, the experts
    that any of its gates used for the input, summed over the levels (all 16 for softmax gates).
    """
    if not isinstance(model, PLE):
        return active_experts(model.moe.last_routing)
    total = 0.0
    for level in model.levels:
        routings: list[Routing] = cast(CGC, level).last_routing or []
        cells = torch.cat([r.token * r.num_experts + r.expert for r in routings])  # (input, bank expert) pairs
        total += cells.unique().numel() / max(routings[0].num_inputs, 1)
    return total


def train(settings: dict[str, Any], gate: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one model (row ``gate``: a gate spec, or ``ple``); val loss = weighted BCE + masked MSE on the
    validation split."""
    torch.manual_seed(seed)
    data = _data(settings["data_seed"], settings["negatives_per_positive"], tuple(settings["split"]))
    train_split = data["train"]
    if settings["train_rows"]:
        train_split = train_split.subset(torch.arange(settings["train_rows"]))
    mean_rating = float(train_split.rating[train_split.watched > 0].mean())  # the rating tower predicts offsets
    steps_per_epoch = -(-len(train_split) // settings["batch_size"])
    options = gate_options(MODEL_ROWS.get(gate, gate), params, settings["k"])
    model: RecsysMMoE | PLE
    if gate in MODEL_ROWS:
        model = ple_model(train_split.num_users, train_split.num_items, settings, **options)
    else:
        model = RecsysMMoE(
            train_split.num_users,
            train_split.num_items,
            gate,
            num_experts=settings["num_experts"],
            embed_dim=settings["embed_dim"],
            expert_dim=settings["expert_dim"],
            tower_hidden=settings["tower_hidden"],
            dropout=settings["dropout"],
            local_search_steps=params.get("perm_epochs", 1) * steps_per_epoch,
            **options,
        )
    # under torchrun: DDP (the trainer gives each rank its shard of every batch); one process: model
    net = data_parallel(model, experts=settings.get("expert_parallel", False))
    w_watch, w_rating = settings["task_weights"]
    probe = data["val"].subset(torch.arange(min(settings["probe_rows"], len(data["val"]))))
    active_per_epoch: list[float] = []

    def loss_on(split: MovieLens, rows: torch.Tensor | None = None) -> torch.Tensor:
        part = split if rows is None else split.subset(rows)
        if rows is None:
            logit, rating = _predict(model, part)
        else:
            out = net(torch.stack([part.user, part.item], 1))
            logit, rating = out[0].squeeze(1), out[1].squeeze(1)
        bce = F.binary_cross_entropy_with_logits(logit, part.watched)
        seen = part.watched > 0
        mse = F.mse_loss(rating[seen], part.rating[seen] - mean_rating) if seen.any() else bce.new_zeros(())
        return w_watch * bce + w_rating * mse

    def count_experts(epoch: int, val_loss: float) -> None:
        with torch.no_grad():  # fit calls this in eval mode, after the validation loss
            model(torch.stack([probe.user, probe.item], 1))
        active_per_epoch.append(experts_per_input(model))

    result = fit_trial(
        net,
        lambda rows: loss_on(train_split, rows) + model.aux_loss(),
        len(train_split),
        lambda: loss_on(data["val"]).item(),
        settings,
        params,
        seed,
        count_experts,
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
    return trial_record(result, metrics, experts_per_input(model), active_per_epoch)


def settings_of(config: Config) -> dict[str, Any]:
    """The fixed settings of ``config``'s trials (quick mode shrinks the data and the epochs)."""
    epochs = min(config.epochs, QUICK_CAPS["epochs"]) if config.quick else config.epochs
    settings = study_settings(config.quick, SETTINGS, QUICK, epochs=epochs, patience=config.patience)
    if config.expert_parallel:  # only then, so that data-parallel runs share the one-process runs' keys
        settings["expert_parallel"] = True
    return settings


def trial_counts(config: Config, gates: list[str]) -> dict[str, int]:
    counts = trials_per_gate(gates, config.trials, TRIALS, DEFAULT_TRIALS)
    return {g: min(n, QUICK_CAPS["trials"]) for g, n in counts.items()} if config.quick else counts


def sample_row(settings: dict[str, Any], trial: Any, row: str) -> dict[str, Any]:
    """One configuration for ``row``: its gate's grid (a model row draws from its gate's)."""
    return sample(settings, trial, MODEL_ROWS.get(row, row))


def problem(settings: dict[str, Any]) -> Problem:
    return Problem(NAME, functools.partial(sample_row, settings), functools.partial(train, settings), METRICS, settings)


def run(config: Config) -> dict[str, Any]:
    """Tune every gate, retrain the best configurations, write results.json, table.md and plots."""
    data_dir(movielens.NAME)  # the data check, before anything (an Optuna database) is written
    seeds = min(config.seeds, QUICK_CAPS["seeds"]) if config.quick else config.seeds
    out = config.out / "quick" if config.quick else config.out
    rank, _ = join_torchrun()  # several processes: every rank runs every trial (same seeded samplers)
    console.quiet = console.quiet or rank > 0
    with rank_output(out) as rank_out:  # rank 0 writes ``out``; the others a private copy of it
        return run_tuning(
            problem(settings_of(config)),
            config.gates,
            trial_counts(config, config.gates),
            seeds,
            rank_out,
            command_line(NAME, config),
        )


def write_report(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write table.md and the plots into ``folder`` from ``results`` alone; returns their paths."""
    return tuning.write_report(results, folder, METRICS)
