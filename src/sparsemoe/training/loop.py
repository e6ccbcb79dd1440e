"""The one training loop: steps over batches, a loss callable, hooks for everything else.

Every trainer in the package (the demo, the tuning studies, MoEBERT distillation, THOR,
gate saturation) is a :class:`Trainer`: a model, a loss callable (THOR's two passes, distillation
and multi-task sums are losses, not loops), a :class:`~sparsemoe.training.Batches` order, an
evaluation callable and a :class:`~sparsemoe.training.TrainConfig`. One step:

1. ``loss(batch)`` for each of ``config.accumulate`` micro-batches; a non-finite loss is caught
   before its backward pass;
2. backward, then the gradients (or their clipped norm) are checked: the NaN/inf policy acts
   *before* the optimiser step, so a bad step never reaches the weights;
3. optimiser step, scheduler step, the loss-free balancing bias update of every gate that has one
   (:func:`sparsemoe.update_balance`), ``after_optimizer_step`` callbacks, ``on_step_end`` callbacks;
4. evaluation when due (every ``eval_every`` steps, or at each epoch's end), best-by-metric
   selection, early stopping; a checkpoint when due.

Several processes (``torchrun``; the default process group initialised before the trainer is
built): each rank trains on its own slice of every batch (``data.shard(rank, world)``, applied by
the trainer unless ``data`` is a :class:`~sparsemoe.training.ShardedBatches` already), so the ranks
together see each row once; the model does the gradient averaging (``DistributedDataParallel``,
``fully_shard``, :func:`sparsemoe.distributed.expert_parallel`). Every step's loss and terms and
every evaluation's metrics are averaged over the ranks (one all-reduce each), and the ranks agree on
a non-finite step, so ``nan_policy``, the history and best-by-metric selection act the same on all.

Resuming is bit-identical: a checkpoint holds, besides the model, optimiser, scheduler and RNG states
(:mod:`sparsemoe.checkpoint`), the loop's position (epoch and batches done in it; batch orders are
pure functions of the epoch), the running loss sums, the history and the best weights so far.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from .._validation import check_int
from ..checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, shard_like
from ..distributed import load_dcp_checkpoint, read_dcp_checkpoint, save_dcp_checkpoint
from ..gates import discard_balance, update_balance
from .config import SchedulerFactory, TrainConfig
from .data import Batches, RandomBatches, ShardedBatches

#: ``loss(batch)``: a scalar tensor, or a mapping with the scalar ``"loss"`` and other terms to log
LossFn = Callable[[Any], "torch.Tensor | Mapping[str, torch.Tensor | float]"]
#: ``evaluate()``: metric name -> value (run in eval mode under ``torch.no_grad``)
EvaluateFn = Callable[[], Mapping[str, float]]
OptimizerFactory = Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]


def adam(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The default optimiser: Adam over the trainable parameters, ``config.lr`` and ``weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class TrainResult:
    """What a run did. ``history`` has one record per evaluation: ``epoch``, ``step``, the mean
    training terms since the previous evaluation (``train_loss``, ``train_<term>``) and the metrics."""

    #: best value of ``config.metric`` (``None`` without a metric) and where it was reached
    best_value: float | None
    best_step: int | None
    best_epoch: int | None
    #: optimiser steps (skipped ones included) and epochs begun, over the whole run (resumes included)
    steps: int
    epochs_run: int
    #: training wall and CPU seconds over the whole run (resumes included), evaluations included
    seconds: float
    cpu_seconds: float
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    #: training loss of every step run by this call (skipped non-finite steps included, as nan/inf)
    step_losses: list[float] = field(default_factory=list)
    #: steps skipped by ``nan_policy="skip"`` (global step numbers, counted from 1)
    skipped_steps: list[int] = field(default_factory=list)


def _gradients_finite(params: list[nn.Parameter]) -> bool:
    """Whether every gradient is finite: one sum per gradient (a NaN or inf anywhere makes the total
    non-finite), and the elementwise test only when the total is not finite (it may be an overflow)."""
    grads = [_local(p.grad.detach()) for p in params if p.grad is not None]
    if not grads:
        return True
    if math.isfinite(torch.stack([g.sum().float() for g in grads]).sum().item()):
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` that also takes expert-parallel models; returns the total norm.

    Torch's version stacks every gradient in one ``foreach`` call, which refuses a mix of plain tensors
    and DTensors (the expert shards). Here the norm of each sharded gradient is the norm of the whole
    tensor over its mesh (one all-reduce), so every rank clips by the same total as one process would.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return nn.utils.clip_grad_norm_(list(params), max_norm)
    norms = [
        torch.linalg.vector_norm(g).full_tensor() if isinstance(g, DTensor) else torch.linalg.vector_norm(g)
        for g in grads
    ]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = min(1.0, max_norm / (float(total) + 1e-6))  # nn.utils.clip_grads_with_norm_'s coefficient
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the ranks agree on finiteness afterwards); any other tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(values: list[float], world: int) -> list[float]:
    """The mean of each value over the ranks (one all-reduce; NaN on any rank gives NaN)."""
    if world == 1:
        return values
    packed = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(packed)
    return (packed / world).tolist()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (hands freed heap pages back to the system); ``None`` without glibc."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def _split_loss(out: object) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """The scalar loss and the extra terms of what a loss callable returned; TypeError otherwise."""
    terms: dict[str, torch.Tensor | float] = {}
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(f"the loss callable returned a mapping without 'loss' (keys: {', '.join(map(str, out))})")
        terms = {str(k): v for k, v in out.items() if k != "loss"}
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the loss callable must return a scalar torch.Tensor (or a mapping with one under 'loss'), got "
            f"{type(out).__name__}; return the tensor itself, not loss.item() or float(loss)"
        )
    if out.dim() != 0:
        raise TypeError(
            f"the loss callable returned a tensor of shape {tuple(out.shape)}; it must be a scalar: reduce it "
            "with .mean() or .sum()"
        )
    if not out.requires_grad:
        raise TypeError("the loss callable returned a tensor that does not require grad: nothing would be trained")
    return out, terms


class Callback:
    """Hooks of the loop; subclass and override the moments you need. ``after_optimizer_step`` is the
    place for updates that must follow every real optimiser step and never a skipped one.

    No-op hooks, called in this order: ``on_train_start``; per step ``after_optimizer_step`` (not
    for steps skipped by the NaN policy), ``on_step_end``; ``on_evaluate`` after each evaluation
    (``record`` is the new history entry; the best weights are already updated); ``on_epoch_end``;
    ``on_train_end`` with the result (best weights restored).

    Several processes: a callback runs on every rank (what changes the model, such as bias updates,
    must), unless its class sets ``every_rank = False`` (logs and progress bars: rank 0 alone, which
    sees the losses and metrics averaged over the ranks)."""

    every_rank: bool = True

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of this call (after a resume has restored the state)."""

    def after_optimizer_step(self, trainer: Trainer) -> None:
        """Right after the optimiser step and the scheduler step."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After every step, skipped ones included (``trainer.last_loss`` is its loss)."""

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After each evaluation."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After the last batch of an epoch (and its evaluation, when evaluating per epoch)."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After training, before :meth:`Trainer.run` returns."""


class Trainer:
    """One training run; see the module docstring for a step. :meth:`run` trains and returns a
    :class:`TrainResult`. Callbacks read the attributes below while it runs.

    Args:
        model: the module to train (in place); left in eval mode with the best (or last) weights.
        loss: ``loss(batch)`` -> scalar tensor, or ``{"loss": scalar, "<term>": value, ...}`` (the
            other terms are averaged into the history as ``train_<term>``).
        data: the batch order (:class:`~sparsemoe.training.RandomBatches`, or any
            :class:`~sparsemoe.training.Batches`; ``data.shard(rank, world)`` for several processes).
        config: lengths, evaluation, selection, NaN policy, checkpoints (:class:`TrainConfig`).
        evaluate: ``evaluate()`` -> ``{metric: value}``, run in eval mode under ``torch.no_grad``;
            needed when ``config.metric`` is set.
        optimizer: ``optimizer(model, config)`` -> an optimiser (default: :func:`adam`).
        scheduler: ``scheduler(optimizer)`` -> an ``LRScheduler``, stepped after every optimiser step
            (default: ``config.scheduler()``, the warm-up, or constant).
        callbacks: :class:`~sparsemoe.training.Callback` objects, called in order.

    Several processes (see the module doc): build the trainer on every rank with the same
    arguments, the model already wrapped (DDP) or sharded; the data is sharded by rank here, the
    logged losses and metrics are means over the ranks. ``evaluate`` runs on every rank (collective
    models need that): give each rank the same evaluation data, or its own equal-sized shard.

    Attributes: ``model``, ``config``, ``optimizer``, ``scheduler``, ``step`` (optimiser steps done),
    ``epoch`` and ``position`` (batches done in it), ``history``, ``best_value``/``best_step``,
    ``last_loss`` (the last step's loss, a float), ``last_terms`` and :attr:`seconds`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        data: Batches,
        config: TrainConfig,
        *,
        evaluate: EvaluateFn | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable (batch -> scalar tensor), got {type(loss).__name__}")
        if not isinstance(data, Batches):
            raise TypeError(
                f"data must be a sparsemoe.training.Batches (e.g. RandomBatches), got {type(data).__name__}"
            )
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if config.metric is not None and evaluate is None:
            raise ValueError(f"config.metric={config.metric!r} needs evaluate= (a callable returning the metrics)")
        if evaluate is not None and not callable(evaluate):
            raise TypeError(f"evaluate must be callable, got {type(evaluate).__name__}")
        bad = [c for c in callbacks if not isinstance(c, Callback)]
        if bad:
            raise TypeError(f"callbacks must be sparsemoe.training.Callback objects, got {type(bad[0]).__name__}")
        if config.checkpoint_format == "dcp" and config.checkpoint_path and Path(config.checkpoint_path).is_file():
            raise ValueError(
                f"checkpoint_path={config.checkpoint_path!r} is a file; a DCP checkpoint is a folder: pass a folder "
                "path, or checkpoint_format='safetensors' for one file"
            )
        self.rank, self.world = _process_group()
        if self.world > 1 and not isinstance(data, ShardedBatches):
            data = data.shard(self.rank, self.world)  # each rank its own rows
        self.model, self.loss_fn, self.data, self.config = model, loss, data, config
        # the weights as saved and selected: a DDP wrapper's module, so that a checkpoint's keys do not
        # depend on the wrapper (it resumes in one process, at another world size, or into DDP again)
        self._stored = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.evaluate_fn = evaluate
        self.callbacks = [c for c in callbacks if self.rank == 0 or c.every_rank]  # logs on rank 0 alone
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter that requires grad: nothing to train")
        self.optimizer = (optimizer or adam)(model, config)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer factory must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}"
            )
        factory = scheduler if scheduler is not None else config.scheduler()
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if factory is not None:
            made = factory(self.optimizer)
            if not isinstance(made, torch.optim.lr_scheduler.LRScheduler):
                raise TypeError(
                    "scheduler factory must return a torch.optim.lr_scheduler.LRScheduler, got "
                    f"{type(made).__name__}; write e.g. scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)"
                )
            self.scheduler = made
        # the loop's position and bookkeeping (all of it in the checkpoint)
        self.step, self.epoch, self.position = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_epoch: int | None = None
        self.best_index = -1  # evaluation index of the best value
        self.skipped: list[int] = []
        self.last_loss = math.nan
        self.last_terms: dict[str, float] = {}
        self.stopped_early = self.finished = False
        self._window: dict[str, float] = {}  # training term sums since the last evaluation
        self._window_steps = 0
        self._evaluated_at = -1  # step of the last evaluation
        self._best_state: dict[str, torch.Tensor] | None = None
        self._seconds_before = self._cpu_before = 0.0
        self._clock = self._cpu_clock = 0.0
        self._started = False
        self._last_saved = -1
        self.step_losses: list[float] = []

    # ----------------------------------------------------------------------------------- running
    @property
    def seconds(self) -> float:
        """Training wall seconds so far, over the whole run (resumes included)."""
        return self._seconds_before + time.perf_counter() - self._clock

    def run(self, resume: str | Path | None = None) -> TrainResult:
        """Train until ``config.epochs``/``config.steps`` are done or patience runs out.

        ``resume``: a checkpoint written by a trainer built the same way (same data order); the run
        continues exactly as the uninterrupted run would (same losses, bit for bit).
        """
        cfg = self.config
        if self._started:
            raise RuntimeError("a Trainer runs once; build a new one (with resume=) to continue a run")
        if resume is not None:
            self._restore(resume)
        self._started = True
        self._clock, self._cpu_clock = time.perf_counter(), time.process_time()
        for c in self.callbacks:
            c.on_train_start(self)
        self.model.train()
        try:
            self._loop()
        except RuntimeError as err:
            if self.world == 1:
                raise
            kept = (
                f"the last checkpoint is {cfg.checkpoint_path} (step {self._last_saved}); resume every rank from it"
                if cfg.checkpoint_path is not None and self._last_saved >= 0
                else "no checkpoint was written"
            )
            raise RuntimeError(
                f"rank {self.rank} of {self.world} stopped after {self.step} steps: {str(err).splitlines()[0]} "
                f"(when another rank exits or hangs, the collectives fail at once or after the process group's "
                f"timeout); {kept}"
            ) from err
        if self.evaluate_fn is not None and self._evaluated_at != self.step:
            self._evaluate()  # the final weights are always evaluated once
        self.finished = True
        if cfg.checkpoint_path is not None and cfg.checkpoint_at_end:
            self._save()  # the finished state: resuming from it trains nothing
        return self._finish()

    def _loop(self) -> None:
        """The epochs and steps of :meth:`run`, until the budget is spent or training stops early."""
        cfg = self.config
        while not self.finished and not self._budget_spent():
            batches = self.data.epoch(self.epoch)
            if len(batches) == 0:
                raise ValueError(f"data.epoch({self.epoch}) returned no batches")
            while self.position < len(batches) and not self._budget_spent():
                end = min(self.position + cfg.accumulate, len(batches))
                self._train_step(batches, self.position, end)
                if cfg.eval_every is not None and self.step % cfg.eval_every == 0:
                    self._evaluate()
                if cfg.checkpoint_every is not None and self.step % cfg.checkpoint_every == 0 and not self.finished:
                    self._save()
                if self.finished:
                    break
            if self.position == len(batches) and not self.finished:
                if cfg.eval_every is None:
                    self._evaluate()
                for c in self.callbacks:
                    c.on_epoch_end(self)
                if not self.finished:
                    self.epoch, self.position = self.epoch + 1, 0

    def _budget_spent(self) -> bool:
        cfg = self.config
        return (cfg.steps is not None and self.step >= cfg.steps) or (
            cfg.epochs is not None and self.epoch >= cfg.epochs
        )

    def _train_step(self, batches: Sequence[Any], start: int, end: int) -> None:
        cfg, count = self.config, end - start
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, float] = {}
        value, finite, what = 0.0, True, "loss"
        for index in range(start, end):
            loss, extra = _split_loss(self.loss_fn(batches[index]))
            item = loss.item()
            value += item
            for name, term in extra.items():
                terms[name] = terms.get(name, 0.0) + float(term.detach() if isinstance(term, torch.Tensor) else term)
            if not math.isfinite(item):
                finite, value = False, item
                if self.world == 1:
                    break  # several ranks: every rank runs every forward and backward (collectives)
            (loss if count == 1 else loss / count).backward()
        if count > 1 and finite:
            value, terms = value / count, {k: v / count for k, v in terms.items()}
        loss_finite = finite
        if finite:
            if cfg.clip_norm is not None:
                finite = bool(torch.isfinite(clip_grad_norm(self.params, cfg.clip_norm)))
            else:
                finite = _gradients_finite(self.params)
            what = "gradient"
        if self.world > 1:  # the mean loss and terms, and a step is finite only if it is on every rank
            names = sorted(terms)
            mean = _mean_over_ranks([value, *(terms[k] for k in names), float(loss_finite), float(finite)], self.world)
            value, terms = mean[0], dict(zip(names, mean[1:-2], strict=True))
            finite, what = mean[-1] == 1.0, "loss" if mean[-2] < 1.0 else "gradient"
        self.step += 1
        self.position = end
        self.last_loss, self.last_terms = value, terms
        self.step_losses.append(value)
        if not finite:
            if cfg.nan_policy == "stop":
                kept = (
                    f"; the last good checkpoint is {cfg.checkpoint_path} (step {self._last_saved})"
                    if cfg.checkpoint_path is not None and self._last_saved >= 0
                    else ""
                )
                raise FloatingPointError(
                    f"non-finite {what} at step {self.step} (epoch {self.epoch}, batch {end - 1}): loss={value}"
                    f"{kept}; lower lr, set clip_norm, or pass nan_policy='skip'"
                )
            self.optimizer.zero_grad(set_to_none=True)
            discard_balance(self.model)  # the skipped step's routing must not steer the next bias update
            self.skipped.append(self.step)
        else:
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            update_balance(self.model)
            for c in self.callbacks:
                c.after_optimizer_step(self)
            self._window["loss"] = self._window.get("loss", 0.0) + value
            for name, term in terms.items():
                self._window[name] = self._window.get(name, 0.0) + term
            self._window_steps += 1
        for c in self.callbacks:
            c.on_step_end(self)

    def _evaluate(self) -> None:
        cfg = self.config
        self._evaluated_at = self.step
        if self.evaluate_fn is None:
            return
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate_fn()
        self.model.train()
        if not isinstance(metrics, Mapping):
            raise TypeError(f"evaluate must return a mapping of metric name to value, got {type(metrics).__name__}")
        n = max(self._window_steps, 1)
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step}
        record.update({f"train_{k}": v / n for k, v in self._window.items()} or {"train_loss": 0.0})
        names = sorted(str(k) for k in metrics)
        values = _mean_over_ranks([float(metrics[k]) for k in names], self.world)  # the mean over ranks
        record.update(dict(zip(names, values, strict=True)))
        self._window, self._window_steps = {}, 0
        self.history.append(record)
        index = len(self.history) - 1
        if cfg.metric is not None:
            if cfg.metric not in record:
                raise ValueError(f"evaluate returned no {cfg.metric!r} (config.metric); it returned {sorted(metrics)}")
            value = record[cfg.metric]
            if not math.isfinite(value):
                if cfg.nan_policy == "stop":
                    raise FloatingPointError(
                        f"evaluation at step {self.step} (epoch {self.epoch}) gave {cfg.metric}={value}; the model "
                        "diverged or the evaluation is broken (nan_policy='skip' ignores such evaluations)"
                    )
            elif self.best_value is None or (value < self.best_value if cfg.mode == "min" else value > self.best_value):
                self.best_value, self.best_step, self.best_epoch, self.best_index = (
                    value,
                    self.step,
                    self.epoch,
                    index,
                )
                self._best_state = copy.deepcopy(self._stored.state_dict())
            if cfg.patience is not None and self.best_index != index and index - self.best_index >= cfg.patience:
                self.stopped_early = self.finished = True
        for c in self.callbacks:
            c.on_evaluate(self, record)
        trim = _malloc_trim() if cfg.trim_memory and not self.params[0].is_cuda else None
        if trim is not None:
            trim(0)

    def _finish(self) -> TrainResult:
        cfg = self.config
        if cfg.metric is not None:
            if self._best_state is None:
                steps = [h["step"] for h in self.history]
                raise FloatingPointError(
                    f"no evaluation gave a finite {cfg.metric} (evaluated at steps {steps}): the model diverged or "
                    "the evaluation is broken; the initial weights are not a trained model"
                )
            self._stored.load_state_dict(self._best_state)
        self.model.eval()
        result = TrainResult(
            best_value=self.best_value,
            best_step=self.best_step,
            best_epoch=self.best_epoch,
            steps=self.step,
            epochs_run=self.epoch + (1 if self.position else 0),
            seconds=self.seconds,
            cpu_seconds=self._cpu_before + time.process_time() - self._cpu_clock,
            stopped_early=self.stopped_early,
            history=self.history,
            step_losses=self.step_losses,
            skipped_steps=self.skipped,
        )
        for c in self.callbacks:
            c.on_train_end(self, result)
        return result

    # ----------------------------------------------------------------------------------- checkpoints
    def _run_config(self) -> dict[str, Any]:
        return {"data": self.data.describe(), "train": self.config.to_dict()}

    def _save(self) -> None:
        path = self.config.checkpoint_path
        assert path is not None
        state = {
            "epoch": self.epoch,
            "position": self.position,
            "window": self._window,
            "window_steps": self._window_steps,
            "evaluated_at": self._evaluated_at,
            "history": self.history,
            "best": [self.best_value, self.best_step, self.best_epoch, self.best_index],
            "skipped": self.skipped,
            "seconds": self.seconds,
            "cpu_seconds": self._cpu_before + time.process_time() - self._cpu_clock,
            "stopped_early": self.stopped_early,
            "finished": self.finished,
        }
        best = {f"best.{k}": v for k, v in (self._best_state or {}).items()}
        if self.config.checkpoint_format == "dcp":  # every rank writes its shards into the folder
            save_dcp_checkpoint(
                path,
                self._stored,
                self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self._run_config(),
                state=state,
                tensors=best,
            )
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(  # several processes: every rank saves its RNG states, rank 0 writes the file
                path,
                self._stored,
                self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self._run_config(),
                state=state,
                tensors=best,
                collective=self.world > 1,
            )
        self._last_saved = self.step

    def _restore(self, resume: str | Path) -> None:
        folder = Path(resume).is_dir()  # a torch.distributed.checkpoint folder, else one safetensors file
        meta = read_dcp_checkpoint(resume) if folder else read_checkpoint(resume)[1]
        written = meta["config"]  # checked before anything is loaded
        if "data" not in written or "train" not in written:
            raise ValueError(f"cannot resume from {resume}: it was not written by sparsemoe.training.Trainer")
        mine = self.data.describe()
        # any number of ranks: the global batches go on in the same order, split over this run's
        # ranks (docs/failure-modes.md: resuming at another world size)
        for key in sorted((set(written["data"]) | set(mine)) - {"rank", "world"}):
            if written["data"].get(key) != mine.get(key):
                raise ValueError(
                    f"cannot resume from {resume}: it was written with {key}={written['data'].get(key)!r}, "
                    f"this run has {key}={mine.get(key)!r} (the data order would differ)"
                )
        current = self._stored.state_dict()
        if folder:  # the best weights load into copies of the model's own (sharded) tensors
            like = {f"best.{k}": v.detach().clone() for k, v in current.items()}
            templates = {k: like[k] for k in meta["extra"] if k in like}
            saved = load_dcp_checkpoint(
                resume, self._stored, self.optimizer, scheduler=self.scheduler, tensors=templates
            )
        else:
            saved = load_checkpoint(resume, self._stored, self.optimizer, scheduler=self.scheduler)
        loop = saved["state"]
        self.step, self.epoch, self.position = saved["step"], loop["epoch"], loop["position"]
        self._window, self._window_steps = loop["window"], loop["window_steps"]
        self._evaluated_at, self.history, self.skipped = loop["evaluated_at"], loop["history"], loop["skipped"]
        self.best_value, self.best_step, self.best_epoch, self.best_index = loop["best"]
        self._seconds_before, self._cpu_before = loop["seconds"], loop["cpu_seconds"]
        self.stopped_early, self.finished = loop["stopped_early"], loop["finished"]
        best: dict[str, torch.Tensor] = {}
        for key, value in saved["tensors"].items():
            if key.startswith("best."):
                own = current.get(key[len("best.") :])  # a file holds it in full: this rank's part of a DTensor
                full = isinstance(own, DTensor) and not isinstance(value, DTensor)
                best[key[len("best.") :]] = shard_like(value, own) if full else value  # type: ignore[arg-type]
        self._best_state = best or None
        self._last_saved = self.step


