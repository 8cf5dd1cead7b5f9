"""transformers attention with one fused `qkv` Linear (rows q|k|v) and an output `projection` (BLIP's vision tower).

Call convention: `forward(hidden_states (B, L, d), **kwargs) -> (out (B, L, d), weights)`. The module
computes softmax(q k^T * scale) v itself (no mask, no SDPA call), with `scale` and `num_heads`
attributes and an `nn.Dropout` on the probabilities; `weights` are the probabilities, returned only
when `output_attentions` is asked for (None otherwise: its layer does not read them).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InjectionError, InputError
from .core import attend, merge_heads
from .takeover import Convention, TakeoverState

_IGNORED = {"output_attentions"}


class FusedQKVAttention(Convention):
    name = "hf_fused"
    describe = "transformers attention with a fused qkv Linear (rows q|k|v), num_heads, scale and projection"

    def check(self, module: nn.Module) -> None:
        for name in ("qkv", "projection"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise InjectionError(f"{type(module).__name__} has no Linear {name!r}")
        if not isinstance(getattr(module, "num_heads", None), int):
            raise InjectionError(f"{type(module).__name__} has no num_heads attribute")

    def forward(self, module: nn.Module, state: TakeoverState, hidden_states, *args: Any, **kwargs: Any):
        unknown = [k for k, v in kwargs.items() if k not in _IGNORED and v is not None]
        if args or unknown:
            raise InputError(f"{type(module).__name__} (taken over): arguments {unknown or list(args)} that the "
                             f"takeover does not reproduce; the module's own forward takes hidden states only")
        b, n, _ = hidden_states.shape
        heads = module.num_heads
        qkv = module.qkv(hidden_states)
        q, k, v = qkv.reshape(b, n, 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        dropout = getattr(module, "dropout", None)
        p = dropout.p if isinstance(dropout, nn.Dropout) and module.training else 0.0
        ctx, weights = attend(q, k, v, scale=getattr(module, "scale", None), dropout=p,
                              prefixes=state.prefix_tensors(q), need_weights=bool(kwargs.get("output_attentions")))
        return module.projection(merge_heads(ctx)), weights
