"""transformers DeBERTa-v2 / v3 disentangled self-attention (`DisentangledSelfAttention`).

Call convention: `forward(hidden_states (B, L, d), attention_mask (B, 1, L, L) bool-like,
output_attentions=False, query_states=None, relative_pos=None, rel_embeddings=None) -> (context
(B, L, d), probabilities or None)`; the output projection lives outside, in `attention.output`.
Scores are `q k^T / sqrt(dh * f)` plus the module's own content-to-position and position-to-content
terms (`disentangled_attention_bias`, with `f` = 1 + one per term in `pos_att_type`), masked with the
dtype's lowest value (not -inf: a padded query row stays finite). Here those terms and the mask are
one additive bias on the real keys; key/value prefixes have no relative position, so they get no
bias, as in every other convention. Recognised by structure (the `disentangled_attention_bias`
method beside `query_proj`/`key_proj`/`value_proj` Linears), so it serves a block read structurally.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InjectionError
from .core import attend
from .takeover import Convention, TakeoverState

_PROJECTIONS = ("query_proj", "key_proj", "value_proj")


class DisentangledAttention(Convention):
    name = "hf_deberta"
    describe = "transformers DeBERTa-v2 disentangled self-attention (content and relative-position scores)"

    def recognises(self, module: nn.Module) -> bool:
        return callable(getattr(module, "disentangled_attention_bias", None)) and all(
            isinstance(getattr(module, n, None), nn.Linear) for n in _PROJECTIONS)

    def check(self, module: nn.Module) -> None:
        if not self.recognises(module) or not isinstance(getattr(module, "num_attention_heads", None), int):
            raise InjectionError(f"{type(module).__name__} is not a DeBERTa disentangled self-attention")

    def forward(self, module: nn.Module, state: TakeoverState, hidden_states, attention_mask, output_attentions=False,
                query_states=None, relative_pos=None, rel_embeddings=None):
        heads = module.num_attention_heads
        b = hidden_states.shape[0]
        query = module.transpose_for_scores(module.query_proj(hidden_states if query_states is None else query_states),
                                            heads)                                              # (B*H, Lq, dh)
        key = module.transpose_for_scores(module.key_proj(hidden_states), heads)
        value = module.transpose_for_scores(module.value_proj(hidden_states), heads)
        factor = 1 + sum(term in module.pos_att_type for term in ("c2p", "p2c"))
        lq, lk = query.shape[-2], key.shape[-2]
        bias = query.new_zeros(b * heads, lq, lk)
        if module.relative_attention:
            bias = module.disentangled_attention_bias(query, key, relative_pos, module.pos_dropout(rel_embeddings),
                                                      factor)
        bias = bias.view(b, heads, lq, lk).masked_fill(~attention_mask.bool(), torch.finfo(query.dtype).min)
        q, k, v = (t.view(b, heads, t.shape[-2], t.shape[-1]) for t in (query, key, value))
        dropout = module.dropout.p if module.training and isinstance(module.dropout, nn.Dropout) else 0.0
        ctx, probs = attend(q, k, v, mask=bias, scale=1 / math.sqrt(q.shape[-1] * factor), dropout=dropout,
                            prefixes=state.prefix_tensors(q), need_weights=bool(output_attentions))
        return ctx.permute(0, 2, 1, 3).reshape(b, lq, -1), probs
