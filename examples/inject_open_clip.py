"""Put LoRA, UP-Person and DM-Adapter into an open_clip `CLIP` you already hold, one after another.

Run: python examples/inject_open_clip.py
     python examples/inject_open_clip.py --model ViT-B-16 --pretrained openai   # OpenAI weights
       (the tag needs the weights in the local open_clip / Hugging Face cache or network)
The default is a small randomly initialised open_clip CLIP (2 layers per tower, no download).
Prints, per preset: where the methods went (`report.describe()`), one checkpoint key (open_clip
keeps q, k, v fused in `in_proj_weight`, so LoRA sits on row slices of it), `pt.summary(model)`,
`pt.aux_loss(model)` after a forward (DM-Adapter's router load balancing; 0 for the others) and
the max |difference| to the original features after `pt.eject` (0).
"""

import argparse

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before open_clip on CPU-only torch

import open_clip  # noqa: E402
import torch  # noqa: E402

import petl_tpr as pt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", help="unused (kept so every example takes the same arguments)")
parser.add_argument("--model", default=None, help="open_clip architecture, e.g. ViT-B-16 (default: small random CLIP)")
parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file, e.g. openai")
parser.add_argument("--presets", nargs="+", default=["lora", "up-person", "dm-adapter"])
args = parser.parse_args()

torch.manual_seed(0)
if args.model:
    model = open_clip.create_model(args.model, pretrained=args.pretrained).eval()
else:
    vision = dict(image_size=64, patch_size=16, width=64, layers=2, head_width=32)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=dict(width=64, heads=2, layers=2)).eval()
images = torch.randn(2, 3, *model.visual.image_size)
ids = open_clip.get_tokenizer("ViT-B-16")(["a woman in a red jacket carrying a bag", "a man in grey trousers"])


def features(m):
    return torch.cat([m.encode_image(images), m.encode_text(ids)], dim=-1)


with torch.no_grad():
    original = features(model)
for preset in args.presets:
    report = pt.inject(model, preset)   # in place; every base parameter is frozen
    print(f"== {preset}\n{report.describe()}")
    keys = list(pt.adapter_state_dict(model))
    print(f"{len(keys)} adapter tensors, e.g. {keys[0]}")
    print(pt.summary(model))
    with torch.no_grad():
        out = features(model)
    print(f"forward: features {tuple(out.shape)}; aux_loss = {pt.aux_loss(model).item():.4f}")
    pt.eject(model)                     # back to the original modules and requires_grad flags
    with torch.no_grad():
        diff = (features(model) - original).abs().max().item()
    print(f"after eject: max |feature difference| to the original = {diff:.2e}\n")
