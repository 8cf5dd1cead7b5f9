"""timm's `Attention` (ViT and most timm transformers): one fused `qkv` Linear, then `proj`.

Call convention: `forward(x (B, N, C), attn_mask=None, is_causal=False) -> (B, N, C)`, with
`attn_mask` as in `F.scaled_dot_product_attention` (bool True = may attend, or additive float,
broadcastable to `(B, H, N, N)`). Optional parts are honoured when present: `q_norm`/`k_norm`
(per-head norms of q and k; prefixes live after them, in the space attention reads), `norm`
(scale norm on the context), `gate` (sigmoid output gate), `attn_drop`, `proj_drop`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InjectionError, InputError
from .core import attend, check_mask, merge_heads
from .takeover import Convention, TakeoverState


def _identity(x):
    return x


class TimmAttention(Convention):
    name = "timm"
    describe = "timm Attention: qkv Linear (rows q|k|v), num_heads, head_dim, proj"

    def check(self, module: nn.Module) -> None:
        for name in ("qkv", "proj"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise InjectionError(f"{type(module).__name__} has no Linear {name!r}")
        if not isinstance(getattr(module, "num_heads", None), int):
            raise InjectionError(f"{type(module).__name__} has no num_heads attribute")

    def forward(self, module: nn.Module, state: TakeoverState, x, attn_mask=None, is_causal: bool = False,
                *args: Any, **kwargs: Any):
        if args or kwargs:
            raise InputError(f"{type(module).__name__} (taken over): unexpected arguments {list(kwargs) or args}")
        b, n, _ = x.shape
        heads = module.num_heads
        gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
        qkv = module.qkv(x)
        head_dim = qkv.shape[-1] // (3 * heads)
        q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = getattr(module, "q_norm", _identity)(q), getattr(module, "k_norm", _identity)(k)
        if attn_mask is not None:
            check_mask(attn_mask, (b, heads, n, n), type(module).__name__)
        drop = module.attn_drop.p if module.training and hasattr(module, "attn_drop") else 0.0
        ctx, _ = attend(q, k, v, mask=attn_mask, causal=is_causal, scale=getattr(module, "scale", None), dropout=drop,
                        prefixes=state.prefix_tensors(q))
        out = getattr(module, "norm", _identity)(merge_heads(ctx))
        if gate is not None:
            out = out * gate
        out = module.proj(out)
        return getattr(module, "proj_drop", _identity)(out)
