"""Benchmark of the routed mixture-of-adapters op (`petl_tpr.kernels`) at DM-Adapter's shapes.

Times the inference forward (no_grad), the forward of a training step (inputs require grad) and
forward+backward of every implementation in `IMPLEMENTATIONS` available on the device, interleaved
repeat by repeat so that the ratios come from the same stretch of time; reports medians. On CUDA
"triton" is the launcher's choice (pair tiles at small E, k = 2) and "triton-slots" the slot-pass
forward forced. Shapes (`--batch` B, default 32): vision T = B*193, d = 768, r = 96; text T = B*77,
d = 512, r = 64; E = 6, k = 2. Sweeps: E in (2, 4, 8, 16, 32, 64) at the vision shape, and T from
1k to 12k tokens at the vision width.

    python benchmarks/moa_routing.py [--quick] [--device cpu] [--batch 32] [--dtype float32] [--out DIR]

writes `<out>/moa_routing_<device type>[_b<B>_<dtype>].json` and `.png`. `--quick` shrinks
everything for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine  # noqa: E402

from petl_tpr.kernels import (dense_all_experts, routed_adapters_reference, routed_adapters_torch,  # noqa: E402
                              routed_adapters_triton, triton_available)

def shapes(batch: int) -> dict[str, dict[str, int]]:
    """DM-Adapter's per-layer shapes at a batch size (issue 4: 32 on CPU; issue 5: 128 on a GPU)."""
    return {"vision": {"T": batch * 193, "d": 768, "r": 96}, "text": {"T": batch * 77, "d": 512, "r": 64}}


SHAPES = shapes(32)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# peak memory bandwidth (GB/s) by device-name fragment, for the roofline column; --peak-gbs overrides
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}
EXPERTS, TOP_K = 6, 2
E_SWEEP = (2, 4, 8, 16, 32, 64)
T_SWEEP = (1024, 2048, 4096, 8192, 12288)
DENSE_LIMIT_BYTES = 1 << 30   # skip dense-all-experts where its (E, T, d) output alone exceeds this


def _dense_fits(T: int, d: int, r: int, E: int) -> bool:
    return E * T * d * 4 <= DENSE_LIMIT_BYTES


def triton_slot_passes(*args, **kwargs) -> torch.Tensor:
    """The Triton path with its forward forced to slot passes (at small E, k = 2 `auto` runs pair tiles)."""
    from petl_tpr.kernels.triton import launch

    with launch.forward_override("slots"):
        return routed_adapters_triton(*args, **kwargs)


def _on_cuda_with_triton(device: torch.device) -> bool:
    return device.type == "cuda" and triton_available(device)


# name -> (function, available(device), fits(T, d, r, E)). "triton*" run on CUDA only (never the interpreter).
IMPLEMENTATIONS: dict[str, tuple[Callable, Callable[[torch.device], bool], Callable[..., bool]]] = {
    "reference": (routed_adapters_reference, lambda device: True, lambda *shape: True),
    "torch": (routed_adapters_torch, lambda device: True, lambda *shape: True),
    "dense": (dense_all_experts, lambda device: True, _dense_fits),
    "triton": (routed_adapters_triton, _on_cuda_with_triton, lambda *shape: True),
    "triton-slots": (triton_slot_passes, _on_cuda_with_triton, lambda *shape: True),
}


def minimal_bytes(T: int, d: int, r: int, E: int, k: int, element: int) -> int:
    """The op's least memory traffic: read x, the ids, the gates and every weight once; write y once."""
    return element * (2 * T * d + T * k + E * (2 * d * r + r + d)) + 8 * T * k


def peak_bandwidth(device_name: str) -> float | None:
    for fragment, gbs in PEAK_GBS.items():
        if fragment in device_name:
            return gbs
    return None


