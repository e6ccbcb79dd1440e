"""Where experiment results live, and how a long study survives being stopped.

Each finished run is written as ``<out>/runs/<key>.json`` the moment it ends (atomically: temp file
+ rename), and a rerun skips every key already there. So a study killed halfway continues where it
stopped, and the final tables are always rebuilt from the saved runs alone.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_ENV = "SPARSEMOE_DATA_DIR"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def data_dir(name: str) -> Path:
    """``$SPARSEMOE_DATA_DIR/<name>``, checked to exist, with a message saying how to fix it."""
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


class RunStore:
    """Finished runs of one experiment, one JSON file per run key."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.runs_dir = self.out_dir / "runs"

    @staticmethod
    def key(**parts: object) -> str:
        """A file-name-safe key such as ``gate=comet__seed=0``."""
        raw = "__".join(f"{k}={v}" for k, v in parts.items())
        return re.sub(r"[^A-Za-z0-9=_.+-]", "-", raw)

    def path(self, key: str) -> Path:
        return self.runs_dir / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        write_json(self.path(key), record)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.runs_dir.glob("*.json")):
            yield json.loads(path.read_text())

    def clear(self) -> None:
        for path in self.runs_dir.glob("*.json"):
            path.unlink()
