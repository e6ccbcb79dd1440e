"""The data directory, and the loaders of the real data sets (they need ``$SPARSEMOE_DATA_DIR``; CI sets it)."""

from __future__ import annotations

import gzip
import hashlib
import io
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from sparsemoe import data
from sparsemoe.data import fetch as fetch_module
from sparsemoe.data import multi30k, sst2

from conftest import needs_data


def test_data_dir_resolves_under_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "some-set").mkdir()
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.DATA_ENV == "SPARSEMOE_DATA_DIR"
    assert data.data_dir("some-set") == tmp_path / "some-set"
    with pytest.raises(FileNotFoundError, match=r"expected .*other-set/ .*SPARSEMOE_DATA_DIR=.*sparsemoe data fetch"):
        data.data_dir("other-set")


def test_data_dir_checks_the_layout_and_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(FileNotFoundError, match=r"sst2/\{train.tsv,dev.tsv,test.tsv\}.*sparsemoe data fetch sst2"):
        data.data_dir("sst2")
    for split in ("dev", "test"):
        (tmp_path / "sst2" / f"{split}.tsv").write_text("sentence\tlabel\n")
    assert data.data_dir("sst2") == tmp_path / "sst2"


def test_default_data_folder_is_the_user_cache_where_fetch_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.data_root() == tmp_path / "sparsemoe" / "data"
    with pytest.raises(FileNotFoundError, match=r"SPARSEMOE_DATA_DIR is not set.*sparsemoe data fetch multi30k"):
        data.data_dir("multi30k")


def test_sst2_reader_keeps_sentences_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text('sentence\tlabel\na "quoted" film \t1\nbad \t0\nmeh \t0\n')
    assert sst2.read_tsv(path) == (['a "quoted" film', "bad", "meh"], [1, 0, 0])
    assert sst2.read_tsv(path, rows=2) == (['a "quoted" film', "bad"], [1, 0])
    with pytest.raises(ValueError, match="split must be one of train, dev, test"):
        sst2.split_path("val")


def test_multi30k_batch_order_is_a_pure_function_of_seed_and_step() -> None:
    lengths = [3, 5, 2, 7, 4, 6, 1, 8, 2, 5]
    corpus = multi30k.ParallelData([[5] * n for n in lengths], [[6] * n for n in lengths], [""] * 10, [""] * 10)
    order = multi30k.BatchOrder(corpus, batch_tokens=40, seed=3)
    epoch = order.epoch(0)
    assert sorted(i for batch in epoch for i in batch) == list(range(10))  # every sentence once per epoch
    steps = [order(step) for step in range(3 * len(epoch))]
    assert steps[: len(epoch)] == epoch and steps[len(epoch) :] != steps[: len(epoch)] * 2  # epochs reshuffle
    replay = multi30k.BatchOrder(corpus, batch_tokens=40, seed=3)
    assert [replay(step) for step in reversed(range(len(steps)))] == steps[::-1]  # resume anywhere: same batches


def _serve(tmp_path: Path, files: dict[str, bytes]) -> str:
    """``files`` written under ``tmp_path/remote``; returns their ``file://`` base URL."""
    remote = tmp_path / "remote"
    for name, content in files.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(content)
    return remote.as_uri() + "/"


def test_fetch_sst2_and_multi30k_write_the_layout_the_loaders_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tsv = {f"{split}.tsv": f"sentence\tlabel\n{split} film \t1\n".encode() for split in ("train", "dev", "test")}
    text = {f"{remote}.{lang}.gz": gzip.compress(f"{remote} {lang}\n".encode()) for remote in
            ("train", "val", "test_2016_flickr") for lang in ("en", "de")}  # fmt: skip
    monkeypatch.setitem(fetch_module.SOURCES, "sst2", _serve(tmp_path / "s", tsv))
    monkeypatch.setitem(fetch_module.SOURCES, "multi30k", _serve(tmp_path / "m", text))
    root = tmp_path / "data"
    monkeypatch.setenv(data.DATA_ENV, str(root))
    with pytest.warns(UserWarning, match="differs from the copy the committed results were made with"):
        assert fetch_module.fetch("sst2") == root / "sst2"
    assert sst2.read_tsv(sst2.split_path("test")) == (["test film"], [1])
    with pytest.warns(UserWarning):
        fetch_module.fetch("multi30k")
    assert multi30k.read_split(data.data_dir("multi30k"), "test") == (["test_2016_flickr en"], ["test_2016_flickr de"])
    assert not list(root.rglob(".*.tmp"))  # written atomically: no temporary files left


def test_fetch_is_silent_when_the_checksum_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = "196\t242\t3\t881250949"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ml-100k/u.data", rows + "\n")
    url = _serve(tmp_path, {"ml.zip": archive.getvalue()}) + "ml.zip"
    monkeypatch.setitem(fetch_module.SOURCES, "movielens-100k", url)
    expected = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + rows + "\n"
    digest = hashlib.sha256(expected.encode()).hexdigest()
    monkeypatch.setitem(fetch_module.CHECKSUMS, "movielens-100k/ml-100k.inter", digest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = fetch_module.fetch("movielens-100k", root=tmp_path / "data")
    assert (folder / "ml-100k.inter").read_text() == expected


def test_fetch_rejects_unknown_names_and_a_file_as_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'imdb'; fetchable: .*multi30k.*sst2"):
        fetch_module.fetch("imdb", root=tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--root"):
        fetch_module.fetch("sst2", root=tmp_path / "file")


@needs_data("movielens-100k")
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


@needs_data("movielens-100k")
def test_movielens_negatives_are_unobserved() -> None:
    from sparsemoe.data import load_movielens
    from sparsemoe.data.movielens import read_ratings

    ratings = read_ratings()
    observed = set(zip((ratings[:, 0] - 1).tolist(), (ratings[:, 1] - 1).tolist(), strict=True))
    split = load_movielens(seed=1)["val"]
    negatives = split.watched == 0
    pairs = zip(split.user[negatives].tolist(), split.item[negatives].tolist(), strict=True)
    assert not any(pair in observed for pair in pairs)


@needs_data("mnist-5k")
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
