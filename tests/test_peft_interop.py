"""LoRA against PEFT's own LoRA on a tiny transformers CLIP, and export to PEFT's adapter format."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import petl_tpr as pt
from petl_tpr.compat import ensure_torchvision_importable
from petl_tpr.errors import InjectionError
from petl_tpr.interop.peft import export_peft
from petl_tpr.registry import FAMILIES

ensure_torchvision_importable()
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

ATOL = 1e-5


def lora_entry(**config):
    alpha = {} if config.get("scaling") == "learnable" else {"alpha": 8}
    return {"method": "lora", "config": {"rank": 4, **alpha, "roles": ["q", "v"], **config}}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return FAMILIES["hf_clip"].example()


def perturb(model, seed=1):
    """Fill every adapter tensor with noise so that LoRA's delta is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in pt.adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(peft_model):
    """{module path in the base model: PEFT LoraLayer}."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def test_lora_matches_peft_lora(clip):
    base, run = clip
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
    pt.inject(ours, pt.Spec([lora_entry()]))
    layers = lora_modules(theirs)
    state = pt.adapter_state_dict(ours)
    assert len(layers) == 8 and 2 * len(layers) == len(state)
    g = torch.Generator().manual_seed(2)
    for path, layer in layers.items():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
        state[f"{path}.lora.lora_a"].copy_(layer.lora_A["default"].weight)
        state[f"{path}.lora.lora_b"].copy_(layer.lora_B["default"].weight)
    expected = run(theirs)
    assert not torch.allclose(expected, run(base), atol=1e-3)
    torch.testing.assert_close(run(ours), expected, atol=ATOL, rtol=0)
    assert trainable(ours) == trainable(theirs) == 8 * (4 * 32 + 32 * 4)


def export_and_load(model, base, directory, **kwargs):
    export_peft(model, directory, **kwargs)
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)


@pytest.mark.parametrize("config", [{}, {"scaling": "learnable", "init_scale": 0.7}],
                         ids=["alpha_over_r", "learnable_scale"])
@torch.no_grad()
def test_export_round_trip(clip, tmp_path, config):
    base, run = clip
    model = copy.deepcopy(base)
    pt.inject(model, pt.Spec([lora_entry(**config)]))
    perturb(model)
    expected = run(model)
    assert not torch.allclose(expected, run(base), atol=1e-3)
    loaded = export_and_load(model, base, tmp_path)
    torch.testing.assert_close(run(loaded), expected, atol=ATOL, rtol=0)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == ((4, 8) if not config else (4, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@torch.no_grad()
def test_export_mixed_ranks_uses_patterns(clip, tmp_path):
    base, run = clip
    model = copy.deepcopy(base)
    pt.inject(model, pt.Spec([
        {"method": "lora", "name": "lora_q", "config": {"rank": 4, "alpha": 8, "roles": ["q"]},
         "where": {"branches": ["vision"]}},
        {"method": "lora", "name": "lora_mix", "config": {"rank": 2, "scaling": "learnable", "init_scale": 1.5,
                                                          "roles": ["v", "fc1"]}, "where": {"layers": [1]}},
    ]))
    perturb(model, seed=3)
    loaded = export_and_load(model, base, tmp_path)
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] and written["alpha_pattern"]
    expected_paths = {att.owner for att in pt.api.get_injection(model).attachments}
    assert set(lora_modules(loaded)) == expected_paths and len(expected_paths) == 6


def test_export_refuses_fused_in_proj(tmp_path):
    model, _ = FAMILIES["open_clip"].example()
    pt.inject(model, pt.Spec([lora_entry(roles=["q"])]))
    with pytest.raises(InjectionError, match=r"in_proj_weight rows 0:32"):
        export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


@torch.no_grad()
def test_export_refuses_other_methods_unless_ignored(clip, tmp_path):
    base, run = clip
    model = copy.deepcopy(base)
    pt.inject(model, pt.Spec([lora_entry(), {"method": "l-adapter", "config": {"reduction": 4}}]))
    with pytest.raises(InjectionError, match="l-adapter"):
        export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())
    perturb(model)  # leaves the L-Adapter's up projection non-zero too
    for key, tensor in pt.adapter_state_dict(model).items():
        if ".l_adapter." in key:
            tensor.zero_()  # so outputs equal those of the LoRA part alone
    loaded = export_and_load(model, base, tmp_path, ignore_other_methods=True)
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)


@torch.no_grad()
def test_export_one_named_set_of_several(clip, tmp_path):
    """PEFT's LoRA of set b gives what the model gives with set b active; without a name it is refused."""
    base, run = clip
    model = copy.deepcopy(base)
    pt.inject(model, pt.Spec([lora_entry()]), name="a")
    pt.inject(model, pt.Spec([lora_entry(rank=2)]), name="b")
    perturb(model)
    pt.activate(model, "b")
    expected = run(model)
    with pytest.raises(InjectionError, match="name="):
        export_peft(model, tmp_path / "x")
    loaded = export_and_load(model, base, tmp_path / "b", name="b")
    torch.testing.assert_close(run(loaded), expected, atol=ATOL, rtol=0)
    pt.activate(model, "a")
    assert not torch.allclose(run(model), expected, atol=1e-3)