def make_inputs(T: int, d: int, r: int, E: int, k: int, device: torch.device, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Router-like inputs: ids = top-k of random logits, gates = softmax of those; all floats require grad."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    top, ids = logits.topk(k, dim=-1)
    tensors = [torch.randn(T, d, generator=g), top.softmax(-1), torch.randn(E, d, r, generator=g) / d ** 0.5,
               torch.zeros(E, r), torch.randn(E, r, d, generator=g) / r ** 0.5, torch.zeros(E, d)]
    x, gates, *weights = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    return [x, ids.to(device), gates, *weights]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = (("infer_ms", "infer"), ("fwd_ms", "fwd"), ("fwd_bwd_ms", "fwd_bwd"))


def _run(fn: Callable, inputs: list[torch.Tensor], mode: str) -> None:
    """infer: forward under no_grad (nothing saved for a backward); fwd: forward of a training step;
    fwd_bwd: that and the backward."""
    if mode == "infer":
        with torch.no_grad():
            fn(*inputs)
        return
    y = fn(*inputs)
    if mode == "fwd_bwd":
        y.backward(torch.ones_like(y))


def measure(impls: dict[str, Callable], inputs: list[torch.Tensor], *, repeats: int, warmup: int,
            device: torch.device) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Median and minimum ms of the inference forward, the training forward and forward+backward per
    implementation, interleaved across repeats (the minimum is the better estimate when other
    processes share the machine)."""
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key, _ in MODES} for name in impls}
    for rep in range(warmup + repeats):
        for name, fn in impls.items():
            for key, mode in MODES:
                for t in inputs:
                    t.grad = None
                _sync(device)
                start = time.perf_counter()
                _run(fn, inputs, mode)
                _sync(device)
                if rep >= warmup:
                    times[name][key].append((time.perf_counter() - start) * 1e3)
    median = {name: {key: round(statistics.median(v), 3) for key, v in entry.items()} for name, entry in times.items()}
    best = {name: {key: round(min(v), 3) for key, v in entry.items()} for name, entry in times.items()}
    return median, best


def case(T: int, d: int, r: int, E: int, k: int, device: torch.device, repeats: int, warmup: int,
         dtype: torch.dtype = torch.float32, peak_gbs: float | None = None) -> dict:
    """One shape: timings of every implementation that runs on the device and fits, plus ratios,
    achieved forward bandwidth (minimal bytes / forward time) and its share of the device's peak."""
    impls = {name: fn for name, (fn, available, fits) in IMPLEMENTATIONS.items()
             if available(device) and fits(T, d, r, E)}
    inputs = make_inputs(T, d, r, E, k, device, dtype=dtype)
    with torch.no_grad():   # sanity: every implementation agrees with the reference
        expected = routed_adapters_reference(*inputs)
        errors = {name: float((fn(*inputs) - expected).abs().max()) for name, fn in impls.items() if T}
    timings, best = measure(impls, inputs, repeats=repeats, warmup=warmup, device=device)
    ref = timings.get("reference")
    speedup = {name: {key: round(ref[key] / t[key], 3) for key in t} for name, t in timings.items()} if ref else {}
    nbytes = minimal_bytes(T, d, r, E, k, torch.finfo(dtype).bits // 8)
    bandwidth = {key: {name: round(nbytes / (t[key] * 1e-3) / 1e9, 2) for name, t in timings.items() if t[key] > 0}
                 for key in ("infer_ms", "fwd_ms")}
    roofline = {key: {name: round(100 * gbs / peak_gbs, 1) for name, gbs in entry.items()}
                for key, entry in bandwidth.items()} if peak_gbs else None
    return {"T": T, "d": d, "r": r, "E": E, "k": k, "ms": timings, "min_ms": best, "speedup_vs_reference": speedup,
            "max_abs_diff_vs_reference": errors, "skipped": sorted(set(IMPLEMENTATIONS) - set(impls)),
            "minimal_bytes": nbytes, "bandwidth_gbs": bandwidth, "roofline_percent": roofline}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(IMPLEMENTATIONS)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    groups = [(shape, key) for shape in results["shapes"] for key, _ in MODES]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["shapes"][shape]["ms"].get(name, {}).get(key, 0.0) for shape, key in groups]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + width * (len(names) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{shape}\n{key.removesuffix('_ms').replace('_', '+')}" for shape, key in groups])
    ax.set_ylabel("ms (median)")
    ax.set_title(f"E={EXPERTS}, k={TOP_K}")
    ax.legend()
    for ax, sweep, var, title in ((axes[1], "e_sweep", "E", "vision shape, k=2: vary E"),
                                  (axes[2], "t_sweep", "T", "d=768, r=96, E=6, k=2: vary T")):
        for name in names:
            points = [(c[var], c["ms"][name]["fwd_bwd_ms"]) for c in results[sweep] if name in c["ms"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(var)
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"routed mixture of adapters, {results['machine']['device_name']}, "
                 f"{results['machine']['threads']} threads, torch {results['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and repeats (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 9; quick 1)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--batch", type=int, default=32, help="images/captions per batch (issue 5's GPU targets: 128)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth, GB/s "
                        "(default: looked up by device name for known GPUs)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    repeats = args.repeats or (1 if args.quick else 9)
    warmup = 1 if args.quick else 2
    shrink = 32 if args.quick else 1
    e_sweep = E_SWEEP[:3] if args.quick else E_SWEEP
    t_sweep = T_SWEEP[:2] if args.quick else T_SWEEP

    info = machine(str(device))
    peak = args.peak_gbs or (peak_bandwidth(info["device_name"]) if device.type == "cuda" else None)
    dtype, table = DTYPES[args.dtype], shapes(args.batch)

    def run(T, d, r, E):
        result = case(max(1, T // shrink), d, r, E, TOP_K, device, repeats, warmup, dtype, peak)
        print(f"T={result['T']:6d} d={d} r={r} E={E:2d}: " + ", ".join(
            f"{name} {t['fwd_ms']:.1f}/{t['fwd_bwd_ms']:.1f} ms" for name, t in result["ms"].items()), flush=True)
        return result

    results = {
        "benchmark": "moa_routing", "quick": args.quick, "repeats": repeats, "warmup": warmup,
        "timing": ("ms: median, min_ms: minimum over the repeats; infer = forward under no_grad, fwd = forward "
                   "with grad-requiring inputs, fwd_bwd = forward + backward of y.sum(); bandwidth_gbs and "
                   "roofline_percent: minimal_bytes / time of infer and fwd"),
        "machine": info, "batch": args.batch, "dtype": args.dtype, "peak_bandwidth_gbs": peak,
        "shapes": {name: run(s["T"], s["d"], s["r"], EXPERTS) for name, s in table.items()},
        "e_sweep": [run(table["vision"]["T"], 768, 96, E) for E in e_sweep],
        "t_sweep": [run(T, 768, 96, EXPERTS) for T in t_sweep],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if (args.batch, args.dtype) == (32, "float32") else f"_b{args.batch}_{args.dtype}"
    stem = args.out / f"moa_routing_{device.type}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    if not args.no_plot:
        plot(results, stem.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
