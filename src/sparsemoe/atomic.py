"""The one way this project writes a file: atomic and durable, with normal permissions.

A reader sees the old file or the new one, never half of it, and a crash (even of the machine) right
after a write returns leaves the new file on disk: the content goes to a temporary sibling, which is
``fsync``-ed, renamed over the target with ``os.replace``, and then the folder is ``fsync``-ed so
the rename itself is durable. ``tempfile.mkstemp`` would create the sibling with mode 0600, which
the rename carries to the result; here it is created with 0666 minus the process umask, as
``open()`` would, so results and checkpoints stay readable by whoever could read the folder.

Temporary names carry the writer's process id (``.<name>.<pid>.<random>.tmp``); a write removes
the temporary files of the same target left by writers that no longer run (killed mid-write).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "save_figure", "write_json"]

_TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary file next to ``path``; make it ``path``, durably, if the block succeeds.

    The block writes the temporary file by name, so libraries that take a path (safetensors,
    matplotlib's ``savefig``) can use it. On success the file is ``fsync``-ed, renamed onto ``path``
    and the folder ``fsync``-ed; on any exception the temporary file is removed and ``path`` is left
    untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 & ~umask
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:  # the writer made the file anew (safetensors' save_file: 0600)
            tmp.chmod(mode)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[: 1 << 24]) :]
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably (see the module docstring)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON (and a final newline), written atomically and durably."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # write access: some platforms refuse fsync on a read-only handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; Windows has no folder handles to flush)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files of ``path`` left by writers that no longer run (killed mid-write)."""
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*{_TMP_SUFFIX}"):
        try:
            pid = int(tmp.name[len(prefix) :].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, OSError):  # not one of ours, or a live process of another user
            continue


def save_figure(figure: Any, path: str | Path, **kwargs: Any) -> None:
    """``figure.savefig(path, **kwargs)`` (matplotlib), atomically and durably.

    The temporary file's name ends in ``.tmp``, so the format is passed from ``path``'s suffix
    (unless ``format=`` is given).
    """
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, **kwargs)
