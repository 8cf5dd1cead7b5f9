"""Deltas attached at a weight: for a projection whose parent reads its weight instead of calling it.

timm's EVA and BEiT attentions compute `F.linear(x, self.qkv.weight, bias)` themselves, so a
forward hook on `qkv` never runs (`probe.py` finds this at inject). A mergeable delta (LoRA) is
then attached at the weight: the projection's class is swapped for a generated subclass (as the
attention takeover does) whose `weight` attribute is a property returning `W + sum of the acting
deltas` (each `delta_weight()` placed at its rows of a fused weight). The Parameter itself stays in
`_parameters`, untouched: state-dict keys and values, `named_parameters`, `.to()` and optimisers
see the base weight; only attribute reads, which is what the parent's forward does, see the sum.

Reading the property marks each acting delta as run for the first-forward check (runcheck.py),
so a parent that reads neither the module nor its `weight` attribute is still caught. A weight
is one for the whole batch, so `per_sample` refuses sets with a delta attached this way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InjectionError
from .sets import acts, per_sample_rows, set_of

STATE_ATTR = "_petl_weight_deltas"
_CLASSES: dict[type, type] = {}


def _summed(module: nn.Module, name: str) -> torch.Tensor:
    base = module._parameters[name]
    total = base
    for adapter, rows in module.__dict__[STATE_ATTR].get(name, ()):
        if not acts(adapter):
            continue
        if per_sample_rows(adapter):
            raise InjectionError(f"set {set_of(adapter)!r} has a delta attached at a weight ({type(module).__name__}."
                                 f"{name}, read directly by its parent), which is one for the whole batch: per_sample "
                                 f"cannot give rows different sets there")
        for hook in adapter._forward_pre_hooks.values():      # the run check's mark: this delta acted
            hook(adapter, ())
        delta = adapter.delta_weight().to(base.dtype)
        if rows is not None:
            delta = F.pad(delta, (0, 0, rows[0], base.shape[0] - rows[1]))
        total = total + delta
    return total


def _weight_property(name: str) -> property:
    return property(lambda self: _summed(self, name), doc=f"{name} plus the acting deltas attached at it")


def _rebuild(cls: type, state: dict, names: tuple[str, ...]) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = _weight_class(cls, names)
    return module


def _reduce_ex(self: nn.Module, protocol: int):
    names = tuple(self.__dict__[STATE_ATTR])
    return _rebuild, (type(self)._petl_weight_original, self.__getstate__(), names)


def _weight_class(cls: type, names: tuple[str, ...]) -> type:
    key = (cls, names)
    if key not in _CLASSES:
        body: dict[str, Any] = {name: _weight_property(name) for name in names}
        body |= {"_petl_weight_original": cls, "__reduce_ex__": _reduce_ex, "__module__": cls.__module__,
                 "__qualname__": cls.__qualname__}
        _CLASSES[key] = type(cls.__name__, (cls,), body)
    return _CLASSES[key]


def original_class(module: nn.Module) -> type:
    return getattr(type(module), "_petl_weight_original", type(module))


def attach_weight(owner: nn.Module, name: str, adapter: nn.Module, rows: tuple[int, int] | None) -> None:
    """Make `owner.<name>` read as the weight plus `adapter.delta_weight()` (at `rows` of it)."""
    if name not in owner._parameters:
        raise InjectionError(f"{type(owner).__name__} has no parameter {name!r} to attach a delta at")
    state = owner.__dict__.setdefault(STATE_ATTR, {})
    state.setdefault(name, []).append((adapter, rows))
    owner.__class__ = _weight_class(original_class(owner), tuple(sorted(state)))


def detach_weight(owner: nn.Module, name: str, adapter: nn.Module) -> None:
    state = owner.__dict__[STATE_ATTR]
    state[name] = [(a, r) for a, r in state[name] if a is not adapter]
    if not state[name]:
        del state[name]
    if state:
        owner.__class__ = _weight_class(original_class(owner), tuple(sorted(state)))
    else:
        del owner.__dict__[STATE_ATTR]
        owner.__class__ = original_class(owner)


def reads_attribute(model: nn.Module, owner_path: str, name: str, call) -> bool:
    """Whether `call()` reads `<owner>.<name>` as an attribute (a probe: counted through a temporary subclass)."""
    owner = model.get_submodule(owner_path)
    cls = type(owner)
    count = [0]

    def read(self):
        count[0] += 1
        return self._parameters[name]

    owner.__class__ = type(cls.__name__, (cls,), {name: property(read)})
    try:
        call()
    finally:
        owner.__class__ = cls
    return count[0] > 0
