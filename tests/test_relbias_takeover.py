"""The hf_relbias takeover (Data2Vec-vision): with no prefix acting it reproduces the model's own forward.

Checked on both ways the model gives its relative position bias (a table per layer, or one shared
table passed to every layer), with the prefix attached but switched off (`pt.disabled`: the
taken-over forward runs, its prefix does not), then with the prefix acting (outputs change).
"""

from __future__ import annotations

import pytest
import torch

import petl_tpr as pt
from petl_tpr.compat import ensure_torchvision_importable

from backbone_zoo import randomise_constants
from conftest import perturb

ensure_torchvision_importable()


def _model(**bias):
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    config = Data2VecVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8, **bias)
    torch.manual_seed(0)
    model = Data2VecVisionModel(config).eval()
    randomise_constants(model)
    with torch.no_grad():       # a zero bias table would hide a dropped bias
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_()
    return model


@pytest.mark.parametrize("bias", [{"use_relative_position_bias": True}, {"use_shared_relative_position_bias": True}],
                         ids=["per-layer", "shared"])
def test_takeover_reproduces_the_relative_bias_and_prefixes_act(bias):
    model = _model(**bias)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = model(pixel_values=pixels).last_hidden_state
    pt.inject(model, "up-person")
    assert type(model.encoder.layer[0].attention.attention).__name__.startswith("Data2VecVision")
    perturb(model)
    with torch.no_grad():
        with pt.disabled(model):
            torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, bare, atol=1e-5, rtol=1e-5)
        assert (model(pixel_values=pixels).last_hidden_state - bare).abs().max() > 1e-3
