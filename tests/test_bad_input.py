"""Bad specs and failures half-way: a clear error, and the model exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import petl_tpr as pt
from petl_tpr.methods.lora import LoRA

from conftest import assert_no_petl_traces, assert_state_equal, family_example, perturb, state_snapshot


@pytest.fixture
def clip():
    model, run = family_example("hf_clip")
    return model, run, state_snapshot(model)


def _entry(**kw):
    return pt.Spec.from_dict({"entries": [kw]})


@pytest.mark.parametrize("entry,fragment", [
    ({"method": "lora", "where": {"branches": ["visual"]}}, "branches: text (2 layers, hf_clip), vision (2 layers"),
    ({"method": "lora", "where": {"layers": [5]}}, "out of range"),
    ({"method": "lora", "where": {"layers": "2:2"}}, "selects no site"),
    ({"method": "lora", "where": {"roles": ["norm1"]}}, "roles: q, k, v, o, fc1, fc2"),
    ({"method": "l-adapter", "where": {"roles": ["q"]}}, "roles: norm1, norm2"),
])
def test_bad_selectors_name_what_exists_and_touch_nothing(clip, entry, fragment):
    model, _, before = clip
    with pytest.raises(pt.SpecError) as info:
        pt.inject(model, _entry(**entry))
    assert fragment in str(info.value)
    assert_state_equal(before, model)
    assert_no_petl_traces(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("data,fragment", [
    ({"entries": [{"method": "dora"}]}, "available methods: adapter, l-adapter, lora, "),
    ({"entries": [{"method": "lora", "config": {"rank": 0}}]}, "rank must be > 0"),
    ({"entries": [{"method": "lora", "config": {"rnk": 4}}]}, "no field(s) ['rnk']"),
    ({"entries": [{"method": "lora", "config": {"roles": ["qq"]}}]}, "unknown role(s) ['qq']"),
    ({"entries": [{"method": "adapter", "config": {"activation": "swish"}}]}, "activation must be one of"),
    ({"entries": [{"method": "adapter", "config": {"width": 8, "reduction": 4}}]}, "not both"),
    ({"entries": [{"method": "lora", "compose": "stack"}]}, "compose must be"),
    ({"entries": [{"method": "lora", "name": "Bad.Name"}]}, "entry name"),
    ({"entries": [{"method": "lora", "where": {"layer": [1]}}]}, "where has no field"),
    ({"entries": [{"method": "lora", "where": {"layers": "first"}}]}, "start:stop"),
    ({"entries": []}, "at least one"),
    ({"version": 7, "entries": [{"method": "lora"}]}, "version 7"),
])
def test_malformed_specs(data, fragment):
    with pytest.raises(pt.SpecError) as info:
        pt.Spec.from_dict(data)
    assert fragment in str(info.value)


def test_spec_from_bad_json():
    with pytest.raises(pt.SpecError, match="not valid JSON"):
        pt.Spec.from_json("{entries: ")


def test_injecting_twice_into_a_site_needs_compose(clip):
    model, run, _ = clip
    pt.inject(model, _entry(method="lora", config={"rank": 2}))
    snapshot = state_snapshot(model)
    with pytest.raises(pt.SpecError, match="compose='add'"):
        pt.inject(model, _entry(method="lora", name="second", config={"rank": 2}))
    with pytest.raises(pt.SpecError, match="already has an adapter named 'lora'"):
        pt.inject(model, _entry(method="lora", compose="add", config={"rank": 2}))
    assert_state_equal(snapshot, model)
    pt.inject(model, _entry(method="lora", name="second", compose="add", config={"rank": 2}))
    assert {a.entry for a in pt.api.get_injection(model).attachments} == {"lora", "second"}
    pt.eject(model)
    assert_no_petl_traces(model)


def test_same_site_conflict_inside_one_spec(clip):
    model, _, before = clip
    spec = pt.Spec.from_dict({"entries": [{"method": "adapter"}, {"method": "adapter", "name": "again"}]})
    with pytest.raises(pt.SpecError, match="compose='add'"):
        pt.inject(model, spec)
    assert_state_equal(before, model)
    assert_no_petl_traces(model)


@pytest.mark.parametrize("family", ["hf_clip", "open_clip", "timm_vit", "hf_bert"])
def test_failure_half_way_rolls_back(family, monkeypatch):
    model, run = family_example(family)
    before = state_snapshot(model)
    with torch.no_grad():
        reference = run(model)
    calls = {"n": 0}
    original = LoRA.build.__func__

    def failing_build(cls, config, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated failure at the 7th site")
        return original(cls, config, **kw)

    monkeypatch.setattr(LoRA, "build", classmethod(failing_build))
    spec = pt.Spec.from_dict({"entries": [{"method": "l-adapter"}, {"method": "lora", "config": {"roles": ["q", "k", "v", "o"]}}]})
    with pytest.raises(RuntimeError, match="7th site"):
        pt.inject(model, spec)
    assert calls["n"] == 7
    assert_state_equal(before, model)
    assert_no_petl_traces(model)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(run(model), reference)


def test_model_without_blocks_says_what_it_found():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(pt.DiscoveryError) as info:
        pt.inject(model, "lora")
    message = str(info.value)
    assert "0 (Linear)" in message and "Known families: hf_bert" in message and "docs/adding.md" in message


def test_eject_or_merge_without_injection():
    model, _ = family_example("torch_mha")
    with pytest.raises(pt.InjectionError, match="nothing is injected"):
        pt.eject(model)
    with pytest.raises(pt.InjectionError, match="nothing is injected"):
        pt.merge(model)


def test_unknown_preset_and_missing_method(monkeypatch):
    from petl_tpr.presets import PRESETS

    with pytest.raises(pt.SpecError, match="presets: adapter"):
        pt.Spec.preset("up-persons")
    monkeypatch.setitem(PRESETS, "future", [{"method": "not-yet"}, {"method": "lora"}])
    with pytest.raises(pt.SpecError, match="needs method"):
        pt.Spec.preset("future")
    assert [e.method for e in pt.Spec.preset("future", without=("not-yet",)).entries] == ["lora"]


@pytest.mark.parametrize("family", ["open_clip", "torch_mha", "torchvision_vit"])
def test_second_inject_on_taken_over_attention(family):
    """A second inject on an attention already taken over adds to the same takeover."""
    model, run = family_example(family)
    pt.inject(model, _entry(method="lora", config={"roles": ["q"]}))
    pt.inject(model, _entry(method="lora", name="second", config={"roles": ["v"]}))
    assert {a.role for a in pt.api.get_injection(model).attachments} == {"q", "v"}
    pt.eject(model)
    assert_no_petl_traces(model)


def test_deepcopy_of_taken_over_model_is_independent():
    """The takeover swaps a module's class: a deepcopy must be ejected and merged on its own."""
    import copy

    model, run = family_example("open_clip")
    pt.inject(model, _entry(method="lora", config={"roles": ["q", "o"]}))
    perturb(model)
    with torch.no_grad():
        expected = run(model)
    twin = copy.deepcopy(model)
    pt.eject(twin)
    assert_no_petl_traces(twin)
    with torch.no_grad():
        torch.testing.assert_close(run(model), expected, atol=0, rtol=0)
    twin2 = copy.deepcopy(model)
    pt.merge(twin2)
    with torch.no_grad():
        torch.testing.assert_close(run(twin2), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(model), expected, atol=0, rtol=0)
    pt.eject(model)
    assert_no_petl_traces(model)


def test_same_name_in_two_slots_of_one_site(clip):
    model, _, before = clip
    spec = pt.Spec.from_dict({"entries": [{"method": "adapter", "name": "x"},
                                          {"method": "adapter", "name": "x", "config": {"mode": "parallel"}}]})
    with pytest.raises(pt.SpecError, match="would both be stored as 'x'"):
        pt.inject(model, spec)
    assert_state_equal(before, model)
    assert_no_petl_traces(model)


def test_lora_alpha_with_learnable_scale_is_refused():
    with pytest.raises(pt.SpecError, match="alpha is unused"):
        pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"scaling": "learnable", "alpha": 16}}]})


def test_cli_reports_bad_input_without_traceback(capsys):
    from petl_tpr.cli import main

    assert main(["inspect", "no-such-preset", "--small"]) == 2
    err = capsys.readouterr().err
    assert "SpecError: unknown preset 'no-such-preset'" in err and "Traceback" not in err
