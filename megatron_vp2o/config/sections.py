"""Config sections registered from the package that owns them (config stays a leaf package).

The root :class:`~megatron_vp2o.config.Config` holds the core sections (``model``, ``parallel``,
``train``, ...) as plain dataclass fields, and one *slot* per section that lives elsewhere: the
``rl`` section is defined in ``megatron_vp2o/rl/config.py``, which calls
``register_section("rl", RLConfig)`` when it is imported (``megatron_vp2o/__init__.py`` imports it,
so the section is always there). ``megatron_vp2o.config`` itself imports nothing from ``rl/``
(tests/algo/test_boundary.py checks it), which removes the old ``config -> rl.config ->
config.loader`` package cycle.

A slot is an ordinary dataclass field (so ``dataclasses.replace`` and ``asdict`` work) whose
metadata names the section; :func:`megatron_vp2o.config.loader.build` looks the section's type
up here when it builds the field.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

_SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> type:
    """Make ``cls`` (a dataclass) the type of the root config's ``name`` slot; returns ``cls``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"config section '{name}' must be a dataclass, got {cls!r}")
    known = _SECTIONS.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"config section '{name}' is already registered as {known.__qualname__}")
    _SECTIONS[name] = cls
    return cls


def section_type(name: str) -> type | None:
    """The registered type of section ``name`` (None when nothing registered it)."""
    return _SECTIONS.get(name)


def _default(name: str) -> Any:
    cls = _SECTIONS.get(name)
    return None if cls is None else cls()


def section_slot(name: str, home: str) -> Any:
    """A dataclass field for a section registered by module ``home`` (its default: the section's
    defaults, or None while nothing registered it)."""
    return dataclasses.field(default_factory=partial(_default, name), metadata={"section": name, "home": home})
