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


def final_norm(model: nn.Module, stack: str, stacks: list[str]) -> str | None:
    """Path of the final norm of the branch whose blocks are the children of `stack`, or None."""
    for ancestor in _ancestors(stack):
        module = model.get_submodule(ancestor) if ancestor else model
        norms = [name for name, child in module.named_children() if is_norm(child)]
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
