"""Refresh the README's result sections from the files the experiments wrote.

A section is delimited by ``<!-- BEGIN path -->`` and ``<!-- END path -->``, where ``path`` is a
Markdown file relative to the repository root (e.g. ``results/demo/table.md``). Everything
between the markers is replaced by that file's content, minus its top-level ``#`` title, so the
numbers in the README always come from a command, never from typing. Relative links inside the
file are rewritten to stay valid from the README's folder.

Usage, from the repository root: ``python -m tools.readme [README.md]``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from sparsemoe.atomic import atomic_write_text

_LINK = re.compile(r"\]\((?!https?://|#|/)([^)\s]+)\)")
_SECTION = re.compile(r"(<!-- BEGIN (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END (?P=path) -->)", re.DOTALL)


def refresh(readme: Path) -> list[str]:
    """Rewrite ``readme`` in place; returns the paths whose sections were filled."""
    root = readme.resolve().parent
    filled: list[str] = []

    def fill(match: re.Match[str]) -> str:
        source = root / match["path"]
        if not source.is_file():
            raise FileNotFoundError(
                f"{readme} refers to {match['path']}, which does not exist; run its experiment first"
            )
        lines = [line for line in source.read_text().splitlines() if not line.startswith("# ")]
        # Relative links and images point from the source file's folder; re-anchor them at the README's.
        body = _LINK.sub(
            lambda link: f"]({os.path.relpath(source.parent / link[1], root)})", chr(10).join(lines).strip()
        )
        filled.append(match["path"])
        return f"{match.group(1)}{body}\n{match.group(4)}"

    atomic_write_text(readme, _SECTION.sub(fill, readme.read_text()))
    return filled


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    readme = Path(args[0] if args else "README.md")
    for path in refresh(readme):
        print(f"filled {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
