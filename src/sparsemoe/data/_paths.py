"""Where the data sets live: one environment variable, checked with a message that says how to fix it.

It sits in ``sparsemoe.data`` (not with the experiments) so that the loaders depend on nothing above them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the environment variable naming the folder that holds one subfolder per data set
DATA_ENV = "SPARSEMOE_DATA_DIR"


def data_dir(name: str) -> Path:
    """``$SPARSEMOE_DATA_DIR/<name>``, checked to exist (``FileNotFoundError`` saying how to fix it otherwise)."""
    root = os.environ.get(DATA_ENV)
    if not root:
        raise FileNotFoundError(
            f"set {DATA_ENV} to the folder holding {name}/ (e.g. export {DATA_ENV}=../shared/data), "
            f"or download it with: sparsemoe data fetch {name}"
        )
    path = Path(root).expanduser() / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; {DATA_ENV}={root} must contain {name}/")
    return path
