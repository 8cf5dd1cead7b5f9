"""Branches are named by what feeds them, and `pt.discover` reports what inject will use."""

from __future__ import annotations

import pytest

import petl_tpr as pt

import backbone_zoo

EXPECTED = {
    "hf_blip": {"text", "vision"},                   # the text tower alone was once named "vision"
    "hf_siglip2": {"vision"},                         # a Linear patchifier, not a Conv2d
    "hf_swin": {"vision"},                            # its stages are one branch, not encoder/encoder_1
    "open_clip_coca": {"text", "vision", "text_decoder", "text_decoder_cross_attn"},   # not text_1, text_2
    "hf_clip": {"text", "vision"},
    "open_clip_timm_vit": {"text", "vision"},
    "hf_bert": {"text"},
    "torch_encoder": {"encoder"},
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_branch_names(arch):
    model, _ = backbone_zoo.build(arch)
    assert set(pt.discover(model).branches) == EXPECTED[arch]


def test_swin_stages_keep_their_order_and_widths():
    model, _ = backbone_zoo.build("hf_swin")
    branch = pt.discover(model).branches["vision"]
    assert [b.path for b in branch.blocks] == [f"encoder.layers.{s}.blocks.{i}" for s in (0, 1) for i in (0, 1)]
    assert [b.dim for b in branch.blocks] == [16, 16, 32, 32]


def test_report_names_roles_norms_pooling_and_takeover():
    model, _ = backbone_zoo.build("hf_clip")
    report = str(pt.discover(model))
    assert "text: 2 hf_clip blocks at 'text_model.encoder.layers'" in report
    assert "pooled token eos (the first position holding token id" in report and "pooled token first" in report
    assert "q=self_attn.q_proj" in report and "(pre-norm)" in report and "attention takeover: hf" in report
    bert, _ = backbone_zoo.build("hf_bert")
    assert "(post-norm)" in str(pt.discover(bert))
