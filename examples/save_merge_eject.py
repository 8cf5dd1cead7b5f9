"""Train-side and deploy-side life of an adapter: save, load into a fresh model, merge LoRA, eject.

Run: python examples/save_merge_eject.py [OUT_DIR]
"""

import sys
from pathlib import Path

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()

import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

import petl_tpr as pt  # noqa: E402


def build():
    torch.manual_seed(0)   # same base weights every time, as from_pretrained would give
    return CLIPModel(CLIPConfig(vision_config=dict(patch_size=16, num_hidden_layers=2),
                                text_config=dict(num_hidden_layers=2))).eval()


out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example")
images, tokens = torch.randn(2, 3, 224, 224), torch.randint(1, 49000, (2, 16))


def image_features(m):
    return m(input_ids=tokens, pixel_values=images).image_embeds


model = build()
pt.inject(model, pt.Spec.preset("up-person"))
with torch.no_grad():                       # stand-in for training: move the adapters off zero
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.01)
    trained = image_features(model)
path = pt.save_adapters(model, out / "adapters.safetensors")
print(f"saved {len(pt.adapter_state_dict(model))} adapter tensors to {path}")

fresh = pt.load_adapters(build(), path)      # injects the stored spec, then loads
with torch.no_grad():
    print("reloaded max diff:", (image_features(fresh) - trained).abs().max().item())
    print("merged:", len(pt.merge(fresh)), "LoRA deltas folded into base weights")
    print("merged max diff:", (image_features(fresh) - trained).abs().max().item())
pt.eject(fresh)                              # S-Prefix and L-Adapters removed too; merged weights stay merged
print("after eject:", len(pt.adapter_state_dict(fresh)), "adapter tensors left; requires_grad flags as before inject")
