"""Walk a model, recognise transformer blocks by structure, group them into named branches.

A branch is one stack of blocks (the children of one ModuleList). Branches are named by what
feeds them, not by attribute names: the highest ancestor of a stack that holds no other stack is
inspected; a Conv2d there (a patch embedding) makes the branch `vision`, an Embedding makes it
`text`. A stack left unnamed in a model whose root holds a token Embedding outside every vision
branch is `text` (open_clip keeps `token_embedding` at the root); anything else is `encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..attention import recognised_convention
from ..errors import DiscoveryError
from ..registry import FAMILIES
from .ends import final_norm, token_embedding
from .pooling import pooling
from .structural import STRUCTURAL, infer_layout
from .layout import PROJECTION_ROLES, Block, BlockLayout, Branch, Projection, ProjectionRef, is_linear, is_mha, is_norm, linear_dims


@dataclass(frozen=True)
class Backbone:
    """Every recognised branch of a model, in discovery order."""

    branches: dict[str, Branch]

    def blocks(self) -> list[Block]:
        return [block for branch in self.branches.values() for block in branch.blocks]

    def describe(self) -> str:
        """One line per branch: name, family, layer count, width."""
        return "; ".join(
            f"{b.name}: {len(b.blocks)} {b.family} blocks of width {b.dim} at '{b.path}'"
            for b in self.branches.values()
        )

    def report(self) -> str:
        """What `inject` will work with, to check before training: per branch, its blocks and roles."""
        lines = []
        for b in self.branches.values():
            first = b.blocks[0]
            layout = first.layout
            pooled = b.pooling.describe() if b.pooling is not None else "?"
            widths = sorted({blk.dim for blk in b.blocks})
            lines.append(f"{b.name}: {len(b.blocks)} {b.family} blocks at '{b.path}', width "
                         f"{'/'.join(map(str, widths))}, final norm {b.final_norm or 'none'}, pooled token {pooled}"
                         + (f", token embedding {b.token_embedding}" if b.token_embedding and b.pooling is not None
                            and b.pooling.kind in ("eot", "eos") else ""))
            roles = ", ".join(f"{r}={p.key[len(first.path) + 1:]}" for r, p in first.projections.items())
            lines.append(f"  block 0 '{first.path}': {roles}; norms {layout.norm1}, {layout.norm2} "
                         f"({'pre' if first.pre_norm else 'post'}-norm); attention takeover: "
                         + (f"{b.takeover} (prefixes given at its own SDPA call, probed at inject)" if b.takeover == "sdpa"
                            else str(b.takeover)))
        return "\n".join(lines)

    __str__ = report

    def fingerprint(self) -> dict[str, dict[str, object]]:
        """What a checkpoint records to check that it fits a model."""
        return {n: {"family": b.family, "layers": len(b.blocks), "dim": b.dim} for n, b in self.branches.items()}


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _resolve_projection(block: nn.Module, role: str, ref: ProjectionRef, prefix: str) -> Projection | None:
    owner = _get(block, ref.path)
    if owner is None:
        return None
    owner_path = f"{prefix}.{ref.path}" if prefix else ref.path
    if ref.param is None:
        if not is_linear(owner):
            return None
        in_dim, out_total = linear_dims(owner)
    else:
        weight = getattr(owner, ref.param, None)   # a Parameter, or a plain Tensor if the user parametrized it
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        out_total, in_dim = weight.shape
    if ref.part is None:
        return Projection(role, owner_path, ref.param, None, in_dim, out_total)
    if out_total % ref.parts:
        return None
    size = out_total // ref.parts
    rows = (ref.part * size, (ref.part + 1) * size)
    return Projection(role, owner_path, ref.param, rows, in_dim, size)


def match_layout(block: nn.Module, layout: BlockLayout, prefix: str) -> tuple[int, dict[str, Projection]] | None:
    """Return (width, resolved projections) when `block` has every role of `layout`."""
    attn = _get(block, layout.attn)
    if attn is None or not layout.attn_check(attn):
        return None
    norms = [_get(block, layout.norm1), _get(block, layout.norm2)]
    if not all(n is not None and (is_norm(n) or isinstance(n, nn.Identity)) for n in norms):
        return None
    norms = [n for n in norms if is_norm(n)]     # one may be an nn.Identity in its place (ModernBERT's layer 0)
    if not norms:
        return None
    for path in (layout.attn_in, layout.attn_out, layout.mlp_in, layout.mlp_out):
        if _get(block, path) is None:
            return None
    projections = {}
    for role in PROJECTION_ROLES:
        resolved = _resolve_projection(block, role, layout.projection(role), prefix)
        if resolved is None:
            return None
        projections[role] = resolved
    return int(norms[0].weight.shape[0]), projections


def _match_block(module: nn.Module, prefix: str, in_list: bool) -> tuple[str, BlockLayout, int, dict[str, Projection]] | None:
    """The first registered layout that fits; else, for an element of a list, one read from its structure."""
    for family in FAMILIES.values():
        for layout in family.layouts:
            found = match_layout(module, layout, prefix)
            if found is not None:
                return family.name, layout, found[0], found[1]
    if in_list and STRUCTURAL in FAMILIES:
        layout = infer_layout(module)
        found = match_layout(module, layout, prefix) if layout is not None else None
        if found is not None:
            return STRUCTURAL, layout, found[0], found[1]
    return None


def _has(module: nn.Module, kinds: tuple[type, ...], skip: tuple[str, ...] = (), prefix: str = "") -> bool:
    for name, sub in module.named_modules(prefix=prefix):
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(sub, kinds):
            return True
    return False


def _is_patchifier(name: str, module: nn.Module) -> bool:
    """A patch embedding: a Conv2d, or a Linear (or any module) named or typed as a patch embedding."""
    if isinstance(module, nn.Conv2d):
        return True
    leaf = name.rsplit(".", 1)[-1].lower()
    return ("patch" in leaf or "patch" in type(module).__name__.lower()) and any(
        isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules())


def _feeder(module: nn.Module, prefix: str, stacks: list[str]) -> str | None:
    """'vision' when a patchifier lies under `module` outside every stack, 'text' for an Embedding, else None."""
    kind = None
    for name, sub in module.named_modules(prefix=prefix):
        if any(name == s or name.startswith(s + ".") for s in stacks):
            continue
        if _is_patchifier(name, sub):
            return "vision"
        if isinstance(sub, nn.Embedding):
            kind = "text"
    return kind


def _branch_kind(model: nn.Module, stack: str, stacks: list[str]) -> str:
    """Name a stack by what feeds it: walking up from the stack, the first ancestor holding a patchifier
    (vision) or a token embedding (text) outside the stacks decides; the walk stops below an ancestor
    that holds another stack, so a tower never takes its name from another tower."""
    parts = stack.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        candidate = ".".join(parts[:cut])
        if any(other != stack and (candidate == "" or other.startswith(candidate + ".")) for other in stacks):
            break
        sub = model.get_submodule(candidate) if candidate else model
        kind = _feeder(sub, candidate, stacks)
        if kind is not None:
            return kind
    return "encoder"


_CONTAINERS = {"layers", "layer", "blocks", "block", "resblocks", "h", "encoder", "transformer", "model"}


def _own_name(kind: str, stack: str, taken: set[str]) -> str:
    """A second stack of one kind is named from its path: `text_decoder.resblocks` -> `text_decoder`."""
    words = [w for w in stack.split(".") if w not in _CONTAINERS and not w.isdigit()]
    name = "_".join(words) or kind
    if not name.startswith(kind) and kind != "encoder" and not any(k in name for k in ("text", "vision", "visual")):
        name = f"{kind}_{name}"
    base, suffix = name, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def _width(module: nn.Module) -> int | None:
    norm = next((m for m in module.modules() if is_norm(m)), None)
    return None if norm is None else int(norm.weight.shape[0])


def _widening(model: nn.Module, siblings: list[str]) -> bool:
    """Several stacks that are items of one container and widen from one to the next: a pyramid's stages."""
    widths = [_width(model.get_submodule(s)) for s in siblings]
    return len(siblings) > 1 and None not in widths and all(a < b for a, b in zip(widths, widths[1:]))


