"""Attention takeover: with nothing attached it reproduces each family's own attention forward.

References are the unmodified modules themselves (transformers, open_clip, timm, PyTorch), with
causal text masks, padding masks and every mask form each call convention accepts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import petl_tpr as pt
from petl_tpr.attention import CONVENTIONS, is_taken_over, release, take_over
from petl_tpr.backbones import discover
from petl_tpr.registry import FAMILIES

from conftest import assert_no_petl_traces, assert_state_equal, family_example, perturb, state_snapshot

ATOL = 1e-6


def _take_over_all(model: nn.Module) -> list[nn.Module]:
    taken = []
    for block in discover(model).blocks():
        module = model.get_submodule(block.module_path(block.layout.attn))
        take_over(module, CONVENTIONS[block.layout.attention])
        taken.append(module)
    return taken


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if any(l.attention for l in FAMILIES[f].layouts)))
def test_takeover_with_nothing_attached_equals_the_family_forward(family):
    model, run = family_example(family)
    before = state_snapshot(model)
    with torch.no_grad():
        reference = run(model)
    taken = _take_over_all(model)
    assert taken and all(is_taken_over(m) for m in taken)
    with torch.no_grad():
        torch.testing.assert_close(run(model), reference, atol=ATOL, rtol=0)
    for module in taken:
        release(module)
    assert_state_equal(before, model)
    assert_no_petl_traces(model)


def _hf_clip_text(implementation: str):
    model, run = family_example("hf_clip")
    model.config._attn_implementation = implementation
    for sub in (model.config.text_config, model.config.vision_config):
        sub._attn_implementation = implementation
    return model, run


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hf_clip_text_causal_and_padding_masks_both_mask_builders(implementation):
    """transformers builds an additive float mask for eager and a bool mask (or none) for SDPA."""
    model, run = _hf_clip_text(implementation)
    with torch.no_grad():
        reference = run(model)
    _take_over_all(model)
    with torch.no_grad():
        torch.testing.assert_close(run(model), reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hf_clip_text_without_padding_uses_the_causal_flag(implementation):
    """Without padding, transformers' SDPA path passes no mask and is_causal=True instead."""
    model, _ = _hf_clip_text(implementation)
    ids = torch.randint(1, 98, (2, 7), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 99
    with torch.no_grad():
        reference = model.text_model(input_ids=ids).last_hidden_state
        _take_over_all(model)
        torch.testing.assert_close(model.text_model(input_ids=ids).last_hidden_state, reference, atol=ATOL, rtol=0)


def test_hf_output_attentions_returns_the_same_weights():
    model, _ = _hf_clip_text("eager")
    attention = model.text_model.encoder.layers[0].self_attn
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.full((6, 6), float("-inf")).triu(1)[None, None].expand(2, 1, 6, 6)
    with torch.no_grad():
        out, weights = attention(x, mask, output_attentions=True)
        take_over(attention, CONVENTIONS["hf"])
        out2, weights2 = attention(x, mask, output_attentions=True)
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=0)
    torch.testing.assert_close(weights2, weights, atol=ATOL, rtol=0)


def _mha_masks(kind: str, b: int, heads: int, lq: int, lk: int):
    g = torch.Generator().manual_seed(3)
    causal = torch.ones(lq, lk, dtype=torch.bool).triu(1)      # True = may not attend
    padding = torch.zeros(b, lk, dtype=torch.bool)
    padding[1, lk - 2:] = True
    return {
        "none": {},
        "causal_bool": {"attn_mask": causal},
        "causal_float": {"attn_mask": torch.zeros(lq, lk).masked_fill(causal, float("-inf"))},
        "causal_hint": {"attn_mask": causal, "is_causal": True},
        "per_head_float": {"attn_mask": torch.randn(b * heads, lq, lk, generator=g)},
        "padding_bool": {"key_padding_mask": padding},
        "padding_float": {"key_padding_mask": torch.zeros(b, lk).masked_fill(padding, -1e4)},
        "both": {"attn_mask": causal, "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["none", "causal_bool", "causal_float", "causal_hint", "per_head_float",
                                  "padding_bool", "padding_float", "both"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_multihead_attention_call_convention(batch_first, kind, need_weights, average):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    b, length = 2, 5
    x = torch.randn(b, length, 16) if batch_first else torch.randn(length, b, 16)
    masks = _mha_masks(kind, b, 4, length, length)
    kwargs = dict(need_weights=need_weights, average_attn_weights=average, **masks)
    with torch.no_grad():
        out, weights = mha(x, x, x, **kwargs)
        take_over(mha, CONVENTIONS["mha"])
        out2, weights2 = mha(x, x, x, **kwargs)
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=0)
    assert (weights2 is None) == (weights is None)
    if weights is not None:
        torch.testing.assert_close(weights2, weights, atol=ATOL, rtol=0)


def test_multihead_attention_cross_and_unbatched_inputs():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2).eval()
    q, kv = torch.randn(3, 2, 16), torch.randn(7, 2, 16)
    single = torch.randn(4, 16)
    with torch.no_grad():
        expected = [mha(q, kv, kv)[0], mha(single, single, single, need_weights=True)]
        take_over(mha, CONVENTIONS["mha"])
        got = [mha(q, kv, kv)[0], mha(single, single, single, need_weights=True)]
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1][0], expected[1][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1][1], expected[1][1], atol=ATOL, rtol=0)


def test_multihead_attention_training_mode_matches_without_dropout():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = mha(x, x, x, need_weights=False)[0]
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    take_over(mha, CONVENTIONS["mha"])
    out2 = mha(x, x, x, need_weights=False)[0]
    grad2 = torch.autograd.grad(out2.square().sum(), x)[0]
    torch.testing.assert_close(out2, out, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad2, grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_timm_attention_masks(kind):
    model, _ = family_example("timm_vit")
    attention = model.blocks[0].attn
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    kwargs = {
        "bool": {"attn_mask": torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(4)) > 0.3},
        "float": {"attn_mask": torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))},
        "causal": {"is_causal": True},
    }[kind]
    if kind == "bool":
        kwargs["attn_mask"][..., 0] = True     # no fully masked row
    with torch.no_grad():
        expected = attention(x, **kwargs)
        take_over(attention, CONVENTIONS["timm"])
        torch.testing.assert_close(attention(x, **kwargs), expected, atol=ATOL, rtol=0)


def test_nn_transformer_encoder_fast_path_does_not_bypass_the_takeover():
    """The fused encoder-layer path reads attention weights directly; a prefix must still count."""
    model, run = family_example("torch_mha")
    with torch.no_grad():
        reference = run(model)
    pt.inject(model, "s-prefix")
    with torch.no_grad():
        assert (run(model) - reference).abs().max() > 1e-3


def test_deepcopy_of_a_model_with_prefixes_is_independent():
    model, run = family_example("open_clip")
    pt.inject(model, "up-person")
    perturb(model)
    with torch.no_grad():
        expected = run(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(run(twin), expected, atol=0, rtol=0)
    pt.eject(twin)
    assert_no_petl_traces(twin)
    with torch.no_grad():
        torch.testing.assert_close(run(model), expected, atol=0, rtol=0)


def test_torch_save_of_a_whole_model_with_takeovers(tmp_path):
    """The generated class is not importable by name; pickling goes through the original class."""
    model, run = family_example("hf_clip")
    pt.inject(model, "up-person")
    perturb(model)
    with torch.no_grad():
        expected = run(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), expected, atol=0, rtol=0)
    pt.eject(loaded)
    assert_no_petl_traces(loaded)
