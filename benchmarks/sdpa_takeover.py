"""What giving prefixes at an attention's own SDPA call costs, against a convention that re-implements it.

The same S-Prefix (L = 10) on the same transformers CLIP ViT-B/16 (384x128 images, 77-token text),
attached two ways: through the `hf` convention (the attention re-implemented around `attend`), and
through `sdpa` (the module's own forward under a TorchFunctionMode that hands its
F.scaled_dot_product_attention call to `attend`; forced here by taking the family's convention
away). Also the bare model, and the `sdpa` model with its prefixes switched off (`pt.disabled`:
the mode is not entered). Inference forward and a training step (forward + backward), timed
round-robin in one run; both prefix paths are checked to give the same outputs first.

    python benchmarks/sdpa_takeover.py            # full size, CPU or the GPU
    python benchmarks/sdpa_takeover.py --quick    # 2-layer models, smoke run

Writes benchmarks/results/sdpa_takeover_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_bars, time_interleaved, timing_arguments, write_json  # noqa: E402
from forward_time import build, inputs  # noqa: E402

import petl_tpr as pt  # noqa: E402
from petl_tpr.attention import state_of  # noqa: E402
from petl_tpr.registry import FAMILIES  # noqa: E402

RATIOS = [("s-prefix, sdpa", "s-prefix, hf"), ("s-prefix, hf", "bare"), ("s-prefix, sdpa", "bare"),
          ("sdpa, prefixes off", "bare")]


def _inject_through_sdpa(model: torch.nn.Module, spec: str) -> None:
    """Inject with hf_clip's layouts naming no convention, so prefixes go through each module's own SDPA call."""
    family = FAMILIES["hf_clip"]
    FAMILIES["hf_clip"] = dataclasses.replace(
        family, layouts=tuple(dataclasses.replace(layout, attention=None) for layout in family.layouts))
    try:
        pt.inject(model, spec)
    finally:
        FAMILIES["hf_clip"] = family


def measure(args) -> dict:
    base, forward = build("transformers", args.quick)
    images, tokens = inputs(args.batch, args.device)
    hf, sdpa = copy.deepcopy(base), copy.deepcopy(base)
    pt.inject(hf, "s-prefix")
    _inject_through_sdpa(sdpa, "s-prefix")
    sdpa.load_state_dict(hf.state_dict())            # the same prefix values in both
    assert state_of(sdpa.vision_model.encoder.layers[0].self_attn).convention.name == "sdpa"
    models = {"bare": base, "s-prefix, hf": hf, "s-prefix, sdpa": sdpa}
    for m in models.values():
        m.to(args.device).eval()
    with torch.no_grad():
        gap = max((a - b).abs().max().item() for a, b in zip(forward(hf, images, tokens), forward(sdpa, images, tokens)))
    print(f"hf vs sdpa outputs: max difference {gap:.2e}", flush=True)

    def infer(model, off=False):
        def run():
            with torch.no_grad():
                if off:
                    with pt.disabled(model):
                        forward(model, images, tokens)
                else:
                    forward(model, images, tokens)
        return run

    def train(model):
        def run():
            image_embeds, text_embeds = forward(model, images, tokens)
            loss = (image_embeds @ text_embeds.T).square().mean()
            if loss.requires_grad:
                loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    print(f"timing inference, batch {args.batch}, {args.repeats} repeats", flush=True)
    inference = time_interleaved({**{n: infer(m) for n, m in models.items()},
                                  "sdpa, prefixes off": infer(sdpa, off=True)},
                                 repeats=args.repeats, device=args.device)
    print("timing training steps", flush=True)
    training = time_interleaved({n: train(m) for n, m in models.items() if n != "bare"}, repeats=args.repeats,
                                device=args.device)
    ratios = {f"{a} / {b}": inference[a]["median_ms"] / inference[b]["median_ms"] for a, b in RATIOS}
    ratios["training step: s-prefix, sdpa / s-prefix, hf"] = (training["s-prefix, sdpa"]["median_ms"]
                                                             / training["s-prefix, hf"]["median_ms"])
    for name, t in inference.items():
        print(f"  inference {name:<22} {t['median_ms']:9.1f} ms")
    for name, t in training.items():
        print(f"  training  {name:<22} {t['median_ms']:9.1f} ms")
    for name, r in ratios.items():
        print(f"  {name:<52} {r:6.3f}x")
    return {"inference": inference, "training": training, "ratios": ratios, "max_output_difference": gap}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for ax, part in zip(axes, ("inference", "training")):
        times = results[part]
        time_bars(ax, times, reference=next(iter(times)), grey={"bare", "s-prefix, hf"}, xlabel="median time (ms)",
                  title=f"{part}: CLIP ViT-B/16, batch {results['batch']}")
    fig.suptitle(f"S-Prefix through the hf convention vs the module's own SDPA call ({results['machine']['device_name']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    timing_arguments(parser, batch=8, repeats=5, quick="2-layer models, 2 repeats (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.batch = 2, 2
    results = {"benchmark": "sdpa_takeover", "machine": machine(args.device), "batch": args.batch, "quick": args.quick,
               "image_size": [384, 128], "context_length": 77, **measure(args)}
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    path = write_json(f"sdpa_takeover_{kind}" + ("_quick" if args.quick else ""), results, args.out)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
