"""Full-size CLIP ViT-B/16 checks against REFERENCE.md's numbers (marked slow), and the quickstart."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import petl_tpr as pt
from petl_tpr.quickstart import build_clip_b16
from petl_tpr.quickstart import run as run_quickstart

CLIP_B16_PARAMS = 149_620_737
UP_PERSON_PARTS = {"s_prefix": 307_272, "lora": 1_966_128, "l_adapter": 5_146_416}  # REFERENCE.md sec. 1


def _open_clip_b16():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None)


@pytest.mark.slow
@pytest.mark.parametrize("build", [build_clip_b16, _open_clip_b16], ids=["transformers", "open_clip"])
def test_up_person_counts(build):
    model = build()
    assert sum(p.numel() for p in model.parameters()) == CLIP_B16_PARAMS
    pt.inject(model, "up-person")
    s = pt.summary(model)
    assert s.by_method() == UP_PERSON_PARTS
    assert s.trainable == 7_419_816 and f"{s.percent:.1f}%" == "4.7%"
    assert s.frozen == CLIP_B16_PARAMS
    assert s.by_branch() == {"vision": 184_356 + 1_179_672 + 3_559_704, "text": 122_916 + 786_456 + 1_586_712}


@pytest.mark.slow
def test_quickstart_cli_full_size(tmp_path):
    done = subprocess.run([sys.executable, "-m", "petl_tpr", "quickstart", "--out", str(tmp_path), "--batch", "2"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7,419,816" in done.stdout and "4.72%" in done.stdout and "-> OK" in done.stdout
    assert (tmp_path / "up_person.safetensors").is_file()


def test_quickstart_small_reloads_exactly(tmp_path):
    lines = []
    diff = run_quickstart(tmp_path, batch=2, small=True, log=lines.append)
    assert diff <= 1e-5
    assert any("-> OK" in line for line in lines)


def test_cli_presets_and_inspect(capsys):
    from petl_tpr.cli import main

    assert main(["presets"]) == 0
    assert "up-person:rstpreid" in capsys.readouterr().out
    assert main(["inspect", "l-adapter", "--small"]) == 0
    out = capsys.readouterr().out
    assert "l_adapter" in out and "percent" in out


@pytest.mark.slow
@pytest.mark.parametrize("build", [build_clip_b16, _open_clip_b16], ids=["transformers", "open_clip"])
def test_unipt_counts_and_forward(build):
    """m = 512: per tap Linear(D, 512); anchor, gate, output; 13 taps (embedding output + 12 blocks)."""
    model = build().eval()
    pt.inject(model, "unipt")
    s = pt.summary(model)
    vision = 13 * (768 * 512 + 512) + (768 * 512 + 512) + 513 + (512 * 768 + 768)
    text = 13 * (512 * 512 + 512) + (512 * 512 + 512) + 513 + (512 * 512 + 512)
    assert s.by_branch() == {"vision": vision, "text": text} and s.trainable == 9_847_042
    image, ids = torch.randn(1, 3, 224, 224), torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        if hasattr(model, "encode_image"):
            features = [model.encode_image(image), model.encode_text(ids)]
        else:
            out = model(pixel_values=image, input_ids=ids)
            features = [out.image_embeds, out.text_embeds]
    assert all(torch.isfinite(f).all() and f.shape == (1, 512) for f in features)
