"""MovieLens-100K as the COMET paper's two-task recommender problem.

Task 1 ("will watch"): observed (user, item) pairs are positives; for each positive, one item the
user never rated is drawn as a negative (seeded, per user). Task 2: the rating (1-5) of observed
pairs; its loss is masked to the positives. Rows are split train/val/test by a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._paths import data_dir
from .table import read_table

NAME = "movielens-100k"


@dataclass
class MovieLens:
    """One split: ``user, item: LongTensor[T]`` (0-based), ``watched: [T]`` in {0, 1}, ``rating: [T]``
    (0 where not watched), and the vocabulary sizes."""

    user: torch.Tensor
    item: torch.Tensor
    watched: torch.Tensor
    rating: torch.Tensor
    num_users: int
    num_items: int

    def __len__(self) -> int:
        return int(self.user.numel())

    def subset(self, rows: torch.Tensor | np.ndarray) -> MovieLens:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return MovieLens(
            self.user[rows], self.item[rows], self.watched[rows], self.rating[rows], self.num_users, self.num_items
        )


def read_ratings(path: str | None = None) -> np.ndarray:
    """``[100000, 3]`` int array of (user id, item id, rating) as in the RecBole atomic file (1-based ids)."""
    folder = data_dir(NAME) if path is None else path
    return read_table(f"{folder}/ml-100k.inter", columns=4, delimiter="\t", usecols=(0, 1, 2), header_lines=1)


def load_movielens(
    seed: int = 0, negatives: int = 1, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, MovieLens]:
    """``{"train", "val", "test"}`` splits of positives plus ``negatives`` sampled negatives each.

    Args:
        seed: seeds both the negative sampling and the split, so a seed fixes the whole data set.
        negatives: unobserved items drawn per observed pair, per user without replacement when possible.
        fractions: train/val/test shares of the rows (positives and negatives shuffled together).
    """
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive shares summing to 1, got {fractions}")
    ratings = read_ratings()
    users, items = ratings[:, 0] - 1, ratings[:, 1] - 1
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    rng = np.random.default_rng(seed)
    neg_users, neg_items = [], []
    seen = np.zeros((num_users, num_items), dtype=bool)
    seen[users, items] = True
    for u in range(num_users):
        count = int(seen[u].sum()) * negatives
        pool = np.flatnonzero(~seen[u])
        if count == 0 or pool.size == 0:
            continue
        neg_items.append(rng.choice(pool, size=count, replace=count > pool.size))
        neg_users.append(np.full(count, u))
    all_users = np.concatenate([users, *neg_users])
    all_items = np.concatenate([items, *neg_items])
    watched = np.concatenate([np.ones(len(users)), np.zeros(len(all_users) - len(users))])
    rating = np.concatenate([ratings[:, 2], np.zeros(len(all_users) - len(users))])
    full = MovieLens(
        torch.from_numpy(all_users).long(),
        torch.from_numpy(all_items).long(),
        torch.from_numpy(watched).float(),
        torch.from_numpy(rating).float(),
        num_users,
        num_items,
    )
    order = rng.permutation(len(full))
    n_train = int(fractions[0] * len(full))
    n_val = int(fractions[1] * len(full))
    return {
        "train": full.subset(order[:n_train]),
        "val": full.subset(order[n_train : n_train + n_val]),
        "test": full.subset(order[n_train + n_val :]),
    }
