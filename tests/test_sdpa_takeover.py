"""The `sdpa` takeover: prefixes given to an attention's own F.scaled_dot_product_attention call.

Checked three ways:
- the intercepted call against a softmax written out here, with the prefix as extra key columns,
  for every argument SDPA takes (bool and additive masks, causal, scale, grouped-query heads,
  positional arguments);
- on real modules whose attention has no position terms (a block written in plain PyTorch, GPT-2
  causal, DistilBERT and ALBERT with a padding mask), a prefix equals extra tokens: a prefix whose
  keys and values are the module's own projections of hidden states `h` gives the real tokens the
  outputs they get when `h` is fed as more tokens (after them, or before them under a causal mask);
- what it cannot serve is refused at inject (a block that computes softmax itself, or calls SDPA
  twice), and a forward in which the module does not call SDPA raises instead of dropping the prefix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import petl_tpr as pt
from petl_tpr.attention import CONVENTIONS, TakeoverState, state_of
from petl_tpr.attention.intercept import _WithPrefixes, count_sdpa
from petl_tpr.compat import ensure_torchvision_importable

from backbone_zoo import UserBlock, build

ensure_torchvision_importable()
PREFIX = pt.Spec.from_dict({"entries": [{"method": "prefix", "config": {"length": 3}}]})


class _Prefix(nn.Module):
    def __init__(self, key: torch.Tensor, value: torch.Tensor) -> None:
        super().__init__()
        self.key, self.value = key, value

    def forward(self):
        return self.key, self.value


def _reference(q, k, v, pk, pv, mask, causal, scale, gqa):
    """softmax(q [k; pk]^T * scale + bias) [v; pv], the prefix columns unmasked and unbiased."""
    b, h, lq, dh = q.shape
    hk, lk = k.shape[1], k.shape[2]
    pk = pk.view(-1, hk, dh).transpose(0, 1).expand(b, -1, -1, -1)
    pv = pv.view(-1, hk, dh).transpose(0, 1).expand(b, -1, -1, -1)
    keys, values = torch.cat([k, pk], 2), torch.cat([v, pv], 2)
    if gqa:
        keys, values = keys.repeat_interleave(h // hk, 1), values.repeat_interleave(h // hk, 1)
    scores = q @ keys.transpose(-1, -2) * (dh ** -0.5 if scale is None else scale)
    bias = torch.zeros_like(scores)
    if mask is not None:
        real = bias[..., :lk]
        bias[..., :lk] = real.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else real + mask
    if causal:
        bias[..., :lk] = bias[..., :lk].masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    return (scores + bias).softmax(-1) @ values


@pytest.mark.parametrize("case", ["plain", "bool-padding", "additive-bias", "causal", "scale-1", "gqa", "positional"])
def test_intercepted_call_equals_the_written_out_softmax_with_prefix_columns(case):
    g = torch.Generator().manual_seed(0)
    b, h, hk, lq, dh, p = 2, 4, 4, 5, 8, 3
    if case == "gqa":
        hk = 2
    q = torch.randn(b, h, lq, dh, generator=g)
    k, v = torch.randn(b, hk, lq, dh, generator=g), torch.randn(b, hk, lq, dh, generator=g)
    pk, pv = torch.randn(p, hk * dh, generator=g), torch.randn(p, hk * dh, generator=g)
    mask, causal, scale = None, False, None
    if case == "bool-padding":
        mask = torch.ones(b, 1, 1, lq, dtype=torch.bool)
        mask[1, ..., 3:] = False
    elif case == "additive-bias":     # T5 / BEiT style: a float bias per head
        mask = torch.randn(1, h, lq, lq, generator=g)
    elif case == "causal":
        causal = True
    elif case == "scale-1":           # T5 does not scale
        scale = 1.0
    state = TakeoverState(CONVENTIONS["sdpa"])
    state.prefixes.append(_Prefix(pk, pv))
    mode = _WithPrefixes(state, "test")
    with mode:
        if case == "positional":
            out = F.scaled_dot_product_attention(q, k, v, None, 0.0, False)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                 enable_gqa=case == "gqa")
    assert mode.calls == 1
    torch.testing.assert_close(out, _reference(q, k, v, pk, pv, mask, causal, scale, case == "gqa"),
                               atol=1e-5, rtol=1e-5)


def test_a_prefix_of_the_wrong_width_is_a_clear_error():
    q = k = v = torch.randn(1, 4, 3, 8)
    state = TakeoverState(CONVENTIONS["sdpa"])
    state.prefixes.append(_Prefix(torch.randn(2, 16), torch.randn(2, 16)))
    with pytest.raises(pt.PetlError, match="cannot be placed"), _WithPrefixes(state, "test"):
        F.scaled_dot_product_attention(q, k, v)


def _taken_prefix(module: nn.Module) -> nn.Module:
    state = state_of(module)
    assert state is not None and state.convention.name == "sdpa", "expected an sdpa takeover"
    (prefix,) = state.prefixes
    return prefix


def _set_prefix(module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
    prefix = _taken_prefix(module)
    with torch.no_grad():
        prefix.prefix_key.copy_(key)
        prefix.prefix_value.copy_(value)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def test_user_block_prefix_equals_extra_tokens():
    model, _ = build("user_vit")
    pt.inject(model, PREFIX)
    block = model.blocks[0]
    g = torch.Generator().manual_seed(1)
    x, extra = torch.randn(2, 5, 32, generator=g), torch.randn(3, 32, generator=g)
    normed = block.ln1(extra)
    _set_prefix(block, block.k(normed), block.v(normed))
    with_prefix = block(x)
    with pt.disabled(model):
        as_tokens = block(torch.cat([x, extra.expand(2, -1, -1)], 1))[:, :5]
        bare = block(x)
    torch.testing.assert_close(with_prefix, as_tokens, atol=1e-5, rtol=1e-5)
    assert (with_prefix - bare).abs().max() > 1e-3


@torch.no_grad()
def test_gpt2_causal_prefix_equals_tokens_before_the_sequence():
    model, _ = build("hf_gpt2")
    pt.inject(model, PREFIX)
    attn = model.h[0].attn
    g = torch.Generator().manual_seed(2)
    x, extra = torch.randn(2, 6, 32, generator=g), torch.randn(3, 32, generator=g)
    _, key, value = attn.c_attn(extra).split(32, dim=-1)
    _set_prefix(attn, key, value)
    with_prefix = _first(attn(x))
    with pt.disabled(model):     # the causal mask lets every later token see tokens put first
        as_tokens = _first(attn(torch.cat([extra.expand(2, -1, -1), x], 1)))[:, 3:]
    torch.testing.assert_close(with_prefix, as_tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,path", [("hf_distilbert", "transformer.layer.0.attention"),
                                       ("hf_albert", "encoder.albert_layer_groups.0.albert_layers.0.attention")])
@torch.no_grad()
def test_padding_masked_prefix_equals_extra_tokens(arch, path):
    model, _ = build(arch)
    pt.inject(model, PREFIX)
    attn = model.get_submodule(path)
    k_lin, v_lin = (attn.k_lin, attn.v_lin) if arch == "hf_distilbert" else (attn.key, attn.value)
    g = torch.Generator().manual_seed(3)
    x, extra = torch.randn(2, 6, 32, generator=g), torch.randn(3, 32, generator=g)
    _set_prefix(attn, k_lin(extra), v_lin(extra))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False                         # row 1 pads its last two tokens
    mask = keep[:, None, None, :].expand(2, 1, 6, 6)
    with_prefix = _first(attn(x, attention_mask=mask))
    long_keep = torch.cat([keep, torch.ones(2, 3, dtype=torch.bool)], 1)
    with pt.disabled(model):
        as_tokens = _first(attn(torch.cat([x, extra.expand(2, -1, -1)], 1),
                                attention_mask=long_keep[:, None, None, :].expand(2, 1, 9, 9)))[:, :6]
    torch.testing.assert_close(with_prefix[keep], as_tokens[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["hf_swin", "hf_t5_encoder", "hf_modernbert", "timm_eva02", "timm_beit", "hf_gpt2"])
@torch.no_grad()
def test_with_prefixes_off_the_model_is_bit_identical_and_on_they_act(arch):
    model, run = build(arch)
    bare = run(model)
    pt.inject(model, "up-person")
    assert any(state_of(m) is not None and state_of(m).convention.name == "sdpa" for m in model.modules())
    with pt.disabled(model):
        assert torch.equal(run(model), bare)
    pt.eject(model)
    pt.inject(model, "prefix")
    with pt.disabled(model):
        assert torch.equal(run(model), bare)
    assert (run(model) - bare).abs().max() > 1e-4


def test_gradients_reach_every_prefix_through_the_sdpa_call():
    model, run = build("timm_eva02")
    pt.inject(model, "s-prefix")
    run(model).square().sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [k for k, g in grads.items() if g is None or g.abs().sum() == 0]


class _EagerBlock(UserBlock):
    """A user block that computes softmax(q k^T) v itself: nowhere for a prefix to go."""

    def forward(self, x):
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = ((q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5).softmax(-1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class _TwiceBlock(UserBlock):
    """A user block that calls SDPA twice (two half-width attentions): which call gets the prefix is ambiguous."""

    def forward(self, x):
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        half = self.heads // 2
        a = torch.cat([F.scaled_dot_product_attention(q[:, :half], k[:, :half], v[:, :half]),
                       F.scaled_dot_product_attention(q[:, half:], k[:, half:], v[:, half:])], 1)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class _Stack(nn.Module):
    def __init__(self, block_cls) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.blocks = nn.ModuleList(block_cls() for _ in range(2))
        self.norm = nn.LayerNorm(32)

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


@pytest.mark.parametrize("block_cls,calls", [(_EagerBlock, 0), (_TwiceBlock, 2)])
def test_a_block_without_one_sdpa_call_is_refused_at_inject(block_cls, calls):
    torch.manual_seed(0)
    model = _Stack(block_cls)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(pt.PetlError, match=f"calls SDPA {calls} times"):
        pt.inject(model, "prefix")
    assert not any(state_of(m) is not None for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pt.inject(model, "lora")          # what needs no takeover is still served


def test_a_forward_that_skips_sdpa_raises_instead_of_dropping_the_prefix():
    model, _ = build("user_vit")
    pt.inject(model, PREFIX)
    block = model.blocks[0]
    x = torch.randn(2, 5, 32)
    original = type(block)._petl_original_class.forward
    try:   # the block's own code swapped for an eager one for this call: the prefix has nowhere to go
        type(block)._petl_original_class.forward = _EagerBlock.forward
        with pytest.raises(pt.PetlError, match="0 times in this forward"):
            block(x)
    finally:
        type(block)._petl_original_class.forward = original


def test_count_sdpa_counts_and_changes_nothing():
    q = torch.randn(1, 2, 3, 4)
    out, calls = count_sdpa(lambda: F.scaled_dot_product_attention(q, q, q) + F.scaled_dot_product_attention(q, q, q))
    assert calls == 2
    assert torch.equal(out, 2 * F.scaled_dot_product_attention(q, q, q))


def test_per_sample_on_window_attention_is_a_clear_error():
    model, run = build("hf_swin")
    pt.inject(model, "prefix", name="a")
    pt.inject(model, "prefix", name="b")
    with pytest.raises(pt.PetlError, match="one name per row"), pt.per_sample(model, ["a", "b"]):
        run(model)
