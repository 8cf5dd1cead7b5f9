"""Prefixes through the module's own forward: its one call of `F.scaled_dot_product_attention` is intercepted.

The `sdpa` convention serves attention modules that no convention re-implements: a block written in
plain PyTorch, transformers attentions that go through `sdpa_attention_forward` (DistilBERT, ALBERT,
GPT-2, T5, ModernBERT, Swin's windows), timm attentions with rotary embeddings or a relative position
bias (EVA-02, BEiT). The module's own forward runs unchanged under a `TorchFunctionMode` that catches
its call of `F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
enable_gqa)` and hands it to `attend` with the acting key/value prefixes appended. Whatever the module
does before that call (rotary embeddings on q and k, q/k norms, a bias table or window mask passed
as `attn_mask`, window partitioning) and after it (output projection, gates) is its own code, so:

- with no prefix acting, the module's forward runs exactly as it was (the mode is not entered);
- prefixes sit in the space attention reads (after rotary/norms), get no positional bias (visible,
  zero-bias mask columns), and every query sees them, as in every other convention.

What must hold, and is checked: the module calls SDPA exactly once per forward (the inject probe
counts the calls; a forward with acting prefixes in which the count is not one raises, naming the
module), q, k, v are `(B, H, L, dh)`, and a prefix's width equals the key heads times `dh`.
Raw-weight deltas are not served here (the module computes its projections itself).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import InjectionError, InputError
from ..sets import acts
from .core import attend
from .takeover import Convention, TakeoverState

_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _is_sdpa(func: Any) -> bool:
    return func is F.scaled_dot_product_attention or func is torch._C._nn.scaled_dot_product_attention


class CountSdpa(TorchFunctionMode):
    """Counts calls of `F.scaled_dot_product_attention` (changes nothing); the inject probe uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _is_sdpa(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count_sdpa(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`(fn(), how many times it called F.scaled_dot_product_attention)`."""
    mode = CountSdpa()
    with mode:
        out = fn()
    return out, mode.calls


class _WithPrefixes(CountSdpa):
    """Routes each SDPA call through `attend` with the acting prefixes of `state`."""

    def __init__(self, state: TakeoverState, who: str) -> None:
        super().__init__()
        self.state, self.who = state, who

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_sdpa(func):
            return func(*args, **kwargs)
        self.calls += 1
        call = {**_DEFAULTS, **dict(zip(_ARGS, args)), **kwargs}
        q, k, v = call["query"], call["key"], call["value"]
        if q.dim() != 4 or k.dim() != 4:
            raise InputError(f"{self.who} (prefixes through its SDPA call): q and k of shapes {tuple(q.shape)} and "
                             f"{tuple(k.shape)}; prefixes need (batch, heads, length, head_dim)")
        prefixes = self.state.prefix_tensors(q)
        if not prefixes:
            return func(*args, **kwargs)
        width = k.shape[1] * k.shape[3]
        bad = sorted({int(p[0].shape[-1]) for p in prefixes if p[0].shape[-1] != width})
        if bad:
            raise InputError(f"{self.who}: its attention reads keys of {k.shape[1]} heads x {k.shape[3]} = {width} "
                             f"features, but its prefixes have {bad} (key heads repeated before the call, or a width "
                             f"the block does not attend at); these prefixes cannot be placed")
        out, _ = attend(q, k, v, mask=call["attn_mask"], causal=bool(call["is_causal"]), scale=call["scale"],
                        dropout=float(call["dropout_p"]), prefixes=prefixes, enable_gqa=bool(call["enable_gqa"]))
        return out


class InterceptAttention(Convention):
    name = "sdpa"
    describe = "any attention whose own forward calls F.scaled_dot_product_attention once (the call gets the prefixes)"

    def forward(self, module: nn.Module, state: TakeoverState, *args: Any, **kwargs: Any) -> Any:
        original = type(module)._petl_original_class.forward
        if state.deltas:
            raise InjectionError(f"{type(module).__name__}: the 'sdpa' takeover applies prefixes only, not raw-weight "
                                 f"deltas")
        if not any(acts(p) for p in state.prefixes):
            return original(module, *args, **kwargs)
        who = type(module).__name__
        mode = _WithPrefixes(state, who)
        with mode:
            out = original(module, *args, **kwargs)
        if mode.calls != 1:
            raise InputError(f"{who} called F.scaled_dot_product_attention {mode.calls} times in this forward, so its "
                             f"key/value prefixes {'did not act' if mode.calls == 0 else 'acted more than once'} (in "
                             f"transformers, output_attentions=True or an eager attn_implementation computes attention "
                             f"without SDPA); call it as at inject, where it called SDPA once")
        return out
