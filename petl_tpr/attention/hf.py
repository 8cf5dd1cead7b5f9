"""transformers self-attention modules (CLIP, ViT >= 5, BERT's self-attention, and look-alikes).

Call convention: `forward(hidden_states (B, L, d), attention_mask=None, **kwargs) -> (out, weights)`.
`attention_mask` is what transformers' mask builders produce: `(B, 1, Lq, Lk)`, bool (True = may
attend) or additive float. `is_causal` arrives as a keyword (CLIP text) or a module attribute and,
as in transformers' SDPA path, applies only when no mask is given (a given mask already holds the
causal pattern). The output projection is applied when it lives inside the module (`out_proj`,
`o_proj`); BERT's lives outside, in `attention.output`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InjectionError, InputError
from .core import attend, check_mask, merge_heads, split_heads
from .takeover import Convention, TakeoverState

_QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_OUT_NAMES = ("out_proj", "o_proj")
# keyword arguments transformers passes that change nothing here (the first set) or only when given (the second)
_IGNORED = {"output_attentions", "is_causal", "position_ids", "use_cache", "cache_position"}
_ONLY_NONE = {"past_key_values", "past_key_value", "cache", "encoder_hidden_states", "encoder_attention_mask",
              "head_mask", "layer_head_mask"}


def _first_attr(module: nn.Module, names: tuple[str, ...], default: Any = None) -> Any:
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    return default


def _dropout(module: nn.Module) -> float:
    p = _first_attr(module, ("attention_dropout", "dropout"), 0.0)
    return p.p if isinstance(p, nn.Dropout) else float(p)


class HFAttention(Convention):
    name = "hf"
    describe = "transformers attention with separate q/k/v Linears (q_proj... or query...)"

    @staticmethod
    def projections(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module | None]:
        for names in _QKV_NAMES:
            if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
                q, k, v = (getattr(module, n) for n in names)
                return q, k, v, _first_attr(module, _OUT_NAMES)
        raise InjectionError(f"{type(module).__name__} has none of the q/k/v Linear sets {_QKV_NAMES}")

    @staticmethod
    def heads(module: nn.Module) -> int:
        heads = _first_attr(module, ("num_heads", "num_attention_heads"))
        if not isinstance(heads, int):
            raise InjectionError(f"{type(module).__name__} has no num_heads / num_attention_heads attribute")
        return heads

    def check(self, module: nn.Module) -> None:
        self.projections(module)
        self.heads(module)

    def forward(self, module: nn.Module, state: TakeoverState, hidden_states, attention_mask=None, *args: Any,
                **kwargs: Any):
        who = type(module).__name__
        if args:
            raise InputError(f"{who} (taken over): unexpected positional arguments after attention_mask")
        given = [k for k, v in kwargs.items() if k in _ONLY_NONE and v is not None]
        if given:
            raise InputError(f"{who} (taken over): {', '.join(given)} given; key/value caches, head masks and "
                             f"cross-attention are not supported; adapters that take over attention serve encoders")
        unknown = [k for k, v in kwargs.items() if k not in _IGNORED | _ONLY_NONE and v is not None]
        if unknown:   # never drop an input the module's own forward would have used
            raise InputError(f"{who} (taken over): keyword argument(s) {unknown} that the takeover does not "
                             f"reproduce; the module's own forward would use them")
        q_proj, k_proj, v_proj, o_proj = self.projections(module)
        heads = self.heads(module)
        q = split_heads(q_proj(hidden_states), heads)
        k = split_heads(k_proj(hidden_states), heads)
        v = split_heads(v_proj(hidden_states), heads)
        if attention_mask is not None:
            if attention_mask.dim() != 4:
                raise InputError(f"{who} (taken over): attention mask of shape {tuple(attention_mask.shape)}; transformers "
                                 f"attention takes the 4-d (batch, 1, queries, keys) mask the model builds from a "
                                 f"padding mask (pass the (batch, length) padding mask to the model, not to the layer)")
            check_mask(attention_mask, (q.shape[0], heads, q.shape[2], k.shape[2]), who)
        is_causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        out, weights = attend(
            q, k, v, mask=attention_mask, causal=causal and attention_mask is None and q.shape[2] > 1,
            scale=_first_attr(module, ("scale", "scaling")), dropout=_dropout(module) if module.training else 0.0,
            prefixes=state.prefix_tensors(q), need_weights=bool(kwargs.get("output_attentions")))
        out = merge_heads(out)
        if o_proj is not None:
            out = o_proj(out)
        return out, weights
