"""transformers attention with rotary positions handed in by the model (Llama, Mistral, Qwen2, ...).

Call convention: `forward(hidden_states (B, L, d), position_embeddings=(cos, sin), attention_mask=None,
**kwargs) -> (out, weights)`; `cos`, `sin` `(B, L, head_dim)` as the model's rotary embedding makes
them. q, k, v are the module's `q_proj`/`k_proj`/`v_proj` (k and v may have fewer heads: grouped-query
attention, `num_key_value_groups` query heads per key/value head), rotated as transformers rotates
them (`x * cos + rotate_half(x) * sin` over the head dimension), key/value heads repeated to the query
heads, then attention with the 4-d mask the model builds (causal with no mask given, as the module's
`is_causal` says), scale `scaling`, and `o_proj`. Key/value prefixes live after the rotation, in the
repeated (query-head) space: they carry no position. An empty key/value cache (the model makes one by
default) is filled as the module fills it; a cache that already holds tokens (generation steps) and
keyword arguments other than the harmless ones of the `hf` convention (a sliding window...) raise
`InputError`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InjectionError, InputError
from .core import attend, check_mask, merge_heads
from .hf import _IGNORED, _ONLY_NONE
from .takeover import Convention, TakeoverState


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension (halves)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _cached_length(cache: Any, module: nn.Module) -> int:
    try:
        return int(cache.get_seq_length(getattr(module, "layer_idx", 0)))
    except (AttributeError, TypeError, IndexError):
        return -1   # unknown cache type: refused


class RotaryAttention(Convention):
    name = "hf_rotary"
    describe = "transformers attention with q/k/v/o_proj, rotary position_embeddings (cos, sin), grouped-query heads"

    def check(self, module: nn.Module) -> None:
        who = type(module).__name__
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(module, name, None), nn.Linear):
                raise InjectionError(f"{who} has no Linear {name!r}")
        if not isinstance(getattr(module, "head_dim", None), int):
            raise InjectionError(f"{who} has no head_dim attribute")
        if module.q_proj.out_features != module.q_proj.in_features:
            raise InjectionError(f"{who}: heads x head_dim ({module.q_proj.out_features}) differs from the hidden size "
                                 f"({module.q_proj.in_features}); prefixes are sized by the hidden size")

    def forward(self, module: nn.Module, state: TakeoverState, hidden_states, position_embeddings=None,
                attention_mask=None, *args: Any, **kwargs: Any):
        who = type(module).__name__
        if args:
            raise InputError(f"{who} (taken over): unexpected positional arguments after attention_mask")
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        if cache is not None and _cached_length(cache, module) != 0:
            raise InputError(f"{who} (taken over): a key/value cache that already holds tokens (generation steps); "
                             f"adapters that take over attention serve encoders and first forwards")
        given = [k for k, v in kwargs.items() if k in _ONLY_NONE and v is not None]
        unknown = [k for k, v in kwargs.items() if k not in _IGNORED | _ONLY_NONE and v is not None]
        if given or unknown:
            raise InputError(f"{who} (taken over): {', '.join(given + unknown)} given, which the takeover does not "
                             f"reproduce (key/value caches, sliding windows...); adapters that take over attention "
                             f"serve encoders")
        if position_embeddings is None:
            raise InputError(f"{who} (taken over): no position_embeddings (cos, sin); call it as the model does")
        b, length, _ = hidden_states.shape
        dh = module.head_dim
        q, k, v = (p(hidden_states).view(b, length, -1, dh).transpose(1, 2)
                   for p in (module.q_proj, module.k_proj, module.v_proj))
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:   # an empty cache the model made (use_cache defaults on): fill it as the module would
            k, v = cache.update(k, v, module.layer_idx)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if attention_mask is not None:
            check_mask(attention_mask, (b, q.shape[1], length, length), who)
        causal = bool(getattr(module, "is_causal", True)) and attention_mask is None and length > 1
        dropout = float(getattr(module, "attention_dropout", 0.0)) if module.training else 0.0
        out, weights = attend(q, k, v, mask=attention_mask, causal=causal, scale=getattr(module, "scaling", None),
                              dropout=dropout, prefixes=state.prefix_tensors(q),
                              need_weights=bool(kwargs.get("output_attentions")))
        return module.o_proj(merge_heads(out)), weights
