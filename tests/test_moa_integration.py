"""The mixture-of-adapters inside models: where it reads, its aux loss, its errors, the preset."""

from __future__ import annotations

import pytest
import torch

import petl_tpr as pt
from petl_tpr.backbones import discover
from petl_tpr.kernels import RoutingError

from conftest import family_example, perturb

MOA = {"entries": [{"method": "moa", "config": {"experts": 3, "top_k": 2, "width": 4}}]}


@pytest.mark.parametrize("family", ["hf_clip", "open_clip", "timm_vit", "torch_mha", "hf_bert"])
def test_reads_the_residual_stream_entering_the_mlp(family):
    """Pre-norm: the input of norm2 (x', not LN2(x')). Post-norm BERT: the input of the MLP."""
    model, run = family_example(family)
    pt.inject(model, pt.Spec.from_dict(MOA))
    block = discover(model).blocks()[0]
    layout = block.layout
    pre_norm = layout.pre_norm(model.get_submodule(block.path))
    stream_module = model.get_submodule(block.module_path(layout.norm2 if pre_norm else layout.mlp_in))
    att = next(a for a in pt.api.get_injection(model).attachments if a.key == block.module_path(layout.mlp_out))
    moa = pt.api.adapter_module(model, att)
    seen = {}
    stream_module.register_forward_pre_hook(lambda m, args: seen.setdefault("stream", args[0]))
    moa.register_forward_pre_hook(lambda m, args: seen.setdefault("moa", args[0]))
    with torch.no_grad():
        run(model)
    assert pre_norm == (family != "hf_bert")
    torch.testing.assert_close(seen["moa"], seen["stream"], atol=0, rtol=0)


def test_aux_loss_sums_the_layers_of_the_last_forward():
    model, run = family_example("hf_clip")
    pt.inject(model, pt.Spec.from_dict(MOA))
    perturb(model)
    assert float(pt.aux_loss(model)) == 0.0
    run(model)
    modules = [pt.api.adapter_module(model, a) for a in pt.api.get_injection(model).attachments]
    assert len(modules) == 4
    total = pt.aux_loss(model)
    torch.testing.assert_close(total, sum(m.aux_loss() for m in modules))
    assert total.requires_grad and total > 0
    total.backward()
    assert all(m.moa_router_in.grad is not None for m in modules if hasattr(m, "moa_router_in"))


def test_nan_router_input_names_the_site():
    model, run = family_example("timm_vit")
    pt.inject(model, pt.Spec.from_dict(MOA))
    with torch.no_grad():
        model.blocks[1].norm1.weight.fill_(float("nan"))
    with pytest.raises(RoutingError, match=r"^blocks\.1\.mlp: .*(NaN|nan)"):
        with torch.no_grad():
            run(model)


@pytest.mark.slow
@pytest.mark.parametrize("builder", ["transformers", "open_clip"])
def test_dm_adapter_preset_count(builder):
    if builder == "transformers":
        from petl_tpr.quickstart import build_clip_b16

        model = build_clip_b16()
    else:
        import open_clip

        model = open_clip.create_model("ViT-B-16", pretrained=None)
    pt.inject(model, "dm-adapter")
    s = pt.summary(model)
    assert s.trainable == 15_669_528                              # REFERENCE.md sec. 2
    assert s.by_branch() == {"vision": 12 * 901_441, "text": 12 * 404_353}
