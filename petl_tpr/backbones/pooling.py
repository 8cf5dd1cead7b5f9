"""Where a branch pools its feature, read from the model's structure (UniPT's correction lands there).

Walking up from the branch's stack of blocks (and stopping at an ancestor that holds another
branch), the first module that says how it pools decides:

- a pooling attribute the model's own forward reads: open_clip's `pool_type` ("tok"/"first",
  "argmax", "last", "avg", "none") and `attn_pool`; timm's `global_pool` ("token", "avg", "map", "");
- the end-of-text id a transformers CLIP text tower pools at (`eos_token_id`, the first position
  holding it; CLIP's legacy id 2 means the largest id, as the original CLIP did);
- an attention-pooling head: a child module holding an `nn.MultiheadAttention` and a learned
  query (a direct 3-D parameter whose last dimension is the branch width, as SigLIP's
  `head.probe`), whose output is the pooled `(B, D)` feature itself (timm's `attn_pool` is read
  from `global_pool="map"`);
- model code with no attribute to read it from: transformers' SigLIP text towers pool the last
  position (`_LAST_TOKEN`).

Otherwise the family's `global_token(branch)` says it. Kinds: "first" (position 0), "eot" (the
largest token id), "eos" (the first position holding `eos_id`), "last", "mean" (every position),
"head" (the output of module `owner`, already pooled), "none" (the model leaves pooling to the
user), "unsupported" (a pooling the side network cannot reproduce; `why` says which).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .ends import _ancestors, _inside

_LAST_TOKEN = ("SiglipTextTransformer", "Siglip2TextTransformer", "SiglipTextModel", "Siglip2TextModel")
_OPEN_CLIP = {"tok": "first", "first": "first", "cls": "first", "argmax": "eot", "last": "last", "avg": "mean",
              "none": "none", "": "none"}
_TIMM = {"token": "first", "avg": "mean", "": "none"}


@dataclass(frozen=True)
class Pooling:
    kind: str
    source: str                    # what said so, for reports and errors
    owner: str | None = None       # "head": the module whose output is the pooled feature
    eos_id: int | None = None      # "eos": the token id pooled at
    why: str | None = None         # "unsupported": what the model does

    def describe(self) -> str:
        where = {"first": "position 0", "eot": "the largest token id", "last": "the last position",
                 "mean": "the mean of every position", "none": "left to the user"}.get(self.kind, self.kind)
        if self.kind == "head":
            where = f"the output of '{self.owner}'"
        elif self.kind == "eos":
            where = f"the first position holding token id {self.eos_id}"
        return f"{self.kind} ({where}) [{self.source}]"


def _query_head(module: nn.Module, path: str, stack: str, width: int) -> str | None:
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        if _inside(stack, child_path) or not any(isinstance(m, nn.MultiheadAttention) for m in child.modules()):
            continue
        if any(isinstance(m, (nn.Conv2d, nn.Embedding)) for m in child.modules()):      # a feeder (CLS token)
            continue
        for param in child.parameters(recurse=False):
            if param.dim() == 3 and param.shape[-1] == width:
                return child_path
    return None


def _read(module: nn.Module, path: str, stack: str, width: int) -> Pooling | None:
    name = type(module).__name__
    pool_type = getattr(module, "pool_type", None)
    if isinstance(pool_type, str):
        if getattr(module, "attn_pool", None) is not None:
            return Pooling("unsupported", f"{name}.attn_pool",
                           why=f"'{path}' pools with an attentional pooler of several queries (open_clip attn_pool)")
        kind = _OPEN_CLIP.get(pool_type)
        return Pooling(kind, f"{name}.pool_type={pool_type!r}") if kind else Pooling(
            "unsupported", f"{name}.pool_type={pool_type!r}", why=f"'{path}' pools with pool_type={pool_type!r}")
    global_pool = getattr(module, "global_pool", None)
    if isinstance(global_pool, str):
        if global_pool == "map" and getattr(module, "attn_pool", None) is not None:
            return Pooling("head", f"{name}.global_pool='map'", owner=f"{path}.attn_pool" if path else "attn_pool")
        kind = _TIMM.get(global_pool)
        return Pooling(kind, f"{name}.global_pool={global_pool!r}") if kind else Pooling(
            "unsupported", f"{name}.global_pool={global_pool!r}", why=f"'{path}' pools with global_pool={global_pool!r}")
    if name in _LAST_TOKEN:
        return Pooling("last", f"{name} pools its last position")
    eos = getattr(module, "eos_token_id", None)
    if isinstance(eos, int) and not isinstance(eos, bool) and hasattr(module, "final_layer_norm"):
        return Pooling("eot", f"{name}.eos_token_id=2 (legacy: largest id)") if eos == 2 else Pooling(
            "eos", f"{name}.eos_token_id={eos}", eos_id=eos)
    head = _query_head(module, path, stack, width)
    if head is not None:
        return Pooling("head", f"attention-pooling head '{head}' (a learned query)", owner=head)
    return None


def pooling(model: nn.Module, branch, stacks: list[str], family_default: str) -> Pooling:
    """How `branch` (a layout.Branch) pools; `stacks` are the paths of every branch's stack."""
    for ancestor in _ancestors(branch.path):
        module = model.get_submodule(ancestor) if ancestor else model
        if any(other != branch.path and _inside(other, ancestor) for other in stacks):
            own = getattr(module, f"{branch.name}_pool_type", None)      # open_clip CLIP: text_pool_type
            if isinstance(own, str) and own in _OPEN_CLIP:
                return Pooling(_OPEN_CLIP[own], f"{type(module).__name__}.{branch.name}_pool_type={own!r}")
            break
        found = _read(module, ancestor, branch.path, branch.dim)
        if found is not None:
            return found
    return Pooling(family_default, f"family {branch.family}")
