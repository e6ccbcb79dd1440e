"""Fine-tuning and distillation of sequence classifiers, resumable from safetensors checkpoints.

One loss serves both steps of MoEBERT, trained by :class:`~sparsemoe.training.Trainer`: fine-tuning
the dense model (task loss only) and distilling the converted MoE student from the frozen dense teacher:

    L = CE(student, y) + λ · (Σ_layers MSE(H_student, H_teacher) + ½ (KL(p_t‖p_s) + KL(p_s‖p_t))) + gate losses

``H`` are the hidden states (embedding output and every layer), the MSE averaged over real
(non-padding) tokens; the teacher runs in eval mode (no dropout) without gradients. Batches are a
pure function of ``(seed, step)``, so a run restored from its checkpoint (weights, optimiser, RNG,
step) sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import aux_loss
from ..thor import symmetric_kl
from ..training import Batches, Callback, TrainConfig, Trainer


@dataclass
class Encoded:
    """A tokenised classification set: token ids per sentence (unpadded) and labels."""

    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: Sequence[int]) -> Encoded:
        return Encoded([self.input_ids[i] for i in rows], [self.labels[i] for i in rows])


def collate(data: Encoded, rows: Sequence[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad ``rows`` to their longest sentence (dynamic padding).

    Shape: ``input_ids, attention_mask [B, L]``, ``labels [B]``.
    """
    length = max(len(data.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for r, i in enumerate(rows):
        seq = data.input_ids[i]
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([data.labels[i] for i in rows])}


class RowBatches(Batches):
    """Epoch ``e`` walks a permutation of the rows seeded by ``(seed, e)`` in ``batch_size`` slices
    (a last partial slice is dropped, unless it is the only one)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed

    def epoch(self, index: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        order = torch.randperm(self.num_rows, generator=generator)
        size = self.batch_size
        return [order[i * size : (i + 1) * size].tolist() for i in range(max(self.num_rows // size, 1))]

    def describe(self) -> dict[str, Any]:
        return {"num_rows": self.num_rows, "batch_size": self.batch_size, "seed": self.seed}


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of training batch ``step`` of :class:`RowBatches`."""
    epoch, index = divmod(step, max(num_rows // batch_size, 1))
    return RowBatches(num_rows, batch_size, seed).epoch(epoch)[index]


def eval_batches(data: Encoded, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """Fixed evaluation batches, sentences sorted by length so padding stays small."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    return [collate(data, order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Accuracy in percent (0-100) of ``model`` (in eval mode) on ``batches``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        total += int(batch["labels"].numel())
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def prediction_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """MoEBERT's prediction term: the :func:`~sparsemoe.thor.symmetric_kl` of the two models' class
    distributions (float32), averaged over the batch. Shape: ``[B, C]`` -> ``[]``."""
    return symmetric_kl(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)).mean()


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``Σ_layers`` mean squared error over real tokens. Shapes: ``[B, L, d]`` each, ``mask [B, L]``."""
    weight = mask.unsqueeze(-1).to(student[0].dtype)
    count = weight.sum() * student[0].shape[-1]
    return torch.stack([((s - t).pow(2) * weight).sum() / count for s, t in zip(student, teacher, strict=True)]).sum()


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of ``steps``, then linear decay to 0."""
    warm = max(int(warmup * steps), 1)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (steps - step) / max(steps - warm, 1))


def adamw_grouped(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with ``config.weight_decay`` on matrices only (no decay on biases and LayerNorms)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "LayerNorm" in name else decay).append(param)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )


class _OnStep(Callback):
    def __init__(self, on_step: Callable[[int], None]) -> None:
        self.on_step = on_step

    def on_step_end(self, trainer: Trainer) -> None:
        self.on_step(trainer.step)


def train(
    model: nn.Module,
    data: Encoded,
    config: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    dev: Sequence[dict[str, torch.Tensor]] | None = None,
    distill_weight: float = 1.0,
    warmup: float = 0.1,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place and load the weights that scored best on ``dev`` (last ones if no dev).

    Args:
        model: a Hugging Face sequence classifier (dense or converted).
        data: training set, in :class:`RowBatches` order.
        config: ``steps`` (required), ``batch_size``, ``lr``, ``weight_decay`` (AdamW, not on biases
            and LayerNorms), ``eval_every``, ``seed``; ``checkpoint_path``/``checkpoint_every``: the
            resumable state (an existing file is resumed from; the caller saves the finished model
            and may delete it).
        teacher: the frozen dense model to distil from; ``None`` = plain fine-tuning.
        dev: evaluation batches; the best dev accuracy (``"dev"``) selects the weights.
        distill_weight: λ of the distillation terms.
        warmup: fraction of ``steps`` with a linear warm-up, then linear decay to 0.
        on_step: called after each step with the number of steps done (progress bars).

    Returns ``{"best_dev": accuracy or None, "best_step", "history": [{"step", "loss", "dev"}...]}``.
    """
    if config.steps is None:
        raise ValueError("config.steps must be set: this schedule decays to 0 at the last step")
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup must be a fraction of the steps in [0, 1], got {warmup}")
    if teacher is not None:
        teacher.eval()  # frozen: run under no_grad (its requires_grad flags are left alone, so copies of it train)
    steps = config.steps
    if dev is not None:
        config = replace(config, metric="dev", mode="max")
    path = config.checkpoint_path
    result = Trainer(
        model,
        lambda rows: distillation_loss(model, teacher, collate(data, rows), distill_weight),
        RowBatches(len(data), config.batch_size, config.seed),
        config,
        evaluate=None if dev is None else (lambda: {"dev": accuracy(model, dev)}),
        optimizer=adamw_grouped,
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup)),
        callbacks=[] if on_step is None else [_OnStep(on_step)],
    ).run(resume=path if path is not None and Path(path).exists() else None)
    return {
        "best_dev": result.best_value,
        "best_step": result.best_step,
        "history": [{"step": h["step"], "loss": h["train_loss"], "dev": h["dev"]} for h in result.history],
    }


def distillation_loss(
    model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], distill_weight: float
) -> torch.Tensor:
    """MoEBERT's training loss of one batch: cross-entropy plus the aux losses, and with a teacher
    ``distill_weight`` × (hidden-state MSE + prediction KL)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model(**inputs, output_hidden_states=teacher is not None)
    loss = F.cross_entropy(out.logits.float(), batch["labels"]) + aux_loss(model)
    if teacher is not None:
        with torch.no_grad():
            ref = teacher(**inputs, output_hidden_states=True)
        distill = hidden_mse(out.hidden_states, ref.hidden_states, batch["attention_mask"])
        loss = loss + distill_weight * (distill + prediction_kl(out.logits, ref.logits))
    return loss
