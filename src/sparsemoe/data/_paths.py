"""Where the data sets live: an environment variable or a per-user default, checked with a message saying how to fix it.

It sits in ``sparsemoe.data`` (not with the experiments) so that the loaders depend on nothing above them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the environment variable naming the folder that holds one subfolder per data set
DATA_ENV = "SPARSEMOE_DATA_DIR"

#: the files each data set's folder holds: what ``sparsemoe data fetch`` writes and the loaders read
LAYOUT: dict[str, tuple[str, ...]] = {
    "movielens-100k": ("ml-100k.inter",),
    "mnist-5k": ("mnist_5k.csv.gz",),
    "multi30k": ("train.en", "train.de", "val.en", "val.de", "test.en", "test.de"),
    "sst2": ("train.tsv", "dev.tsv", "test.tsv"),
}


def data_root() -> Path:
    """``$SPARSEMOE_DATA_DIR``, or ``sparsemoe/data`` in the user's cache folder when it is unset.

    The default (``$XDG_CACHE_HOME`` or ``~/.cache``) is where ``sparsemoe data fetch`` writes, so a
    fetched data set is found without setting anything.
    """
    root = os.environ.get(DATA_ENV)
    if root:
        return Path(root).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "sparsemoe" / "data"


def data_dir(name: str) -> Path:
    """``<data root>/<name>``, checked to hold the data set's files (``FileNotFoundError`` saying how to fix it)."""
    root = data_root()
    path = root / name
    files = LAYOUT.get(name, ())
    missing = [f for f in files if not (path / f).is_file()]
    if path.is_dir() and not missing:
        return path
    origin = f"{DATA_ENV}={os.environ[DATA_ENV]}" if os.environ.get(DATA_ENV) else f"the default; {DATA_ENV} is not set"
    layout = f"{path}/{{{','.join(files)}}}" if len(files) > 1 else f"{path}/{''.join(files)}"
    raise FileNotFoundError(
        f"data set {name!r} not found: expected {layout} (data folder {root}, {origin}). "
        f"Download it there with: sparsemoe data fetch {name}; or set {DATA_ENV} to a folder that holds {name}/"
    )
