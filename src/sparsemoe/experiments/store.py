"""Where experiment results live, and how a long study survives being stopped.

Each finished run is written as ``<out>/runs/<key>.json`` the moment it ends (atomically and
durably, by the project's one writer, :mod:`sparsemoe.atomic`), and a rerun skips every key already
there. So a study killed halfway continues where it stopped, and the final tables are always
rebuilt from the saved runs alone.

A store made with ``config=`` records the settings that shape its results in
``<out>/runs/.config`` and refuses to reuse runs made under different settings: a study rerun
with, say, more training steps must not silently mix new runs with old ones. Settings that only
choose *which* runs to do (seeds, gates, output folder) are left out by the caller.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..atomic import write_json

__all__ = ["RunStore", "write_json"]


class RunStore:
    """Finished runs of one experiment, one JSON file per run key.

    Args:
        out_dir: the experiment's output folder; runs go to ``<out_dir>/runs/``.
        config: the experiment's settings (a mapping of JSON-able values). When given, the first
            store records them, and a later store with different values raises ``ValueError``
            naming the differences, before anything is written or reused.
        selection: keys of ``config`` that only select runs (seeds, gates, ``out``, ``quick``) and
            may differ between sittings.
    """

    CONFIG_FILE = ".config"  # JSON, but outside the runs' "*.json" pattern

    def __init__(
        self, out_dir: str | Path, config: Mapping[str, Any] | None = None, selection: Iterable[str] = ()
    ) -> None:
        self.out_dir = Path(out_dir)
        self.runs_dir = self.out_dir / "runs"
        if config is not None:
            skip = set(selection)
            self._check_config({k: v for k, v in config.items() if k not in skip})

    def _check_config(self, settings: dict[str, Any]) -> None:
        settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
        path = self.runs_dir / self.CONFIG_FILE
        if not path.exists():
            write_json(path, settings)
            return
        saved = json.loads(path.read_text())
        changed = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"the runs saved in {self.runs_dir} were made with other settings ({details}); "
                "rerun with the saved settings to resume, or pass a new --out (or delete that folder) to start afresh"
            )

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

    def reuse_note(self, keys: Iterable[str], retrain: str) -> str | None:
        """What a rerun reuses: ``"reusing 5 saved runs (in <folder>); <retrain>"``, or ``None`` when nothing is saved.

        ``retrain`` says how to train them again instead (``"--fresh to retrain"``).
        """
        reused = sum(self.path(key).exists() for key in keys)
        if not reused:
            return None
        return f"reusing {reused} saved run{'' if reused == 1 else 's'} (in {self.runs_dir}); {retrain}"

    def put(self, key: str, record: dict[str, Any]) -> None:
        write_json(self.path(key), record)

    def checkpoint(self, key: str) -> Path:
        """The checkpoint file of ``key``'s run in progress (``checkpoints/<key>.safetensors`` beside the runs)."""
        return self.out_dir / "checkpoints" / f"{key}.safetensors"

    def run_missing(
        self, jobs: Mapping[str, Callable[[Path], dict[str, Any]]], extra: Mapping[str, Any] | None = None
    ) -> None:
        """Run, in order, the job of every key that has no saved record, and save what it returns.

        ``jobs[key](checkpoint)`` trains one run; ``checkpoint`` (``checkpoints/<key>.safetensors``
        beside the runs) is its own file to write and resume from, so an interrupted sitting continues
        that run. The file is removed once the record (with ``extra``'s entries added) is saved.
        """
        for key, job in jobs.items():
            if self.get(key) is not None:
                continue
            checkpoint = self.checkpoint(key)
            self.put(key, {**job(checkpoint), **(extra or {})})
            checkpoint.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for path in self._run_files():
            yield json.loads(path.read_text())

    def _run_files(self) -> list[Path]:
        return sorted(self.runs_dir.glob("*.json"))

    def clear(self) -> None:
        """Delete every saved run and the recorded settings."""
        for path in self._run_files():
            path.unlink()
        (self.runs_dir / self.CONFIG_FILE).unlink(missing_ok=True)
