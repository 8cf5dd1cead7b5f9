"""Every preset on every architecture of the zoo: served, or refused with a clear error; never silent.

The table in docs/backbone_matrix.md (and tests/backbone_matrix.json) is what `python
tests/backbone_matrix.py` printed; this test runs the same classification and checks it: no
"SILENT" result anywhere, and every result as the table documents it (a newly refused case, or a
newly served one, means the docs need regenerating).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import petl_tpr as pt

import backbone_matrix
import backbone_zoo

TABLE = json.loads((Path(__file__).parent / "backbone_matrix.json").read_text())


@pytest.fixture(autouse=True)
def _quiet_transformers():
    try:
        import transformers
    except ImportError:
        yield
        return
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


@pytest.mark.parametrize("arch", sorted(backbone_zoo.ZOO))
def test_every_preset_is_served_or_refused_never_silent(arch):
    try:
        backbone_zoo.build(arch)
    except ImportError as error:
        pytest.skip(f"{arch} needs a package that is not installed: {error}")
    got = {preset: backbone_matrix.classify(arch, preset) for preset in backbone_matrix.PRESETS}
    silent = {p: detail for p, (status, detail) in got.items() if status == "SILENT"}
    assert not silent, f"{arch}: silently wrong: {silent}"
    documented = {p: r["status"] for p, r in TABLE[arch]["presets"].items()}
    assert {p: status for p, (status, _) in got.items()} == documented, \
        f"{arch}: results differ from docs/backbone_matrix.md; regenerate it with python tests/backbone_matrix.py"


def test_table_covers_the_zoo():
    assert set(TABLE) == set(backbone_zoo.ZOO)


def test_bypassed_projection_is_caught_at_first_forward_when_no_probe_can_see_it():
    """A block that reads its projection's weight itself, and whose attention cannot be called alone:
    the first forward raises, naming the sites, instead of training an adapter that never runs."""

    class Attention(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
            self.num_heads = 2

        def forward(self, hidden_states, position_embeddings):   # a required extra argument: no probe
            q = nn.functional.linear(hidden_states, self.q_proj.weight, self.q_proj.bias)   # bypasses q_proj()
            k, v = self.k_proj(hidden_states), self.v_proj(hidden_states)
            a = torch.softmax(q @ k.transpose(-1, -2) + position_embeddings, -1) @ v
            return self.out_proj(a), None

    class Layer(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.self_attn = Attention(d)
            self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.mlp = nn.Sequential()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            x = x + self.self_attn(self.layer_norm1(x), torch.zeros(x.shape[1], x.shape[1]))[0]
            return x + self.mlp.fc2(torch.relu(self.mlp.fc1(self.layer_norm2(x))))

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    pt.inject(model, pt.Spec.from_dict({"entries": [{"method": "lora", "config": {"rank": 2, "roles": ["q", "v"]}}]}))
    x = torch.randn(1, 3, 16)
    with pytest.raises(pt.InjectionError, match=r"layers\.0.*did not run.*lora.*layers\.0\.self_attn\.q_proj"):
        for layer in model.layers:
            x = layer(x)
    pt.eject(model)
    from conftest import assert_no_petl_traces
    assert_no_petl_traces(model)


def test_run_check_goes_once_every_block_ran():
    """After one forward through every block the checks remove their hooks: training carries none."""
    from petl_tpr.runcheck import pending_sites

    model, run = backbone_zoo.build("hf_clip")
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    pt.inject(model, "lora")
    assert pending_sites(model)
    with torch.no_grad():
        run(model)
    assert pending_sites(model) == {}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    sites = len(pt.api.get_injection(model).attachments)
    assert hooks - hooks_before == sites, "only the LoRA site hooks should remain"


def test_nested_tensor_encoder_keeps_its_zeros_at_padding():
    """nn.TransformerEncoder's default nested path returns zeros at padded positions; injected, it must too."""
    model, _ = backbone_zoo.build("torch_encoder_nested")
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        bare = model(x, src_key_padding_mask=pad)
    assert bare[1, 5:].abs().max() == 0, "the bare model is expected to take the nested path"
    pt.inject(model, "lora")    # identity at init; LoRA on in_proj_weight takes the attention over
    with torch.no_grad():
        torch.testing.assert_close(model(x, src_key_padding_mask=pad), bare, atol=1e-5, rtol=0)
    pt.eject(model)
    assert model.use_nested_tensor
