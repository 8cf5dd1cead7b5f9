"""Where a branch pools its feature, read from the model's structure (UniPT's correction lands there).

Walking up from the branch's stack of blocks (and stopping at an ancestor that holds another
branch), the first module that says how it pools decides:

- a pooling attribute the model's own forward reads: open_clip's `pool_type` ("tok"/"first",
  "argmax", "last", "avg", "none") and `attn_pool`; timm's `global_pool` ("token", "avg", "map", "");
- the end-of-text id a transformers CLIP text tower pools at (`eos_token_id`, the first position
  holding it; CLIP's legacy id 2 means the largest id, as the original CLIP did);
- a child `nn.AdaptiveAvgPool1d(1)` or `AdaptiveAvgPool2d(1)` over the positions (transformers' and
  torchvision's Swin): the mean;
- a transformers `pooler` child (a `(d, d)` Linear, or a module holding one as `dense`: BERT, ALBERT,
  MPNet), which the model applies to position 0;
- an attention-pooling head: a child module holding an `nn.MultiheadAttention` and a learned
  query (a direct 3-D parameter whose last dimension is the branch width, as SigLIP's
  `head.probe`), whose output is the pooled `(B, D)` feature itself (timm's `attn_pool` is read
  from `global_pool="map"`);
- model code with no attribute to read it from: transformers' SigLIP text towers pool the last
  position (`_LAST_TOKEN`).

Otherwise the family's `global_token(branch)` says it, except that a causal stack (CoCa's text
decoder) is never read as pooling its position 0, which sees only itself: it returns every position.
Kinds: "first" (position 0), "eot" (the largest token id), "eos" (the first position holding `eos_id`), "last", "mean" (every position),
"head" (the output of module `owner`, already pooled), "none" (the model leaves pooling to the
user: a side network corrects every position), "unsupported" (a pooling the side network cannot reproduce; `why` says which).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
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
                 "mean": "the mean of every position",
                 "none": "left to the user; side networks correct every position"}.get(self.kind, self.kind)
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


def _bert_pooler(pooler: nn.Module | None, width: int) -> bool:
    """transformers' BERT-style pooler (BERT, ALBERT, MPNet...): a `(d, d)` Linear, alone or as its `dense`,
    that the model's forward applies to position 0."""
    dense = pooler if isinstance(pooler, nn.Linear) else getattr(pooler, "dense", None)
    return isinstance(dense, nn.Linear) and dense.in_features == dense.out_features == width


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
    for child_name, child in module.named_children():
        if isinstance(child, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and child.output_size in (1, (1,), (1, 1)):
            return Pooling("mean", f"{name}.{child_name} ({type(child).__name__} over the positions)")   # Swin
    if _bert_pooler(getattr(module, "pooler", None), width):
        return Pooling("first", f"{name}.pooler (a transformers pooler: a d x d Linear on position 0)")
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
    if family_default == "first" and is_causal(model, branch, stacks):   # position 0 of a causal stack sees itself only
        return Pooling("none", f"a causal stack with no pooling read (family {branch.family} would say position 0)")
    return Pooling(family_default, f"family {branch.family}")


def _takes_attention_mask(module: nn.Module) -> bool:
    try:
        return "attention_mask" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def padding_mask_source(model: nn.Module, branch, stacks: list[str]) -> str | None:
    """Path of the nearest module above `branch`'s stack whose forward takes `attention_mask` (the `(B, N)`
    padding mask a transformers model is given), stopping below an ancestor that holds another branch; None."""
    for ancestor in _ancestors(branch.path):
        if any(other != branch.path and _inside(other, ancestor) for other in stacks):
            return None
        module = model.get_submodule(ancestor) if ancestor else model
        if _takes_attention_mask(module):
            return ancestor
    return None


def _causal_mask(tensor: torch.Tensor) -> bool:
    """A square `(L, L)` mask hiding exactly the positions after each query: -inf above the diagonal and 0
    elsewhere, or True above it and False elsewhere (PyTorch's bool convention, True = may not attend)."""
    if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1] or tensor.shape[0] < 2:
        return False
    after = torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device).triu(1)
    if tensor.dtype == torch.bool:
        return bool(tensor[after].all()) and not bool(tensor[~after].any())
    return tensor.is_floating_point() and bool(torch.isneginf(tensor[after]).all()) and bool((tensor[~after] == 0).all())


def is_causal(model: nn.Module, branch, stacks: list[str]) -> bool:
    """Whether `branch`'s attention is causal: a module in its blocks says `is_causal = True` (GPT-2, Llama), or a
    module above its stack holds a causal mask buffer (open_clip's text towers and CoCa's decoder build one)."""
    if any(getattr(m, "is_causal", None) is True for block in branch.blocks
           for m in model.get_submodule(block.path).modules()):
        return True
    for ancestor in _ancestors(branch.path):
        module = model.get_submodule(ancestor) if ancestor else model
        if any(_causal_mask(buffer) for _, buffer in module.named_buffers(recurse=False)):
            return True
        if any(other != branch.path and _inside(other, ancestor) for other in stacks):
            return False
    return False
