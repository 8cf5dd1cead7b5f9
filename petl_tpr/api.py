"""inject / eject / merge / aux_loss: orchestration only; the model is changed in `attach.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attach import Attachment, adapter_module, attach, detach, fold
from .backbones.discover import discover
from .compiled import guard_hooks
from .errors import InjectionError
from .registry import METHODS
from .nested import renest, unnest
from .probe import check_planned
from .runcheck import arm, forget
from .sets import DEFAULT, SetGate, check_set_name, tag
from .spec import Spec
from .targeting import plan

INJECTION_ATTR = "_petl_injection"


@dataclass
class AdapterSet:
    """One named set of adapters: its spec (None once every entry was merged) and what was merged."""

    name: str
    spec: Spec | None
    merged_entries: list[str] = field(default_factory=list)


@dataclass
class Injection:
    """What `inject` did to a model: kept on the model so eject/save/summary can find it.

    `attachments` are those of every set (each `Attachment.set` names its own); `sets` in injection
    order; `gate` decides which sets act in a forward (`petl_tpr.sets`).
    """

    attachments: list[Attachment]
    requires_grad: dict[str, bool]
    fingerprint: dict[str, dict[str, object]]
    sets: dict[str, AdapterSet] = field(default_factory=dict)
    gate: SetGate = field(default_factory=SetGate)
    set_params: dict[str, tuple] = field(default_factory=dict, repr=False)   # switch.py's per-set cache

    def changed(self) -> None:
        """Attachments changed (inject, eject, merge): drop the per-set parameter lists."""
        self.set_params.clear()

    def _only(self) -> AdapterSet:
        if len(self.sets) != 1:
            raise InjectionError(f"this model carries {len(self.sets)} adapter sets ({', '.join(self.sets)}); "
                                 f"ask for one: injection.sets[name].spec")
        return next(iter(self.sets.values()))

    @property
    def spec(self) -> Spec | None:
        """The spec of the model's one adapter set (an error when it has several)."""
        return self._only().spec

    @property
    def merged_entries(self) -> list[str]:
        return self._only().merged_entries

    def of_set(self, name: str) -> list[Attachment]:
        return [att for att in self.attachments if att.set == name]

    def describe(self) -> str:
        counts: dict[tuple[str, str, str], int] = {}
        for att in self.attachments:
            counts[(att.set, att.entry, att.branch)] = counts.get((att.set, att.entry, att.branch), 0) + 1
        several = len({key[0] for key in counts}) > 1
        lines = [(f"{name:<10} " if several else "") + f"{entry:<14} {branch:<8} {n:>4} sites"
                 for (name, entry, branch), n in counts.items()]
        return "\n".join(lines)

    __str__ = describe


def get_injection(model: nn.Module) -> Injection | None:
    return model.__dict__.get(INJECTION_ATTR)


