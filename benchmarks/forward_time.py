"""Forward time of CLIP ViT-B/16 (384x128 images, 77-token text) with PETL methods vs the bare model.

Every variant is a copy of the same randomly initialised model; all are timed round-robin in one
run, so the ratios compare like with like. Variants: the bare backbone, `up-person` (S-Prefix +
LoRA + L-Adapter), `up-person` with LoRA merged (what the LoRA hooks cost), LoRA alone, vanilla
prefix (L = 10) and S-Prefix (L = 10).

    python benchmarks/forward_time.py                 # full size, both builds, CPU or the GPU
    python benchmarks/forward_time.py --quick         # 2-layer models, smoke run

Writes benchmarks/results/forward_time_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_bars, time_interleaved, timing_arguments, write_json  # noqa: E402

import petl_tpr as pt  # noqa: E402
from petl_tpr.compat import ensure_torchvision_importable  # noqa: E402

VARIANTS: dict[str, Callable[[torch.nn.Module], None]] = {
    "bare": lambda m: None,
    "up-person": lambda m: pt.inject(m, "up-person"),
    "up-person (LoRA merged)": lambda m: (pt.inject(m, "up-person"), pt.merge(m)),
    "lora k,v r=32": lambda m: pt.inject(m, pt.Spec.preset("up-person").without("s-prefix", "l-adapter")),
    "prefix L=10": lambda m: pt.inject(m, pt.Spec.from_dict({"entries": [{"method": "prefix", "config": {"length": 10}}]})),
    "s-prefix L=10": lambda m: pt.inject(m, "s-prefix"),
}
RATIOS = [("up-person", "bare"), ("up-person (LoRA merged)", "bare"), ("lora k,v r=32", "bare"),
          ("s-prefix L=10", "prefix L=10"), ("prefix L=10", "bare"), ("s-prefix L=10", "bare")]


def build(backbone: str, small: bool) -> tuple[torch.nn.Module, Callable]:
    """(model, forward(model, images, tokens)) for a CLIP ViT-B/16 at 384x128, random weights."""
    ensure_torchvision_importable()
    torch.manual_seed(0)
    layers = 2 if small else 12
    if backbone == "transformers":
        from transformers import CLIPConfig, CLIPModel

        model = CLIPModel(CLIPConfig(vision_config=dict(patch_size=16, num_hidden_layers=layers, image_size=224),
                                     text_config=dict(num_hidden_layers=layers)))

        def forward(m, images, tokens):
            out = m(pixel_values=images, input_ids=tokens, attention_mask=(tokens > 0).long(),
                    interpolate_pos_encoding=True)
            return out.image_embeds, out.text_embeds
    else:
        import open_clip

        model = open_clip.CLIP(embed_dim=512, vision_cfg=dict(layers=layers, width=768, patch_size=16,
                                                              image_size=(384, 128)),
                               text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=layers))

        def forward(m, images, tokens):
            return m.encode_image(images), m.encode_text(tokens)
    return model.eval(), forward


def inputs(batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 384, 128, generator=g)
    tokens = torch.randint(1, 49405, (batch, 77), generator=g)
    lengths = torch.randint(8, 77, (batch,), generator=g)
    tokens[:, 0] = 49406
    tokens[torch.arange(batch), lengths - 1] = 49407
    tokens = tokens.masked_fill(torch.arange(77)[None] >= lengths[:, None], 0)
    return images.to(device), tokens.to(device)


def measure(backbone: str, args) -> dict[str, object]:
    base, forward = build(backbone, args.quick)
    images, tokens = inputs(args.batch, args.device)
    models = {}
    for name, setup in VARIANTS.items():
        model = copy.deepcopy(base)
        setup(model)
        models[name] = model.to(args.device).eval()
    trainable = {name: pt.summary(m).trainable if name != "bare" else 0 for name, m in models.items()}

    def case(model):
        def run():
            with torch.no_grad():
                forward(model, images, tokens)
        return run

    print(f"[{backbone}] timing {len(models)} variants, batch {args.batch}, {args.repeats} repeats", flush=True)
    times = time_interleaved({n: case(m) for n, m in models.items()}, repeats=args.repeats, device=args.device,
                             progress=lambda s: print(f"  {s}", flush=True))
    ratios = {f"{a} / {b}": times[a]["median_ms"] / times[b]["median_ms"] for a, b in RATIOS}
    for name, t in times.items():
        print(f"  {name:<26} {t['median_ms']:9.1f} ms  ({trainable[name]:,} trainable)")
    for name, r in ratios.items():
        print(f"  {name:<40} {r:6.3f}x")
    return {"times": times, "ratios": ratios, "trainable": trainable}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(results["backbones"])
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.2), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        times = results["backbones"][backbone]["times"]
        time_bars(ax, times, reference="bare", grey={"bare"}, xlabel="forward time, median (ms)",
                  title=f"{backbone}: CLIP ViT-B/16, batch {results['batch']}, 384x128 + 77 tokens")
    fig.suptitle(f"Forward time with PETL methods vs the bare backbone ({results['machine']['device_name']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    timing_arguments(parser, batch=8, repeats=5, quick="2-layer models, 2 repeats (smoke run)")
    parser.add_argument("--backbones", nargs="+", default=["transformers", "open_clip"],
                        choices=["transformers", "open_clip"])
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batch = 2, 2
    results = {"benchmark": "forward_time", "machine": machine(args.device), "batch": args.batch,
               "quick": args.quick, "image_size": [384, 128], "context_length": 77,
               "backbones": {b: measure(b, args) for b in args.backbones}}
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    path = write_json(f"forward_time_{kind}", results, args.out)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
