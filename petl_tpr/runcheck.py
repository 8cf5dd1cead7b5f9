"""Never silently inert: the first forward through each block proves that its adapters ran.

`inject` arms a `RunCheck` on the model. Every adapter module gets a forward pre-hook that marks it
as run; the module that encloses its site (its block, or for a side network the branch's final
norm) gets a pre-hook that clears the marks and a forward hook that, when the enclosing module
returns, raises `InjectionError` naming every adapter of that module that did not run. A block whose
forward reads a projection's weight directly instead of calling it, or an attention that calls its
own kernel instead of the taken-over forward, is caught at its first forward instead of training an
adapter that never acts.

Once an enclosing module has passed, its hooks and its adapters' markers are removed: steady-state
training carries no extra hooks. A module never called (a CoCa text decoder in a contrastive run)
is never checked, which is right: nothing was computed without its adapters. The hooks do nothing
while `torch.compile` traces (the eager first call is the check). The objects hold plain strings and
sets, no module references, so `copy.deepcopy` of a model gives the copy its own check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InjectionError

CHECK_ATTR = "_petl_run_check"


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


class RunCheck:
    """Which adapters (by state prefix) each enclosing module must run; see the module docstring."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, str]] = {}      # enclosing path -> {adapter key: site description}
        self.ran: set[str] = set()
        self.handles: dict[str, list[Any]] = {}            # enclosing path or adapter key -> hook handles
        self.sets: dict[str, str] = {}                      # adapter key -> its adapter set
        self.gate: Any = None                               # the model's SetGate: only acting sets are expected

    def _expected(self, enclosing: str) -> dict[str, str]:
        pending = self.pending.get(enclosing, {})
        if self.gate is None:
            return pending
        return {key: what for key, what in pending.items() if key not in self.sets or self.gate.acts(self.sets[key])}

    def clear(self, enclosing: str) -> None:
        for key in self.pending.get(enclosing, {}):
            self.ran.discard(key)

    def verify(self, enclosing: str) -> None:
        expected = self._expected(enclosing)      # an inert set's adapters stay pending until their set acts
        missing = [what for key, what in expected.items() if key not in self.ran]
        if missing:
            others = sum(len(v) for p, v in self.pending.items() if p != enclosing)
            raise InjectionError(
                f"{len(missing)} adapter(s) attached in '{enclosing}' did not run in its forward: "
                f"{'; '.join(missing)}. The module's forward bypasses them (it reads a weight directly instead of "
                f"calling the projection, or computes attention without the taken-over forward), so training "
                f"would change nothing. Eject and target other roles, or describe the block (docs/adding.md)"
                + (f"; {others} adapter(s) elsewhere are not verified yet" if others else ""))
        for key in expected:
            for handle in self.handles.pop(key, []):
                handle.remove()
            self.pending[enclosing].pop(key, None)
        if not self.pending.get(enclosing):
            for handle in self.handles.pop(enclosing, []):
                handle.remove()
            self.pending.pop(enclosing, None)
        self.ran.difference_update(expected)

    def remove(self) -> None:
        for handles in self.handles.values():
            for handle in handles:
                handle.remove()
        self.handles.clear()
        self.pending.clear()


class _Mark:
    def __init__(self, check: RunCheck, key: str) -> None:
        self.check, self.key = check, key

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not _compiling():
            self.check.ran.add(self.key)


class _Clear:
    def __init__(self, check: RunCheck, enclosing: str) -> None:
        self.check, self.enclosing = check, enclosing

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not _compiling():
            self.check.clear(self.enclosing)


class _Verify(_Clear):
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not _compiling():
            self.check.verify(self.enclosing)


def check_of(model: nn.Module) -> RunCheck | None:
    return model.__dict__.get(CHECK_ATTR)


def arm(model: nn.Module, sites: list[tuple[str, str, str, nn.Module]], *, sets: dict[str, str] | None = None,
        gate: Any = None) -> None:
    """Expect each `(enclosing path, adapter key, description, adapter module)` to run.

    The enclosing module's verifying hook is registered last, after every adapter hook on it, so a
    side network applied in a forward hook of its final norm has run when the check looks.
    """
    check = check_of(model)
    if check is None:
        check = model.__dict__[CHECK_ATTR] = RunCheck()
    check.sets.update(sets or {})
    check.gate = gate if gate is not None else check.gate
    for enclosing, key, what, adapter in sites:
        check.handles.setdefault(key, []).append(adapter.register_forward_pre_hook(_Mark(check, key)))
        if enclosing not in check.pending:
            module = model.get_submodule(enclosing) if enclosing else model
            check.pending[enclosing] = {}
            check.handles.setdefault(enclosing, []).extend([
                module.register_forward_pre_hook(_Clear(check, enclosing)),
                module.register_forward_hook(_Verify(check, enclosing))])
        check.pending[enclosing][key] = what
    for enclosing in {site[0] for site in sites}:      # keep each verifier after the newest adapter hooks
        module = model.get_submodule(enclosing) if enclosing else model
        hooks = module._forward_hooks
        for hook_id in [h for h, fn in hooks.items() if isinstance(fn, _Verify)]:
            hooks.move_to_end(hook_id)


def forget(model: nn.Module, keys: list[str]) -> None:
    """Stop expecting the adapters `keys` (ejected or merged); the model's check goes when empty."""
    check = check_of(model)
    if check is None:
        return
    for key in keys:
        for handle in check.handles.pop(key, []):
            handle.remove()
        check.ran.discard(key)
        check.sets.pop(key, None)
    for enclosing in list(check.pending):
        for key in keys:
            check.pending[enclosing].pop(key, None)
        if not check.pending[enclosing]:
            for handle in check.handles.pop(enclosing, []):
                handle.remove()
            del check.pending[enclosing]
    if not check.pending:
        check.remove()
        del model.__dict__[CHECK_ATTR]


def pending_sites(model: nn.Module) -> dict[str, list[str]]:
    """Enclosing module -> the adapters whose run is not verified yet (empty once every block ran)."""
    check = check_of(model)
    return {} if check is None else {p: list(v.values()) for p, v in check.pending.items()}


def pending_keys(model: nn.Module) -> set[str]:
    """State prefixes of the adapters whose run is not verified yet."""
    check = check_of(model)
    return set() if check is None else {key for sites in check.pending.values() for key in sites}