def _injection(model: nn.Module) -> Injection:
    injection = get_injection(model)
    if injection is None:
        raise InjectionError(f"nothing is injected in this {type(model).__name__}")
    return injection


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Adapter parameters: of every set under `<site>.<entry>[__<set>].<param>` (unique in the model),
    or of set `name` under its set-local key `<site>.<entry>.<param>` (as its file stores them)."""
    injection = get_injection(model)
    if injection is None:
        return {}
    if name is not None:
        _check_names(injection, [name])
    out = {}
    for att in injection.attachments:
        if name is not None and att.set != name:
            continue
        prefix = att.state_prefix if name is None else att.local_prefix
        for param_name, param in adapter_module(model, att).named_parameters():
            out[f"{prefix}.{param_name}"] = param
    return out


def _site_device(model: nn.Module, att: Attachment) -> torch.device:
    owner = model.get_submodule(att.owner)
    for tensor in (next(owner.parameters(), None), next(model.parameters(), None)):
        if tensor is not None:
            return tensor.device
    return torch.device("cpu")


def inject(model: nn.Module, spec: Spec | str, *, name: str = DEFAULT, freeze: bool = True) -> Injection:
    """Attach every method of `spec` (a Spec or a preset name) to `model`, in place, as adapter set `name`.

    All selectors are checked before anything changes; an exception half-way detaches what was
    attached. With `freeze`, every non-adapter parameter stops requiring grad (eject restores it).
    Calling inject again with the same `name` adds to that set (sharing a site needs `compose="add"`);
    a new `name` adds a set beside the others (sites may be shared freely) and makes it the one
    active set: the others stay attached but inert until `activate` (docs/adapter_sets.md).
    """
    if isinstance(spec, str):
        spec = Spec.preset(spec)
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a Spec or a preset name, got {type(spec).__name__}")
    check_set_name(name)
    guard_hooks()
    prior = get_injection(model)
    backbone = discover(model)
    planned = plan(model, spec, backbone, prior.attachments if prior else [], set_name=name)
    planned = check_planned(model, backbone, planned)     # bypassed projections' deltas move to their weight
    # taken before attaching, so adapter parameters are not in it
    requires = {n: p.requires_grad for n, p in model.named_parameters()} if prior is None else {}
    gate = prior.gate if prior is not None else SetGate()
    done: list[Attachment] = []
    try:
        for site in planned:
            adapter = METHODS[site.entry.method].build(site.entry.config, in_dim=site.in_dim, out_dim=site.out_dim,
                                                       branch=site.attachment.branch, **site.extra)
            tag(adapter, name, gate)
            attach(model, site.attachment, adapter.to(_site_device(model, site.attachment)))
            done.append(site.attachment)
    except BaseException:
        for att in reversed(done):
            detach(model, att)
        raise
    if prior is None:
        injection = Injection(done, requires, backbone.fingerprint(), gate=gate)
        model.__dict__[INJECTION_ATTR] = injection
    else:
        injection = prior
        injection.attachments = prior.attachments + done
    injection.changed()
    adapter_set = injection.sets.get(name)
    if adapter_set is None:
        injection.sets[name] = AdapterSet(name, spec)
        gate.active = (name,)
    else:
        adapter_set.spec = spec if adapter_set.spec is None else adapter_set.spec + spec
    arm(model, [_run_site(model, backbone, att) for att in done], sets={a.state_prefix: a.set for a in done},
        gate=gate)
    if hasattr(type(model), "save_pretrained"):   # transformers: its own save would drop the adapters' spec
        from .integrations.pretrained import patch_save_pretrained

        patch_save_pretrained(model)
    unnest(model, [b.path for b in backbone.branches.values()])
    if freeze:
        trainable = {id(p) for n in gate.active for p in adapter_parameters(model, n).values()}
        for param in model.parameters():
            param.requires_grad_(id(param) in trainable)
    result = Injection(done, injection.requires_grad, injection.fingerprint, gate=gate)
    result.sets[name] = AdapterSet(name, spec)
    return result


def _run_site(model: nn.Module, backbone, att: Attachment) -> tuple[str, str, str, nn.Module]:
    """(enclosing module, key, description, adapter) for the first-forward run check (runcheck.py)."""
    if att.side is None:
        enclosing = backbone.branches[att.branch].blocks[att.layer].path
    else:        # the module it ends at; for a block run at several positions, the module running the stack
        enclosing = att.side.start if att.side.repeats > 1 else att.owner
    where = "" if att.set == DEFAULT else f" of set {att.set!r}"
    what = f"{att.entry} ({att.method}){where} at {att.key} [{att.role}, {att.slot}]"
    return enclosing, att.state_prefix, what, adapter_module(model, att)


def _check_names(injection: Injection, names: list[str]) -> None:
    unknown = [n for n in names if n not in injection.sets]
    if unknown:
        raise InjectionError(f"no adapter set named {', '.join(map(repr, unknown))}; sets: {', '.join(injection.sets)}")


def _one_set(injection: Injection, name: str | None, call: str) -> str:
    """`name`, checked; or, left out, the model's only set (several sets: an error saying to name one)."""
    if name is None:
        if len(injection.sets) > 1:
            raise InjectionError(f"this model carries {len(injection.sets)} adapter sets ({', '.join(injection.sets)}); "
                                 f"{call} works on one: say which, {call}(..., name=...)")
        return next(iter(injection.sets))
    _check_names(injection, [name])
    return name


def eject(model: nn.Module, name: str | None = None) -> None:
    """Take adapters out: set `name`, or every set (modules, hooks, attention takeovers; with the last
    set, the requires_grad flags as before `inject`)."""
    guard_hooks()
    injection = _injection(model)
    if name is not None:
        _check_names(injection, [name])
        if len(injection.sets) > 1:
            gone = injection.of_set(name)
            forget(model, [att.state_prefix for att in gone])
            for att in reversed(gone):
                detach(model, att)
            injection.attachments = [a for a in injection.attachments if a.set != name]
            injection.changed()
            del injection.sets[name]
            injection.gate.active = tuple(n for n in injection.gate.active if n != name)
            return
    forget(model, [att.state_prefix for att in injection.attachments])
    for att in reversed(injection.attachments):
        detach(model, att)
    renest(model)
    for param_name, param in model.named_parameters():
        if param_name in injection.requires_grad:
            param.requires_grad_(injection.requires_grad[param_name])
    del model.__dict__[INJECTION_ATTR]


def merge(model: nn.Module, name: str | None = None) -> list[str]:
    """Fold every mergeable delta (LoRA) of set `name` into its base weight and remove it; returns the
    merged keys. `name` may be left out when the model carries one set.

    Other methods stay attached. Folding changes base weights, so `eject` afterwards keeps them, and
    the other sets (and `disabled`) then run on the merged weights.
    """
    guard_hooks()
    injection = _injection(model)
    name = _one_set(injection, name, "merge")    # it folds one set into the base weights every set shares
    merged = [att for att in injection.of_set(name) if METHODS[att.method].mergeable]
    forget(model, [att.state_prefix for att in merged])
    for att in merged:
        fold(model, att)
    injection.attachments = [a for a in injection.attachments if a not in merged]
    injection.changed()
    adapter_set = injection.sets[name]
    if adapter_set.spec is None:      # everything was merged by an earlier call
        return []
    kept = tuple(e for e in adapter_set.spec.entries if not METHODS[e.method].mergeable)
    adapter_set.merged_entries += [e.name for e in adapter_set.spec.entries if METHODS[e.method].mergeable]
    adapter_set.spec = Spec(kept) if kept else None
    return [a.state_prefix for a in merged]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses (router load balancing) of the last forward; 0 when none."""
    injection = get_injection(model)
    total = None
    for att in injection.attachments if injection else []:
        module = adapter_module(model, att)
        if hasattr(module, "aux_loss"):          # an inert set's router kept no loss (`skipped`)
            term = module.aux_loss()
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total