def _stage_groups(model: nn.Module, stacks: list[str]) -> dict[str, list[str]]:
    """Stacks that are the stages of one pyramid (`encoder.layers.0.blocks`, `encoder.layers.1.blocks`, as in
    transformers' Swin; or `features.1`, `features.3` widening from one to the next, as in torchvision's) form
    one branch, keyed by the stage container (`encoder.layers`, `features`); any other stack stands alone."""
    groups: dict[str, list[str]] = {}
    for stack in stacks:
        parts = stack.split(".")
        key = stack
        for i in range(len(parts) - 1, 0, -1):
            if parts[i].isdigit():
                container = ".".join(parts[:i])
                if isinstance(model.get_submodule(container), (nn.ModuleList, nn.Sequential)):
                    rest = ".".join(parts[i + 1:])
                    if rest:
                        siblings = [s for s in stacks if s.startswith(container + ".") and s.endswith("." + rest)]
                        if len(siblings) > 1:
                            key = container
                    elif _widening(model, [s for s in stacks if s.rsplit(".", 1)[0] == container]):
                        key = container     # torchvision Swin: features.1, features.3, ... with downsamplers between
                break
        groups.setdefault(key, []).append(stack)
    return groups


def discover(model: nn.Module) -> Backbone:
    """Find every block of a registered family in `model`, grouped into branches.

    Raises DiscoveryError listing what was found when no block matches.
    """
    found: list[tuple[str, str, BlockLayout, int, dict[str, Projection]]] = []
    matched_prefixes: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in matched_prefixes):
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else None
        hit = _match_block(module, path, isinstance(parent, (nn.ModuleList, nn.Sequential))) if "." in path else None
        if hit is not None:
            found.append((path, *hit))
            matched_prefixes.append(path)
    if not found:
        raise DiscoveryError(_nothing_found_message(model))
    _check_whole_stacks(model, [row[0] for row in found])
    stacks: dict[str, list] = {}
    for path, family, layout, dim, projections in found:
        stacks.setdefault(path.rsplit(".", 1)[0], []).append((path, family, layout, dim, projections))
    groups = _stage_groups(model, list(stacks))
    roots = list(groups)
    kinds = {g: _branch_kind(model, members[0], [m for m in stacks if m not in members])
             for g, members in groups.items()}
    vision_roots = tuple(members[0] for g, members in groups.items() if kinds[g] == "vision")
    for g, kind in kinds.items():
        if kind == "encoder" and vision_roots and _has(model, (nn.Embedding,), skip=_vision_owners(vision_roots)):
            kinds[g] = "text"
    branches: dict[str, Branch] = {}
    for group, members in groups.items():
        kind = kinds[group]
        name = kind if kind not in branches else _own_name(kind, group, set(branches))
        rows = [row for stack in members for row in stacks[stack]]
        blocks = tuple(
            Block(path, name, i, family, dim, layout, projections, layout.pre_norm(model.get_submodule(path)))
            for i, (path, family, layout, dim, projections) in enumerate(rows)
        )
        families = {b.family for b in blocks}
        branch = Branch(name, group, blocks, "/".join(sorted(families)), final_norm=final_norm(model, group, roots),
                        token_embedding=token_embedding(model, group, roots), takeover=_takeover_name(model, blocks[0]))
        default = FAMILIES[blocks[0].family].global_token(name) if blocks[0].family in FAMILIES else "none"
        branches[name] = replace(branch, pooling=pooling(model, branch, list(roots), default))
    return Backbone(branches)


