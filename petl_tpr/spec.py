"""Spec: which methods go where. Plain data with a JSON round trip; presets are specs.

JSON shape::

    {"version": 1, "entries": [
        {"method": "lora", "name": "lora", "compose": "error",
         "config": {"rank": 32, "scaling": "learnable", "roles": ["k", "v"]},
         "where": {"branches": ["vision", "text"], "layers": null, "roles": null}}]}

`where.roles` overrides the config's roles; `where.layers` takes ints (negative from the end) or
a "start:stop" string; `compose="add"` lets an entry share a site with an earlier one (the two
contributions are summed); otherwise a second adapter on the same site and slot is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import SpecError
from .methods.base import config_from_dict, config_to_dict
from .registry import METHODS

SPEC_VERSION = 1
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layers_from(value: Any) -> tuple[int, ...] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not re.fullmatch(r"-?\d{0,9}:-?\d{0,9}", value):
            raise SpecError(f"layers string must look like 'start:stop', got {_short(value)}")
        return value
    if _is_int(value):
        return (value,)
    if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
        return tuple(value)
    raise SpecError(f"layers must be null, a list of ints or 'start:stop', got {_short(value)}")


def _names_from(field: str, value: Any) -> tuple[str, ...] | None:
    """A `where` list of names: null, one string, or a list of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(f"where.{field} must be null, a name or a list of names, got {_short(value)}")


@dataclass(frozen=True)
class Where:
    """Selector: branches (None = all), layers (None = all), roles (None = the config's roles)."""

    branches: tuple[str, ...] | None = None
    layers: tuple[int, ...] | str | None = None
    roles: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("branches", "roles"):
            object.__setattr__(self, name, _names_from(name, getattr(self, name)))
        object.__setattr__(self, "layers", _layers_from(self.layers))

    def layer_indices(self, count: int) -> list[int]:
        """Resolve to sorted indices in [0, count); out-of-range ints raise SpecError."""
        if self.layers is None:
            return list(range(count))
        if isinstance(self.layers, str):
            start, stop = (int(p) if p else None for p in self.layers.split(":"))
            return list(range(count))[slice(start, stop)]
        out = []
        for i in self.layers:
            if not -count <= i < count:
                raise SpecError(f"layer {i} is out of range for a branch of {count} layers")
            out.append(i % count)
        return sorted(set(out))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in (("branches", self.branches), ("layers", self.layers), ("roles", self.roles))}


@dataclass(frozen=True)
class MethodEntry:
    """One method with its config at the sites its `where` selects."""

    method: str
    config: Any = None
    where: Where = field(default_factory=Where)
    name: str = ""
    compose: str = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise SpecError(f"unknown method {_short(self.method)}; available methods: {', '.join(sorted(METHODS))}")
        cls = METHODS[self.method].config_cls
        if self.config is None or isinstance(self.config, dict):
            object.__setattr__(self, "config", config_from_dict(cls, self.config or {}))
        elif not isinstance(self.config, cls):
            raise SpecError(f"config of {self.method!r} must be a {cls.__name__} or a dict, got {type(self.config).__name__}")
        if self.where is None:
            object.__setattr__(self, "where", Where())
        elif not isinstance(self.where, (dict, Where)):
            raise SpecError(f"where must be an object with branches, layers, roles; got {_short(self.where)}")
        if isinstance(self.where, dict):
            unknown = set(self.where) - {"branches", "layers", "roles"}
            if unknown:
                raise SpecError(f"where has no field(s) {sorted(unknown, key=repr)}; fields: branches, layers, roles")
            object.__setattr__(self, "where", Where(**self.where))
        if not isinstance(self.name, str):
            raise SpecError(f"entry name must be a string, got {_short(self.name)}")
        name = self.name or self.method.replace("-", "_")
        if not _NAME.match(name):
            raise SpecError(f"entry name {name!r} must match {_NAME.pattern} (it is part of checkpoint keys)")
        object.__setattr__(self, "name", name)
        if not isinstance(self.compose, str) or self.compose not in ("error", "add"):
            raise SpecError(f"compose must be 'error' or 'add', got {_short(self.compose)}")

    @property
    def roles(self) -> tuple[str, ...]:
        return self.where.roles if self.where.roles is not None else METHODS[self.method].default_roles(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "name": self.name, "compose": self.compose,
                "config": config_to_dict(self.config), "where": self.where.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodEntry":
        if not isinstance(data, dict) or "method" not in data:
            raise SpecError(f"a spec entry must be an object with a 'method' key, got {_short(data)}")
        unknown = set(data) - {"method", "name", "compose", "config", "where"}
        if unknown:
            raise SpecError(f"spec entry has unknown key(s) {sorted(unknown, key=repr)}")
        return cls(method=data["method"], config=data.get("config"), where=data.get("where"),
                   name=data.get("name", ""), compose=data.get("compose", "error"))


@dataclass(frozen=True)
class Spec:
    """An ordered list of method entries."""

    entries: tuple[MethodEntry, ...]

    def __post_init__(self) -> None:
        entries = tuple(e if isinstance(e, MethodEntry) else MethodEntry.from_dict(e) for e in self.entries)
        if not entries:
            raise SpecError("a spec needs at least one method entry")
        object.__setattr__(self, "entries", entries)

    def __add__(self, other: "Spec") -> "Spec":
        return Spec(self.entries + other.entries)

    def without(self, *methods: str) -> "Spec":
        """The same spec minus the entries of the given methods."""
        return Spec(tuple(e for e in self.entries if e.method not in methods))

    def replace_config(self, method: str, **changes: Any) -> "Spec":
        """A copy whose entries of `method` have the given config fields changed."""
        return Spec(tuple(replace(e, config=replace(e.config, **changes)) if e.method == method else e
                          for e in self.entries))

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Spec":
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise SpecError("a spec must be an object with an 'entries' list")
        version = data.get("version", SPEC_VERSION)
        if not _is_int(version) or version != SPEC_VERSION:
            raise SpecError(f"spec version {_short(version)} is not supported (this is version {SPEC_VERSION})")
        return cls(tuple(MethodEntry.from_dict(e) for e in data["entries"]))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        """Parse a spec; any string gives a Spec or a SpecError, and nothing is allocated for it."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise SpecError(f"a spec in JSON must be a string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as error:   # JSONDecodeError, undecodable bytes, too-deep nesting
            raise SpecError(f"spec is not valid JSON: {str(error)[:200]}") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, *, without: tuple[str, ...] = ()) -> "Spec":
        """A named preset (see `petl_tpr.presets.PRESETS`), minus the methods in `without`."""
        from .presets import build_preset

        return build_preset(name, without=without)
