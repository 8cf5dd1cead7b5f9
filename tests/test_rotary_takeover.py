"""The hf_rotary takeover (Llama-style attention) reproduces the module's own forward exactly."""

from __future__ import annotations

import pytest
import torch

import petl_tpr as pt
from petl_tpr.attention import CONVENTIONS, release, take_over

import backbone_zoo
from conftest import assert_no_petl_traces


def _llama(implementation: str):
    model, _ = backbone_zoo.build("hf_llama")
    model.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_takeover_equals_llama_attention_with_padding_gqa_and_cache(implementation, use_cache):
    model = _llama(implementation)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                  # left padding, as decoders are fed
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).last_hidden_state
    attentions = [layer.self_attn for layer in model.layers]
    assert attentions[0].k_proj.out_features < attentions[0].q_proj.out_features, "the zoo Llama uses GQA"
    for attention in attentions:
        take_over(attention, CONVENTIONS["hf_rotary"])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=use_cache).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], reference[mask.bool()], atol=1e-5, rtol=0)
    for attention in attentions:
        release(attention)
    assert_no_petl_traces(model)


def test_generation_steps_are_refused_clearly():
    """A cache that already holds tokens is a generation step: refused, not computed without the past."""
    model = _llama("sdpa")
    pt.inject(model, "prefix")
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        with pytest.raises(pt.InputError, match="cache that already holds tokens"):
            model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
