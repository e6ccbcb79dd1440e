"""Fine-tuning and distillation of sequence classifiers, resumable from safetensors checkpoints.

One loop serves both steps of MoEBERT: fine-tuning the dense model (task loss only) and distilling
the converted MoE student from the frozen dense teacher:

    L = CE(student, y) + λ · (Σ_layers MSE(H_student, H_teacher) + ½ (KL(p_t‖p_s) + KL(p_s‖p_t))) + gate losses

``H`` are the hidden states (embedding output and every layer), the MSE averaged over real
(non-padding) tokens; the teacher runs in eval mode (no dropout) without gradients. Batches are a
pure function of ``(seed, step)``, so a run restored from its checkpoint (weights, optimiser, RNG,
step) sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_checkpoint, save_checkpoint
from ..layers import aux_loss
from ..thor import symmetric_kl


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


def batch_rows(num_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of training batch ``step``: epoch ``e`` walks a permutation seeded by ``(seed, e)``."""
    per_epoch = max(num_rows // batch_size, 1)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size : (index + 1) * batch_size].tolist()


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


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (fine-tuning when there is no teacher)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps with a linear warm-up, then linear decay to 0
    distill_weight: float = 1.0  # λ
    eval_every: int = 250  # steps between dev evaluations (model selection); 0 = only at the end
    checkpoint_every: int = 100
    seed: int = 0


def _lr_factor(step: int, config: TrainConfig) -> float:
    warm = max(int(config.warmup * config.steps), 1)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (config.steps - step) / max(config.steps - warm, 1))


def train(
    model: nn.Module,
    data: Encoded,
    config: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    dev: Sequence[dict[str, torch.Tensor]] | None = None,
    checkpoint: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place and load the weights that scored best on ``dev`` (last ones if no dev).

    Args:
        model: a Hugging Face sequence classifier (dense or converted).
        data: training set.
        config: see :class:`TrainConfig`.
        teacher: the frozen dense model to distil from; ``None`` = plain fine-tuning.
        dev: evaluation batches for model selection every ``config.eval_every`` steps.
        checkpoint: file for the resumable state, written every ``config.checkpoint_every`` steps
            (weights, optimiser, RNG, step); the best weights go to ``<checkpoint stem>.best.safetensors``.
            An existing file is resumed from. Nothing is written after the last step: the caller
            saves the finished model (and may delete both files).
        on_step: called after each step with the number of steps done (progress bars).

    Returns ``{"best_dev": accuracy or None, "best_step", "history": [{"step", "dev", "loss"}...]}``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "LayerNorm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    if teacher is not None:
        teacher.eval()  # frozen: run under no_grad (its requires_grad flags are left alone, so copies of it train)
    state: dict[str, Any] = {"best_dev": None, "best_step": None, "history": []}
    best_path = None if checkpoint is None else checkpoint.with_suffix(".best.safetensors")
    best_weights: dict[str, torch.Tensor] | None = None
    start = 0
    if checkpoint is not None and checkpoint.exists():
        meta = load_checkpoint(checkpoint, model, optimizer)
        start, state = meta["step"], meta["config"]["state"]
    model.train()
    eval_every = config.eval_every or config.steps
    running, counted = state.pop("running", (0.0, 0))  # loss sum and count since the last record
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config)
        batch = collate(data, batch_rows(len(data), config.batch_size, config.seed, step))
        loss = _loss(model, teacher, batch, config.distill_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}; lower lr")
        running, counted = running + value, counted + 1
        done = step + 1
        if done % eval_every == 0 or done == config.steps:
            record: dict[str, Any] = {"step": done, "loss": running / max(counted, 1)}
            running, counted = 0.0, 0
            if dev is not None:
                record["dev"] = accuracy(model, dev)
                if state["best_dev"] is None or record["dev"] > state["best_dev"]:
                    state["best_dev"], state["best_step"] = record["dev"], done
                    best_weights = copy.deepcopy(model.state_dict())
                    if best_path is not None:
                        save_checkpoint(best_path, model, step=done)
            state["history"].append(record)
        if checkpoint is not None and done % config.checkpoint_every == 0 and done < config.steps:
            saved = {**state, "running": (running, counted)}
            save_checkpoint(checkpoint, model, optimizer, step=done, config={"train": asdict(config), "state": saved})
        if on_step is not None:
            on_step(done)
    if dev is not None and state["best_step"] is not None:
        if best_weights is not None:
            model.load_state_dict(best_weights)
        elif best_path is not None and best_path.exists():
            load_checkpoint(best_path, model, restore_rng=False)
    model.eval()
    return state


def _loss(
    model: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], distill_weight: float
) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = model(**inputs, output_hidden_states=teacher is not None)
    loss = F.cross_entropy(out.logits.float(), batch["labels"]) + aux_loss(model)
    if teacher is not None:
        with torch.no_grad():
            ref = teacher(**inputs, output_hidden_states=True)
        distill = hidden_mse(out.hidden_states, ref.hidden_states, batch["attention_mask"])
        loss = loss + distill_weight * (distill + prediction_kl(out.logits, ref.logits))
    return loss
