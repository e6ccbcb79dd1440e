"""What an experiment's ``Config`` dataclass may declare, and the checks every Config shares.

An experiment's options are the fields of its ``Config``: each has a default and
``metadata={"help": ...}``, and may bound its value with ``"min"``/``"max"`` (inclusive) or
``"above"`` (exclusive) in the same metadata. ``validate(config)``, called from
``Config.__post_init__``, checks types and bounds and raises :class:`ConfigError` naming the field, so
a bad value fails before any work starts, whether it came from Python or from the command line (which
builds its ``--options`` from the same fields, see ``sparsemoe.cli``).

Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Path``, ``Literal[...]`` of those,
``list[T]`` of those, and any of them ``| None`` (``None`` then means "the experiment picks").
This module imports nothing heavy, so the command line can read Configs cheaply.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .._fields import FieldType, check_value, field_type

__all__ = ["ConfigError", "FieldType", "field_type", "from_record", "help_text", "validate"]


class ConfigError(ValueError):
    """A bad value for one Config field; ``field`` names it so the command line can name its option."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def help_text(field: dataclasses.Field[Any]) -> str:
    """The field's ``metadata["help"]`` (required: every option explains itself)."""
    text = field.metadata.get("help")
    if not text:
        raise TypeError(f"Config field {field.name!r} has no metadata={{'help': ...}}; every option needs one")
    return str(text)


def bounds_text(field: dataclasses.Field[Any]) -> str:
    """The field's bounds in words (``"at least 1"``, ``"above 0"``), or ``""`` when it has none."""
    meta = field.metadata
    parts = []
    if "min" in meta:
        parts.append(f"at least {meta['min']}")
    if "above" in meta:
        parts.append(f"above {meta['above']}")
    if "max" in meta:
        parts.append(f"at most {meta['max']}")
    return " and ".join(parts)


def _check_bounds(field: dataclasses.Field[Any], value: Any) -> None:
    meta = field.metadata
    low, above, high = meta.get("min"), meta.get("above"), meta.get("max")
    if (
        (low is not None and value < low)
        or (above is not None and value <= above)
        or (high is not None and value > high)
    ):
        raise ConfigError(field.name, f"must be {bounds_text(field)} (got {value!r})")


def run_settings(config: Any) -> dict[str, Any]:
    """``asdict(config)`` as a study's run store keys it: ``expert_parallel`` only when it is on, so
    that data-parallel and one-process runs share their settings (and their saved runs)."""
    settings = dataclasses.asdict(config)
    if not settings.get("expert_parallel", True):
        del settings["expert_parallel"]
    return settings


def from_record(config_class: Any, results: dict[str, Any]) -> Any:
    """The study's Config as its ``results.json`` recorded it (``out`` back to a ``Path``), so its report
    can be redrawn from the record alone."""
    return config_class(**{**results["config"], "out": Path(results["config"]["out"])})


def validate(config: Any) -> None:
    """Check every field of the dataclass instance ``config``: type, bounds, help text.

    Converts in place where the meaning is unambiguous (``str`` to ``Path``, ``int`` to ``float``,
    a tuple to a list). Raises ``TypeError`` for a wrong type and :class:`ConfigError` (a
    ``ValueError``) for a value out of bounds, each naming the field.
    """
    cls = type(config)
    for field in dataclasses.fields(config):
        help_text(field)
        kind = field_type(cls, field)
        value = check_value(field.name, kind, getattr(config, field.name))
        for v in [] if value is None else value if kind.many else [value]:
            if kind.choices is not None and v not in kind.choices:
                raise ConfigError(field.name, f"must be one of {', '.join(map(str, kind.choices))} (got {v!r})")
            _check_bounds(field, v)
        object.__setattr__(config, field.name, value)  # works for frozen Configs too
