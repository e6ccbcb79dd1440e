"""A small, explicit training loop: Adam, minibatches, early stopping, checkpoints that resume exactly.

Resuming is bit-identical: a checkpoint holds, besides the model, optimiser, scheduler and RNG states
(:mod:`sparsemoe.checkpoint`), the loop's own position: epoch, batches done in it, the data
generator's state at the start of the epoch (so the epoch's shuffle is redrawn identically), the
running epoch sums, the history and the best weights so far.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._validation import check_choice, check_int
from ..checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

NAN_POLICIES = ("stop", "skip")
#: fit arguments that fix the data order; a checkpoint resumes only with the same values
_RESUME_KEYS = ("num_rows", "batch_size", "seed")

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


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
    #: training loss of every step run by this call (skipped non-finite steps included, as nan/inf)
    step_losses: list[float] = field(default_factory=list)
    #: steps skipped by ``nan_policy="skip"`` (global step numbers, counted from 1)
    skipped_steps: list[int] = field(default_factory=list)


def _gradients_finite(params: list[nn.Parameter]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


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
    scheduler: SchedulerFactory | None = None,
    nan_policy: str = "stop",
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: str | Path | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` with Adam and keep the weights of the best validation epoch.

    Args:
        batch_loss: maps a LongTensor of row indices to the training loss (aux losses included).
        num_rows: number of training rows.
        val_loss: evaluates the model (it is put in eval mode around the call).
        patience: stop after this many epochs without improvement (``None``: never).
        scheduler: ``scheduler(optimizer) -> LRScheduler``, stepped after every optimiser step.
        nan_policy: on a NaN/inf loss or gradient, ``"stop"`` raises ``FloatingPointError`` naming
            the step (the last checkpoint written stays as it was: nothing is saved after the bad
            step); ``"skip"`` drops that step's update and goes on (listed in ``skipped_steps``).
        checkpoint_path: where to write checkpoints (one file, replaced durably each time).
        checkpoint_every: write one every this many steps (and after the last step); needs
            ``checkpoint_path``. ``None`` with a path: after the last step only.
        resume: a checkpoint written by ``fit`` to continue from; the run then continues exactly as
            the uninterrupted run would (same losses, bit for bit). ``model`` must be freshly built
            the same way; ``num_rows``, ``batch_size`` and ``seed`` must match the checkpoint's.
        on_step: called as ``on_step(step, loss)`` after each step, skipped ones included (e.g. local
            search schedules); ``on_epoch(epoch, val_loss)`` after each epoch (e.g. progress bars).

    ``FitResult.epochs_run`` counts the epochs of the whole run, those before a resume included.
    """
    nan_policy = check_choice("nan_policy", nan_policy, NAN_POLICIES)
    num_rows = check_int("num_rows", num_rows, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every, low=1)
        if checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path= (the file to write)")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    sched = scheduler(optimizer) if scheduler is not None else None
    generator = torch.Generator().manual_seed(seed)
    run_config = {"num_rows": num_rows, "batch_size": batch_size, "seed": seed}

    best_loss, best_epoch, best_state = float("inf"), -1, copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    step, first_epoch, position, total, batches = 0, 0, 0, 0.0, 0
    epoch_start_rng = generator.get_state()
    skipped: list[int] = []
    if resume is not None:
        written = read_checkpoint(resume)[1]["config"]  # checked before anything is loaded
        for key in _RESUME_KEYS:
            if written.get(key) != run_config[key]:
                raise ValueError(
                    f"cannot resume from {resume}: it was written with {key}={written.get(key)!r}, "
                    f"this run has {key}={run_config[key]!r} (the data order would differ)"
                )
        saved = load_checkpoint(resume, model, optimizer, scheduler=sched)
        loop = saved["state"]
        step, first_epoch, position = saved["step"], loop["epoch"], loop["position"]
        total, batches, skipped = loop["total"], loop["batches"], loop["skipped"]
        best_loss, best_epoch, history = loop["best_loss"], loop["best_epoch"], loop["history"]
        best_state = {k[len("best.") :]: v for k, v in saved["tensors"].items() if k.startswith("best.")}
        epoch_start_rng = saved["tensors"]["data_rng"]

    def checkpoint(epoch: int, position: int, data_rng: torch.Tensor, total: float, batches: int) -> None:
        """Save the run so that it resumes at batch ``position`` of ``epoch`` (shuffled from ``data_rng``)."""
        state = {
            "epoch": epoch,
            "position": position,
            "total": total,
            "batches": batches,
            "skipped": skipped,
            "best_loss": best_loss,
            "best_epoch": best_epoch,
            "history": history,
        }
        tensors = {"data_rng": data_rng, **{f"best.{k}": v for k, v in best_state.items()}}
        assert checkpoint_path is not None
        save_checkpoint(
            checkpoint_path,
            model,
            optimizer,
            scheduler=sched,
            step=step,
            config=run_config,
            state=state,
            tensors=tensors,
        )

    start, epoch, losses = time.perf_counter(), first_epoch, []
    last_saved_step = step if resume is not None else -1
    stopped_early = False
    for epoch in range(first_epoch, epochs):
        model.train()
        if epoch != first_epoch or resume is None:
            epoch_start_rng, position, total, batches = generator.get_state(), 0, 0.0, 0
        generator.set_state(epoch_start_rng)
        for index, rows in enumerate(minibatches(num_rows, batch_size, generator)):
            if index < position:  # done before the checkpoint we resumed from
                continue
            loss = batch_loss(rows)
            optimizer.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                finite = _gradients_finite(params)
            step += 1
            position = index + 1
            losses.append(loss.item())
            if not finite:
                what = f"non-finite {'loss' if not math.isfinite(losses[-1]) else 'gradient'}"
                if nan_policy == "stop":
                    kept = f"; the last good checkpoint is {checkpoint_path} (step {last_saved_step})"
                    raise FloatingPointError(
                        f"{what} at step {step} (epoch {epoch}, batch {index}): loss={losses[-1]}"
                        + (kept if checkpoint_path is not None and last_saved_step >= 0 else "")
                    )
                optimizer.zero_grad(set_to_none=True)
                skipped.append(step)
            else:
                optimizer.step()
                if sched is not None:
                    sched.step()
                total, batches = total + losses[-1], batches + 1
            if on_step is not None:
                on_step(step, loss)
            if checkpoint_every is not None and step % checkpoint_every == 0:
                checkpoint(epoch, position, epoch_start_rng, total, batches)
                last_saved_step = step
        model.eval()
        with torch.no_grad():
            current = float(val_loss())
        history.append({"epoch": epoch, "train_loss": total / max(batches, 1), "val_loss": current})
        if on_epoch is not None:
            on_epoch(epoch, current)
        if current < best_loss:
            best_loss, best_epoch, best_state = current, epoch, copy.deepcopy(model.state_dict())
        elif patience is not None and epoch - best_epoch >= patience:
            stopped_early = True
        if stopped_early:
            break
    if checkpoint_path is not None and step != last_saved_step:
        # resumes at the next epoch: the generator now holds that epoch's starting state
        checkpoint(epochs if stopped_early else epoch + 1, 0, generator.get_state(), 0.0, 0)
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best_loss, len(history), time.perf_counter() - start, history, losses, skipped)
