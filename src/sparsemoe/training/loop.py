"""A small, explicit training loop: Adam, minibatches, early stopping on a validation loss."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


def minibatches(num_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled row indices, ``batch_size`` at a time (the last batch may be smaller)."""
    yield from torch.randperm(num_rows, generator=generator).split(batch_size)


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def fit(
    model: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    num_rows: int,
    val_loss: Callable[[], float],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    patience: int | None = None,
    weight_decay: float = 0.0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` with Adam and keep the weights of the best validation epoch.

    Args:
        batch_loss: maps a LongTensor of row indices to the training loss (aux losses included).
        num_rows: number of training rows.
        val_loss: evaluates the model (it is put in eval mode around the call).
        patience: stop after this many epochs without improvement (``None``: never).
        on_step: called as ``on_step(step, loss)`` after each optimiser step (e.g. local search
            schedules); ``on_epoch(epoch, val_loss)`` after each epoch (e.g. progress bars).
    """
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_epoch, best_state = float("inf"), -1, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    start, step, epoch = time.perf_counter(), 0, 0
    for epoch in range(epochs):
        model.train()
        total, batches = 0.0, 0
        for rows in minibatches(num_rows, batch_size, generator):
            loss = batch_loss(rows)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total, batches = total + loss.item(), batches + 1
            if on_step is not None:
                on_step(step, loss)
        model.eval()
        with torch.no_grad():
            current = float(val_loss())
        history.append({"epoch": epoch, "train_loss": total / max(batches, 1), "val_loss": current})
        if on_epoch is not None:
            on_epoch(epoch, current)
        if current < best_loss:
            best_loss, best_epoch, best_state = current, epoch, copy.deepcopy(model.state_dict())
        elif patience is not None and epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best_loss, epoch + 1, time.perf_counter() - start, history)
