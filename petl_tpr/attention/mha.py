"""`nn.MultiheadAttention` (open_clip, OpenAI CLIP, nn.TransformerEncoderLayer, torchvision ViT).

Call convention (PyTorch's): `forward(query, key, value, key_padding_mask=None, need_weights=True,
attn_mask=None, average_attn_weights=True, is_causal=False) -> (out, weights | None)`, inputs
`(L, B, E)`, or `(B, L, E)` with `batch_first`, or unbatched `(L, E)`. Masks: `key_padding_mask`
`(B, S)` and `attn_mask` `(L, S)` or `(B * H, L, S)`, bool (True = may NOT attend) or additive float.
`is_causal` is only a hint in PyTorch (the causal `attn_mask` must be given), so the mask is used.
The weights are read from `in_proj_weight` / `out_proj.weight`; LoRA deltas on them are applied to
the activations by the takeover (see `TakeoverState.deltas`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InjectionError, InputError
from .core import attend, combine_masks, merge_heads, split_heads
from .takeover import Convention, TakeoverState


def _keep(mask: torch.Tensor) -> torch.Tensor:
    """PyTorch's bool masks mark what may NOT be attended; `attend` takes the opposite."""
    return ~mask if mask.dtype == torch.bool else mask


class MHAAttention(Convention):
    name = "mha"
    describe = "torch.nn.MultiheadAttention with a packed in_proj_weight"

    def check(self, module: nn.Module) -> None:
        who = type(module).__name__
        if not isinstance(module, nn.MultiheadAttention):
            raise InjectionError(f"{who} is not an nn.MultiheadAttention")
        if not module._qkv_same_embed_dim or module.in_proj_weight is None:
            raise InjectionError(f"{who} with kdim/vdim != embed_dim (separate q/k/v weights) cannot be taken over")
        if module.bias_k is not None or module.add_zero_attn:
            raise InjectionError(f"{who} with add_bias_kv or add_zero_attn cannot be taken over")

    def _masks(self, module, b, lq, lk, key_padding_mask, attn_mask, dtype):
        heads, who = module.num_heads, type(module).__name__
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (lq, lk):
                mask = _keep(attn_mask)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (b * heads, lq, lk):
                mask = _keep(attn_mask).view(b, heads, lq, lk)
            else:
                raise InputError(f"{who} (taken over): attn_mask of shape {tuple(attn_mask.shape)}; expected "
                                 f"({lq}, {lk}) or ({b * heads}, {lq}, {lk})")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (b, lk):
                raise InputError(f"{who} (taken over): key_padding_mask of shape {tuple(key_padding_mask.shape)}; "
                                 f"expected (batch, keys) = ({b}, {lk})")
            mask = combine_masks(mask, _keep(key_padding_mask)[:, None, None, :], dtype)
        return mask

    def forward(self, module: nn.Module, state: TakeoverState, query, key, value, key_padding_mask=None,
                need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        who = type(module).__name__
        if query.is_nested:
            raise InputError(f"{who} (taken over) got a nested tensor; build nn.TransformerEncoder with "
                             f"enable_nested_tensor=False when adapters take over its attention")
        if is_causal and attn_mask is None:
            raise InputError(f"{who}: is_causal needs attn_mask, as in nn.MultiheadAttention")
        batched = query.dim() == 3
        shared = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not module.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (B, L, E) from here on
        e, heads = module.embed_dim, module.num_heads
        w, bias = module.in_proj_weight, module.in_proj_bias
        if shared:   # self-attention: one GEMM for q, k and v, as PyTorch does
            q, k, v = F.linear(query, w, bias).chunk(3, dim=-1)
            q, k, v = (t if (d := state.delta(role, query)) is None else t + d for t, role in zip((q, k, v), "qkv"))
        else:
            parts = [(w[i * e:(i + 1) * e], None if bias is None else bias[i * e:(i + 1) * e]) for i in range(3)]
            q, k, v = (state.project(role, x, *part) for role, x, part in zip("qkv", (query, key, value), parts))
        q, k, v = (split_heads(t, heads) for t in (q, k, v))
        b, _, lq, _ = q.shape
        mask = self._masks(module, b, lq, k.shape[2], key_padding_mask, attn_mask, q.dtype)
        ctx, weights = attend(q, k, v, mask=mask, dropout=module.dropout if module.training else 0.0,
                              prefixes=state.prefix_tensors(q), need_weights=need_weights)
        out = state.project("o", merge_heads(ctx), module.out_proj.weight, module.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not module.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        return out, weights
