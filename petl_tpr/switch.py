"""Switching between the adapter sets of one model: activate, disabled, per_sample (see `petl_tpr.sets`).

Nothing here builds, copies or moves a tensor: switching sets a few attributes of the model's
`SetGate` and, for `activate`, the `requires_grad` flags of the adapter parameters, so an optimiser
built after `activate` trains only the active sets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .api import Injection, _check_names, _injection, adapter_parameters, get_injection
from .attach import adapter_module
from .errors import InjectionError, InputError


def adapter_sets(model: nn.Module) -> list[str]:
    """The names of the model's adapter sets, in injection order ([] when nothing is injected)."""
    injection = get_injection(model)
    return [] if injection is None else list(injection.sets)


def active_sets(model: nn.Module) -> list[str]:
    """The sets that act in a plain forward (outside `disabled` and `per_sample`)."""
    return list(_injection(model).gate.active)


def _names(value: str | Sequence[str]) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise InputError(f"set names must be strings, got {value!r}")
    if len(set(names)) != len(names):
        raise InputError(f"set names repeat: {names}")
    return names


def _check_together(injection: Injection, names: list[str]) -> None:
    """Sets that act together must not both end a side network at one module (their corrections would chain)."""
    owners: dict[str, str] = {}
    for att in injection.attachments:
        if att.side is None or att.set not in names:
            continue
        other = owners.setdefault(att.owner, att.set)
        if other != att.set:
            raise InjectionError(f"sets {other!r} and {att.set!r} both have a side network ({att.method}) ending at "
                                 f"'{att.owner}': each would correct the other's output, so they cannot act together; "
                                 f"activate one of them, or mix them row by row with per_sample")


def activate(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` (one set or several) the sets that act; the others stay attached, inert.

    Only the active sets' adapter parameters require grad afterwards. Several sets act together as
    one set would (deltas and adapters add up, prefixes concatenate).
    """
    injection = _injection(model)
    names = _names(names)
    _check_names(injection, names)
    _check_together(injection, names)
    injection.gate.active = tuple(n for n in injection.sets if n in names)
    set_trainable(model, names)


def set_trainable(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly the parameters of sets `names` require grad, whichever sets act (`activate` calls
    it with the active sets; call it to train several sets at once under `per_sample`, including sets
    that cannot act together)."""
    injection = _injection(model)
    names = _names(names)
    _check_names(injection, names)
    for name in injection.sets:
        want = name in names
        for param in _params(model, injection, name):
            if param.requires_grad != want:
                param.requires_grad_(want)


def _params(model: nn.Module, injection: Injection, name: str) -> list[nn.Parameter]:
    """Set `name`'s parameters, cached on the injection until its attachments change (a switch walks
    no module tree: microseconds, not milliseconds, on a ViT-B/16 with eight sets)."""
    cached = injection.set_params.get(name)
    if cached is not None:      # still the live modules? (one lookup: a model whose modules were swapped rebuilds)
        att, module, params = cached
        if att is None or adapter_module(model, att) is module:
            return params
    atts = injection.of_set(name)
    first = atts[0] if atts else None
    params = list(adapter_parameters(model, name).values())
    injection.set_params[name] = (first, adapter_module(model, first) if first else None, params)
    return params


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Inside the block no set acts: the outputs are the bare backbone's (on merged weights, if a set was merged)."""
    gate = _injection(model).gate
    before = gate.off
    gate.off = True
    try:
        yield
    finally:
        gate.off = before


@contextmanager
def per_sample(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block row i of every batch uses set `names[i]` alone (None: no set, the bare backbone).

    Each set runs once per site on its own rows (gathered, then added back at them). Gradients reach
    the sets named in the batch, where their parameters require grad (`set_trainable` to train
    several: requires_grad must be set before the forward). A batch whose size is not `len(names)`
    is an `InputError` at the first adapted site.
    """
    injection = _injection(model)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise InputError(f"per_sample needs a non-empty list of set names (one per row), got {names!r}")
    if not all(n is None or isinstance(n, str) for n in names):
        raise InputError("per_sample: every name must be a set name or None")
    present = sorted({n for n in names if n is not None})
    _check_names(injection, present)
    at_weight = [att for att in injection.attachments if att.slot == "weight" and att.set in present]
    if at_weight:
        att = at_weight[0]
        raise InjectionError(f"set {att.set!r} has {len(at_weight)} delta(s) attached at a weight its parent reads "
                             f"directly ({att.owner}.weight, {att.method}): a weight is one for the whole batch, so "
                             f"per_sample cannot give its rows different sets; run such a set alone (activate)")
    gate = injection.gate
    if gate.rows is not None:
        raise InjectionError("per_sample blocks do not nest")
    gate.set_rows(names)
    try:
        yield
    finally:
        gate.set_rows(None)
