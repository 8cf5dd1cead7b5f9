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
from typing import Any, ClassVar

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
    roles = tuple(config.roles)
    if not roles:
        raise SpecError(f"{type(config).__name__}.roles is empty; allowed roles: {', '.join(allowed)}")
    unknown = [r for r in roles if r not in allowed]
    if unknown:
        raise SpecError(f"{type(config).__name__}: unknown role(s) {unknown}; allowed roles: {', '.join(allowed)}")


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a frozen config dataclass from plain data, naming unknown keys; lists become tuples."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SpecError(f"{cls.__name__} has no field(s) {unknown}; fields: {', '.join(sorted(fields))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
