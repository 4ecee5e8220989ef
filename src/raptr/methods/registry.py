"""The method registry: ``name -> Method class`` (each class carries its typed ``Options``).

Everything a host knows about methods comes from here: the config keys ``method.<name>.*`` and
their types, choices and defaults (``raptr.training.config``), the CLI help, validation
(``Options.check``) and building (``build_method``). A new method is one file with a ``Method``
subclass plus one ``register_method`` line; a user's own method can be registered the same way
from their code, before ``raptr.cli.main`` or ``load_config`` runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raptr.errors import RaptrError
from raptr.methods.base import Method, Standard
from raptr.methods.layerdrop import LayerDrop
from raptr.methods.pld import ProgressiveLayerDrop
from raptr.methods.raptr import RaPTrMethod
from raptr.methods.stacking import GradualStacking
from raptr.methods.width import DepthWidth, WidthMethod

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a method under ``cls.name`` (usable as a class decorator); its ``Options`` become config keys."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise RaptrError(f"register_method takes a Method subclass, got {cls!r}")
    name = cls.name
    if not name.isidentifier() or name in ("name", "method"):
        raise RaptrError(f"method name {name!r} cannot be a config key: use a Python identifier other than 'name'")
    if cls.Options is not None and not dataclasses.is_dataclass(cls.Options):
        raise RaptrError(f"{cls.__name__}.Options must be a dataclass of typed fields, got {cls.Options!r}")
    if METHODS.get(name, cls) is not cls:
        raise RaptrError(f"a method named {name!r} is already registered ({METHODS[name].__name__}): pick another name")
    METHODS[name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise RaptrError(f"'method.name' is {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(name: str, options: Any = None) -> Method:
    """A fresh, unattached method (options: its ``Options`` instance, or None for the defaults)."""
    return method_class(name)(options)


for _cls in (Standard, RaPTrMethod, GradualStacking, ProgressiveLayerDrop, LayerDrop, WidthMethod, DepthWidth):
    register_method(_cls)