def _takeover_name(model: nn.Module, block: Block) -> str:
    """The convention a takeover of `block`'s attention starts from: the family's, one that recognises the
    module, or `sdpa` (the inject probe may still move prefixes to `sdpa` or refuse; probe.py)."""
    if block.layout.attention is not None:
        return block.layout.attention
    return recognised_convention(model.get_submodule(block.module_path(block.layout.attn))) or "sdpa"


def _check_whole_stacks(model: nn.Module, blocks: list[str]) -> None:
    """A stack whose other elements of the same class were not recognised would be adapted in part: refuse."""
    by_stack: dict[str, set[str]] = {}
    for path in blocks:
        by_stack.setdefault(path.rsplit(".", 1)[0], set()).add(path.rsplit(".", 1)[1])
    for stack, names in by_stack.items():
        container = model.get_submodule(stack)
        kinds = {type(container.get_submodule(n)) for n in names}
        missed = [n for n, child in container.named_children() if n not in names and type(child) in kinds]
        if missed:
            child = container.get_submodule(missed[0])
            raise DiscoveryError(
                f"'{stack}' holds {len(names) + len(missed)} {type(child).__name__} blocks but only {len(names)} could be "
                f"read as transformer blocks (not: {', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''}); adapting "
                f"part of a stack would be silently partial. Describe the block with a BlockLayout in a family file "
                f"(docs/adding.md)")


def _vision_owners(vision_stacks: tuple[str, ...]) -> tuple[str, ...]:
    """The top-level attribute holding each vision stack (e.g. `visual`), to skip when looking for text."""
    return tuple(s.split(".")[0] for s in vision_stacks)


def _nothing_found_message(model: nn.Module) -> str:
    children = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children()) or "none"
    kinds = sorted({type(m).__name__ for m in model.modules()})
    families = ", ".join(FAMILIES) or "none"
    return (
        f"no transformer block of a known family in {type(model).__name__}. Top-level children: {children}. "
        f"Module classes present: {', '.join(kinds[:30])}{' ...' if len(kinds) > 30 else ''}. "
        f"Known families: {families}. To support a new family, describe its block with a BlockLayout "
        f"(roles attn, q, k, v, o, fc1, fc2, norm1, norm2 and branch in/out points) in a new file under "
        f"petl_tpr/backbones/ and register it; see docs/adding.md."
    )
