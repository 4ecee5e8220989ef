"""Typed dataclass fields from plain values: one converter for YAML, ``key=value`` and Python.

``from_dict(cls, data)`` builds a config dataclass from parsed YAML or command-line values;
``check_fields(obj)`` checks one that was built in Python (``RaPTrOptions(scaling="sqr")``). Both
convert each value to its field's type (``Literal`` choices, bool, int, float, str, lists, nested
dataclasses) or raise one ``RaptrError`` line naming the key and what it takes.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Callable, Literal

import yaml

from raptr.errors import RaptrError


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _same(kind: Any) -> Any:
    return kind


def convert(value: Any, kind: Any, key: str, resolve: Callable[[Any], Any] = _same) -> Any:
    """``value`` as ``kind`` (``resolve`` may stand a field's declared type in for another, e.g. the
    registered methods' options), or one error line naming ``key``."""
    kind = resolve(kind)
    origin = typing.get_origin(kind)
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise RaptrError(f"'{key}' is {value!r}: use one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(kind):
        if dataclasses.is_dataclass(value) and isinstance(value, kind):
            return value
        if not isinstance(value, dict):
            raise RaptrError(f"'{key}' must be a mapping of its fields, got {value!r}")
        return from_dict(kind, value, key + ".", resolve)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):  # "0,1" on the command line: items parsed like single values, strings kept as written
            value = [v if item is str else _scalar(v) for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise RaptrError(f"'{key}' must be a list, got {value!r}")
        return [convert(v, item, f"{key}[{i}]", resolve) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise RaptrError(f"'{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RaptrError(f"'{key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RaptrError(f"'{key}' must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RaptrError(f"'{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {kind} for {key}")


def from_dict(cls: type, data: dict, prefix: str = "", resolve: Callable[[Any], Any] = _same) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(prefix + n for n in names)}"
            raise RaptrError(f"unknown config key '{prefix}{key}': {hint}")
        kwargs[key] = convert(value, hints[key], prefix + key, resolve)
    return cls(**kwargs)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Convert, in place, every field of a dataclass built in Python, or raise one error line."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, convert(getattr(obj, f.name), hints[f.name], prefix + f.name))
