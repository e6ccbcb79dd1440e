"""Where experiment results live, and how a long study survives being stopped.

Each finished run is written as ``<out>/runs/<key>.json`` the moment it ends (atomically: temp file
+ rename), and a rerun skips every key already there. So a study killed halfway continues where it
stopped, and the final tables are always rebuilt from the saved runs alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_text

__all__ = ["RunStore", "atomic_write_text", "write_json"]


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically with the umask's permissions."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def __getattr__(name: str) -> Any:
    """``data_dir`` and ``DATA_ENV`` moved to ``sparsemoe.data``; the old import path still finds them."""
    if name in ("data_dir", "DATA_ENV"):
        from ..data import _paths

        return getattr(_paths, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
