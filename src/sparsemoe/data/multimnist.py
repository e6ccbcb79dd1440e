"""MultiMNIST built from the 5,000 MNIST digits in ``$SPARSEMOE_DATA_DIR/mnist-5k``.

As in the COMET paper (after Sabour et al.): two digits are overlaid on a 36x36 canvas, one shifted
4 px toward the top-left corner, the other 4 px toward the bottom-right (pixel-wise maximum).
Task 1 is the top-left digit's class, task 2 the bottom-right one's. The *digits* are split
train/val/test first, and pairs are drawn within each split, so no test digit is seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._paths import data_dir
from .table import read_table

NAME = "mnist-5k"
CANVAS = 36
SHIFT = 4


@dataclass
class MultiMNIST:
    """One split: ``images: [T, 1, 36, 36]`` in [0, 1], ``labels: LongTensor[T, 2]`` (top-left, bottom-right)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``([5000, 28, 28] uint8, [5000] int64)`` from ``mnist_5k.csv.gz``."""
    table = read_table(data_dir(NAME) / "mnist_5k.csv.gz", columns=785, delimiter=",")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def overlay(top_left: np.ndarray, bottom_right: np.ndarray) -> np.ndarray:
    """``[T, 28, 28]`` x2 -> ``[T, 36, 36]``: the first digit shifted up-left, the second down-right."""
    canvas = np.zeros((len(top_left), 2, CANVAS, CANVAS), dtype=np.uint8)
    centre = (CANVAS - 28) // 2  # 4
    a, b = centre - SHIFT, centre + SHIFT  # 0 and 8
    canvas[:, 0, a : a + 28, a : a + 28] = top_left
    canvas[:, 1, b : b + 28, b : b + 28] = bottom_right
    return canvas.max(axis=1)


def load_multimnist(
    seed: int = 0, sizes: tuple[int, int, int] = (10000, 2000, 2000), fractions: tuple[float, float] = (0.7, 0.15)
) -> dict[str, MultiMNIST]:
    """``{"train", "val", "test"}`` with ``sizes`` pairs each.

    Args:
        seed: fixes the digit split and the pairing.
        sizes: number of overlaid images per split.
        fractions: shares of the 5,000 digits for train and val (test gets the rest).
    """
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"sizes must be three positive pair counts, got {sizes}")
    digits, labels = read_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits))
    n_train, n_val = int(fractions[0] * len(order)), int(fractions[1] * len(order))
    pools = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    out = {}
    for (split, pool), size in zip(pools.items(), sizes, strict=True):
        first, second = rng.choice(pool, size=size), rng.choice(pool, size=size)
        images = overlay(digits[first], digits[second]).astype(np.float32) / 255.0
        out[split] = MultiMNIST(
            torch.from_numpy(images)[:, None],
            torch.from_numpy(np.stack([labels[first], labels[second]], axis=1)).long(),
        )
    return out
