"""Named adapter sets on one backbone: which sets act in a forward, for the whole batch or per row.

A model carries one `SetGate` (created by the first `inject`). Every adapter module knows its set's
name (`adapter.__dict__["_petl_set"]`) and the gate (`"_petl_gate"`): plain attributes, so
`copy.deepcopy` of a model gives the copy its own gate shared by its own adapters. Every mechanism
that applies an adapter (the site hooks, attention takeovers, side networks) asks the gate first:

- `acts(adapter)`: does the adapter's set act in this forward? All sets in `active` do; none do
  while `off` (`pt.disabled`); under `per_sample` exactly the sets named for some row do.
- `row_index(adapter, x, dim)`: `None` when the set acts on every row; under `per_sample` the
  LongTensor of the batch rows (along `dim` of `x`) whose set it is. The mechanism then runs the
  adapter on those rows only (`index_select`) and adds its result back at them (`index_add`):
  rows are grouped by set, one adapter call per set and site, never one call per row.

Switching re-builds nothing and copies no weights: it changes a few Python attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InputError

DEFAULT = "default"
SET_ATTR = "_petl_set"
GATE_ATTR = "_petl_gate"


def check_set_name(name: object) -> str:
    """A set name is a non-empty identifier-like string (it becomes part of module attribute names)."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name) or "__" in name:
        raise InputError(f"adapter set name must be a non-empty string of letters, digits, '_' or '-' (no '__'), "
                         f"got {name!r}")
    return name


class SetGate:
    """Which sets act in the next forward. `active` in injection order; `rows` set by `per_sample`."""

    def __init__(self) -> None:
        self.active: tuple[str, ...] = ()
        self.off = False
        self.rows: dict[str, torch.Tensor] | None = None    # set -> (n,) row indices, under per_sample
        self.batch: int = 0                                 # len(names) under per_sample
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def acts(self, name: str) -> bool:
        if self.rows is not None:
            return name in self.rows
        return not self.off and name in self.active

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = self.rows[name].to(device)
        return self._on_device[key]

    def set_rows(self, names: Sequence[str | None] | None) -> None:
        """Group row i of the coming batches under set `names[i]` (None: no set, the bare backbone)."""
        self._on_device = {}
        if names is None:
            self.rows, self.batch = None, 0
            return
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                groups.setdefault(name, []).append(i)
        self.rows = {name: torch.tensor(rows, dtype=torch.long) for name, rows in groups.items()}
        self.batch = len(names)


def tag(adapter: nn.Module, name: str, gate: SetGate) -> None:
    adapter.__dict__[SET_ATTR] = name
    adapter.__dict__[GATE_ATTR] = gate


def set_of(adapter: nn.Module) -> str:
    return adapter.__dict__.get(SET_ATTR, DEFAULT)


def acts(adapter: nn.Module) -> bool:
    gate: SetGate | None = adapter.__dict__.get(GATE_ATTR)
    return True if gate is None else gate.acts(adapter.__dict__[SET_ATTR])


def per_sample_rows(adapter: nn.Module) -> bool:
    """Whether a per_sample block is open on the adapter's model."""
    gate: SetGate | None = adapter.__dict__.get(GATE_ATTR)
    return gate is not None and gate.rows is not None


def row_index(adapter: nn.Module, x: torch.Tensor, dim: int, where: str = "") -> torch.Tensor | None:
    """Rows of `x` (along `dim`) that the adapter's set owns under `per_sample`; None outside it."""
    gate: SetGate | None = adapter.__dict__.get(GATE_ATTR)
    if gate is None or gate.rows is None:
        return None
    if x.dim() <= dim or x.shape[dim] != gate.batch:
        raise InputError(f"per_sample was given {gate.batch} set names, but {where or 'an adapted module'} sees "
                         f"{x.shape[dim] if x.dim() > dim else 'no'} rows on its batch dimension ({dim}) of an input "
                         f"of shape {tuple(x.shape)}: give one name per row of the batch")
    return gate.index(adapter.__dict__[SET_ATTR], x.device)


def add_at_rows(out: torch.Tensor, value: torch.Tensor, index: torch.Tensor | None, dim: int, *,
                in_place: bool = False) -> torch.Tensor:
    """`out + value` where `value` covers every row (index None) or only the rows `index` along `dim`.

    With `in_place`, rows are added into `out` itself (a tensor the caller made and owns: one copy
    per site under per_sample, not one per set) instead of into a copy.
    """
    if index is None:
        return out + value
    out = out if in_place else out.clone()
    return out.index_add_(dim, index, value.to(out.dtype))


def spread_rows(value: torch.Tensor, index: torch.Tensor, dim: int, rows: int) -> torch.Tensor:
    """`value`, computed on the rows `index` (along `dim`), in a tensor of `rows` rows that is zero elsewhere."""
    shape = list(value.shape)
    shape[dim] = rows
    return add_at_rows(value.new_zeros(shape), value, index, dim, in_place=True)
