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


def _layers_from(value: Any) -> tuple[int, ...] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and not re.fullmatch(r"-?\d*:-?\d*", value):
            raise SpecError(f"layers string must look like 'start:stop', got {value!r}")
        return value
    if isinstance(value, int):
        return (value,)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise SpecError(f"layers must be null, a list of ints or 'start:stop', got {value!r}")


@dataclass(frozen=True)
class Where:
    """Selector: branches (None = all), layers (None = all), roles (None = the config's roles)."""

    branches: tuple[str, ...] | None = None
    layers: tuple[int, ...] | str | None = None
    roles: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("branches", "roles"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is not None:
                object.__setattr__(self, name, tuple(value))
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
        if self.method not in METHODS:
            raise SpecError(f"unknown method {self.method!r}; available methods: {', '.join(sorted(METHODS))}")
        cls = METHODS[self.method].config_cls
        if self.config is None or isinstance(self.config, dict):
            object.__setattr__(self, "config", config_from_dict(cls, self.config or {}))
        elif not isinstance(self.config, cls):
            raise SpecError(f"config of {self.method!r} must be a {cls.__name__} or a dict, got {type(self.config).__name__}")
        if isinstance(self.where, dict):
            unknown = set(self.where) - {"branches", "layers", "roles"}
            if unknown:
                raise SpecError(f"where has no field(s) {sorted(unknown)}; fields: branches, layers, roles")
            object.__setattr__(self, "where", Where(**self.where))
        name = self.name or self.method.replace("-", "_")
        if not _NAME.match(name):
            raise SpecError(f"entry name {name!r} must match {_NAME.pattern} (it is part of checkpoint keys)")
        object.__setattr__(self, "name", name)
        if self.compose not in ("error", "add"):
            raise SpecError(f"compose must be 'error' or 'add', got {self.compose!r}")

    @property
    def roles(self) -> tuple[str, ...]:
        return self.where.roles if self.where.roles is not None else METHODS[self.method].default_roles(self.config)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "name": self.name, "compose": self.compose,
                "config": config_to_dict(self.config), "where": self.where.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodEntry":
        if not isinstance(data, dict) or "method" not in data:
            raise SpecError(f"a spec entry must be an object with a 'method' key, got {data!r}")
        unknown = set(data) - {"method", "name", "compose", "config", "where"}
        if unknown:
            raise SpecError(f"spec entry has unknown key(s) {sorted(unknown)}")
        return cls(method=data["method"], config=data.get("config"), where=data.get("where") or Where(),
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
        if data.get("version", SPEC_VERSION) != SPEC_VERSION:
            raise SpecError(f"spec version {data.get('version')!r} is not supported (this is version {SPEC_VERSION})")
        return cls(tuple(MethodEntry.from_dict(e) for e in data["entries"]))

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"spec is not valid JSON: {error}") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, *, without: tuple[str, ...] = ()) -> "Spec":
        """A named preset (see `petl_tpr.presets.PRESETS`), minus the methods in `without`."""
        from .presets import build_preset

        return build_preset(name, without=without)
