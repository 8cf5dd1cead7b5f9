"""The two tables that make the toolkit extensible: METHODS and FAMILIES.

Adding a method or a backbone family is one new file plus one `register_*` line; tests, presets,
checkpoints and the CLI discover entries from these tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backbones.layout import Family
    from .methods.base import Method

METHODS: dict[str, type["Method"]] = {}
FAMILIES: dict[str, "Family"] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: add a Method subclass under `cls.name`. A duplicate name raises."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name]!r}")
    METHODS[cls.name] = cls
    return cls


def register_family(family: "Family") -> "Family":
    """Add a backbone family under `family.name`. A duplicate name raises."""
    if family.name in FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family
