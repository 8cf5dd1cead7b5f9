"""How a backbone family describes its transformer block: by roles, not by class names.

A `BlockLayout` maps roles to paths inside one block:
- projections `q`, `k`, `v`, `o`, `fc1`, `fc2` (a `ProjectionRef`: a Linear, a row slice of a fused
  Linear, or a row slice of a raw weight Parameter such as `in_proj_weight`);
- norms `norm1`, `norm2`;
- the attention module `attn`, and `attention`, the name of the convention that can take it over
  (`hf`, `mha`, `timm`; None when the family's attention cannot be taken over);
- branch entry and exit points `attn_in`/`attn_out`, `mlp_in`/`mlp_out`: the input of the
  `*_in` module is the branch input and the output of the `*_out` module is the branch output before
  the residual addition (they are one module where the family has a self-contained attention or MLP);
- `pre_norm(block)`: whether the norms come before the branches (the residual stream entering a
  branch is then the input of `norm1`/`norm2`) or after the residual additions (BERT; the stream
  is then the input of `attn_in`/`mlp_in`).

A block matches a layout when every path exists with the right kind of module. Matching is
structural, so any model built from the same pieces is recognised whatever its class is called.
"""

from __future__ import annotations

from typing import Any

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

PROJECTION_ROLES = ("q", "k", "v", "o", "fc1", "fc2")
NORM_ROLES = ("norm1", "norm2")
BRANCH_ROLES = ("attn", "mlp")


@dataclass(frozen=True)
class ProjectionRef:
    """Where a projection's weight lives, relative to its block.

    - `param=None, part=None`: `path` is an `nn.Linear` used whole.
    - `param=None, part=i`: `path` is a fused `nn.Linear`; the projection is rows
      `[i*n, (i+1)*n)` of its output with `n = out_features // parts`.
    - `param="in_proj_weight", part=i`: a raw `(parts*n, d)` Parameter of the module at `path`.
    - `param="weight", part=None`: the whole weight of a Linear that its owner never calls
      (MultiheadAttention reads `out_proj.weight` directly), so it must be changed as a weight.
    """

    path: str
    param: str | None = None
    part: int | None = None
    parts: int = 3


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style `Conv1D`: `y = x @ weight + bias` with `weight (in, out)` and `nf == out`."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def is_linear(module: nn.Module) -> bool:
    """A projection `x -> x W^T + b` whatever its storage: nn.Linear, or a Conv1D (transposed weight)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, or a model's own norm class (LlamaRMSNorm, T5LayerNorm: a class named *Norm with a 1-d weight)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if hasattr(module, "normalized_shape"):
        return True
    return type(module).__name__.endswith("Norm") and weight.dim() == 1


def is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


@dataclass(frozen=True)
class BlockLayout:
    """The roles of one block variant of a family; see the module docstring."""

    attn: str
    q: ProjectionRef
    k: ProjectionRef
    v: ProjectionRef
    o: ProjectionRef
    fc1: ProjectionRef
    fc2: ProjectionRef
    norm1: str
    norm2: str
    attn_in: str
    attn_out: str
    mlp_in: str
    mlp_out: str
    attn_check: Callable[[nn.Module], bool] = lambda module: True
    attention: str | None = None    # takeover convention of `attn` (petl_tpr.attention.CONVENTIONS)
    pre_norm: Callable[[nn.Module], bool] = lambda block: True   # norms before the branches (given the block)
    batch_first: Callable[[nn.Module], bool] = lambda block: True   # hidden states (B, L, D), not (L, B, D)

    def projection(self, role: str) -> ProjectionRef:
        return getattr(self, role)


@dataclass(frozen=True)
class Family:
    """A backbone family: its layouts and a tiny example model for the tests.

    `global_token(branch)` says where the branch's pooled feature is read: "first" (CLS) or "eot"
    (the position of the largest token id, as CLIP's text tower pools), or "none" (the model does not pool).
    `refuses` names the methods that `inject` refuses on this family's example with a clear error (the
    contract suite checks that refusal instead of the method's behaviour).
    `example` returns `(model, run)`, where `run(model)` feeds fixed inputs (made with a fixed seed)
    and returns one float tensor of outputs; it imports its third-party package lazily.
    """

    name: str
    layouts: tuple[BlockLayout, ...]
    description: str
    example: Callable[[], tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]] | None = None
    global_token: Callable[[str], str] = lambda branch: "first"   # "first" (CLS), "eot" (CLIP text), "none"
    refuses: tuple[str, ...] = ()   # methods its blocks refuse at inject by design (e.g. prefixes without a takeover)

    def build_example(self, seed: int = 0) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
        """The tiny example with weights drawn from `seed`, leaving the global RNG as it was."""
        if self.example is None:
            raise NotImplementedError(f"family {self.name!r} has no example model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.example()


@dataclass(frozen=True)
class Projection:
    """A projection resolved inside a model.

    `owner` is the module path of the Linear (or of the Parameter's owner), `rows` the output rows
    it occupies in a fused weight, and `key` the logical site name used in checkpoints, e.g.
    `blocks.0.attn.qkv.k` or `transformer.resblocks.0.attn.in_proj_weight.v`.
    """

    role: str
    owner: str
    param: str | None
    rows: tuple[int, int] | None
    in_dim: int
    out_dim: int

    @property
    def key(self) -> str:
        parts = [self.owner]
        if self.param not in (None, "weight"):
            parts.append(self.param)
        if self.rows is not None:
            parts.append(self.role)
        return ".".join(parts)


@dataclass(frozen=True)
class Block:
    """One recognised transformer block of a model, with every role resolved to a path."""

    path: str
    branch: str
    index: int
    family: str
    dim: int
    layout: BlockLayout
    projections: dict[str, Projection] = field(hash=False, compare=False)
    pre_norm: bool = field(default=True, compare=False)   # layout.pre_norm of this block, read at discovery

    def module_path(self, relative: str) -> str:
        return f"{self.path}.{relative}" if self.path else relative


@dataclass(frozen=True)
class Branch:
    """A stack of blocks (one ModuleList), e.g. the vision or text encoder."""

    name: str
    path: str
    blocks: tuple[Block, ...]
    family: str
    final_norm: str | None = None        # see backbones/ends.py
    token_embedding: str | None = None
    pooling: Any = None                  # backbones/pooling.Pooling: where the branch pools its feature
    takeover: str | None = None          # convention a takeover of its attention starts from (discover.py)

    @property
    def dim(self) -> int:
        return self.blocks[0].dim
