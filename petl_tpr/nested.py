"""`nn.TransformerEncoder`'s nested-tensor fast path, switched off while adapters are attached.

With `enable_nested_tensor=True` (PyTorch's default), an encoder in eval mode given a padding mask
packs its input into a nested tensor and runs every layer on it; the layers' fused kernel reads
the weights directly, so adapters inside the layers could never run (and adapter code cannot take
nested tensors). While a model has adapters, each such encoder gets `use_nested_tensor = False` and
a forward hook that puts zeros at the padded positions whenever PyTorch's nested path would have
run (eval mode, a batched `(B, L, D)` input, a padding mask and no attention mask, no autocast,
the MHA fast path enabled): the fast path returns zeros there, so outputs stay those of the bare
model everywhere, padding included. `eject` puts the flag back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTR = "_petl_unnested"


class _ZeroPadding:
    """Forward hook: zeros at padded positions, as the nested fast path leaves them."""

    def __call__(self, module: nn.TransformerEncoder, args: tuple, kwargs: dict, output: Any) -> Any:
        src = args[0] if args else kwargs.get("src")
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        padding = args[2] if len(args) > 2 else kwargs.get("src_key_padding_mask")
        if (padding is None or mask is not None or module.layers[0].training or src is None or src.dim() != 3
                or torch.is_autocast_enabled() or not torch.backends.mha.get_fastpath_enabled()
                or not isinstance(output, torch.Tensor)):
            return output
        pad = padding if padding.dtype == torch.bool else padding != 0
        if not module.layers[0].self_attn.batch_first:
            pad = pad.transpose(0, 1)
        return output.masked_fill(pad[..., None], 0.0)


def unnest(model: nn.Module, stacks: list[str]) -> None:
    """Switch off the nested path of every TransformerEncoder holding one of the `stacks` (ModuleList paths)."""
    done = model.__dict__.setdefault(ATTR, {})
    for stack in stacks:
        parent_path = stack.rsplit(".", 1)[0] if "." in stack else ""
        parent = model.get_submodule(parent_path) if parent_path else model
        if parent_path in done or not isinstance(parent, nn.TransformerEncoder):
            continue
        if not getattr(parent, "use_nested_tensor", False) or stack.rsplit(".", 1)[-1] != "layers":
            continue
        parent.use_nested_tensor = False
        done[parent_path] = parent.register_forward_hook(_ZeroPadding(), with_kwargs=True)
    if not done:
        del model.__dict__[ATTR]


def renest(model: nn.Module) -> None:
    """Undo `unnest`: the flags back to True and the hooks removed."""
    for path, handle in model.__dict__.pop(ATTR, {}).items():
        handle.remove()
        (model.get_submodule(path) if path else model).use_nested_tensor = True
