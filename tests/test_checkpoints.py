"""Adapter-only safetensors files: contents, every refusal, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import petl_tpr as pt
import petl_tpr.io as pio

from conftest import assert_no_petl_traces, assert_state_equal, family_example, perturb, state_snapshot


def _spec(**config):
    return pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"rank": 4, **config}}, {"method": "l-adapter"}]})


@pytest.fixture
def saved(tmp_path):
    model, run = family_example("hf_clip")
    pt.inject(model, _spec())
    perturb(model)
    return model, pt.save_adapters(model, tmp_path / "a.safetensors")


def test_file_holds_only_adapter_tensors_and_metadata(saved):
    model, path = saved
    with safe_open(str(path), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert keys == set(pt.adapter_state_dict(model))
    assert "vision_model.encoder.layers.0.self_attn.q_proj.lora.lora_a" in keys
    assert "text_model.encoder.layers.1.layer_norm2.l_adapter.ladapter_up_weight" in keys
    assert not any(k.endswith(".weight") and "ladapter" not in k for k in keys)
    assert meta["format"] == "petl_tpr.adapters" and meta["format_version"] == "1"
    assert pt.Spec.from_json(meta["spec"]) == pt.api.get_injection(model).spec
    assert json.loads(meta["backbone"])["vision"] == {"family": "hf_clip", "layers": 2, "dim": 32}


def test_load_into_model_that_already_has_the_adapters(saved):
    model, path = saved
    other, run = family_example("hf_clip")
    pt.inject(other, _spec())
    pt.load_adapters(other, path)
    with torch.no_grad():
        torch.testing.assert_close(run(other), run(model), atol=0, rtol=0)


def _refused(path, fragment, family="hf_clip", spec=None):
    model, _ = family_example(family)
    if spec is not None:
        pt.inject(model, spec)
    before = state_snapshot(model)
    had = pt.api.get_injection(model)
    with pytest.raises(pt.CheckpointError) as info:
        pt.load_adapters(model, path)
    assert fragment in str(info.value), str(info.value)
    assert_state_equal(before, model)
    if had is None:
        assert_no_petl_traces(model)
    return str(info.value)


def test_shape_mismatch_names_tensor_and_both_shapes(saved):
    _, path = saved
    message = _refused(path, "has shape (4, 32) in the file but (8, 32) in the model", spec=_spec(rank=8))
    assert "lora_a" in message


def test_key_mismatch(saved):
    _, path = saved
    _refused(path, "has no matching adapter parameter", spec=_spec(roles=["k"]))


def test_backbone_mismatch(saved):
    _, path = saved
    message = _refused(path, "when saved but is", family="hf_bert")
    assert "'family': 'hf_clip'" in message and "'family': 'hf_bert'" in message


def test_other_format_version(saved, tmp_path):
    _, path = saved
    tensors, meta = pio.read_adapters(path)
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "format_version": "9"})
    _refused(tmp_path / "v9.safetensors", "format version '9'")


def test_foreign_safetensors_file(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    _refused(tmp_path / "x.safetensors", "not a petl_tpr adapter file")


def test_not_safetensors_and_truncated(saved, tmp_path):
    _, path = saved
    (tmp_path / "junk.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    _refused(tmp_path / "junk.safetensors", "not a readable safetensors file")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.safetensors", "not a readable safetensors file")
    _refused(tmp_path / "missing.safetensors", "no such file")


def test_crash_mid_save_keeps_previous_file(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(pio, "save_file", crash)
    perturb(model, seed=3)
    with pytest.raises(KeyboardInterrupt):
        pt.save_adapters(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_save_without_adapters_is_refused(tmp_path):
    model, _ = family_example("hf_clip")
    with pytest.raises(pt.CheckpointError, match="no adapters"):
        pt.save_adapters(model, tmp_path / "x.safetensors")


def test_save_after_merge_keeps_only_unmerged_entries(tmp_path):
    model, run = family_example("timm_vit")
    pt.inject(model, _spec())
    perturb(model)
    pt.merge(model)
    path = pt.save_adapters(model, tmp_path / "m.safetensors")
    tensors, meta = pio.read_adapters(path)
    assert all(".l_adapter." in k for k in tensors)
    assert [e.method for e in pt.Spec.from_json(meta["spec"]).entries] == ["l-adapter"]
    assert json.loads(meta["merged_entries"]) == ["lora"]


def test_save_after_merging_everything_is_refused(tmp_path):
    model, _ = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora"}]}))
    pt.merge(model)
    with pytest.raises(pt.CheckpointError, match="nothing adapter-only left"):
        pt.save_adapters(model, tmp_path / "x.safetensors")


def test_merge_then_inject_same_name_saves_and_reloads(tmp_path):
    model, run = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"roles": ["q"]}}]}))
    perturb(model)
    pt.merge(model)
    merged_base = state_snapshot(model)
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"roles": ["v"]}}]}))
    perturb(model, seed=1)
    path = pt.save_adapters(model, tmp_path / "m.safetensors")
    fresh, _ = family_example("hf_clip")
    fresh.load_state_dict({k: v for k, v in merged_base.items()})
    pt.load_adapters(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh), run(model), atol=0, rtol=0)


def test_extra_metadata_cannot_overwrite_reserved_keys(saved, tmp_path):
    model, _ = saved
    with pytest.raises(pt.CheckpointError, match="reserved"):
        pt.save_adapters(model, tmp_path / "e.safetensors", extra={"spec": "{}"})
    path = pt.save_adapters(model, tmp_path / "e.safetensors", extra={"run": "cuhk-1"})
    assert pio.read_adapters(path)[1]["run"] == "cuhk-1"


def test_merge_again_after_everything_was_merged():
    model, run = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora"}]}))
    perturb(model)
    assert pt.merge(model)
    with torch.no_grad():
        merged = run(model)
        assert pt.merge(model) == []
        assert torch.equal(run(model), merged)
