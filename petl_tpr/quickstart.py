"""The main job until the retrieval demo exists: UP-Person's LoRA + L-Adapter on CLIP ViT-B/16.

Builds a CLIP ViT-B/16 from its transformers config (random weights, no download), injects the
`up-person` preset (its S-Prefix part is left out until that method lands), prints the
trainable-parameter table, runs one training step on 384x128 images and 77-token captions with
a symmetric contrastive loss, saves the adapters, loads them into a freshly built model and checks
that both give the same features.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .api import inject
from .backbones.discover import discover
from .io import load_adapters, save_adapters
from .spec import Spec
from .summary import summary


def build_clip_b16(seed: int = 0, *, small: bool = False) -> torch.nn.Module:
    """transformers CLIPModel with ViT-B/16 sizes (or a 2-layer model when `small`), random weights."""
    from .compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    vision, text = dict(patch_size=16), {}
    if small:
        vision.update(num_hidden_layers=2)
        text.update(num_hidden_layers=2)
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text))


def _batch(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 384, 128, generator=g)
    ids = torch.randint(1, 49405, (batch, 77), generator=g)
    lengths = torch.randint(8, 77, (batch,), generator=g)
    mask = torch.arange(77)[None] < lengths[:, None]
    ids[:, 0] = 49406
    ids[torch.arange(batch), lengths - 1] = 49407
    ids = ids.masked_fill(~mask, 0)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask.long()}


def features(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text features `(B, 512)` each, at 384x128 (position embedding interpolated)."""
    out = model(**batch, interpolate_pos_encoding=True)
    return F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)


def run(out_dir: str | Path = "runs/quickstart", *, batch: int = 4, small: bool = False, log=print) -> float:
    """Run the quickstart; returns the max abs difference between saved and reloaded features."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    log(f"[1/5] building CLIP ViT-B/16 from config ({'2 layers' if small else 'full size'}, random weights)")
    model = build_clip_b16(small=small)
    log("      " + discover(model).describe())
    spec = Spec.preset("up-person")
    log("[2/5] injecting up-person (S-Prefix L=10, LoRA k/v r=32 with learnable scale, L-Adapter d/8) into both towers")
    inject(model, spec)
    log(summary(model).table())
    log(f"[3/5] one training step, batch {batch}, 384x128 images, 77-token captions")
    data = _batch(batch, seed=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-3)
    model.train()
    step_t = time.perf_counter()
    image, text = features(model, data)
    logits = text @ image.T / 0.02
    target = torch.arange(batch)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    loss.backward()
    optimizer.step()
    log(f"      loss {loss.item():.4f}, step {time.perf_counter() - step_t:.1f} s")
    model.eval()
    path = save_adapters(model, out_dir / "up_person.safetensors")
    log(f"[4/5] saved adapters to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    fresh = build_clip_b16(small=small).eval()
    load_adapters(fresh, path)
    check = _batch(2, seed=2)
    with torch.no_grad():
        a, b = features(model, check), features(fresh, check)
    diff = max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
    verdict = "OK" if diff <= 1e-5 else "MISMATCH"
    log(f"[5/5] reloaded into a fresh model: max |feature difference| = {diff:.2e} -> {verdict}")
    log(f"done in {time.perf_counter() - t0:.1f} s")
    if verdict != "OK":
        raise SystemExit(f"reloaded adapters give different features (max difference {diff:.2e})")
    return diff
