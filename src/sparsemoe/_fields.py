"""Dataclass fields taken apart by type, and values checked against them.

Shared by the experiments' ``Config`` classes (options from the command line or Python) and
:class:`~sparsemoe.training.TrainConfig` (settings from JSON/TOML files): both refuse a value of the
wrong type, naming it, instead of failing later or coercing it silently (``True`` is not a count).
This module imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FieldType", "check_value", "field_type"]

_SCALARS: tuple[type, ...] = (bool, int, float, str, Path)


@dataclass(frozen=True)
class FieldType:
    """A field's type, taken apart: the scalar type, list or not, ``None`` allowed or not, choices."""

    scalar: type
    many: bool = False
    optional: bool = False
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        """``"int"``, ``"list of float"``, ``"int or null"``: how an error names the expected type."""
        text = f"list of {self.scalar.__name__}" if self.many else self.scalar.__name__
        return f"{text} or null" if self.optional else text


def field_type(cls: type, field: dataclasses.Field[Any]) -> FieldType:
    """The :class:`FieldType` of ``field`` of the dataclass ``cls`` (string annotations resolved).

    Supported: ``bool``, ``int``, ``float``, ``str``, ``Path``, ``Literal[...]`` of those,
    ``list[T]`` of those, and any of them ``| None``. Raises ``TypeError`` naming the field otherwise.
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


def _scalar(label: str, kind: FieldType, value: Any) -> Any:
    if kind.scalar is Path and isinstance(value, str):
        return Path(value)
    if kind.scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: True is not a valid seed count
    if not isinstance(value, kind.scalar) or (kind.scalar is not bool and isinstance(value, bool)):
        raise TypeError(f"{label} must be {kind.describe()}, got {type(value).__name__} ({value!r})")
    return value


def check_value(label: str, kind: FieldType, value: Any) -> Any:
    """``value`` checked against ``kind``; returns it converted where the meaning is unambiguous.

    ``str`` becomes ``Path``, ``int`` becomes ``float``, a tuple becomes a list. A wrong type raises
    ``TypeError("<label> must be <type>, got <type> (<value>)")``. Choices are not checked here.
    """
    if value is None:
        if not kind.optional:
            raise TypeError(f"{label} must be {kind.describe()}, got None")
        return None
    if kind.many:
        if not isinstance(value, list | tuple):
            raise TypeError(f"{label} must be {kind.describe()}, got {type(value).__name__} ({value!r})")
        return [_scalar(label, kind, v) for v in value]
    return _scalar(label, kind, value)
