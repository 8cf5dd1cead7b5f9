"""Peak memory and time of one training step of CLIP ViT-B/16 (384x128, 77 tokens) per method.

One step = forward of both towers, SDM loss on the projected features, backward, Adam step. Each
method runs in its own fresh process (so one method's allocations cannot hide another's), two
steps each; the second (steady state, optimizer state present) is measured.

- GPU: `torch.cuda.max_memory_allocated` over the step (weights, activations, gradients and
  optimizer state).
- CPU: the process's resident set size, sampled every 2 ms by a thread during the step: the peak
  (`peak_rss_mb`) and the peak above the RSS just before the step (`step_rss_mb`: activations,
  gradients and temporaries; the weights and optimizer state are already resident).

    python benchmarks/train_memory.py                      # batch 32, all methods
    python benchmarks/train_memory.py --quick              # 2-layer model, batch 2 (smoke run)
    python benchmarks/train_memory.py --fp16               # GPU only: fp16 backbone weights, as the papers

Writes benchmarks/results/train_memory_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402

from petl_tpr.memory import PeakMemory  # noqa: E402

METHODS = {
    "full fine-tuning": None,
    "lora (q, v, r=32)": "lora",
    "up-person": "up-person",
    "dm-adapter": "dm-adapter",
    "unipt": "unipt",
}


def one_method(name: str, args) -> dict:
    """Runs in a child process: build, inject, two steps; measure the second."""
    import torch

    import petl_tpr as pt
    from petl_tpr.quickstart import _batch, build_clip_b16, features
    from petl_tpr.tpr.training.losses import sdm_loss

    device = args.device
    torch.manual_seed(0)
    model = build_clip_b16(small=args.quick)
    if args.fp16:
        model.half()
    preset = METHODS[name]
    if preset is not None:
        pt.inject(model, preset)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-5, eps=1e-3)
    batch = {k: v.to(device) for k, v in _batch(args.batch, seed=1).items()}
    pids = torch.arange(args.batch, device=device) // 2

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        image, text = features(model, batch)
        loss = sdm_loss(image.float(), text.float(), pids) + pt.aux_loss(model)
        loss.backward()
        optimizer.step()
        return float(loss)

    step()
    result = {"trainable": sum(p.numel() for p in trainable), "total": sum(p.numel() for p in model.parameters())}
    with PeakMemory(device) as memory:      # CUDA: synchronised on entry and exit
        start = time.perf_counter()
        step()
        if memory.kind == "cuda_allocated":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - start
    if memory.kind == "cuda_allocated":
        result.update(step_s=step_s, peak_mb=memory.peak_mb)
    else:
        result.update(step_s=step_s, peak_rss_mb=memory.peak_mb, rss_before_mb=memory.start_mb,
                      step_rss_mb=memory.added_mb)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    names = list(rows)
    key = "peak_mb" if "peak_mb" in rows[names[0]] else "peak_rss_mb"
    panels = [(key, "peak memory (MB)")] + ([("step_rss_mb", "memory added by the step (MB)")]
                                           if key == "peak_rss_mb" else []) + [("step_s", "step time (s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (field, label) in zip(axes, panels):
        values = [rows[n][field] for n in names]
        full = rows[names[0]][field]
        bars = ax.bar(range(len(names)), values, color=["#888"] + ["#3b7dd8"] * (len(names) - 1))
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value / full:.2f}x", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(label)
    fig.suptitle(f"One training step, CLIP ViT-B/16, batch {results['batch']}, 384x128 "
                 f"({results['machine']['device_name']}); ratios to full fine-tuning", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--fp16", action="store_true", help="fp16 backbone weights (GPU)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="2-layer model, batch 2 (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.batch = 2
    if args.child:
        print(json.dumps(one_method(args.child, args)))
        return {}
    results = {"benchmark": "train_memory", "machine": machine(args.device), "batch": args.batch, "fp16": args.fp16,
               "quick": args.quick, "methods": {}}
    for name in args.methods:
        cmd = [sys.executable, __file__, "--child", name, "--batch", str(args.batch), "--device", args.device]
        cmd += ["--quick"] * args.quick + ["--fp16"] * args.fp16
        print(f"[train_memory] {name} ...", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results["methods"][name] = row
        print("   ", {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    key = "peak_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    full = results["methods"].get("full fine-tuning")
    if full:
        for row in results["methods"].values():
            row["peak_ratio_to_full"] = row[key] / full[key]
            if "step_rss_mb" in row:
                row["step_ratio_to_full"] = row["step_rss_mb"] / full["step_rss_mb"]
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    path = write_json(f"train_memory_{kind}{'_quick' if args.quick else ''}", results, args.out)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
