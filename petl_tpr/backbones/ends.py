"""Where a branch ends and what feeds it: its final norm and its token embedding (found by structure).

- Final norm: walking up from the stack of blocks, the first ancestor that has norm modules among
  its direct children (the stack's own blocks excluded); the last of them in registration order
  (CLIP's `post_layernorm` after `pre_layrnorm`, open_clip's `ln_post`/`ln_final`, timm's `norm`,
  torchvision's `encoder.ln`). An ancestor that holds another branch's stack ends the walk, so a
  branch never takes another's norm. None when there is none (BERT, an nn.TransformerEncoder
  built without `norm`): the last block's output is the branch output then.
- Token embedding: the `nn.Embedding` with the largest vocabulary among the modules that feed the
  branch (not inside any stack of blocks); its input holds the token ids (CLIP's EOT is the
  largest id of a caption).
"""

from __future__ import annotations

from torch import nn

from .layout import is_norm


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:cut]) for cut in range(len(parts) - 1, -1, -1)]


def _inside(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


def _before_stack(name: str) -> bool:
    """A norm named for what it follows runs before the stack: BART's `layernorm_embedding`, open_clip's `ln_pre`,
    transformers CLIP's `pre_layrnorm`, timm's `norm_pre`."""
    name = name.lower()
    return "embed" in name or name.startswith(("pre", "ln_pre", "norm_pre"))


def final_norm(model: nn.Module, stack: str, stacks: list[str]) -> str | None:
    """Path of the final norm of the branch whose blocks are the children of `stack`, or None (a norm
    that runs before the stack, named so, is not one)."""
    for ancestor in _ancestors(stack):
        module = model.get_submodule(ancestor) if ancestor else model
        norms = [name for name, child in module.named_children() if is_norm(child) and not _before_stack(name)]
        if norms:
            return f"{ancestor}.{norms[-1]}" if ancestor else norms[-1]
        if any(other != stack and _inside(other, ancestor) for other in stacks):
            return None
    return None


def token_embedding(model: nn.Module, stack: str, stacks: list[str]) -> str | None:
    """Path of the largest-vocabulary Embedding feeding the branch at `stack`, or None."""
    best: tuple[int, str] | None = None
    for ancestor in _ancestors(stack):
        module = model.get_submodule(ancestor) if ancestor else model
        for name, sub in module.named_modules(prefix=ancestor):
            if not isinstance(sub, nn.Embedding) or any(_inside(name, s) for s in stacks):
                continue
            if any(other != stack and _inside(name, _owner(other)) for other in stacks):
                continue
            if best is None or sub.num_embeddings > best[0]:
                best = (sub.num_embeddings, name)
        if best is not None:
            return best[1]
    return None


def _owner(stack: str) -> str:
    """The top-level attribute holding a stack (e.g. `visual`): modules under it feed that stack."""
    return stack.split(".")[0]


def calls_per_forward(model: nn.Module, branch) -> int:
    """How many layer positions each block of `branch` runs at per forward: `num_hidden_layers /
    num_hidden_groups` where the nearest config above the stack says its blocks are shared groups (ALBERT runs
    one layer group at every position), else 1. A config that only has more layers than the branch has blocks
    says nothing: a model whose stack was cut short keeps its old `num_hidden_layers`."""
    for ancestor in _ancestors(branch.path):
        config = getattr(model.get_submodule(ancestor) if ancestor else model, "config", None)
        layers, groups = getattr(config, "num_hidden_layers", None), getattr(config, "num_hidden_groups", None)
        if isinstance(layers, int) and groups == len(branch.blocks) and layers > groups and layers % groups == 0:
            return layers // groups
        if config is not None:
            return 1
    return 1
