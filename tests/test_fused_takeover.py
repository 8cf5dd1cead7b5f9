"""The hf_fused takeover (BLIP's vision attention: fused qkv, softmax in its own code) reproduces the module.

With the prefix attached but switched off (`pt.disabled`: the taken-over forward runs, its prefix
does not) the model's outputs equal the bare model's; with the prefix acting they change; the
attention weights it returns when asked are the module's own.
"""

from __future__ import annotations

import torch

import petl_tpr as pt
from petl_tpr.attention import state_of
from petl_tpr.compat import ensure_torchvision_importable

from backbone_zoo import build
from conftest import perturb

ensure_torchvision_importable()


@torch.no_grad()
def test_blip_vision_takeover_reproduces_the_module_and_prefixes_act():
    model, run = build("hf_blip")
    attn = model.vision_model.encoder.layers[0].self_attn
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    bare, (own_out, own_weights) = run(model), attn(x)
    pt.inject(model, "s-prefix")
    assert state_of(attn).convention.name == "hf_fused"
    perturb(model)
    with pt.disabled(model):
        torch.testing.assert_close(run(model), bare, atol=1e-5, rtol=1e-5)
        out, weights = attn(x, output_attentions=True)
        torch.testing.assert_close(out, own_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(weights, own_weights, atol=1e-6, rtol=1e-5)
    assert (run(model) - bare).abs().max() > 1e-3
