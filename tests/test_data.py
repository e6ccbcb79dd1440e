"""The data directory, and the loaders of the real data sets (they need ``$SPARSEMOE_DATA_DIR``; CI sets it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparsemoe import data

needs_data = pytest.mark.skipif(
    not os.environ.get("SPARSEMOE_DATA_DIR"),
    reason="SPARSEMOE_DATA_DIR is not set (export SPARSEMOE_DATA_DIR=../shared/data to run the data tests)",
)


def test_data_dir_resolves_under_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "some-set").mkdir()
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.DATA_ENV == "SPARSEMOE_DATA_DIR"
    assert data.data_dir("some-set") == tmp_path / "some-set"
    with pytest.raises(FileNotFoundError, match="must contain other-set/"):
        data.data_dir("other-set")
    monkeypatch.delenv(data.DATA_ENV)
    with pytest.raises(FileNotFoundError, match=r"set SPARSEMOE_DATA_DIR .* sparsemoe data fetch some-set"):
        data.data_dir("some-set")


def test_data_dir_old_import_path_is_the_same_function() -> None:
    from sparsemoe.experiments import store

    assert store.data_dir is data.data_dir and store.DATA_ENV == data.DATA_ENV


@needs_data
def test_movielens_two_tasks_and_fixed_split() -> None:
    from sparsemoe.data import load_movielens

    data = load_movielens(seed=0)
    assert {k: len(v) for k, v in data.items()} == {"train": 160000, "val": 20000, "test": 20000}
    train = data["train"]
    assert (train.num_users, train.num_items) == (943, 1682)
    assert 0.45 < float(train.watched.mean()) < 0.55  # one negative per positive
    seen = train.watched > 0
    assert train.rating[seen].min() >= 1 and train.rating[seen].max() <= 5
    assert torch.all(train.rating[~seen] == 0)
    again = load_movielens(seed=0)
    assert torch.equal(again["test"].user, data["test"].user) and torch.equal(again["test"].item, data["test"].item)


@needs_data
def test_movielens_negatives_are_unobserved() -> None:
    from sparsemoe.data import load_movielens
    from sparsemoe.data.movielens import read_ratings

    ratings = read_ratings()
    observed = set(zip((ratings[:, 0] - 1).tolist(), (ratings[:, 1] - 1).tolist(), strict=True))
    split = load_movielens(seed=1)["val"]
    negatives = split.watched == 0
    pairs = zip(split.user[negatives].tolist(), split.item[negatives].tolist(), strict=True)
    assert not any(pair in observed for pair in pairs)


@needs_data
def test_multimnist_overlays_two_shifted_digits() -> None:
    from sparsemoe.data import load_multimnist
    from sparsemoe.data.multimnist import overlay, read_digits

    digits, labels = read_digits()
    assert digits.shape == (5000, 28, 28) and set(labels.tolist()) == set(range(10))
    data = load_multimnist(seed=0, sizes=(64, 16, 16))
    assert data["train"].images.shape == (64, 1, 36, 36)
    assert data["train"].labels.shape == (64, 2)
    assert float(data["train"].images.min()) >= 0.0 and float(data["train"].images.max()) <= 1.0
    canvas = overlay(digits[:1], digits[1:2])
    assert (canvas[0, :28, :28] >= digits[0]).all()  # top-left digit in the top-left 28x28 window
    assert (canvas[0, 8:, 8:] >= digits[1]).all()  # bottom-right digit shifted by 8 px
