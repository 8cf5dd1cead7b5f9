"""Trainable-parameter accounting per branch and method, with the papers' percent convention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .api import get_injection
from .attach import adapter_module


@dataclass(frozen=True)
class Summary:
    """`rows`: (branch, entry, trainable count). Percent = trainable / (frozen + trainable) * 100.

    With several adapter sets, a row's entry is `<set>/<entry>`, and `sets` has one row per set:
    (name, active, adapter parameters, of which trainable).
    """

    rows: tuple[tuple[str, str, int], ...]
    trainable: int
    frozen: int
    sets: tuple[tuple[str, bool, int, int], ...] = ()

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, entry, n in self.rows:
            out[entry] = out.get(entry, 0) + n
        return out

    def by_branch(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for branch, _, n in self.rows:
            out[branch] = out.get(branch, 0) + n
        return out

    def table(self) -> str:
        lines = [f"{'branch':<10} {'method':<16} {'trainable':>12}", "-" * 40]
        lines += [f"{b:<10} {e:<16} {n:>12,}" for b, e, n in self.rows]
        lines += ["-" * 40,
                  f"{'trainable':<27} {self.trainable:>12,}",
                  f"{'frozen':<27} {self.frozen:>12,}",
                  f"{'percent':<27} {self.percent:>11.2f}%  (trainable / (frozen + trainable))"]
        if len(self.sets) > 1:
            lines += ["", f"{'set':<16} {'active':<7} {'parameters':>12} {'trainable':>12}", "-" * 50]
            lines += [f"{n:<16} {'yes' if a else 'no':<7} {p:>12,} {t:>12,}" for n, a, p, t in self.sets]
        return "\n".join(lines)

    __str__ = table


def summary(model: nn.Module) -> Summary:
    """Count trainable parameters per (branch, method entry); unfrozen base parameters are `base`."""
    counts: dict[tuple[str, str], int] = {}
    adapter_ids: set[int] = set()
    injection = get_injection(model)
    several = injection is not None and len(injection.sets) > 1
    per_set: dict[str, list[int]] = {name: [0, 0] for name in (injection.sets if injection is not None else ())}
    for att in injection.attachments if injection is not None else []:
        label = f"{att.set}/{att.entry}" if several else att.entry
        for param in adapter_module(model, att).parameters():
            adapter_ids.add(id(param))
            per_set[att.set][0] += param.numel()
            if param.requires_grad:
                per_set[att.set][1] += param.numel()
                counts[(att.branch, label)] = counts.get((att.branch, label), 0) + param.numel()
    trainable = frozen = 0
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if param.requires_grad:
            trainable += param.numel()
            if id(param) not in adapter_ids:
                counts[("-", "base")] = counts.get(("-", "base"), 0) + param.numel()
        else:
            frozen += param.numel()
    rows = tuple((b, e, n) for (b, e), n in counts.items())
    active = injection.gate.active if injection is not None else ()
    sets = tuple((name, name in active, p, t) for name, (p, t) in per_set.items())
    return Summary(rows, trainable, frozen, sets)
