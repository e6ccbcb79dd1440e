"""The COMET paper's small CNN expert for MultiMNIST, and the multi-task vision MMoE built from it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import gates
from ..experts import ModuleExperts
from ..layers import MultiTaskMoE
from .mmoe import MMoE


class CNNExpert(nn.Sequential):
    """``[T, 1, H, W] -> [T, 50]``: conv(5x5, 10)+maxpool -> conv(5x5, 20)+maxpool -> Dense(50) -> Dense(50)."""

    def __init__(self, image_size: int = 36, channels: int = 1, d_out: int = 50) -> None:
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by a 2x2 pool
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for two 5x5 convs and two 2x2 pools")
        super().__init__(
            nn.Conv2d(channels, 10, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(10, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(20 * side * side, d_out),
            nn.ReLU(),
            nn.Linear(d_out, d_out),
            nn.ReLU(),
        )


class CNNExperts(ModuleExperts):
    """A bank of :class:`CNNExpert`: rows are ``[1, H, W]`` images, outputs ``[d_out]``."""

    def __init__(self, num_experts: int, image_size: int = 36, d_out: int = 50) -> None:
        super().__init__([CNNExpert(image_size, d_out=d_out) for _ in range(num_experts)], d_out=d_out, input_dims=3)


class VisionMMoE(MMoE):
    """CNN experts, gates on the flattened raw image, a ``Dense(50) -> Dense(classes)`` tower per task.

    The paper's head is Dense(50) -> Dense(50) -> Dense(10); the expert's last Dense(50) plays the
    first of those here, and the tower adds Dense(50)+ReLU -> Dense(10). Returns per-task logits.
    """

    def __init__(
        self,
        gate: str,
        *,
        num_experts: int = 16,
        k: int | None = 4,
        num_tasks: int = 2,
        num_classes: int = 10,
        image_size: int = 36,
        local_search_steps: int = 1000,
        **gate_options: Any,
    ) -> None:
        spec = gates.parse(gate)
        moe = MultiTaskMoE(
            image_size * image_size,
            50,
            num_experts,
            num_tasks,
            gate=spec,
            expert=CNNExperts(num_experts, image_size),
            local_search_steps=local_search_steps,
            **{**gates.k_options(spec.name, k), **gate_options},
        )
        super().__init__(moe, 50, [num_classes] * num_tasks, gate_from_input=True)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]  # no ids: images only
        return super().forward(images)
