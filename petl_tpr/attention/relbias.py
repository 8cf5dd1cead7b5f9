"""transformers BEiT-style self-attention with a relative position bias (Data2Vec-vision, older BEiT).

Call convention: `forward(hidden_states (B, N, d), output_attentions=False, relative_position_bias=None,
interpolate_pos_encoding=False, resolution=None)` (positional, as its parent passes them), returning
`(context (B, N, d), weights or None)`; the output projection lives outside, in `attention.output`.
The bias is the module's own table (`relative_position_bias(window, interpolate_pos_encoding,
dim_size=N)`, `(H, N, N)`, when `has_relative_position_bias`) plus the shared one its model may pass;
it is an additive mask on the real keys, and key/value prefixes get no bias (zero columns).
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import InjectionError, InputError
from .core import attend, merge_heads, split_heads
from .takeover import Convention, TakeoverState


class RelativeBiasAttention(Convention):
    name = "hf_relbias"
    describe = "transformers BEiT-style self-attention (query/key/value Linears, relative position bias table)"

    def check(self, module: nn.Module) -> None:
        for name in ("query", "key", "value"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise InjectionError(f"{type(module).__name__} has no {name} Linear")
        if not isinstance(getattr(module, "attention_head_size", None), int):
            raise InjectionError(f"{type(module).__name__} has no attention_head_size")

    def forward(self, module: nn.Module, state: TakeoverState, hidden_states, output_attentions=False,
                relative_position_bias=None, interpolate_pos_encoding=False, resolution=None):
        dh = module.attention_head_size
        heads = module.query.out_features // dh
        q, k, v = (split_heads(getattr(module, n)(hidden_states), heads) for n in ("query", "key", "value"))
        bias = None
        if getattr(module, "has_relative_position_bias", False):
            if resolution is None:
                raise InputError(f"{type(module).__name__} (taken over) needs resolution=(height, width) for its "
                                 f"relative position bias, as its model passes it")
            patch = module.config.patch_size
            window = (resolution[0] // patch, resolution[1] // patch)
            bias = module.relative_position_bias(window, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        if relative_position_bias is not None:
            bias = relative_position_bias if bias is None else bias + relative_position_bias
        dropout = module.config.attention_probs_dropout_prob if module.training else 0.0
        ctx, weights = attend(q, k, v, mask=bias, scale=1 / math.sqrt(dh), dropout=dropout,
                              prefixes=state.prefix_tensors(q), need_weights=bool(output_attentions))
        return merge_heads(ctx), weights
