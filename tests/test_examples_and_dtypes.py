"""The example scripts run as shipped; adapters work on half-precision backbones; aux_loss is 0 without routers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import petl_tpr as pt

from conftest import family_example, perturb

# serve_several_domains.py runs at full length in its own test (which also checks its results)
EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.py")
                  if p.name != "serve_several_domains.py")


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script, tmp_path):
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()


@pytest.mark.parametrize("family", ["hf_clip", "hf_bert"])  # these cast their float inputs themselves
def test_half_precision_backbone_with_fp32_adapters(family):
    model, run = family_example(family)
    model.to(torch.bfloat16)
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"roles": ["q", "v", "fc1"]}},
                                                    {"method": "l-adapter"}]}))
    params = pt.api.adapter_parameters(model)
    assert {p.dtype for p in params.values()} == {torch.float32}
    perturb(model)
    out = run(model)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())


def test_aux_loss_is_zero_without_routers():
    model, _ = family_example("torch_mha")
    assert pt.aux_loss(model).item() == 0.0
    pt.inject(model, "l-adapter")
    loss = pt.aux_loss(model)
    assert loss.shape == () and loss.item() == 0.0
