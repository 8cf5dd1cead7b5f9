"""Fold trained LoRA into the base weights and ship a plain model that needs no petl_tpr to run.

Run: python examples/merge_lora_for_deployment.py [OUT_DIR]
       (add --backbone openai/clip-vit-base-patch16, or a local transformers CLIP folder, to start
        from pretrained weights; the default is a small randomly initialised CLIP, no download)
Prints the parameter counts before/after merge, the max |difference| of the merged model's
features against the unmerged ones (about 1e-6 in fp32), and the max |difference| after
`save_pretrained` / `CLIPModel.from_pretrained` into a plain model, against the merged one (0).
"""

import argparse
import tempfile
from pathlib import Path

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers on CPU-only torch

import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

import petl_tpr as pt  # noqa: E402

TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
SMALL = CLIPConfig(vision_config=dict(TOWER, image_size=64, patch_size=16), text_config=TOWER, projection_dim=32)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", default=None, help="where the merged model is saved (default: a temp dir)")
parser.add_argument("--backbone", default=None, help="transformers CLIP name or folder (default: SMALL, random)")
args = parser.parse_args()

torch.manual_seed(0)
model = (CLIPModel.from_pretrained(args.backbone) if args.backbone else CLIPModel(SMALL)).eval()
bare = sum(p.numel() for p in model.parameters())
size = model.config.vision_config.image_size
images, tokens = torch.randn(2, 3, size, size), torch.randint(1, 49000, (2, 16))


@torch.no_grad()
def features(m):
    out = m(input_ids=tokens, pixel_values=images)
    return torch.cat([out.image_embeds, out.text_embeds], dim=-1)


pt.inject(model, pt.Spec.preset("lora").replace_config("lora", rank=8, alpha=16))
with torch.no_grad():      # stand-in for training: LoRA's B starts at zero, so move it off zero
    for p in filter(lambda p: p.requires_grad, model.parameters()):   # the adapters (inject froze the rest)
        p.add_(torch.randn_like(p) * 0.02)
trained = features(model)
print(f"bare model {bare:,} parameters; with LoRA {sum(p.numel() for p in model.parameters()):,}")

merged = pt.merge(model)   # W <- W + scale * B @ A at every site; the LoRA modules are removed
pt.eject(model)            # nothing else was attached: restores requires_grad, keeps the merged weights
deployed = features(model)
print(f"merged {len(merged)} LoRA deltas; parameters now {sum(p.numel() for p in model.parameters()):,} "
      f"(bare model: {bare:,})")
print(f"merged vs unmerged: max |feature difference| = {(deployed - trained).abs().max().item():.2e}")

with tempfile.TemporaryDirectory() as tmp:        # removed at the end unless OUT_DIR was given
    out = Path(args.out or tmp) / "clip-merged"
    model.save_pretrained(out)                       # the library's own format: config.json + model.safetensors
    plain = CLIPModel.from_pretrained(out).eval()    # a stock CLIPModel: no adapters, no petl_tpr modules
foreign = [type(m).__name__ for m in plain.modules() if type(m).__module__.startswith("petl_tpr")]
print(f"reloaded from {out}: petl_tpr modules in it: {len(foreign)}; "
      f"max |feature difference| vs merged = {(features(plain) - deployed).abs().max().item():.2e}")
