"""Turn a spec's selectors into attachments, checking everything before the model is touched."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .attach import Attachment, home_of
from .attention import recognised_convention
from .backbones.discover import Backbone
from .backbones.ends import calls_per_forward
from .backbones.pooling import is_causal, padding_mask_source
from .backbones.layout import BRANCH_ROLES, NORM_ROLES, PROJECTION_ROLES, Block, Branch, is_linear
from .errors import SpecError
from .registry import FAMILIES, METHODS
from .sets import DEFAULT
from .side import SideSite
from .sizes import check_fits
from .spec import MethodEntry, Spec


@dataclass(frozen=True)
class PlannedSite:
    attachment: Attachment
    entry: MethodEntry
    in_dim: int
    out_dim: int
    extra: dict = field(default_factory=dict)   # more build() arguments of some mechanisms (side: taps)


def _side_site(model: nn.Module, branch: Branch, layers: list[int], entry: MethodEntry,
               stacks: list[str]) -> PlannedSite:
    """One side network per branch: taps on the embedding output and the selected blocks' outputs (`stacks`:
    every branch's path). Taps may differ in width (Swin's stages): each has its own input Linear."""
    blocks = branch.blocks
    first = blocks[0]
    family = FAMILIES[first.family]
    pool = branch.pooling
    kind = pool.kind if pool is not None else family.global_token(branch.name)
    source = f" [{pool.source}]" if pool is not None else ""
    if kind == "unsupported":
        raise SpecError(f"entry {entry.name!r} ({entry.method}): branch {branch.name!r}: {pool.why}{source}; a side "
                        f"network adds its correction where the model pools, and cannot here")
    owner = pool.owner if kind == "head" else branch.final_norm or blocks[-1].path
    repeats = calls_per_forward(model, branch)
    if len(blocks) == 1 and owner == first.path and repeats == 1:
        raise SpecError(f"entry {entry.name!r} ({entry.method}): branch {branch.name!r} is one block with no final norm "
                        f"('{first.path}') and no config saying how many layer positions it runs at; a model may call "
                        f"such a block several times per forward, and a side network would then add its correction "
                        f"after every call")
    side = SideSite(first_block=first.path, taps=tuple(blocks[i].path for i in layers), owner=owner,
                    ids=branch.token_embedding, global_token=kind,
                    batch_first=first.layout.batch_first(model.get_submodule(first.path)),
                    eos_id=pool.eos_id if pool is not None else None,
                    mask_from=padding_mask_source(model, branch, stacks) if kind == "none" else None,
                    causal=kind == "none" and is_causal(model, branch, stacks), repeats=repeats,
                    start=branch.path.rsplit(".", 1)[0] if "." in branch.path else "")
    if kind in ("eot", "eos") and branch.token_embedding is None:
        raise SpecError(f"entry {entry.name!r}: branch {branch.name!r} pools at the end-of-text token but no token "
                        f"embedding feeds it")
    home, container = home_of(model, owner, entry.name)
    att = Attachment(key=branch.path, entry=entry.name, method=entry.method, branch=branch.name, layer=layers[-1],
                     role="branch", slot="side", owner=owner, container=container, home=home, side=side)
    widths = (blocks[0].dim, *(blocks[i].dim for i in layers for _ in range(repeats)))   # H_0, each tapped output
    d = blocks[-1].dim                # the branch's end (its final norm follows the last block)
    extra: dict = {"taps": len(widths)}
    if any(w != d for w in widths):   # stages of different widths (Swin): one input width per tap
        extra["tap_dims"] = widths
    return PlannedSite(att, entry, d, d, extra)


def takeover_path(model: nn.Module, block: Block) -> str:
    """The module whose forward computes `block`'s attention: the layout's `attn`, or the block itself where
    the layout names a projection there (a block that holds its q/k/v Linears directly)."""
    path = block.module_path(block.layout.attn)
    return block.path if is_linear(model.get_submodule(path)) else path


def _takeover(model: nn.Module, block: Block, entry: MethodEntry, why: str, prefix: bool) -> tuple[str, str]:
    """(attention path, convention) of a block whose attention must be taken over, or SpecError.

    Where the family names no convention, one that recognises the module by structure takes it
    (DeBERTa's disentangled attention); otherwise prefixes go through the module's own SDPA call (`sdpa`, checked
    by the inject probe); raw-weight deltas need a convention that computes the projections.
    """
    path = takeover_path(model, block)
    module = model.get_submodule(path)
    convention = block.layout.attention or recognised_convention(module)
    if convention is not None:
        return path, convention
    if prefix:
        return path, "sdpa"
    raise SpecError(f"entry {entry.name!r} ({entry.method}) needs to take over the attention {path!r} "
                    f"({type(module).__name__}, family {block.family}) {why}, but that family has no takeover "
                    f"convention; see docs/adding.md")


def _site(model: nn.Module, block: Block, role: str, slot: str, entry: MethodEntry) -> PlannedSite:
    common = dict(entry=entry.name, method=entry.method, branch=block.branch, layer=block.index, role=role, slot=slot)
    if slot == "delta":
        proj = block.projections[role]
        if proj.param is None:
            container = entry.name if proj.rows is None else f"{entry.name}_{role}"
            home, container = home_of(model, proj.owner, container)
            att = Attachment(key=proj.key, owner=proj.owner, container=container, home=home, param=proj.param,
                             rows=proj.rows, **common)
        else:   # a raw weight the module reads itself: the takeover applies the delta to activations
            attention, convention = _takeover(model, block, entry, f"to change the raw weight {proj.param}",
                                              prefix=False)
            home, container = home_of(model, attention, f"{entry.name}_{role}")
            att = Attachment(key=proj.key, owner=proj.owner, container=container, home=home, param=proj.param,
                             rows=proj.rows, attention=attention, convention=convention, **common)
        return PlannedSite(att, entry, proj.in_dim, proj.out_dim)
    if slot == "kv":
        attention, convention = _takeover(model, block, entry, "to add key/value prefixes", prefix=True)
        home, container = home_of(model, attention, entry.name)
        att = Attachment(key=attention, owner=attention, container=container, home=home, attention=attention,
                         convention=convention, **common)
        return PlannedSite(att, entry, block.dim, block.dim)
    layout = block.layout
    if role in NORM_ROLES:
        owner, source = block.module_path(getattr(layout, role)), None
    elif slot == "parallel":
        owner = block.module_path(getattr(layout, f"{role}_out"))
        entry_point = block.module_path(getattr(layout, f"{role}_in"))
        if METHODS[entry.method].reads == "stream" and layout.pre_norm(model.get_submodule(block.path)):
            entry_point = block.module_path(layout.norm1 if role == "attn" else layout.norm2)
        source = entry_point if entry_point != owner else None
    else:
        owner, source = block.module_path(getattr(layout, f"{role}_out")), None
    home, container = home_of(model, owner, entry.name)
    att = Attachment(key=owner, owner=owner, container=container, home=home, source=source, **common)
    return PlannedSite(att, entry, block.dim, block.dim)


def _roles_for_slot(slot: str) -> tuple[str, ...]:
    return {"delta": PROJECTION_ROLES, "parallel": NORM_ROLES + BRANCH_ROLES, "post": BRANCH_ROLES,
            "kv": ("attn",), "side": ("branch",)}[slot]


def _describe(backbone: Backbone) -> str:
    return ", ".join(f"{b.name} ({len(b.blocks)} layers, {b.family})" for b in backbone.branches.values())


def _in_set(model: nn.Module, site: PlannedSite, block: Block | None, set_name: str) -> PlannedSite:
    """The site's attachment as a member of adapter set `set_name`, with its module's batch dimension.

    Adapters of a set other than the default one are registered as `<entry>__<set>`, so sets share
    sites without sharing names.
    """
    att = site.attachment
    changes: dict = {"set": set_name}
    if set_name != DEFAULT:
        changes["container"] = f"{att.container}__{set_name}"
    if block is not None and att.attention is None and att.side is None:
        changes["batch_dim"] = 0 if block.layout.batch_first(model.get_submodule(block.path)) else 1
    return replace(site, attachment=replace(att, **changes))


def plan(model: nn.Module, spec: Spec, backbone: Backbone, existing: list[Attachment], *,
         fits: bool = True, set_name: str = DEFAULT) -> list[PlannedSite]:
    """Every attachment the spec asks for, in spec order, as members of set `set_name`. Raises
    SpecError on anything wrong.

    Nothing is built: with `fits`, the parameters the sites would get (`Method.param_shapes`) are
    summed and refused when they exceed the free memory of the model's device (`sizes.check_fits`).
    Sites taken by other sets are free for this one (sets act apart, or add up when activated together).
    """
    taken: dict[tuple[str, str], list[Attachment]] = {}
    stored: dict[tuple[str, str, str | None], Attachment] = {}
    for att in existing:
        if att.set == set_name:
            taken.setdefault((att.key, att.slot), []).append(att)
        stored[(att.home, att.container, att.param)] = att
    planned: list[PlannedSite] = []
    for entry in spec.entries:
        method = METHODS[entry.method]
        slot = method.mechanism_for(entry.config)
        allowed = tuple(r for r in method.roles if r in _roles_for_slot(slot))
        bad = [r for r in entry.roles if r not in allowed]
        if bad:
            raise SpecError(f"entry {entry.name!r}: unknown role(s) {bad} for {entry.method}; roles: {', '.join(allowed)}")
        names = entry.where.branches or tuple(backbone.branches)
        unknown = [b for b in names if b not in backbone.branches]
        if unknown:
            raise SpecError(f"entry {entry.name!r}: unknown branch(es) {unknown}; branches: {_describe(backbone)}")
        count = 0
        joined = _joined(backbone, names) if slot == "side" else {}
        for branch_name in names:
            if joined.get(branch_name) == ():
                continue        # read by the side network of the first branch it interleaves with
            branch, layers = _selected(backbone, joined.get(branch_name, (branch_name,)), entry)
            blocks = branch.blocks
            if slot == "side":
                sites = [_in_set(model, _side_site(model, branch, layers, entry,
                                                [b.path for b in backbone.branches.values()]), None, set_name)
                         ] if layers else []
                for site in sites:
                    _check_side_owner(site, planned, backbone)
            else:
                sites = [_in_set(model, _site(model, blocks[i], role, slot, entry), blocks[i], set_name)
                         for i in layers for role in entry.roles]
            for site in sites:
                _check_free(site, taken)
                _check_name(site.attachment, stored)
                taken.setdefault((site.attachment.key, slot), []).append(site.attachment)
                planned.append(site)
                count += 1
        if count == 0:
            raise SpecError(f"entry {entry.name!r} selects no site (where={entry.where.to_dict()}); "
                            f"branches: {_describe(backbone)}; roles for {entry.method}: {', '.join(allowed)}")
    if fits:
        param = next(model.parameters(), None)
        check_fits(planned, param.device if param is not None else torch.device("cpu"))
    return planned


def _joined(backbone: Backbone, names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Selected branches that end at one final norm and return every position (CoCa's text decoder: a
    self-attention stack and a cross-attention stack called in turn) are read by one side network: the
    first maps to all of them, the others to ()."""
    groups: dict[str, list[str]] = {}
    for name in names:
        branch = backbone.branches[name]
        every = branch.pooling is not None and branch.pooling.kind == "none"
        groups.setdefault(branch.final_norm if every and branch.final_norm else f"branch:{name}", []).append(name)
    out: dict[str, tuple[str, ...]] = {}
    for members in groups.values():
        out |= {members[0]: tuple(members), **{m: () for m in members[1:]}}
    return out


def _selected(backbone: Backbone, names: tuple[str, ...], entry: MethodEntry) -> tuple[Branch, list[int]]:
    """The branch `names[0]` with the blocks of every branch in `names` after its own, and the selected layers
    (`where.layers` applied to each branch, indices into that concatenation)."""
    first = backbone.branches[names[0]]
    blocks, layers = [], []
    for name in names:
        own = backbone.branches[name].blocks
        try:
            layers += [len(blocks) + i for i in entry.where.layer_indices(len(own))]
        except SpecError as error:
            raise SpecError(f"entry {entry.name!r}, branch {name!r}: {error}") from None
        blocks += own
    return (first if len(names) == 1 else replace(first, blocks=tuple(blocks))), layers


def _check_side_owner(site: PlannedSite, planned: list[PlannedSite], backbone: Backbone) -> None:
    """Two branches whose blocks end at one norm cannot each have a side network (CaiT's class-attention stack runs
    after its patch stack; stacks that return every position there are joined instead, as CoCa's decoder)."""
    att = site.attachment
    for other in planned:
        o = other.attachment
        if o.side is not None and o.entry == att.entry and o.owner == att.owner:
            raise SpecError(f"entry {att.entry!r} ({att.method}): branches {o.branch!r} and {att.branch!r} both end at "
                            f"'{att.owner}' (one stack runs among or after the other's blocks and pools a token), so a side "
                            f"network per branch cannot tell their outputs apart; select one of them with "
                            f"where.branches; branches: {_describe(backbone)}")


def _check_free(site: PlannedSite, taken: dict[tuple[str, str], list[Attachment]]) -> None:
    att = site.attachment
    for other in taken.get((att.key, att.slot), []):
        if other.container == att.container:
            raise SpecError(f"{att.key} already has an adapter named {att.container!r} ({other.method}); "
                            f"give the new entry another name")
        if site.entry.compose != "add":
            raise SpecError(f"{att.key} already has {other.method!r} (entry {other.entry!r}) in its {att.slot} slot; "
                            f"set compose='add' on entry {site.entry.name!r} to apply both (deltas and adapters add up, "
                            f"prefixes concatenate), or target other sites")


def _check_name(att: Attachment, stored: dict[tuple[str, str, str | None], Attachment]) -> None:
    """Two adapters registered under one name on one module would overwrite each other."""
    other = stored.get((att.home, att.container, att.param))
    if other is not None:
        raise SpecError(f"{att.key}: entries {other.entry!r} ({other.slot}) and {att.entry!r} ({att.slot}) would both "
                        f"be stored as {att.container!r}; give one of them another name")
    stored[(att.home, att.container, att.param)] = att
