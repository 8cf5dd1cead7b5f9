"""Attention takeover: one attention module computes through `attend` while adapters need it.

The module stays where it is, with its parameters, buffers, attribute names and state-dict keys;
only its class is swapped for a generated subclass whose `forward` hands the call to the family's
`Convention` (the same technique `torch.nn.utils.parametrize` uses). `isinstance` checks keep
working, and `release` puts the original class back. The subclass is generated once per original
class and never changed afterwards, so a `copy.deepcopy` of a taken-over model can be released
independently of the original.

A no-op forward pre-hook marks the module: PyTorch's fused TransformerEncoderLayer path reads the
attention weights directly and would bypass the takeover; it switches itself off when any
submodule has hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InjectionError
from ..sets import acts, per_sample_rows, row_index, spread_rows

STATE_ATTR = "_petl_takeover"
_CLASSES: dict[type, type] = {}


class Convention:
    """How one family's attention module is called; subclasses implement `forward` with `attend`.

    `check(module)` raises InjectionError when this particular module cannot be taken over (an
    option the convention does not reproduce); `describe` names what it supports.
    """

    name: str = ""
    describe: str = ""

    def check(self, module: nn.Module) -> None:
        """Raise InjectionError if `module` uses an option this convention does not reproduce."""

    def recognises(self, module: nn.Module) -> bool:
        """Whether this convention knows `module` by its structure alone (used where the family names no convention)."""
        return False

    def forward(self, module: nn.Module, state: "TakeoverState", *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@dataclass
class TakeoverState:
    """What a taken-over module applies: projection deltas by role and key/value prefixes.

    `deltas[role]` are the delta adapters of projections stored as raw weights (the module
    reads them without calling a Linear); Linear-stored projections keep their own forward hooks.
    `prefixes` are modules whose `forward()` returns `(key (L, d), value (L, d))`.
    """

    convention: Convention
    deltas: dict[str, list[nn.Module]] = field(default_factory=dict)
    prefixes: list[nn.Module] = field(default_factory=list)

    def add(self, slot: str, role: str, adapter: nn.Module) -> None:
        if slot == "kv":
            self.prefixes.append(adapter)
        else:
            self.deltas.setdefault(role, []).append(adapter)

    def remove(self, adapter: nn.Module) -> None:
        self.prefixes = [p for p in self.prefixes if p is not adapter]
        for role in list(self.deltas):
            self.deltas[role] = [d for d in self.deltas[role] if d is not adapter]
            if not self.deltas[role]:
                del self.deltas[role]

    @property
    def empty(self) -> bool:
        return not self.prefixes and not self.deltas

    def delta(self, role: str, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of the acting deltas on projection `role` for its input `x (B, ..., in)`; None when none act.

        Under `per_sample` each set's delta is computed on its own rows and is zero on the others.
        """
        out = None
        for adapter in self.deltas.get(role, ()):
            if not acts(adapter):
                continue
            index = row_index(adapter, x, 0, f"the {role} projection of a taken-over attention")
            if index is None:
                term = adapter(x)
            else:
                term = spread_rows(adapter(x.index_select(0, index)), index, 0, x.shape[0])
            out = term if out is None else out + term
        return out

    def project(self, role: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x W^T + b` plus the deltas of `role`; `weight (out, in)` is that role's own rows."""
        out = torch.nn.functional.linear(x, weight, bias)
        delta = self.delta(role, x)
        return out if delta is None else out + delta

    def prefix_tensors(self, batch: torch.Tensor | None = None) -> list[tuple]:
        """`(key (L, d), value (L, d))` of every acting prefix; under `per_sample`, `(key, value, rows)`
        with the batch rows (LongTensor) that see it. `batch` is a `(B, ...)` tensor of the call (the
        query) to check the row count against; `attend` masks the prefix for the other rows."""
        out = []
        for prefix in self.prefixes:
            if not acts(prefix):
                continue
            if batch is None and per_sample_rows(prefix):
                raise InjectionError("under per_sample a takeover convention must pass its query to "
                                     "prefix_tensors(q), so each row sees its own set's prefix")
            key, value = prefix()
            index = None if batch is None else row_index(prefix, batch, 0, "a taken-over attention")
            out.append((key, value) if index is None else (key, value, index))
        return out


def _marker(module: nn.Module, args: tuple) -> None:
    return None


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: TakeoverState = self.__dict__[STATE_ATTR]
    return state.convention.forward(self, state, *args, **kwargs)


def _rebuild(cls: type, state: dict) -> nn.Module:
    """Unpickle a taken-over module: an instance of the original class, then its takeover class again."""
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = _takeover_class(cls)
    return module


def _reduce_ex(self: nn.Module, protocol: int):
    # pickle finds classes by name, and the generated class shares its name with the original one:
    # store the original class and rebuild the takeover class on load (torch.save of a whole model)
    return _rebuild, (type(self)._petl_original_class, self.__getstate__())


def _takeover_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _forward, "_petl_original_class": cls,
                                                    "__reduce_ex__": _reduce_ex, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__})
    return _CLASSES[cls]


def state_of(module: nn.Module) -> TakeoverState | None:
    return module.__dict__.get(STATE_ATTR)


def take_over(module: nn.Module, convention: Convention) -> TakeoverState:
    """Route `module`'s forward through `convention` (idempotent: returns the existing state)."""
    state = state_of(module)
    if state is not None:
        return state
    convention.check(module)
    state = TakeoverState(convention)
    module.__class__ = _takeover_class(type(module))
    module.__dict__[STATE_ATTR] = state
    module.register_forward_pre_hook(_marker)
    return state


def release(module: nn.Module) -> None:
    """Undo `take_over`: original class, no marker hook, no state."""
    state = state_of(module)
    if state is None:
        raise InjectionError(f"{type(module).__name__} is not taken over")
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _marker]:
        del module._forward_pre_hooks[key]
    module.__class__ = type(module)._petl_original_class
    del module.__dict__[STATE_ATTR]


def is_taken_over(module: nn.Module) -> bool:
    return STATE_ATTR in module.__dict__