def train(
    model: nn.Module,
    loss: LossFn,
    data: Batches,
    config: TrainConfig,
    *,
    evaluate: EvaluateFn | None = None,
    optimizer: OptimizerFactory | None = None,
    scheduler: SchedulerFactory | None = None,
    callbacks: Sequence[Callback] = (),
    resume: str | Path | None = None,
) -> TrainResult:
    """``Trainer(model, loss, data, config, ...).run(resume)``: see :class:`Trainer`."""
    trainer = Trainer(
        model, loss, data, config, evaluate=evaluate, optimizer=optimizer, scheduler=scheduler, callbacks=callbacks
    )
    return trainer.run(resume)


class _FitHooks(Callback):
    """``fit``'s ``on_step(step, loss)`` and ``on_epoch(epoch, val_loss)`` as a callback."""

    def __init__(
        self,
        on_step: Callable[[int, torch.Tensor], None] | None,
        on_epoch: Callable[[int, float], None] | None,
    ) -> None:
        self.on_step, self.on_epoch = on_step, on_epoch

    def on_step_end(self, trainer: Trainer) -> None:
        if self.on_step is not None:
            self.on_step(trainer.step, torch.tensor(trainer.last_loss))

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.on_epoch is not None:
            self.on_epoch(record["epoch"], record["val_loss"])


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
) -> TrainResult:
    """Train ``model`` with Adam on shuffled rows, keep the weights of the best validation epoch.

    The common case of :class:`Trainer`: ``batch_loss(rows)`` maps a LongTensor of row indices to the
    training loss, ``val_loss()`` is evaluated after every epoch (``history[i]["val_loss"]``) and
    selects the best epoch (min); ``patience`` counts epochs without improvement. The other
    arguments are those of :class:`TrainConfig`. ``on_step(step, loss)`` runs after every step,
    skipped ones included; ``on_epoch(epoch, val_loss)`` after every evaluation.
    """
    config = TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
        patience=patience,
        metric="val_loss",
        nan_policy=nan_policy,
        checkpoint_every=checkpoint_every,
        checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
    )
    num_rows = check_int("num_rows", num_rows, low=1)
    hooks = [_FitHooks(on_step, on_epoch)] if on_step is not None or on_epoch is not None else []
    return train(
        model,
        batch_loss,
        RandomBatches(num_rows, batch_size, seed),
        config,
        evaluate=lambda: {"val_loss": float(val_loss())},
        scheduler=scheduler,
        callbacks=hooks,
        resume=resume,
    )
