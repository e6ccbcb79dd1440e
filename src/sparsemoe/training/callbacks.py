"""The standard hooks of the training loop: progress bar, metrics log as JSONL/CSV, TensorBoard.

Each is a :class:`~sparsemoe.training.Callback` (defined beside the loop that calls it) and overrides
the moments it needs; each receives the running :class:`~sparsemoe.training.Trainer` (its ``step``,
``epoch``, ``history``, ``model``, ``optimizer``...).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._validation import check_float
from ..atomic import atomic_write_text
from ..layers import routing_stats
from ..routing import max_violation
from .loop import Callback, Trainer, TrainResult

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def total_steps(trainer: Trainer) -> int:
    """The number of optimiser steps the run will take at most (its step budget, or its epochs)."""
    config = trainer.config
    if config.epochs is None:
        assert config.steps is not None  # TrainConfig sets epochs when neither is given
        return config.steps
    per_epoch = math.ceil(len(trainer.data.epoch(0)) / config.accumulate)
    by_epochs = config.epochs * per_epoch
    return by_epochs if config.steps is None else min(config.steps, by_epochs)


class ProgressBar(Callback):
    """A rich progress bar over the steps. ``progress``: an existing ``rich.progress.Progress`` (the
    caller starts and stops it); ``None``: one of its own, shown while training.

    When the console is not a terminal (``nohup ... > log``) rich draws nothing, so the bar prints a
    plain line ``description: step s/total`` instead, at most once every ``line_seconds``: a log
    then shows a long run moving between its evaluations.
    """

    every_rank = False

    def __init__(
        self, description: str = "training", progress: Progress | None = None, *, line_seconds: float = 300.0
    ) -> None:
        self.description, self.progress, self.own = description, progress, progress is None
        self.line_seconds = check_float("line_seconds", line_seconds, low=0.0, allow_inf=True)
        self.task: TaskID | None = None
        self.last_line = -math.inf

    def on_train_start(self, trainer: Trainer) -> None:
        if self.progress is None:
            from rich.progress import Progress

            self.progress = Progress()
        if self.own:
            self.progress.start()
        self.task = self.progress.add_task(self.description, total=total_steps(trainer), completed=trainer.step)
        self.last_line = time.monotonic()

    def on_step_end(self, trainer: Trainer) -> None:
        assert self.progress is not None and self.task is not None
        self.progress.update(self.task, completed=trainer.step)
        now = time.monotonic()
        if not self.progress.console.is_terminal and now - self.last_line >= self.line_seconds:
            self.progress.console.print(f"{self.description}: step {trainer.step}/{total_steps(trainer)}")
            self.last_line = now

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self.own and self.progress is not None:
            self.progress.stop()


class MetricsLog(Callback):
    """Every evaluation record as a line of ``path``: JSON Lines (``.jsonl``) or CSV (``.csv``; the
    columns are those of the first record). With ``every=N`` (JSONL only) also a line
    ``{"step", "epoch", "train_loss", "lr"}`` every ``N`` steps. A fresh run starts the file anew; a
    resumed one drops the lines written after its checkpoint's step, so the log matches the run."""

    every_rank = False

    def __init__(self, path: str | Path, every: int | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix not in (".jsonl", ".csv"):
            raise ValueError(f"path must end in .jsonl or .csv, got {self.path.name}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be an int >= 1 or None, got {every!r}")
        if every is not None and self.path.suffix == ".csv":
            raise ValueError("every= (per-step lines) needs a .jsonl log; a CSV log holds the evaluations only")
        self.every = every
        self.columns: list[str] | None = None

    def _rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as f:
            if self.path.suffix == ".jsonl":
                lines = [line for line in f if line.strip()]
                if lines and not lines[-1].endswith("\n"):
                    lines.pop()  # torn by a crash mid-append: that step is rerun after the resume anyway
                return [json.loads(line) for line in lines]
            return list(csv.DictReader(f))

    def on_train_start(self, trainer: Trainer) -> None:
        kept = [r for r in self._rows() if int(r["step"]) <= trainer.step] if trainer.step else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix == ".jsonl":
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            return
        self.columns = list(kept[0]) if kept else None
        text = io.StringIO(newline="")
        if self.columns is not None:
            writer = csv.DictWriter(text, self.columns)
            writer.writeheader()
            writer.writerows(kept)
        atomic_write_text(self.path, text.getvalue())

    def _append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            if self.path.suffix == ".jsonl":
                f.write(json.dumps(row) + "\n")
                return
            if self.columns is None:
                self.columns = list(row)
                csv.DictWriter(f, self.columns).writeheader()
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)

    def on_step_end(self, trainer: Trainer) -> None:
        if self.every is not None and trainer.step % self.every == 0:
            lr = trainer.optimizer.param_groups[0]["lr"]
            self._append({"step": trainer.step, "epoch": trainer.epoch, "train_loss": trainer.last_loss, "lr": lr})

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._append(record)


class TensorBoardLog(Callback):
    """Scalars for TensorBoard in ``log_dir``: the training loss and LR every step, every metric of
    each evaluation. Needs ``tensorboard`` (``pip install tensorboard``)."""

    every_rank = False

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"TensorBoardLog needs tensorboard: pip install tensorboard ({e})") from None
        self.writer = SummaryWriter(str(log_dir))

    def on_step_end(self, trainer: Trainer) -> None:
        self.writer.add_scalar("train/loss", trainer.last_loss, trainer.step)
        self.writer.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], trainer.step)

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name not in ("step", "epoch"):
                self.writer.add_scalar(f"eval/{name}", value, trainer.step)
        self.writer.flush()

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        self.writer.close()


class RoutingMonitor(Callback):
    """Expert load of every MoE layer, accumulated over the training steps between evaluations.

    After each step it adds the per-expert load of each layer's last training forward (one host sync
    per layer); each evaluation record then gets ``routing_max_violation`` (MaxVio of the loads
    summed over the window, ``max_i load_i / mean load - 1``, averaged over the layers),
    ``routing_dead_experts`` (experts, over all layers, that got no input in the window) and
    ``routing_load`` (``{layer name: [load per expert]}``, the window's sums), so the history (and
    a checkpoint) holds the load over training. Multi-task layers count each task's gate as
    ``<name>/task<i>``. The window restarts at each evaluation.
    """

    def __init__(self) -> None:
        self.window: dict[str, list[int]] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        self.window = {}

    def on_step_end(self, trainer: Trainer) -> None:
        for name, stats in routing_stats(trainer.model).items():
            per_task = stats if isinstance(stats, list) else [stats]
            for i, task in enumerate(per_task):
                key = name if len(per_task) == 1 else f"{name}/task{i}"
                load = [int(c) for c in task["load"]]
                total = self.window.get(key)
                self.window[key] = load if total is None else [a + b for a, b in zip(total, load, strict=True)]

    def on_evaluate(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if not self.window:
            return
        violations = [max_violation(load) for load in self.window.values()]
        record["routing_max_violation"] = sum(violations) / len(violations)
        record["routing_dead_experts"] = sum(c == 0 for load in self.window.values() for c in load)
        record["routing_load"] = self.window
        self.window = {}
