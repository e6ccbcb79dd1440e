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
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "FieldType", "field_type", "help_text", "validate"]

_SCALARS: tuple[type, ...] = (bool, int, float, str, Path)


class ConfigError(ValueError):
    """A bad value for one Config field; ``field`` names it so the command line can name its option."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


@dataclass(frozen=True)
class FieldType:
    """A Config field's type, taken apart: the scalar type, list or not, ``None`` allowed or not."""

    scalar: type
    many: bool = False
    optional: bool = False
    choices: tuple[Any, ...] | None = None


def field_type(cls: type, field: dataclasses.Field[Any]) -> FieldType:
    """The :class:`FieldType` of ``field`` of the dataclass ``cls`` (string annotations resolved).

    Raises ``TypeError`` for a type the command line could not parse, naming the field.
    """
    hint = typing.get_type_hints(cls)[field.name]
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        if len(members) != 1:
            raise TypeError(f"{cls.__name__}.{field.name}: a union of several types ({hint}) is not supported")
        hint = members[0]
        origin = typing.get_origin(hint)
    many = origin in (list, tuple)
    if many:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(set(args)) != 1:
            raise TypeError(f"{cls.__name__}.{field.name}: use list[T] with one element type, not {hint}")
        hint = args[0]
        origin = typing.get_origin(hint)
    choices = None
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        hint = type(choices[0])
    if hint not in _SCALARS:
        raise TypeError(
            f"{cls.__name__}.{field.name}: type {hint} is not supported; use bool, int, float, str, Path, "
            "Literal[...], a list of those, or any of them | None"
        )
    return FieldType(scalar=hint, many=many, optional=optional, choices=choices)


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


def _check_scalar(name: str, kind: FieldType, value: Any) -> Any:
    """``value`` checked against the scalar type (ints accepted for floats, strings for paths)."""
    if kind.scalar is Path and isinstance(value, str):
        return Path(value)
    if kind.scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: True is not a valid seed count
    if not isinstance(value, kind.scalar) or (kind.scalar is not bool and isinstance(value, bool)):
        raise TypeError(f"{name}: expected {kind.scalar.__name__}, got {type(value).__name__} {value!r}")
    if kind.choices is not None and value not in kind.choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, kind.choices))} (got {value!r})")
    return value


def _check_bounds(field: dataclasses.Field[Any], value: Any) -> None:
    meta = field.metadata
    low, above, high = meta.get("min"), meta.get("above"), meta.get("max")
    if (
        (low is not None and value < low)
        or (above is not None and value <= above)
        or (high is not None and value > high)
    ):
        raise ConfigError(field.name, f"must be {bounds_text(field)} (got {value!r})")


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
        value = getattr(config, field.name)
        if value is None:
            if not kind.optional:
                raise TypeError(f"{field.name}: None is not allowed; give a {kind.scalar.__name__}")
            continue
        if kind.many:
            if not isinstance(value, list | tuple):
                raise TypeError(f"{field.name}: expected a list of {kind.scalar.__name__}, got {value!r}")
            value = [_check_scalar(field.name, kind, v) for v in value]
            for v in value:
                _check_bounds(field, v)
        else:
            value = _check_scalar(field.name, kind, value)
            _check_bounds(field, value)
        object.__setattr__(config, field.name, value)  # works for frozen Configs too
