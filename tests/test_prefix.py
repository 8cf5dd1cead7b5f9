"""Prefix tuning and S-Prefix against a direct implementation of REFERENCE.md's formula.

The direct version inserts the prefixes after the first token, extends the mask with visible
columns, multiplies the prefix columns of the softmax by S_p with no renormalisation, and applies
LoRA explicitly; the toolkit appends the prefixes and folds S_p into the values (fused SDPA path).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import petl_tpr as pt
from petl_tpr.attention import CONVENTIONS, state_of, take_over
from petl_tpr.registry import FAMILIES

from conftest import assert_no_petl_traces, assert_state_equal, family_example, perturb, state_snapshot

SPEC = {"entries": [
    {"method": "s-prefix", "config": {"length": 3}, "where": {"branches": ["text"]}},
    {"method": "lora", "config": {"rank": 4, "scaling": "learnable", "roles": ["k", "v"]}, "where": {"branches": ["text"]}},
]}


def _direct(q, k, v, mask, pk, pv, boost, heads):
    """REFERENCE.md sec. 1 literally. q, k, v `(B, L, d)`; mask additive `(B or 1, 1, L, L)`; pk, pv `(P, d)`."""
    b, length, d = q.shape
    split = lambda t: t.reshape(t.shape[0], -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    pk, pv = split(pk[None]).expand(b, -1, -1, -1), split(pv[None]).expand(b, -1, -1, -1)
    k = torch.cat([k[:, :, :1], pk, k[:, :, 1:]], dim=2)
    v = torch.cat([v[:, :, :1], pv, v[:, :, 1:]], dim=2)
    p = pk.shape[2]
    mask = mask.expand(b, 1, length, length)
    mask = torch.cat([mask[..., :1], torch.zeros(b, 1, length, p), mask[..., 1:]], dim=-1)
    attn = ((q @ k.transpose(-2, -1)) / (d // heads) ** 0.5 + mask).softmax(dim=-1)
    boost_cols = torch.ones(length + p)
    boost_cols[1:1 + p] = boost
    attn = attn * boost_cols                                   # no renormalisation
    return (attn @ v).transpose(1, 2).reshape(b, length, d)


def _lora(x, weight, bias, delta):
    return F.linear(x, weight, bias) + delta.lora_scale * (x @ delta.lora_a.T @ delta.lora_b.T)


def _adapters(model, entry_method):
    att = [a for a in pt.api.get_injection(model).attachments if a.method == entry_method and a.layer == 0]
    return {a.role: pt.api.adapter_module(model, a) for a in att}


def _prepare(family):
    model, _ = family_example(family)
    pt.inject(model, pt.Spec.from_dict(SPEC))
    perturb(model)
    with torch.no_grad():
        _adapters(model, "s-prefix")["attn"].sprefix_boost.fill_(7.5)
    return model


def test_s_prefix_matches_the_formula_on_transformers_clip_text():
    model = _prepare("hf_clip")
    attention = model.text_model.encoder.layers[0].self_attn
    sp, lora = _adapters(model, "s-prefix")["attn"], _adapters(model, "lora")
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 6, 6).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    mask = mask.expand(2, 1, 6, 6).clone()
    mask[1, ..., 4:] = float("-inf")           # padded keys of the second caption
    with torch.no_grad():
        got = attention(x, mask)[0]
        q = F.linear(x, attention.q_proj.weight, attention.q_proj.bias)
        k = _lora(x, attention.k_proj.weight, attention.k_proj.bias, lora["k"])
        v = _lora(x, attention.v_proj.weight, attention.v_proj.bias, lora["v"])
        ctx = _direct(q, k, v, mask, sp.sprefix_key * sp.sprefix_key_scale,
                      sp.sprefix_value * sp.sprefix_value_scale, sp.sprefix_boost, heads=4)
        expected = attention.out_proj(ctx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_s_prefix_matches_the_formula_on_open_clip_text():
    model = _prepare("open_clip")
    attention = model.transformer.resblocks[0].attn
    sp, lora = _adapters(model, "s-prefix")["attn"], _adapters(model, "lora")
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    causal = torch.zeros(12, 12).masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    w, b = attention.in_proj_weight, attention.in_proj_bias
    with torch.no_grad():
        got = attention(x, x, x, need_weights=False, attn_mask=causal)[0]
        q = F.linear(x, w[:32], b[:32])
        k = _lora(x, w[32:64], b[32:64], lora["k"])
        v = _lora(x, w[64:], b[64:], lora["v"])
        ctx = _direct(q, k, v, causal[None, None], sp.sprefix_key * sp.sprefix_key_scale,
                      sp.sprefix_value * sp.sprefix_value_scale, sp.sprefix_boost, heads=4)
        expected = F.linear(ctx, attention.out_proj.weight, attention.out_proj.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_boost_is_not_renormalised():
    """S_p = 1 is plain prefix attention; a larger S_p scales only the prefix share of the output."""
    model = _prepare("hf_clip")
    text_attention = model.text_model.encoder.layers[0].self_attn
    sp = _adapters(model, "s-prefix")["attn"]
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = []
        for boost in (1.0, 2.0, 3.0):
            sp.sprefix_boost.fill_(boost)
            outs.append(text_attention(x)[0])
    # linear in S_p: out(3) - out(2) == out(2) - out(1), and not zero
    torch.testing.assert_close(outs[2] - outs[1], outs[1] - outs[0], atol=1e-5, rtol=1e-5)
    assert (outs[1] - outs[0]).abs().max() > 1e-4


def test_vanilla_prefix_equals_s_prefix_with_unit_scales():
    model, run = family_example("timm_vit")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "prefix", "config": {"length": 4}}]}))
    perturb(model)
    with torch.no_grad():
        expected = run(model)
        keys = {a.key: pt.api.adapter_module(model, a) for a in pt.api.get_injection(model).attachments}
        stored = {k: (m.prefix_key.clone(), m.prefix_value.clone()) for k, m in keys.items()}
    pt.eject(model)
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "s-prefix", "config": {"length": 4, "boost_init": 1.0}}]}))
    with torch.no_grad():
        for att in pt.api.get_injection(model).attachments:
            module = pt.api.adapter_module(model, att)
            module.sprefix_key.copy_(stored[att.key][0])
            module.sprefix_value.copy_(stored[att.key][1])
        torch.testing.assert_close(run(model), expected, atol=1e-6, rtol=0)


def test_reparameterised_prefix_comes_from_its_mlp():
    model, _ = family_example("hf_bert")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "prefix",
                                                      "config": {"length": 2, "reparam": True, "reparam_hidden": 8}}]}))
    module = pt.api.adapter_module(model, pt.api.get_injection(model).attachments[0])
    key, value = module()
    both = module.prefix_mlp(module.prefix_embedding)
    assert key.shape == value.shape == (2, 32)
    torch.testing.assert_close(torch.cat([key, value], dim=-1), both)
    assert not hasattr(module, "prefix_key")


def test_weights_keep_the_module_shape_with_prefixes():
    model, _ = family_example("torch_mha")
    pt.inject(model, "s-prefix")
    attention = model.layers[0].self_attn
    x = torch.randn(5, 2, 32)
    out, weights = attention(x, x, x, need_weights=True)
    assert out.shape == (5, 2, 32) and weights.shape == (2, 5, 5)
    assert (weights.sum(-1) < 1).all(), "the prefixes take part of the attention mass"


# -- bad input ---------------------------------------------------------------------------------


def _without_convention(monkeypatch, name: str) -> None:
    family = FAMILIES[name]
    layouts = tuple(dataclasses.replace(layout, attention=None) for layout in family.layouts)
    monkeypatch.setitem(FAMILIES, name, dataclasses.replace(family, layouts=layouts))


def test_prefix_through_the_modules_own_sdpa_call_equals_the_family_convention(monkeypatch, tmp_path):
    """Two independent paths, one result: the `hf` convention re-implements CLIP's attention; without it the
    module's own forward runs and its SDPA call gets the prefixes (`sdpa`). Same perturbed prefixes, same outputs."""
    model, run = family_example("hf_clip")
    pt.inject(model, "s-prefix")
    perturb(model)
    with torch.no_grad():
        own_convention = run(model)
    pt.save_adapters(model, tmp_path / "a.safetensors")
    _without_convention(monkeypatch, "hf_clip")
    fresh, _ = family_example("hf_clip")
    pt.load_adapters(fresh, tmp_path / "a.safetensors")
    assert state_of(fresh.text_model.encoder.layers[0].self_attn).convention.name == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(run(fresh), own_convention, atol=1e-5, rtol=1e-5)


