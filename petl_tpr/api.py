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
from .spec import Spec
from .targeting import plan

INJECTION_ATTR = "_petl_injection"


@dataclass
class Injection:
    """What `inject` did to a model: kept on the model so eject/save/summary can find it."""

    spec: Spec | None               # None once every entry was merged into the base weights
    attachments: list[Attachment]
    requires_grad: dict[str, bool]
    fingerprint: dict[str, dict[str, object]]
    merged_entries: list[str] = field(default_factory=list)

    def describe(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for att in self.attachments:
            counts[(att.entry, att.branch)] = counts.get((att.entry, att.branch), 0) + 1
        lines = [f"{entry:<14} {branch:<8} {n:>4} sites" for (entry, branch), n in counts.items()]
        return "\n".join(lines)

    __str__ = describe


def get_injection(model: nn.Module) -> Injection | None:
    return model.__dict__.get(INJECTION_ATTR)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter under its checkpoint key `<site>.<entry>.<param>`."""
    injection = get_injection(model)
    if injection is None:
        return {}
    out = {}
    for att in injection.attachments:
        for name, param in adapter_module(model, att).named_parameters():
            out[f"{att.state_prefix}.{name}"] = param
    return out


def _site_device(model: nn.Module, att: Attachment) -> torch.device:
    owner = model.get_submodule(att.owner)
    for tensor in (next(owner.parameters(), None), next(model.parameters(), None)):
        if tensor is not None:
            return tensor.device
    return torch.device("cpu")


def inject(model: nn.Module, spec: Spec | str, *, freeze: bool = True) -> Injection:
    """Attach every method of `spec` (a Spec or a preset name) to `model`, in place.

    All selectors are checked before anything changes; an exception half-way detaches what was
    attached. With `freeze`, every non-adapter parameter stops requiring grad (eject restores it).
    Calling inject again adds to what is there; sharing a site needs `compose="add"`.
    """
    if isinstance(spec, str):
        spec = Spec.preset(spec)
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a Spec or a preset name, got {type(spec).__name__}")
    guard_hooks()
    prior = get_injection(model)
    backbone = discover(model)
    planned = plan(model, spec, backbone, prior.attachments if prior else [])
    check_planned(model, backbone, planned)
    # taken before attaching, so adapter parameters are not in it
    requires = {name: p.requires_grad for name, p in model.named_parameters()} if prior is None else {}
    done: list[Attachment] = []
    try:
        for site in planned:
            adapter = METHODS[site.entry.method].build(site.entry.config, in_dim=site.in_dim, out_dim=site.out_dim,
                                                       branch=site.attachment.branch, **site.extra)
            attach(model, site.attachment, adapter.to(_site_device(model, site.attachment)))
            done.append(site.attachment)
    except BaseException:
        for att in reversed(done):
            detach(model, att)
        raise
    if prior is None:
        injection = Injection(spec, done, requires, backbone.fingerprint())
        model.__dict__[INJECTION_ATTR] = injection
    else:
        injection = prior
        injection.spec = spec if prior.spec is None else prior.spec + spec
        injection.attachments = prior.attachments + done
    arm(model, [_run_site(model, backbone, att) for att in done])
    if hasattr(type(model), "save_pretrained"):   # transformers: its own save would drop the adapters' spec
        from .integrations.pretrained import patch_save_pretrained

        patch_save_pretrained(model)
    unnest(model, [b.path for b in backbone.branches.values()])
    if freeze:
        adapters = {id(p) for p in adapter_parameters(model).values()}
        for param in model.parameters():
            param.requires_grad_(id(param) in adapters)
    return Injection(spec, done, injection.requires_grad, injection.fingerprint)


def _run_site(model: nn.Module, backbone, att: Attachment) -> tuple[str, str, str, nn.Module]:
    """(enclosing module, key, description, adapter) for the first-forward run check (runcheck.py)."""
    enclosing = att.owner if att.side is not None else backbone.branches[att.branch].blocks[att.layer].path
    what = f"{att.entry} ({att.method}) at {att.key} [{att.role}, {att.slot}]"
    return enclosing, att.state_prefix, what, adapter_module(model, att)


def eject(model: nn.Module) -> None:
    """Take every adapter out: modules, hooks, attention takeovers, and requires_grad flags as before."""
    guard_hooks()
    injection = get_injection(model)
    if injection is None:
        raise InjectionError(f"nothing is injected in this {type(model).__name__}")
    forget(model, [att.state_prefix for att in injection.attachments])
    for att in reversed(injection.attachments):
        detach(model, att)
    renest(model)
    for name, param in model.named_parameters():
        if name in injection.requires_grad:
            param.requires_grad_(injection.requires_grad[name])
    del model.__dict__[INJECTION_ATTR]


def merge(model: nn.Module) -> list[str]:
    """Fold every mergeable delta (LoRA) into its base weight and remove it; returns the merged keys.

    Other methods stay attached. Folding changes base weights, so `eject` afterwards keeps them.
    """
    guard_hooks()
    injection = get_injection(model)
    if injection is None:
        raise InjectionError(f"nothing is injected in this {type(model).__name__}")
    merged = [att for att in injection.attachments if METHODS[att.method].mergeable]
    forget(model, [att.state_prefix for att in merged])
    for att in merged:
        fold(model, att)
    injection.attachments = [a for a in injection.attachments if a not in merged]
    if injection.spec is None:      # everything was merged by an earlier call
        return []
    kept = tuple(e for e in injection.spec.entries if not METHODS[e.method].mergeable)
    injection.merged_entries += [e.name for e in injection.spec.entries if METHODS[e.method].mergeable]
    injection.spec = Spec(kept) if kept else None
    return [a.state_prefix for a in merged]


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses (router load balancing) of the last forward; 0 when none."""
    injection = get_injection(model)
    total = None
    for att in injection.attachments if injection else []:
        module = adapter_module(model, att)
        if hasattr(module, "aux_loss"):
            term = module.aux_loss()
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total
