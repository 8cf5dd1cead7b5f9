"""The only code that changes a model: plug adapter modules in, take them out, fold them in.

Two mechanisms, chosen by what is at the site:

- Module sites (Linears, norms, attention/MLP modules that are called): one `SiteHook` forward hook
  per module applies its adapters in a fixed order (projection deltas, then parallel additions,
  then post adapters), whatever order they were injected in. The adapter module becomes a
  submodule of the hooked module, named after its spec entry, so its parameters are named
  `<module path>.<entry>.<param>`. The original module stays where it was: attribute access, call
  conventions, `isinstance` checks and base state-dict keys are untouched, and PyTorch's fused
  TransformerEncoderLayer fast path, which would bypass a replaced module, switches itself off
  when a submodule has hooks.
- Raw weights the owner never calls (MultiheadAttention's `in_proj_weight` and `out_proj.weight`):
  a `WeightDeltas` parametrization returns `W + delta` placed at the projection's rows.

A parallel adapter whose branch input belongs to another module (post-norm BERT, the feed-forward
of nn.TransformerEncoderLayer) gets an `InputTap` pre-hook on that module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import InjectionError

SLOTS = ("delta", "parallel", "post")


@dataclass(frozen=True)
class Attachment:
    """One adapter module at one site. Plain data: paths, not module references."""

    key: str                       # logical site key, e.g. "blocks.0.attn.qkv.k"
    entry: str                     # spec entry name (the adapter's name at the site)
    method: str
    branch: str
    layer: int
    role: str
    slot: str                      # "delta" | "parallel" | "post"
    owner: str                     # path of the hooked module or of the parameter owner
    container: str                 # attribute of `home` (or WeightDeltas key) holding the adapter
    home: str = ""                 # module the adapter is registered on (see `home_of`)
    param: str | None = None       # parametrized parameter name, None for module sites
    rows: tuple[int, int] | None = None
    source: str | None = None      # module whose input feeds a parallel adapter, when not `owner`

    @property
    def state_prefix(self) -> str:
        return f"{self.key}.{self.entry}"


def home_of(model: nn.Module, owner: str, name: str) -> tuple[str, str]:
    """Where an adapter for module `owner` is registered: (home path, attribute name).

    Normally the owner itself. An nn.Sequential calls every child in turn, so an adapter there
    would join the chain; it goes on the nearest ancestor that is not a Sequential instead, under
    `<owner path relative to it, dots as underscores>_<name>`.
    """
    parts = owner.split(".") if owner else []
    cut = len(parts)
    while cut > 0 and isinstance(model.get_submodule(".".join(parts[:cut])), nn.Sequential):
        cut -= 1
    if cut == len(parts):
        return owner, name
    return ".".join(parts[:cut]), "_".join(parts[cut:] + [name])


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "query", "x", "input", "src"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise InjectionError("an adapted module was called without a tensor as its first input")


def _add_rows(out: torch.Tensor, delta: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    if rows is None:
        return out + delta
    a, b = rows
    return torch.cat([out[..., :a], out[..., a:b] + delta, out[..., b:]], dim=-1)


class InputTap:
    """Forward pre-hook that keeps the latest input of a module for one parallel adapter."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = _first_input(args, kwargs)

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise InjectionError("a parallel adapter ran before the module that feeds its input")
        return value


class SiteHook:
    """Forward hook applying every adapter attached to one module, in slot order.

    Holds the adapter modules themselves (they are registered on their home module too, so
    `parameters()`, `.to()` and `state_dict()` see them; deepcopy keeps the two references one).
    """

    def __init__(self) -> None:
        self.items: list[tuple[str, nn.Module, tuple[int, int] | None, InputTap | None]] = []
        self.handle: Any = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        is_seq = isinstance(output, (tuple, list))
        out = output[0] if is_seq else output
        if not isinstance(out, torch.Tensor):
            raise InjectionError(f"{type(module).__name__} returned {type(out).__name__}, not a tensor")
        x = _first_input(args, kwargs)
        for slot in SLOTS:
            for item_slot, adapter, rows, tap in self.items:
                if item_slot != slot:
                    continue
                if slot == "delta":
                    out = _add_rows(out, adapter(x), rows)
                elif slot == "parallel":
                    out = out + adapter(tap.take() if tap is not None else x)
                else:
                    out = out + adapter(out)
        if is_seq:
            return [out, *output[1:]] if isinstance(output, list) else (out, *output[1:])
        return out


