"""Put UP-Person, DM-Adapter and UniPT into a transformers `CLIPModel` you already hold, one after another.

Run: python examples/inject_transformers_clip.py
     python examples/inject_transformers_clip.py --backbone openai/clip-vit-base-patch16   # pretrained
       (a hub name needs the weights in the local Hugging Face cache or network; a saved folder works too)
The default is a small randomly initialised CLIP (2 layers per tower, no download).
Prints, per preset: `pt.summary(model)` (trainable parameters per tower and method), the feature
shapes of a forward pass, `pt.aux_loss(model)` (DM-Adapter's router load balancing; 0 for the
others), and the max |difference| to the original features after `pt.eject` (0).
"""

import argparse

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers on CPU-only torch

import torch  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

import petl_tpr as pt  # noqa: E402
from petl_tpr.tpr import ClipTokenizer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", help="unused (kept so every example takes the same arguments)")
parser.add_argument("--backbone", default=None, help="transformers CLIP name or folder (default: small random CLIP)")
parser.add_argument("--presets", nargs="+", default=["up-person", "dm-adapter", "unipt"])
args = parser.parse_args()

torch.manual_seed(0)
if args.backbone:
    model = CLIPModel.from_pretrained(args.backbone).eval()
else:
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = CLIPModel(CLIPConfig(vision_config=dict(small, image_size=64, patch_size=16),
                                 text_config=small, projection_dim=32)).eval()
size = model.config.vision_config.image_size
images = torch.randn(2, 3, size, size)
ids = ClipTokenizer(mask_token=False)(["a woman in a red jacket carrying a bag", "a man in grey trousers"])


def features(m):
    out = m(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=images)
    return out.image_embeds, out.text_embeds


with torch.no_grad():
    original = torch.cat(features(model), dim=-1)
for preset in args.presets:
    pt.inject(model, preset)            # in place; every base parameter is frozen
    print(f"== {preset}\n{pt.summary(model)}")
    image, text = features(model)       # with grad: only adapter parameters receive it
    loss = -(torch.nn.functional.cosine_similarity(image, text).mean()) + pt.aux_loss(model)
    loss.backward()
    grads = [(p.requires_grad, p.grad is not None) for p in model.parameters()]
    print(f"forward: image {tuple(image.shape)}, text {tuple(text.shape)}; aux_loss = {pt.aux_loss(model).item():.4f}")
    print(f"backward: {sum(t and g for t, g in grads)} of {sum(t for t, _ in grads)} trainable tensors got a "
          f"gradient, frozen tensors with one: {sum(g and not t for t, g in grads)}")
    pt.eject(model)                     # back to the original modules and requires_grad flags
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        diff = (torch.cat(features(model), dim=-1) - original).abs().max().item()
    print(f"after eject: max |feature difference| to the original = {diff:.2e}\n")
