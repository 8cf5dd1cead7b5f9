"""Eager against `torch.compile` for each preset on CLIP ViT-B/16's vision tower.

The tower is transformers' `CLIPVisionModel` built from `CLIPVisionConfig()` with its defaults
(width 768, 12 layers, 12 heads, MLP 3072, 224x224 images) except `patch_size=16` (ViT-B/16:
197 tokens), random weights. Each variant (the bare tower, whose training step is full fine-tuning,
then every distinct preset injected) is timed four ways, round-robin: eager and compiled inference
forward (`no_grad`, eval mode), and eager and compiled training step (train mode, forward + backward
of `mean(pooler_output^2) + aux_loss`, gradients reset to None each step).

Compile time is reported apart from the steady state: `first_call_s` is the wall time of the first
compiled call (tracing, AOTAutograd, inductor code generation and the C++/Triton compile, plus one
run), and `compile_s = first_call_s - steady median`. Inductor's on-disk caches are switched off
(`force_disable_caches`), so every compile is cold. Dynamo is reset between variants. The compiled
output is compared with eager (`max_abs_diff`). The JSON (and plot) is rewritten after every variant;
`load_average` is the highest 1-minute load average seen, for judging a shared machine's numbers.

    python benchmarks/compile.py                       # CPU (or the GPU), batch 2, every preset
    python benchmarks/compile.py --device cuda --batch 32
    python benchmarks/compile.py --quick --backend aot_eager --presets lora   # smoke run

Writes benchmarks/results/compile_<device>.json and .png (`_quick` appended for --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, sync, time_interleaved, timing_arguments, write_json  # noqa: E402

import petl_tpr as pt  # noqa: E402
from petl_tpr.compat import ensure_torchvision_importable  # noqa: E402
from petl_tpr.presets import PRESETS  # noqa: E402

FIRST = ["bare", "up-person", "dm-adapter", "unipt", "lora"]    # the papers' presets first: JSON is written per variant
VARIANTS = FIRST + [p for p in PRESETS if ":" not in p and p not in FIRST]   # up-person:<dataset> differ only in sizes
MODES = ("forward", "train")


def build(variant: str, quick: bool) -> torch.nn.Module:
    """CLIP ViT-B/16 vision tower (CLIPVisionConfig defaults, patch 16), `variant` injected; seed 0."""
    ensure_torchvision_importable()
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32)
    model = CLIPVisionModel(CLIPVisionConfig(patch_size=16, **(small if quick else {})))
    if variant != "bare":
        pt.inject(model, variant)
    return model


def step(model: torch.nn.Module, fn, images: torch.Tensor, mode: str) -> torch.Tensor:
    """One call of `fn` (the model or its compiled version): a no-grad forward, or forward + backward."""
    if mode == "forward":
        model.eval()
        with torch.no_grad():
            return fn(pixel_values=images).pooler_output
    model.train()
    for p in model.parameters():
        p.grad = None
    out = fn(pixel_values=images).pooler_output
    (out.float().pow(2).mean() + pt.aux_loss(model)).backward()
    return out.detach()


def measure(variant: str, args, images: torch.Tensor) -> dict:
    torch._dynamo.reset()
    model = build(variant, args.quick).to(args.device)
    compiled = torch.compile(model, backend=args.backend, fullgraph=True)
    row: dict = {"trainable": pt.summary(model).trainable if variant != "bare"   # bare: full fine-tuning
                 else sum(p.numel() for p in model.parameters())}
    cases = {}
    for mode in MODES:
        want = step(model, model, images, mode)
        sync(args.device)
        start = time.perf_counter()
        got = step(model, compiled, images, mode)
        sync(args.device)
        row[f"{mode}_first_call_s"] = time.perf_counter() - start
        row[f"{mode}_max_abs_diff"] = float((got.float() - want.float()).abs().max())
        cases[f"eager {mode}"] = lambda mode=mode: step(model, model, images, mode)
        cases[f"compiled {mode}"] = lambda mode=mode: step(model, compiled, images, mode)
    times = time_interleaved(cases, repeats=args.repeats, warmup=0, device=args.device)   # each case ran once above
    row["times"] = times
    for mode in MODES:
        eager, comp = times[f"eager {mode}"]["median_ms"], times[f"compiled {mode}"]["median_ms"]
        row[f"{mode}_speedup"] = eager / comp
        row[f"{mode}_compile_s"] = row[f"{mode}_first_call_s"] - comp / 1e3
        print(f"  {variant:<12} {mode:<8} eager {eager:8.1f} ms  compiled {comp:8.1f} ms  "
              f"x{eager / comp:5.2f}  compile {row[f'{mode}_compile_s']:6.1f} s  "
              f"|diff| {row[f'{mode}_max_abs_diff']:.1e}", flush=True)
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["variants"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.42 * len(names) + 1.8), sharey=True)
    for ax, mode in zip(axes[:2], MODES):
        y = range(len(names))
        eager = [rows[n]["times"][f"eager {mode}"]["median_ms"] for n in names]
        comp = [rows[n]["times"][f"compiled {mode}"]["median_ms"] for n in names]
        ax.barh([i - 0.2 for i in y], eager, height=0.4, color="#888", label="eager")
        ax.barh([i + 0.2 for i in y], comp, height=0.4, color="#3b7dd8", label=f"torch.compile ({results['backend']})")
        for i, (e, c) in enumerate(zip(eager, comp)):
            ax.text(max(e, c), i, f" x{e / c:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(eager + comp) * 1.2)
        ax.set_xlabel("steady-state time per call, median (ms)")
        ax.set_title("inference forward (no_grad)" if mode == "forward" else "training step (forward + backward)",
                     fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    for offset, mode, color in ((-0.2, "forward", "#9bc"), (0.2, "train", "#c96")):
        ax.barh([i + offset for i in range(len(names))], [rows[n][f"{mode}_compile_s"] for n in names], height=0.4,
                color=color, label=mode)
    ax.set_xlabel("compile time, cold (s)")
    ax.set_title("first compiled call minus one steady call", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    what = "tiny CLIP vision (--quick)" if results["quick"] else "CLIP ViT-B/16 vision"
    fig.suptitle(f"{what}, batch {results['batch']}, eager vs torch.compile "
                 f"({results['machine']['device_name']}, {results['machine']['threads']} threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    timing_arguments(parser, batch=2, repeats=5, quick="2-layer 64-wide tower at 32x32, 2 repeats (smoke run)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor; aot_eager for smoke runs)")
    parser.add_argument("--presets", nargs="+", default=VARIANTS, choices=VARIANTS, metavar="VARIANT",
                        help=f"variants to time (default: all of {VARIANTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    size = 32 if args.quick else 224
    images = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(args.device)
    print(f"CLIP ViT-B/16 vision, batch {args.batch}, {args.device}, backend {args.backend}, "
          f"{args.repeats} repeats", flush=True)
    results = {"benchmark": "compile", "machine": machine(args.device), "batch": args.batch, "quick": args.quick,
               "backend": args.backend, "image_size": size, "repeats": args.repeats,
               "model": "transformers CLIPVisionModel(CLIPVisionConfig(patch_size=16)), random weights",
               "load_average": os.getloadavg()[0], "variants": {}}
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    name = f"compile_{kind}" + ("_quick" if args.quick else "")
    for variant in args.presets:   # written after every variant: a long run that is cut short keeps what it measured
        with torch._inductor.config.patch(force_disable_caches=True):   # cold compiles: no graph or kernel cache
            results["variants"][variant] = measure(variant, args, images)
        results["load_average"] = max(results["load_average"], os.getloadavg()[0])
        path = write_json(name, results, args.out)
        plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
