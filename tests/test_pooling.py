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
    "hf_swin": {"vision": "mean"},
    "open_clip_coca": {"text": "eot", "vision": "first", "text_decoder": "none", "text_decoder_cross_attn": "none"},
    "hf_albert": {"text": "first"},
    "hf_mpnet": {"text": "first"},
    "hf_bert": {"text": "first"},
    "hf_deberta_v2": {"text": "none"},
    "torchvision_swin": {"vision": "mean"},
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


def test_a_tower_that_does_not_pool_gets_every_position_corrected():
    model, run = build("open_clip_timm_vit")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.encode_image(x)                  # (B, N, D): the tower returns every position
    pt.inject(model, _unipt("vision"))
    assert "side networks correct every position" in str(pt.discover(model))
    perturb(model)
    with torch.no_grad():
        changed = (model.encode_image(x) - before).abs().amax(-1) > 1e-5
    assert before.dim() == 3 and bool(changed.all())


def _text_ids(length: int = 9):
    return torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(0))


def test_every_position_correction_reads_no_padding():
    """T5's encoder ignores padded keys; so must the correction: a padded row equals that row run unpadded."""
    model, _ = build("hf_t5_encoder")
    pt.inject(model, _unipt("text"))
    perturb(model)
    ids, mask = _text_ids(), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[1, :6]
        alone = model(input_ids=ids[1:, :6]).last_hidden_state[0]
        with pt.disabled(model):
            bare = model(input_ids=ids[1:, :6]).last_hidden_state[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert (alone - bare).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["hf_gpt2", "hf_llama", "hf_opt", "hf_gpt_neox", "hf_bloom"])
def test_every_position_correction_keeps_a_causal_model_causal(arch):
    """Position i of a causal model depends on positions <= i only; the correction must not look ahead (BLOOM says
    so by nothing but the mask it gives its layers)."""
    model, _ = build(arch)
    pt.inject(model, _unipt("text"))
    perturb(model)
    ids = _text_ids()
    later = ids.clone()
    later[:, 5:] = (later[:, 5:] + 7) % 90 + 3
    with torch.no_grad():
        a, b = model(input_ids=ids).last_hidden_state, model(input_ids=later).last_hidden_state
        with pt.disabled(model):
            bare = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=1e-5)
    assert (a[:, :5] - bare[:, :5]).abs().max() > 1e-4


def test_stage_wise_tower_taps_each_stage_at_its_own_width():
    """Swin widens from stage to stage (16 then 32) and pools the mean: each tap reads its own width, and the
    correction moves the pooled mean by itself at every position of the last stage."""
    model, _ = build("hf_swin")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(pixel_values=x)
    pt.inject(model, _unipt("vision"))
    side = pt.api.adapter_module(model, pt.api.get_injection(model).attachments[0])
    assert [layer.in_features for layer in side.unipt_layers] == [16, 16, 16, 32, 32]
    perturb(model)
    with torch.no_grad():
        after = model(pixel_values=x)
    shift = after.last_hidden_state - before.last_hidden_state              # (B, N, 32): one correction per row
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after.pooler_output - before.pooler_output, shift[:, 0], atol=1e-5, rtol=1e-5)
    assert shift.abs().max() > 1e-4


def test_coca_decoder_is_read_as_causal_and_every_position_stays_causal():
    """CoCa's text decoder returns every position under a causal mask buffer: it pools nothing (it was read as
    pooling position 0), and its correction at position i must not read later positions."""
    model, _ = build("open_clip_coca")
    pt.inject(model, _unipt("text_decoder"))
    perturb(model)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 5, 32, generator=g), torch.randn(2, 12, 32, generator=g)
    later = text.clone()
    later[:, 7:] = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        a, b = model.text_decoder(image, text), model.text_decoder(image, later)
        with pt.disabled(model):
            bare = model.text_decoder(image, text)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-5, rtol=1e-5)
    assert (a - bare).abs().amax(-1).min() > 1e-5          # every position corrected


def test_coca_interleaved_decoder_stacks_are_read_by_one_side_network():
    """CoCa's decoder calls a self-attention block and a cross-attention block in turn, both ending at ln_final:
    the unipt preset gives it one side network that taps both stacks (H_0 and two block outputs)."""
    model, _ = build("open_clip_coca")
    pt.inject(model, "unipt")
    sides = {a.branch: a for a in pt.api.get_injection(model).attachments if a.side is not None}
    assert sorted(sides) == ["text", "text_decoder", "vision"]
    assert sides["text_decoder"].side.taps == ("text_decoder.resblocks.0", "text_decoder.cross_attn.0")
    assert len(pt.api.adapter_module(model, sides["text_decoder"]).unipt_layers) == 3
    perturb(model)
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(2, 5, 32, generator=g), torch.randn(2, 12, 32, generator=g)
    with torch.no_grad():
        out = model.text_decoder(image, text)
        with pt.disabled(model):
            bare = model.text_decoder(image, text)
    assert (out - bare).abs().amax(-1).min() > 1e-5


def test_albert_shared_layer_is_tapped_at_every_layer_position():
    """ALBERT runs one layer group at all num_hidden_layers positions: the side network taps each call (H_0 and
    two outputs), adds its correction once, after the last, at position 0 (its pooler's token); the pooled output
    moves and every other position stays as it was."""
    model, _ = build("hf_albert")
    ids = _text_ids()
    with torch.no_grad():
        before = model(input_ids=ids)
    pt.inject(model, _unipt("text"))
    side = pt.api.adapter_module(model, pt.api.get_injection(model).attachments[0])
    assert len(side.unipt_layers) == 1 + model.config.num_hidden_layers
    perturb(model)
    with torch.no_grad():
        after = model(input_ids=ids)
    moved = (after.last_hidden_state - before.last_hidden_state).abs().amax(-1) > 1e-6
    assert moved[:, 0].all() and not moved[:, 1:].any()
    assert (after.pooler_output - before.pooler_output).abs().max() > 1e-4


def test_a_run_broken_off_half_way_leaves_nothing_for_the_next():
    """An exception between two layer positions (out of memory, a bad input) must not leave half a run's taps
    for the next forward to mix with its own: the module running the stack starts each run afresh."""
    model, _ = build("hf_albert")
    pt.inject(model, _unipt("text"))
    perturb(model)
    ids = _text_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    calls = []

    def fail_second(module, args):    # before the second layer position runs: its taps are half filled
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("broken off")

    handle = model.encoder.albert_layer_groups[0].register_forward_pre_hook(fail_second)
    with pytest.raises(RuntimeError, match="broken off"), torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, atol=0, rtol=0)