def test_prefix_on_an_eager_attention_without_convention_names_module_and_class(monkeypatch):
    _without_convention(monkeypatch, "hf_clip")
    model, _ = family_example("hf_clip")
    model.set_attn_implementation("eager")      # softmax in its own code: no SDPA call to give prefixes to
    before = state_snapshot(model)
    with pytest.raises(pt.PetlError, match=r"'text_model.encoder.layers.0.self_attn' \(CLIPAttention\) has no "
                                           r"takeover convention.*calls SDPA 0 times"):
        pt.inject(model, "s-prefix")
    assert_state_equal(before, model)
    assert_no_petl_traces(model)


@pytest.mark.parametrize("length,fragment", [(0, "must be > 0"), (5000, "1..1024"), (2.5, "must be an int")])
def test_prefix_length_is_bounded(length, fragment):
    for method in ("prefix", "s-prefix"):
        with pytest.raises(pt.SpecError, match=fragment):
            pt.Spec.from_dict({"entries": [{"method": method, "config": {"length": length}}]})


def test_attention_option_the_takeover_cannot_reproduce_is_refused_and_rolled_back():
    model, _ = family_example("torch_mha")
    model.layers[1].self_attn = nn.MultiheadAttention(32, 4, add_bias_kv=True)
    before = state_snapshot(model)
    with pytest.raises(pt.InjectionError, match="add_bias_kv"):
        pt.inject(model, "s-prefix")
    assert_state_equal(before, model)
    assert_no_petl_traces(model)


def test_mask_shapes_the_family_never_produces_are_refused():
    hf, _ = family_example("hf_clip")
    attention = hf.text_model.encoder.layers[0].self_attn
    take_over(attention, CONVENTIONS["hf"])
    with pytest.raises(pt.errors.InputError, match=r"mask of shape \(2, 6\); transformers attention takes the 4-d"):
        attention(torch.randn(2, 6, 32), torch.ones(2, 6))
    with pytest.raises(pt.errors.InputError, match="its queries dimension is 5"):
        attention(torch.randn(2, 6, 32), torch.zeros(2, 1, 5, 6))
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    take_over(mha, CONVENTIONS["mha"])
    x = torch.randn(2, 5, 16)
    with pytest.raises(pt.errors.InputError, match=r"key_padding_mask of shape \(5, 2\)"):
        mha(x, x, x, key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(pt.errors.InputError, match=r"attn_mask of shape \(2, 5, 5\)"):
        mha(x, x, x, attn_mask=torch.zeros(2, 5, 5))
