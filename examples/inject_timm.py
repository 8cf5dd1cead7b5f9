"""Put LoRA, DM-Adapter and UniPT into a timm ViT you already hold (one tower: `vision`).

Run: python examples/inject_timm.py
     python examples/inject_timm.py --model vit_base_patch16_224 --pretrained   # ImageNet weights
       (needs the weights in the local timm / Hugging Face cache or network)
The default is timm's `vit_tiny_patch16_224` with random weights (no download).
Prints, per preset: `pt.summary(model)`, the logits' shape and `pt.aux_loss(model)` after a
forward (DM-Adapter's router load balancing; 0 for the others), and whether the state dict after
`pt.eject` equals the original bit for bit (True).
"""

import argparse

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before timm on CPU-only torch

import timm  # noqa: E402
import torch  # noqa: E402

import petl_tpr as pt  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", nargs="?", help="unused (kept so every example takes the same arguments)")
parser.add_argument("--model", default="vit_tiny_patch16_224", help="any timm ViT, e.g. vit_base_patch16_224")
parser.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
parser.add_argument("--presets", nargs="+", default=["lora", "dm-adapter", "unipt"])
args = parser.parse_args()


torch.manual_seed(0)
model = timm.create_model(args.model, pretrained=args.pretrained).eval()
print(pt.backbones.discover(model).describe())
images = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
for preset in args.presets:
    pt.inject(model, preset)   # in place; presets apply to every branch there is (here the one ViT stack)
    print(f"== {preset}\n{pt.summary(model)}")
    with torch.no_grad():
        logits = model(images)
    print(f"forward: logits {tuple(logits.shape)}; aux_loss = {pt.aux_loss(model).item():.4f}")
    pt.eject(model)                        # back to the original modules and requires_grad flags
    state = model.state_dict()             # no adapter keys left, every base tensor untouched
    same = state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
    print(f"after eject: state_dict equal to the original, bit for bit: {same} ({len(state)} tensors)\n")
