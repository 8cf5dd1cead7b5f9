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
- Attention takeover (`petl_tpr.attention`): key/value prefixes (slot `kv`), and deltas on
  projections stored as raw weights that the owner never calls as a module (MultiheadAttention's
  `in_proj_weight` and `out_proj.weight`), are applied by the attention module itself once its
  forward is routed through the family's convention. The weights themselves are never changed.

A parallel adapter whose branch input belongs to another module (post-norm BERT, the feed-forward
of nn.TransformerEncoderLayer) gets an `InputTap` pre-hook on that module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import CONVENTIONS, release, state_of, take_over
from .backbones.layout import is_conv1d
from .errors import InjectionError, PetlError
from .sets import DEFAULT, acts, add_at_rows, row_index, spread_rows
from .side import SideSite, attach_side, detach_side
from .weight_site import attach_weight, detach_weight

SLOTS = ("delta", "parallel", "post")        # applied by SiteHook, in this order; "kv" by the takeover


@dataclass(frozen=True)
class Attachment:
    """One adapter module at one site. Plain data: paths, not module references."""

    key: str                       # logical site key, e.g. "blocks.0.attn.qkv.k"
    entry: str                     # spec entry name (the adapter's name at the site)
    method: str
    branch: str
    layer: int
    role: str
    slot: str                      # "delta" | "parallel" | "post" | "kv" | "side" | "weight" (weight_site.py)
    owner: str                     # path of the hooked module or of the parameter owner
    container: str                 # attribute of `home` holding the adapter
    home: str = ""                 # module the adapter is registered on (see `home_of`)
    param: str | None = None       # raw weight the delta applies to, None for module sites
    rows: tuple[int, int] | None = None
    source: str | None = None      # module whose input feeds a parallel adapter, when not `owner`
    attention: str | None = None   # attention module taken over to apply this adapter (kv, raw-weight deltas)
    convention: str | None = None  # its takeover convention
    side: SideSite | None = None   # taps and output of a side network (slot "side")
    set: str = DEFAULT             # the adapter set it belongs to (`petl_tpr.sets`)
    batch_dim: int = 0             # batch dimension of the hooked module's input (1 for (L, B, D) blocks)

    @property
    def local_prefix(self) -> str:
        """Key within its set, as adapter files store it: `<site key>.<entry>`."""
        return f"{self.key}.{self.entry}"

    @property
    def state_prefix(self) -> str:
        """Key unique in the model: `local_prefix`, with `__<set>` unless the set is the default one."""
        return self.local_prefix if self.set == DEFAULT else f"{self.local_prefix}__{self.set}"


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

    def __init__(self, site: str = "") -> None:
        self.items: list[tuple[str, nn.Module, tuple[int, int] | None, InputTap | None, int]] = []
        self.handle: Any = None
        self.site = site

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        try:
            return self._apply(module, args, kwargs, output)
        except PetlError as error:   # say where: the adapter itself does not know its site
            if self.site and not str(error).startswith(self.site):
                raise type(error)(f"{self.site}: {error}") from error
            raise

    def _apply(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        is_seq = isinstance(output, (tuple, list))
        out = output[0] if is_seq else output
        if not isinstance(out, torch.Tensor):
            raise InjectionError(f"{type(module).__name__} returned {type(out).__name__}, not a tensor")
        x = _first_input(args, kwargs)
        owned = False        # `out` is a tensor made here, so per-set rows may be added into it in place
        for slot in SLOTS:
            for item_slot, adapter, rows, tap, dim in self.items:
                if item_slot != slot:
                    continue
                source = tap.take() if tap is not None else None     # taken even when inert: one forward's input
                if not acts(adapter):
                    if hasattr(adapter, "skipped"):   # per-forward state (a router's loss) is of no forward now
                        adapter.skipped()
                    continue
                inp = {"delta": x, "parallel": x if source is None else source, "post": out}[slot]
                index = row_index(adapter, inp, dim)
                value = adapter(inp if index is None else inp.index_select(dim, index))
                if index is not None and rows is not None:    # a fused projection's rows: every batch row first
                    value, index = spread_rows(value, index, dim, inp.shape[dim]), None
                out = _add_rows(out, value, rows) if index is None else add_at_rows(out, value, index, dim,
                                                                                   in_place=owned)
                owned = True
        if is_seq:
            return [out, *output[1:]] if isinstance(output, list) else (out, *output[1:])
        return out


def _site_hook(module: nn.Module) -> SiteHook | None:
    return next((h for h in module._forward_hooks.values() if isinstance(h, SiteHook)), None)


def attach(model: nn.Module, att: Attachment, adapter: nn.Module) -> None:
    """Plug `adapter` in as described by `att`. Raises InjectionError on a name clash."""
    home = model.get_submodule(att.home)
    if hasattr(home, att.container):
        raise InjectionError(f"{att.home or type(model).__name__} already has an attribute named {att.container!r}")
    if att.attention is not None:
        state = take_over(model.get_submodule(att.attention), CONVENTIONS[att.convention])
        home.add_module(att.container, adapter)
        state.add(att.slot, att.role, adapter)   # the convention applies each role's own weight rows
        return
    if att.side is not None:
        attach_side(model, adapter, att.side)
        home.add_module(att.container, adapter)
        return
    if att.slot == "weight":      # the parent reads the projection's weight itself (weight_site.py)
        home.add_module(att.container, adapter)
        attach_weight(model.get_submodule(att.owner), "weight", adapter, att.rows)
        return
    owner = model.get_submodule(att.owner)
    hook = _site_hook(owner)
    if hook is None:
        hook = SiteHook(att.owner)
        hook.handle = owner.register_forward_hook(hook, with_kwargs=True)
    home.add_module(att.container, adapter)
    tap = None
    if att.source is not None:
        tap = InputTap()
        tap.handle = model.get_submodule(att.source).register_forward_pre_hook(tap, with_kwargs=True)
    hook.items.append((att.slot, adapter, att.rows, tap, att.batch_dim))


def adapter_module(model: nn.Module, att: Attachment) -> nn.Module:
    """The live adapter module of an attachment."""
    return getattr(model.get_submodule(att.home), att.container)


def detach(model: nn.Module, att: Attachment) -> None:
    """Take an attachment out; the site is left exactly as before `attach`."""
    adapter = adapter_module(model, att)
    if att.side is not None:
        detach_side(adapter)
    elif att.slot == "weight":
        detach_weight(model.get_submodule(att.owner), "weight", adapter)
    elif att.attention is not None:
        attention = model.get_submodule(att.attention)
        state = state_of(attention)
        state.remove(adapter)
        if state.empty:
            release(attention)
    else:
        hook = _site_hook(model.get_submodule(att.owner))
        for item in [item for item in hook.items if item[1] is adapter]:
            if item[3] is not None:
                item[3].handle.remove()
            hook.items.remove(item)
        if not hook.items:
            hook.handle.remove()
    delattr(model.get_submodule(att.home), att.container)


@torch.no_grad()
def fold(model: nn.Module, att: Attachment) -> None:
    """Add a delta's weight into the base weight at its rows, then detach it."""
    adapter = adapter_module(model, att)
    owner = model.get_submodule(att.owner)
    name = att.param or "weight"
    weight = owner._parameters[name] if name in owner._parameters else getattr(owner, name)   # the Parameter itself
    delta = adapter.delta_weight().to(weight.dtype)            # (out, in)
    if att.param is None and is_conv1d(owner):                  # Conv1D stores its weight (in, out)
        target = weight if att.rows is None else weight[:, att.rows[0]:att.rows[1]]
        target += delta.T
    else:
        target = weight if att.rows is None else weight[att.rows[0]:att.rows[1]]
        target += delta
    detach(model, att)
