"""The one place that computes attention for a taken-over module: prefixes, masks, SDPA.

Every family convention turns its module's call into `attend(q, k, v, ...)` with heads split:
`q (B, H, Lq, dh)`, `k, v (B, H, Lk, dh)`. Key/value prefixes are `(L, H * dh)` tensors in the
post-projection space; they are split into heads like ordinary tokens and appended after the real
keys. Attention does not depend on the order of the keys, only on which query sees which key, so
appending is the same as inserting them after the first token (S-Prefix); every query sees every
prefix slot, so a causal or padding mask gets visible columns for them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

MAX_PREFIX_LENGTH = 1024


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`(B, L, H * dh)` -> `(B, H, L, dh)`."""
    b, length, width = x.shape
    return x.reshape(b, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`(B, H, L, dh)` -> `(B, L, H * dh)`."""
    b, h, length, dh = x.shape
    return x.transpose(1, 2).reshape(b, length, h * dh)


def check_mask(mask: torch.Tensor, shape: tuple[int, int, int, int], who: str) -> None:
    """A mask must broadcast to `shape = (B, H, Lq, Lk)` and cover every key: clear error otherwise.

    A silent broadcast of a wrong-shaped mask (e.g. `(B, Lk)` read as `(Lq, Lk)`) would mask the
    wrong tokens without an error.
    """
    if mask.dim() > 4 or mask.dim() < 2:
        raise InputError(f"{who}: attention mask of shape {tuple(mask.shape)} has {mask.dim()} dims; expected a mask "
                         f"broadcastable to (batch, heads, queries, keys) = {shape}")
    for size, want, name in zip(reversed(mask.shape), reversed(shape), ("keys", "queries", "heads", "batch")):
        if size != want and not (size == 1 and name != "keys"):
            raise InputError(f"{who}: attention mask of shape {tuple(mask.shape)} does not fit (batch, heads, queries, "
                             f"keys) = {shape}: its {name} dimension is {size}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise InputError(f"{who}: attention mask must be bool or floating point, got {mask.dtype}")


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive float mask; float masks are returned as they are."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def combine_masks(a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Both masks applied: `a AND b` for bool masks, the sum of additive forms otherwise."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _as_additive(a, dtype) + _as_additive(b, dtype)


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """`(Lq, Lk)` bool, True where query i may see key j (j <= i, top-left aligned as SDPA's is_causal)."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril()


def _pad_keys(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """Append `extra` visible key columns to a mask (True for bool masks, 0 for additive ones)."""
    pad = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([mask, pad(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)], dim=-1)


def _prefix_heads(prefixes: Sequence[tuple], like: torch.Tensor):
    """Stack `[(key (L_i, H*dh), value (L_i, H*dh)[, rows])]` into `(B, H, sum L_i, dh)` keys and values.

    Also returns which rows see each prefix slot, `(B, sum L_i)` bool, when some prefix is given
    `rows` (a LongTensor of batch rows: `per_sample` adapter sets), else None.
    """
    b, h, _, dh = like.shape
    keys = torch.cat([p[0] for p in prefixes]).to(like.dtype)
    values = torch.cat([p[1] for p in prefixes]).to(like.dtype)
    shape = (keys.shape[0], h, dh)
    visible = None
    if any(len(p) > 2 for p in prefixes):
        parts = []
        for p in prefixes:
            length = p[0].shape[0]
            if len(p) == 2:
                parts.append(torch.ones(b, length, dtype=torch.bool, device=like.device))
            else:
                seen = torch.zeros(b, dtype=torch.bool, device=like.device).index_fill(0, p[2].to(like.device), True)
                parts.append(seen[:, None].expand(b, length))
        visible = torch.cat(parts, dim=1)
    return (keys.view(shape).transpose(0, 1).expand(b, -1, -1, -1),
            values.view(shape).transpose(0, 1).expand(b, -1, -1, -1), visible)


def _with_prefix_columns(mask: torch.Tensor | None, visible: torch.Tensor, lk: int) -> torch.Tensor:
    """A `(B, Hm, Lq, lk + P)` mask: `mask` on the real keys (all visible when None), `visible (B, P)` on the prefix."""
    b, extra = visible.shape
    if mask is None:
        mask = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=visible.device)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    mask = mask.expand(b, mask.shape[1], mask.shape[2], lk)
    cols = visible[:, None, None, :].expand(b, mask.shape[1], mask.shape[2], extra)
    if mask.dtype != torch.bool:
        cols = _as_additive(cols, mask.dtype)
    return torch.cat([mask, cols], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
           causal: bool = False, scale: float | None = None, dropout: float = 0.0,
           prefixes: Sequence[tuple[torch.Tensor, torch.Tensor]] = (), need_weights: bool = False,
           enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with optional key/value prefixes.

    q `(B, H, Lq, dh)`, k and v `(B, H, Lk, dh)`; prefixes `[(key, value)]` or `[(key, value, rows)]`
    (see `_prefix_heads`); mask bool (True = may attend) or additive float,
    broadcastable to `(B, H, Lq, Lk)`; `causal` applies a top-left causal mask over the real keys.
    Returns the context `(B, H, Lq, dh)` and, with `need_weights`, the attention probabilities on
    the real keys `(B, H, Lq, Lk)` (prefix columns left out, so the shape is the module's own).
    `enable_gqa`: k and v have fewer heads than q (each serves `H / Hk` query heads, as in SDPA); prefixes
    are then split into the key heads.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    if causal and (prefixes or mask is not None or need_weights):
        mask = combine_masks(mask, causal_mask(lq, lk, q.device), q.dtype)
        causal = False
    if prefixes:
        pk, pv, visible = _prefix_heads(prefixes, k)
        k, v = torch.cat([k, pk], dim=-2), torch.cat([v, pv], dim=-2)
        if visible is not None:      # per-sample sets: each row sees its own set's prefix only
            mask = _with_prefix_columns(mask, visible, lk)
        elif mask is not None:
            if mask.shape[-1] != lk:
                mask = mask.expand(*mask.shape[:-1], lk)
            mask = _pad_keys(mask, pk.shape[-2])
    if not need_weights:
        extra = {"enable_gqa": True} if enable_gqa else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale,
                                             **extra)
        return out, None
    if enable_gqa:
        raise InputError("attention weights with grouped-query heads are not computed here")
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + _as_additive(mask, scores.dtype)
    probs = scores.softmax(dim=-1)
    out = F.dropout(probs, p=dropout) @ v if dropout else probs @ v
    return out, probs[..., :lk]