class WeightDeltas(nn.Module):
    """Parametrization `W (out, in) -> W + delta_i.delta_weight()` at each delta's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.deltas = nn.ModuleDict()
        self.rows: dict[str, tuple[int, int] | None] = {}
        self.param_order: list[str] = []   # the owner's parameter order before parametrization

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for name, delta in self.deltas.items():
            weight = _add_rows(weight.T, delta.delta_weight().to(weight.dtype).T, self.rows[name]).T
        return weight


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrizations change.

    torch.nn.utils.parametrize keeps each parametrized tensor as a property on a class generated
    for the module; `copy.deepcopy` shares that class between the original and the copy, so
    removing (or adding) a parametrization on one would change the other. A private copy of the
    class keeps the two independent.
    """
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _restore_order(params: dict, order: list[str]) -> None:
    """Put parameters back in their registration order (remove_parametrizations appends at the end)."""
    items = dict(params)
    params.clear()
    params.update((k, items[k]) for k in order + [k for k in items if k not in order])


def _site_hook(module: nn.Module) -> SiteHook | None:
    return next((h for h in module._forward_hooks.values() if isinstance(h, SiteHook)), None)


def _weight_deltas(owner: nn.Module, param: str) -> WeightDeltas | None:
    if not parametrize.is_parametrized(owner, param):
        return None
    return next((p for p in owner.parametrizations[param] if isinstance(p, WeightDeltas)), None)


def attach(model: nn.Module, att: Attachment, adapter: nn.Module) -> None:
    """Plug `adapter` in as described by `att`. Raises InjectionError on a name clash."""
    owner = model.get_submodule(att.owner)
    if att.param is not None:
        if not hasattr(adapter, "delta_weight"):
            raise InjectionError(f"{att.method} cannot change the raw weight {att.owner}.{att.param}: "
                                 f"it has no weight form (only mergeable deltas can)")
        deltas = _weight_deltas(owner, att.param)
        if deltas is None:
            deltas = WeightDeltas()
            deltas.param_order = list(owner._parameters)
            _own_class(owner)
            parametrize.register_parametrization(owner, att.param, deltas)
        if att.container in deltas.deltas:
            raise InjectionError(f"{att.key} already has an adapter named {att.container!r}")
        deltas.deltas[att.container] = adapter
        deltas.rows[att.container] = att.rows
        return
    home = model.get_submodule(att.home)
    if hasattr(home, att.container):
        raise InjectionError(f"{att.home or type(model).__name__} already has an attribute named {att.container!r}")
    hook = _site_hook(owner)
    if hook is None:
        hook = SiteHook()
        hook.handle = owner.register_forward_hook(hook, with_kwargs=True)
    home.add_module(att.container, adapter)
    tap = None
    if att.source is not None:
        tap = InputTap()
        tap.handle = model.get_submodule(att.source).register_forward_pre_hook(tap, with_kwargs=True)
    hook.items.append((att.slot, adapter, att.rows, tap))


def adapter_module(model: nn.Module, att: Attachment) -> nn.Module:
    """The live adapter module of an attachment."""
    if att.param is not None:
        return _weight_deltas(model.get_submodule(att.owner), att.param).deltas[att.container]
    return getattr(model.get_submodule(att.home), att.container)


def detach(model: nn.Module, att: Attachment) -> None:
    """Take an attachment out; the site is left exactly as before `attach`."""
    owner = model.get_submodule(att.owner)
    if att.param is not None:
        deltas = _weight_deltas(owner, att.param)
        del deltas.deltas[att.container]
        del deltas.rows[att.container]
        if not len(deltas.deltas):
            _own_class(owner)
            parametrize.remove_parametrizations(owner, att.param, leave_parametrized=False)
            _restore_order(owner._parameters, deltas.param_order)
        return
    adapter = adapter_module(model, att)
    hook = _site_hook(owner)
    for item in [item for item in hook.items if item[1] is adapter]:
        if item[3] is not None:
            item[3].handle.remove()
        hook.items.remove(item)
    delattr(model.get_submodule(att.home), att.container)
    if not hook.items:
        hook.handle.remove()


@torch.no_grad()
def fold(model: nn.Module, att: Attachment) -> None:
    """Add a delta's weight into the base weight at its rows, then detach it."""
    adapter = adapter_module(model, att)
    owner = model.get_submodule(att.owner)
    if att.param is None:
        weight = owner.weight
    elif parametrize.is_parametrized(owner, att.param):
        weight = owner.parametrizations[att.param].original
    else:
        weight = getattr(owner, att.param)
    target = weight if att.rows is None else weight[att.rows[0]:att.rows[1]]
    target += adapter.delta_weight().to(weight.dtype)
    detach(model, att)
