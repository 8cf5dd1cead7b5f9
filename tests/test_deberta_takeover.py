"""The hf_deberta takeover reproduces DeBERTa-v2's disentangled attention, relative position terms included.

Built with both position terms (c2p, p2c), with and without shared position keys and log buckets,
and a padding mask; constants randomised. With the prefix attached but switched off (`pt.disabled`:
the taken-over forward runs, its prefix does not) the outputs equal the bare model's at every
position, padded ones included; with the prefix acting they change.
"""

from __future__ import annotations

import pytest
import torch

import petl_tpr as pt
from petl_tpr.attention import state_of
from petl_tpr.compat import ensure_torchvision_importable

from backbone_zoo import randomise_constants
from conftest import perturb

ensure_torchvision_importable()


def _model(**extra):
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             vocab_size=100, max_position_embeddings=32, relative_attention=True,
                             pos_att_type=["p2c", "c2p"], **extra)
    torch.manual_seed(0)
    model = DebertaV2Model(config).eval()
    randomise_constants(model)
    return model


@pytest.mark.parametrize("extra", [{}, {"share_att_key": True, "position_buckets": 8, "max_relative_positions": 16},
                                   {"position_biased_input": False}], ids=["own-keys", "shared-buckets", "no-abs-pos"])
def test_takeover_reproduces_disentangled_attention_and_prefixes_act(extra):
    model = _model(**extra)
    ids = torch.randint(3, 98, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0

    def run():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    bare = run()
    pt.inject(model, "up-person")
    attn = model.encoder.layer[0].attention.self
    assert state_of(attn) is not None and state_of(attn).convention.name == "hf_deberta"
    perturb(model)
    with pt.disabled(model):
        torch.testing.assert_close(run(), bare, atol=1e-5, rtol=1e-5)
    assert (run() - bare)[mask.bool()].abs().max() > 1e-3
    pt.eject(model)
    assert torch.equal(run(), bare)
