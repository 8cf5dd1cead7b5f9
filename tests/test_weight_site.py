"""LoRA attached at the weight, where the parent reads a projection's weight instead of calling it (timm EVA, BEiT).

Every check compares with something that does not go through the weight property: the model's own
forward before injection, the merged weights, a fresh model loaded from the file.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import petl_tpr as pt
from petl_tpr.runcheck import pending_keys

from backbone_zoo import build
from conftest import assert_no_petl_traces, assert_state_equal, perturb, state_snapshot

ARCHS = ["timm_eva02", "timm_beit"]


@pytest.mark.parametrize("name", ARCHS)
def test_lora_at_the_weight_acts_trains_merges_and_ejects(name):
    model, run = build(name)
    snapshot = state_snapshot(model)
    with torch.no_grad():
        bare = run(model)
    pt.inject(model, "lora")
    slots = {a.slot for a in pt.api.get_injection(model).attachments}
    assert slots == {"weight"}, "timm's EVA/BEiT attention reads qkv.weight: the delta goes to the weight"
    with torch.no_grad():
        assert torch.equal(run(model), bare), "an untrained LoRA leaves the outputs as they were"
    assert not pending_keys(model), "reading the weight property marks the deltas as run"
    perturb(model)
    with torch.no_grad():
        adapted = run(model)
    assert (adapted - bare).abs().max() > 1e-4
    run(model).square().sum().backward()
    params = pt.api.adapter_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for n, p in model.named_parameters() if id(p) not in {id(q) for q in params.values()})
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items()), "the base weights themselves are untouched"
    twin = copy.deepcopy(model)
    pt.merge(twin)
    with torch.no_grad():
        torch.testing.assert_close(run(twin), adapted, atol=1e-5, rtol=1e-5)
    pt.eject(model)
    assert_no_petl_traces(model)
    assert_state_equal(snapshot, model)
    with torch.no_grad():
        assert torch.equal(run(model), bare)


def test_weight_deltas_save_load_pickle_and_refuse_per_sample(tmp_path):
    model, run = build("timm_eva02")
    pt.inject(model, "lora", name="a")
    perturb(model)
    with torch.no_grad():
        expected = run(model)
    path = pt.save_adapters(model, tmp_path / "a.safetensors")
    fresh, _ = build("timm_eva02")
    pt.load_adapters(fresh, path)
    with torch.no_grad():
        assert torch.equal(run(fresh), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(run(torch.load(buffer, weights_only=False)), expected)
    pt.inject(model, "lora", name="b")
    with pytest.raises(pt.InjectionError, match="weight its parent reads"):
        with pt.per_sample(model, ["a", "b"]):
            pass
    pt.activate(model, "b")
    with torch.no_grad():
        assert not torch.equal(run(model), expected), "only the active set's delta is in the weight"
        pt.activate(model, "a")
        assert torch.equal(run(model), expected)
