"""Blocks no family table describes, read from their structure (a user's own block, most often).

For a module that is one element of a ModuleList or Sequential, `infer_layout` looks for:
- the width d: every norm of the block's residual stream (LayerNorm, RMSNorm or a `*Norm` class
  with a 1-d weight of size d); exactly two of them, one of which may be an `nn.Identity` named
  like a norm (ModernBERT's first layer has no attention norm);
- the attention: three Linears reading d (q, k, v; k and v may be narrower, as with grouped-query
  heads) or one fused Linear d -> 3d (rows q|k|v); GPT-2's `Conv1D` counts as a Linear, told apart by their names (`q`, `query`,
  `q_proj`, `to_q`, `wq`, ... and `qkv`, `c_attn`, `Wqkv`, ...), and an output Linear back to d;
- the MLP: the remaining Linears, `fc1` d -> m and `fc2` m -> d, or a gated MLP with two d -> m
  (the one named `gate`/`w1`... is the gate, which gets no role) and m -> d, or one d -> 2m whose
  output is split into input and gate (ModernBERT's `Wi`) and m -> d;
- where each branch enters and leaves: the smallest module holding the attention's projections
  (its output is the branch output when it holds the output projection too), likewise for the MLP,
  or the projections themselves when the block calls them directly;
- which norm is norm1 and whether the block is pre- or post-norm: from one probe call of the block
  on a seeded `(2, 5, d)` input with hooks that record the order norms and projections run in
  (norm1 runs first; a norm before the first q/k/v call: pre-norm); a block that cannot be called
  alone is read by registration order.
The layout names no takeover convention: prefixes reach such blocks through their attention's own
`F.scaled_dot_product_attention` call (the `sdpa` convention), or are refused at inject.
Anything ambiguous (no names to tell q from k, three norms) is not a match; `discover` then says
what it found, and a family file describes the block (docs/adding.md).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .layout import BlockLayout, ProjectionRef, is_linear, is_norm, linear_dims

_Q, _K, _V = {"q", "query", "wq", "toq"}, {"k", "key", "wk", "tok"}, {"v", "value", "wv", "tov"}
_FUSED = {"qkv", "cattn", "wqkv", "inproj", "toqkv", "querykeyvalue"}
_GATE = {"gate", "gateproj", "w1", "wi0", "wgate"}
ORDER_ATTR = "_petl_probed_order"
_AFFIXES = re.compile(r"(_?(proj|lin|linear|layer|fc)$)|^(proj_?)")


def _word(name: str) -> str:
    """`q_proj` -> `q`, `to_q` -> `toq`, `query_key_value` -> `querykeyvalue`."""
    leaf = name.rsplit(".", 1)[-1].lower()
    return _AFFIXES.sub("", leaf).replace("_", "")


def _linears(block: nn.Module) -> list[tuple[str, int, int]]:
    """(path, in, out) of every linear-like module (nn.Linear, GPT-2's Conv1D) in the block."""
    return [(n, *linear_dims(m)) for n, m in block.named_modules() if n and is_linear(m)]


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _common(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _attention(linears: list[tuple[str, int, int]], d: int) -> dict[str, Any] | None:
    reading = [(n, i, o) for n, i, o in linears if i == d]
    fused = [(n, i, o) for n, i, o in reading if _word(n) in _FUSED and o % 3 == 0]
    if len(fused) == 1:
        name, _, out = fused[0]
        inner = out // 3
        refs = {r: ProjectionRef(name, part=j) for j, r in enumerate("qkv")}
        qkv_paths, inner_dim = [name], inner
    else:
        found = {}
        for role, words in (("q", _Q), ("k", _K), ("v", _V)):
            hits = [(n, o) for n, _, o in reading if _word(n) in words]
            if len(hits) != 1:
                return None
            found[role] = hits[0]
        refs = {r: ProjectionRef(found[r][0]) for r in "qkv"}
        qkv_paths, inner_dim = [found[r][0] for r in "qkv"], found["q"][1]
    home = _common(qkv_paths) if len(qkv_paths) > 1 else _parent(qkv_paths[0])
    outs = [(n, i, o) for n, i, o in linears if i == inner_dim and o == d and n not in qkv_paths]
    near = [x for x in outs if _common([x[0], home]) == home] or outs
    if not near:
        return None
    out_name = near[0][0]
    refs["o"] = ProjectionRef(out_name)
    return {"refs": refs, "qkv": qkv_paths, "o": out_name, "home": home}


def _mlp(linears: list[tuple[str, int, int]], d: int, taken: set[str]) -> dict[str, Any] | None:
    rest = [(n, i, o) for n, i, o in linears if n not in taken]
    ups = [(n, i, o) for n, i, o in rest if i == d and o != d]
    if not ups:
        return None
    width = ups[0][2]
    downs = [n for n, i, o in rest if i == width and o == d]
    ups = [x for x in ups if x[2] == width]
    if not downs and len(ups) == 1 and width % 2 == 0:   # one d -> 2m Linear split into input and gate (GeGLU)
        downs = [n for n, i, o in rest if i == width // 2 and o == d]
    if len(downs) != 1 or len(ups) not in (1, 2):
        return None
    if len(ups) == 2:
        gates = [x for x in ups if _word(x[0]) in _GATE]
        if len(gates) != 1:
            return None
        ups = [x for x in ups if x is not gates[0]]
        paths = [gates[0][0], ups[0][0], downs[0]]
    else:
        paths = [ups[0][0], downs[0]]
    return {"fc1": ups[0][0], "fc2": downs[0], "paths": paths}


class _Order:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def hook(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            self.calls.append(name)
        return record


@torch.no_grad()
def _probe_order(block: nn.Module, norms: list[str], first_qkv: list[str], d: int) -> list[str] | None:
    """The order `norms` and the q/k/v projections first run in one probe call; None if it cannot run."""
    order = _Order()
    handles = [block.get_submodule(n).register_forward_pre_hook(order.hook(n)) for n in norms + first_qkv]
    was_training = block.training
    block.eval()
    param = next(block.parameters())
    try:
        block(torch.randn(2, 5, d, generator=torch.Generator().manual_seed(0)).to(param))
    except Exception:   # noqa: BLE001  (a block needing more arguments is read by registration order)
        return None
    finally:
        block.train(was_training)
        for handle in handles:
            handle.remove()
    seen = list(dict.fromkeys(order.calls))
    return seen if all(n in seen for n in norms) and any(q in seen for q in first_qkv) else None


def _cached_order(block: nn.Module, norms: list[str], qkv: list[str], d: int) -> list[str] | None:
    """The probe's call order, kept on the block: a block with adapters attached is never probed again
    (its hooks would run), so the layout read before `inject` is the one read after it."""
    if ORDER_ATTR not in block.__dict__:
        block.__dict__[ORDER_ATTR] = _probe_order(block, norms, qkv, d)
    return block.__dict__[ORDER_ATTR]


def infer_layout(block: nn.Module) -> BlockLayout | None:
    """A BlockLayout for `block` read from its structure (see module docstring), or None."""
    norms = [(n, m) for n, m in block.named_modules() if n and is_norm(m)]
    widths = {int(m.weight.shape[0]) for _, m in norms}
    if not norms or len(widths) > 2:
        return None
    linears = _linears(block)
    # a norm left out of one layer as nn.Identity (ModernBERT's first attention norm) still marks its place
    placeholders = [n for n, m in block.named_modules() if n and isinstance(m, nn.Identity) and "norm" in n.lower()]
    for d in sorted(widths, reverse=True):
        stream = [n for n, m in norms if int(m.weight.shape[0]) == d]
        if len(stream) == 1 and len(placeholders) == 1:
            stream = [n for n, _ in block.named_modules() if n in stream or n in placeholders]
        if len(stream) != 2:
            continue
        attn = _attention(linears, d)
        if attn is None:
            continue
        mlp = _mlp(linears, d, set(attn["qkv"]) | {attn["o"]})
        if mlp is None:
            continue
        order = _cached_order(block, stream, attn["qkv"], d) or [n for n, _ in block.named_modules()]
        stream.sort(key=order.index)      # norm1 is the one that runs (or is registered) first
        first_qkv = min((order.index(q) for q in attn["qkv"] if q in order), default=len(order))
        pre = order.index(stream[0]) < first_qkv
        home = attn["home"]
        holds_out = bool(home) and attn["o"].startswith(home + ".")
        attn_in = home if home else attn["qkv"][0]
        attn_out = home if holds_out else attn["o"]
        mlp_home = _common(mlp["paths"])
        mlp_in, mlp_out = (mlp_home, mlp_home) if mlp_home and not any(
            p.startswith(mlp_home + ".") for p in attn["qkv"]) else (mlp["fc1"], mlp["fc2"])
        return BlockLayout(
            attn=home or attn["qkv"][0], **attn["refs"], fc1=ProjectionRef(mlp["fc1"]), fc2=ProjectionRef(mlp["fc2"]),
            norm1=stream[0], norm2=stream[1], attn_in=attn_in, attn_out=attn_out, mlp_in=mlp_in, mlp_out=mlp_out,
            pre_norm=lambda module, pre=pre: pre)
    return None


class PlainBlock(nn.Module):
    """A pre-norm block as people write it in plain PyTorch (the structural family's example)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `(B, L, d)` -> `(B, L, d)`."""
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.to_out(a)
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))


class PlainViT(nn.Module):
    """Patchify (Conv2d), a class token, PlainBlocks, a final norm; returns the class token `(B, d)`."""

    def __init__(self, d: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.ModuleList(PlainBlock(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def tiny_example():
    """A 2-block PlainViT on 32x32 images, norms and biases randomised (unit norms would hide a dropped one)."""
    model = PlainViT().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "ln1.weight", "ln2.weight", "norm.weight")):
                param.add_(0.1 * torch.randn(param.shape))

    def run(m):
        return m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).flatten()

    return model, run


STRUCTURAL = "structural"
