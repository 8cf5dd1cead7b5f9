"""Where each branch pools (backbones/pooling.py), and UniPT's correction landing exactly there.

The check that can fail: with a perturbed side network, the model's own pooled feature changes and,
for sequence outputs, every position the model does not pool stays bit-for-bit as it was. A
correction added at the wrong position would leave the pooled feature unchanged (or change the
wrong position), which is the silent failure this guards against.
"""

from __future__ import annotations

import pytest
import torch

import petl_tpr as pt
from petl_tpr.backbones import discover

from backbone_zoo import build
from conftest import perturb

EXPECTED = {   # architecture -> {branch: pooling kind}, read from each model's structure
    "hf_clip": {"text": "eos", "vision": "first"},
    "hf_siglip": {"text": "last", "vision": "head"},
    "hf_siglip2": {"vision": "head"},
    "hf_blip": {"text": "first", "vision": "first"},
    "hf_vit": {"vision": "first"},
    "hf_dinov2": {"vision": "first"},
    "timm_vit": {"vision": "first"},
    "timm_eva02": {"vision": "mean"},
    "open_clip": {"vision": "first", "text": "eot"},
    "open_clip_timm_vit": {"vision": "none", "text": "eot"},
    "hf_t5_encoder": {"text": "none"},
    "hf_llama": {"text": "none"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pooling_is_read_from_the_model(name):
    model, _ = build(name)
    backbone = discover(model)
    assert {b: backbone.branches[b].pooling.kind for b in EXPECTED[name]} == EXPECTED[name]
    assert "pooled token" in backbone.report()


def _unipt(branch: str) -> pt.Spec:
    return pt.Spec.from_dict({"entries": [{"method": "unipt", "config": {"width": 8}, "where": {"branches": [branch]}}]})


def _siglip():
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8))
    torch.manual_seed(0)
    return SiglipModel(config).eval()


def _before_and_after_unipt(branch: str, **inputs):
    """A SigLIP tower's outputs before and after a perturbed UniPT on it."""
    model = _siglip()
    tower = model.text_model if branch == "text" else model.vision_model
    with torch.no_grad():
        before = tower(**inputs)
    pt.inject(model, _unipt(branch))
    perturb(model)
    with torch.no_grad():
        return before, tower(**inputs)


def test_siglip_text_correction_lands_on_the_last_position_only():
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    before, after = _before_and_after_unipt("text", input_ids=ids)
    assert torch.equal(after.last_hidden_state[:, :-1], before.last_hidden_state[:, :-1])
    assert (after.last_hidden_state[:, -1] - before.last_hidden_state[:, -1]).abs().max() > 1e-4
    assert (after.pooler_output - before.pooler_output).abs().max() > 1e-4, "SigLIP pools the last position"


def test_siglip_vision_correction_is_added_to_the_attention_pooled_feature():
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    before, after = _before_and_after_unipt("vision", pixel_values=pixels)
    assert torch.equal(after.last_hidden_state, before.last_hidden_state), "the sequence the head reads is untouched"
    assert (after.pooler_output - before.pooler_output).abs().max() > 1e-4


def test_clip_text_correction_lands_on_the_first_end_of_text_id():
    model, _ = build("hf_clip")
    eos = model.text_model.config.eos_token_id if hasattr(model, "text_model") else None
    eos = eos if eos is not None else discover(model).branches["text"].pooling.eos_id
    ids = torch.tensor([[3, 7, 9, eos, 50, 60], [4, 5, eos, 8, 70, 80]])   # larger ids after the end-of-text id
    text = model.text_model
    with torch.no_grad():
        before = text(input_ids=ids).last_hidden_state
    pt.inject(model, _unipt("text"))
    perturb(model)
    with torch.no_grad():
        after = text(input_ids=ids).last_hidden_state
    changed = (after - before).abs().amax(dim=-1) > 1e-6
    assert changed.tolist() == [[False, False, False, True, False, False], [False, False, True, False, False, False]]


def test_mean_pooling_model_gets_its_pooled_feature_corrected():
    model, run = build("timm_eva02")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    pt.inject(model, _unipt("vision"))
    perturb(model)
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 1e-4


def test_blip_vision_final_norm_called_twice_takes_one_correction():
    model, run = build("hf_blip")
    with torch.no_grad():
        before = run(model)
    pt.inject(model, _unipt("vision"))
    perturb(model)
    with torch.no_grad():
        first, second = run(model), run(model)
    assert torch.equal(first, second) and (first - before).abs().max() > 1e-4


def test_a_tower_that_does_not_pool_is_refused_with_what_was_read():
    model, _ = build("open_clip_timm_vit")
    with pytest.raises(pt.SpecError, match="no pooled token.*global_pool=''"):
        pt.inject(model, _unipt("vision"))
    assert pt.api.get_injection(model) is None
