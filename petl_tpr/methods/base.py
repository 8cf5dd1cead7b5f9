"""What a method declares: its config, where it may attach, how, and its capabilities.

A method never touches the model: it builds an adapter module for one site from its config and
the site's dimensions; `petl_tpr.attach` plugs that module in by the method's mechanism:

- `delta`: the module maps a projection's input `(..., in_dim)` to an addition to its output rows
  `(..., out_dim)`; a mergeable delta also provides `delta_weight() -> (out_dim, in_dim)`.
- `parallel`: the module maps the input of a branch (or of a norm) `(..., d)` to an addition to its
  output `(..., d)`. With `reads = "stream"` a branch-parallel module reads the residual stream
  entering the branch instead (before the branch's norm on pre-norm blocks), as the
  mixture-of-adapters does.
- `kv`: the module's `forward()` returns key/value prefixes `(L, d)` each; the attention module
  is taken over (`petl_tpr.attention`) to use them.
- `post`: the module maps the output of a branch `(..., d)` to an addition to that same output.

Capabilities drive the contract tests: `identity_at_init` (the model's outputs are unchanged right
after injection) and `mergeable` (the delta can be folded into the base weights).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SpecError


class Method:
    """Base class of a PETL method; subclasses are registered with `register_method`."""

    name: ClassVar[str]
    config_cls: ClassVar[type]
    mechanism: ClassVar[str]
    roles: ClassVar[tuple[str, ...]]
    identity_at_init: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    reads: ClassVar[str] = "branch"      # "branch" | "stream": the input of a branch-parallel module

    @classmethod
    def default_roles(cls, config: Any) -> tuple[str, ...]:
        return tuple(config.roles)

    @classmethod
    def mechanism_for(cls, config: Any) -> str:
        """The mechanism used with this config (a method may offer several, e.g. adapter modes)."""
        return cls.mechanism

    @classmethod
    def build(cls, config: Any, *, in_dim: int, out_dim: int, branch: str) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def param_shapes(cls, config: Any, *, in_dim: int, out_dim: int, branch: str, **extra: Any) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter `build` would create, by its name in the module, without allocating.

        Checkpoint loading compares these with a file's header before building anything, and
        `targeting.plan` sums them to refuse a spec that cannot fit. Methods here give them by formula;
        this default builds the module on the meta device (no storage), for methods that do not.
        """
        with torch.device("meta"):
            module = cls.build(config, in_dim=in_dim, out_dim=out_dim, branch=branch, **extra)
        return {name: tuple(p.shape) for name, p in module.named_parameters()}

    @classmethod
    def examples(cls) -> list[dict[str, Any]]:
        """Spec entries (as dicts) the contract suite runs on every family."""
        return [{"method": cls.name}]


def check_positive(config: Any, *names: str) -> None:
    """Raise SpecError when a named int/float field of a config is not > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise SpecError(f"{type(config).__name__}.{name} must be > 0, got {value!r}")


def check_choice(config: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise SpecError(f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}")


def check_roles(config: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(config.roles, (list, tuple)) or not all(isinstance(r, str) for r in config.roles):
        raise SpecError(f"{type(config).__name__}.roles must be a list of role names (allowed: {', '.join(allowed)}), "
                        f"got {_short(config.roles)}")
    roles = tuple(config.roles)
    if not roles:
        raise SpecError(f"{type(config).__name__}.roles is empty; allowed roles: {', '.join(allowed)}")
    unknown = [r for r in roles if r not in allowed]
    if unknown:
        raise SpecError(f"{type(config).__name__}: unknown role(s) {unknown}; allowed roles: {', '.join(allowed)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _matches(value: Any, hint: Any) -> bool:
    """Whether plain data `value` fits the type hint of a config field (JSON-ish types only)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:   # an int too large for a float
            return False
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if args and len(args) == 2 and typing.get_origin(args[0]) is tuple and args[1] is Ellipsis \
                and isinstance(value, Mapping):   # pairs may be given as a mapping (JSON object)
            return all(_matches(tuple(item), args[0]) for item in value.items())
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    return True   # a hint this checker does not know: the config's own __post_init__ decides


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple:
        return f"an object or a list of [{', '.join(_describe(a) for a in typing.get_args(args[0]))}] pairs"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list [{', '.join(_describe(a) for a in args)}]"
    return {bool: "true or false", int: "an int", float: "a finite number", str: "a string",
            type(None): "null"}.get(hint, str(hint))


def check_field_types(cls: type, values: Mapping[str, Any]) -> None:
    """SpecError naming the first field whose value does not fit its annotation (bool is not an int,
    an int is a number, NaN/inf are not, a string is not a list of roles). Fields a config lists in
    its `_own_checks` class attribute are left to its `__post_init__`."""
    hints = typing.get_type_hints(cls)
    skip = getattr(cls, "_own_checks", ())
    for name, value in values.items():
        if name in hints and name not in skip and not _matches(value, hints[name]):
            raise SpecError(f"{cls.__name__}.{name} must be {_describe(hints[name])}, got {_short(value)}")


def check_fields(config: Any) -> None:
    """`check_field_types` on a config instance; configs call it first in `__post_init__`."""
    check_field_types(type(config), {f.name: getattr(config, f.name) for f in dataclasses.fields(config)})


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a frozen config dataclass from plain data, naming unknown keys; lists become tuples."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a {cls.__name__} must be given as an object (dict), got {_short(data)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields, key=repr)
    if unknown:
        raise SpecError(f"{cls.__name__} has no field(s) {_short(unknown)}; fields: {', '.join(sorted(fields))}")
    check_field_types(cls, data)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
