"""Validated reading of the numeric text tables in the data folder (TSV/CSV, optionally gzipped).

``numpy.loadtxt`` does the parsing (fast); when it fails, the file is scanned again line by line to
report the first bad line, so a missing, empty, truncated or malformed file gives an error naming
the file and the line instead of a bare ``ValueError`` from deep inside numpy.
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path
from typing import IO

import numpy as np


def _open(path: Path) -> IO[str]:
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def read_table(
    path: str | Path,
    *,
    columns: int,
    delimiter: str | None = None,
    usecols: tuple[int, ...] | None = None,
    header_lines: int = 0,
    dtype: type = np.int64,
) -> np.ndarray:
    """``[rows, len(usecols) or columns]`` array of the numbers in a delimited text file.

    Args:
        columns: fields every data line must have (at least ``max(usecols) + 1`` when ``usecols``).
        delimiter: field separator (``None``: any whitespace).
        usecols: the fields to keep (default: all ``columns``).
        header_lines: lines to skip at the top.
        dtype: ``np.int64`` or ``np.float64``.

    Raises:
        FileNotFoundError: the file does not exist (names it).
        ValueError: the file is empty or has a malformed line (names the file and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} is missing (check $SPARSEMOE_DATA_DIR or the path given)")
    try:
        with _open(path) as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table: np.ndarray = np.loadtxt(
                f, delimiter=delimiter, skiprows=header_lines, usecols=usecols, dtype=dtype, ndmin=2
            )
    except (ValueError, EOFError, OSError, UnicodeDecodeError) as e:
        raise _first_bad_line(path, columns, delimiter, usecols, header_lines, dtype, e) from None
    if table.shape[0] == 0:
        raise ValueError(f"data file {path} is empty: no data lines after {header_lines} header line(s)")
    if usecols is None and table.shape[1] != columns:
        raise ValueError(f"data file {path}, line {header_lines + 1}: {table.shape[1]} fields, expected {columns}")
    return table


def _first_bad_line(
    path: Path,
    columns: int,
    delimiter: str | None,
    usecols: tuple[int, ...] | None,
    header_lines: int,
    dtype: type,
    cause: Exception,
) -> ValueError:
    """A ValueError naming the first malformed line of ``path`` (or the file, if no line is at fault)."""
    wanted = usecols if usecols is not None else tuple(range(columns))
    try:
        with _open(path) as f:
            for number, line in enumerate(f, start=1):
                if number <= header_lines or not line.strip():
                    continue
                fields = line.rstrip("\n").split(delimiter)
                if len(fields) < max(wanted) + 1 or (usecols is None and len(fields) != columns):
                    return ValueError(
                        f"data file {path}, line {number}: {len(fields)} fields, expected {columns}: {line[:80]!r}"
                    )
                for i in wanted:
                    try:
                        dtype(fields[i]) if dtype is not np.int64 else int(fields[i])
                    except ValueError:
                        return ValueError(
                            f"data file {path}, line {number}, field {i + 1}: {fields[i][:40]!r} is not "
                            f"{'an integer' if dtype is np.int64 else 'a number'}"
                        )
    except (EOFError, OSError, UnicodeDecodeError) as e:
        return ValueError(f"data file {path} is damaged or truncated: {type(e).__name__}: {e}")
    return ValueError(f"data file {path} could not be read: {cause}")
