"""Atomic file writes that keep normal permissions.

A reader sees the old file or the new one, never half of it: the content goes to a temporary sibling
that is renamed over the target. ``tempfile.mkstemp`` would create that sibling with mode 0600, which
the rename then carries to the result; here it is created with 0666 minus the process umask, as
``open()`` would, so results and checkpoints stay readable by whoever could read the folder.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary file next to ``path``; rename it onto ``path`` if the block succeeds.

    The block writes the temporary file by name (so libraries that take a path, such as safetensors,
    can use it). On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode 0666 & ~umask
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
