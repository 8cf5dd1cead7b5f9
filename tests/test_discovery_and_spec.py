"""Discovery by structure, branch naming, selectors, spec JSON, and behaviours of attached adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import petl_tpr as pt
from petl_tpr.backbones import discover
from petl_tpr.presets import PRESETS
from petl_tpr.registry import FAMILIES

from conftest import assert_no_petl_traces, family_example, perturb

EXPECTED_BRANCHES = {
    "hf_clip": {"text": 2, "vision": 2},
    "open_clip": {"vision": 2, "text": 2},
    "hf_vit": {"vision": 2},
    "timm_vit": {"vision": 2},
    "torchvision_vit": {"vision": 2},
    "hf_bert": {"text": 2},
    "torch_mha": {"encoder": 2},
}


@pytest.mark.parametrize("family", sorted(EXPECTED_BRANCHES))
def test_branches_are_found_and_named_by_structure(family):
    model, _ = family_example(family)
    backbone = discover(model)
    assert {n: len(b.blocks) for n, b in backbone.branches.items()} == EXPECTED_BRANCHES[family]
    for branch in backbone.branches.values():
        assert [b.index for b in branch.blocks] == list(range(len(branch.blocks)))
        assert {b.family for b in branch.blocks} == {family}


def test_open_clip_projections_are_rows_of_in_proj_weight():
    model, _ = family_example("open_clip")
    block = discover(model).branches["text"].blocks[1]
    assert block.projections["v"].key == "transformer.resblocks.1.attn.in_proj_weight.v"
    assert block.projections["v"].rows == (64, 96)
    assert block.projections["o"].key == "transformer.resblocks.1.attn.out_proj"


@pytest.mark.parametrize("batch_first,norm_first", [(True, True), (True, False), (False, False)])
def test_encoder_layer_fast_path_cannot_bypass_adapters(batch_first, norm_first):
    """nn.TransformerEncoderLayer has a fused eval path that reads weights directly."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        bare = model(x)
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "l-adapter"}, {"method": "lora", "config": {"roles": ["q", "fc2"]}}]}))
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare, atol=1e-6, rtol=0)
    perturb(model)
    with torch.no_grad():
        assert (model(x) - bare).abs().max() > 1e-3
    pt.eject(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare, atol=1e-6, rtol=0)


def test_layer_selection_and_negative_indices():
    model, _ = family_example("hf_clip")
    spec = pt.Spec.from_dict({"entries": [
        {"method": "lora", "where": {"branches": ["vision"], "layers": [-1], "roles": ["k"]}},
        {"method": "l-adapter", "where": {"branches": "text", "layers": "0:1"}}]})
    report = pt.inject(model, spec)
    sites = sorted((a.entry, a.branch, a.layer, a.role) for a in report.attachments)
    assert sites == [("l_adapter", "text", 0, "norm1"), ("l_adapter", "text", 0, "norm2"), ("lora", "vision", 1, "k")]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    try:
        spec = pt.Spec.preset(name)
    except pt.SpecError:
        spec = pt.Spec.preset(name, without=("s-prefix",))
    again = pt.Spec.from_json(spec.to_json())
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_up_person_variants_follow_the_reference():
    for dataset, rank in (("cuhk-pedes", 32), ("icfg-pedes", 32), ("rstpreid", 16)):
        spec = pt.Spec.preset(f"up-person:{dataset}", without=("s-prefix",))
        lora = next(e for e in spec.entries if e.method == "lora")
        assert (lora.config.rank, lora.config.scaling, lora.roles) == (rank, "learnable", ("k", "v"))
    assert [e["config"]["length"] for k in ("cuhk-pedes", "icfg-pedes", "rstpreid")
            for e in PRESETS[f"up-person:{k}"] if e["method"] == "s-prefix"] == [10, 14, 2]


def test_injected_model_deepcopies_and_compiles():
    model, run = family_example("timm_vit")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"roles": ["q", "v", "o"]}},
                                                    {"method": "adapter", "config": {"mode": "parallel"}}]}))
    perturb(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        expected = run(model)
        torch.testing.assert_close(run(twin), expected, atol=0, rtol=0)
        pt.api.adapter_parameters(twin)["blocks.0.attn.qkv.q.lora.lora_b"].zero_()
        pt.api.adapter_parameters(twin)["blocks.0.attn.qkv.v.lora.lora_b"].zero_()
        assert not torch.equal(run(twin), expected)
        assert torch.equal(run(model), expected)
    pt.eject(twin)
    assert_no_petl_traces(twin)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(run(compiled), expected, atol=1e-6, rtol=0)


def test_summary_counts_and_percent():
    model, _ = family_example("hf_clip")
    frozen = sum(p.numel() for p in model.parameters())
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"rank": 2, "scaling": "learnable"}}]}))
    s = pt.summary(model)
    per_site = 2 * 32 + 32 * 2 + 1
    assert s.by_method() == {"lora": per_site * 2 * 2 * 2}
    assert s.by_branch() == {"vision": per_site * 4, "text": per_site * 4}
    assert s.frozen == frozen and s.trainable == per_site * 8
    assert s.percent == pytest.approx(100 * s.trainable / (frozen + s.trainable))
    assert "percent" in s.table()
    next(model.text_model.final_layer_norm.parameters()).requires_grad_(True)
    assert pt.summary(model).by_method()["base"] == 32


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_preset_injects_into_every_family(preset, family):
    """Presets name no branches: single-tower models (timm, BERT, TransformerEncoder) take them too.

    A preset using a method the family refuses by design is refused at inject with a clear error."""
    model, run = family_example(family)
    refused = {e["method"] for e in PRESETS[preset]} & set(FAMILIES[family].refuses)
    if refused:
        with pytest.raises(pt.PetlError):
            pt.inject(model, preset)
        assert pt.api.get_injection(model) is None
        return
    report = pt.inject(model, preset)
    branches = set(discover(model).branches)
    assert {a.branch for a in pt.api.get_injection(model).attachments} == branches, report.describe()
    assert pt.summary(model).trainable > 0
    with torch.no_grad():
        assert torch.isfinite(run(model)).all()
