"""Peak memory of a refused tampered adapter load (issue 15), against the process just before it.

Every case runs in a fresh child process: build a CLIP (ViT-B/16 sizes; `--quick`: 2 layers),
inject `up-person`, save the adapters, eject; write a copy of the file whose stored spec says
LoRA rank 10**7 (or 20,000); then reset the kernel's peak-RSS counter (`VmHWM`, by writing 5 to
/proc/self/clear_refs: exact, no sampling), optionally cap the address space at its current size
plus `--limit-mb` (RLIMIT_AS), and call `load_adapters`. Reported per case: the exception, the RSS
before, the peak during the call, their difference. `good` loads the untampered file (it allocates
the adapters) for comparison. Linux only (/proc).

    python benchmarks/refused_load_memory.py            # CLIP ViT-B/16 sizes, random weights
    python benchmarks/refused_load_memory.py --quick    # 2-layer CLIP

Writes benchmarks/results/refused_load_memory_cpu[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's petl_tpr, not an installed one
from common import RESULTS, machine, write_json  # noqa: E402

CASES = {"good": None, "rank 20,000": 20_000, "rank 10**7": 10**7}
MB = 2 ** 20


def _status(field: str) -> int:
    """A `/proc/self/status` field in bytes (VmRSS, VmHWM, VmSize)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


MODELS = {"b16": "CLIP ViT-B/16 sizes", "small": "2-layer CLIP, ViT-B/16 widths", "tiny": "hf_clip test example (width 32)"}


def _model(name: str):
    from petl_tpr.quickstart import build_clip_b16
    from petl_tpr.registry import FAMILIES

    return FAMILIES["hf_clip"].build_example()[0] if name == "tiny" else build_clip_b16(small=name == "small").eval()


def child(rank: int | None, model_name: str, limit_mb: float | None, folder: str) -> dict:
    """In a fresh process: prepare the (tampered) file, then measure one `load_adapters` call."""
    import torch

    import petl_tpr as pt
    import petl_tpr.io as pio
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    model = _model(model_name)
    pt.inject(model, "up-person")
    path = pt.save_adapters(model, Path(folder) / "good.safetensors")
    pt.eject(model)
    if rank is not None:
        tensors, meta = pio.read_adapters(path)
        spec = json.loads(meta["spec"])
        for entry in spec["entries"]:
            if entry["method"] == "lora":
                entry["config"]["rank"] = rank
        meta["spec"] = json.dumps(spec)
        path = Path(folder) / "tampered.safetensors"
        save_file(tensors, str(path), metadata=meta)
        del tensors
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")                      # VmHWM := VmRSS
    before, size = _status("VmRSS"), _status("VmSize")
    if limit_mb is not None:
        resource.setrlimit(resource.RLIMIT_AS, (size + int(limit_mb * MB), resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        pt.load_adapters(model, path)
        error = None
    except Exception as exc:   # noqa: BLE001  (reported, whatever it is)
        error = {"type": type(exc).__name__, "message": str(exc)[:400]}
    peak = _status("VmHWM")
    return {"rank": rank, "error": error, "rss_before_mb": before / MB, "peak_during_mb": peak / MB,
            "peak_above_before_mb": (peak - before) / MB, "address_space_limit_mb": None if limit_mb is None
            else (size + limit_mb * MB) / MB, "file_bytes": path.stat().st_size}


def run_child(rank: int | None, *, model: str, limit_mb: float | None, timeout: float = 600) -> dict:
    """`child` in a fresh interpreter; its JSON result."""
    with tempfile.TemporaryDirectory() as folder:
        args = [sys.executable, __file__, "--child", json.dumps([rank, model, limit_mb, folder])]
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["cases"])
    values = [results["cases"][n]["peak_above_before_mb"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(names, values, color=["tab:green" if results["cases"][n]["error"] is None else "tab:red"
                                        for n in names])
    ax.bar_label(bars, labels=[f"{v:.1f} MB" for v in values])
    ax.set_ylim(0, max(values) * 1.25 + 1)
    ax.set_ylabel("peak RSS above before (MB)")
    ax.set_title(f"load_adapters on {results['model']}: refused (red) vs good (green)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer CLIP instead of ViT-B/16 sizes")
    parser.add_argument("--limit-mb", type=float, default=200.0, help="address-space headroom of refused loads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return {}
    model = "small" if args.quick else "b16"
    cases = {name: run_child(rank, model=model, limit_mb=None if rank is None else args.limit_mb)
             for name, rank in CASES.items()}
    results = {"machine": machine("cpu"), "model": MODELS[model],
               "spec": "up-person", "command": "python benchmarks/refused_load_memory.py" + " --quick" * args.quick,
               "cases": cases}
    name = "refused_load_memory_cpu" + "_quick" * args.quick
    write_json(name, results, args.out)
    plot(results, args.out / f"{name}.png")
    for case, row in cases.items():
        print(f"{case:>12}: before {row['rss_before_mb']:.1f} MB, peak {row['peak_during_mb']:.1f} MB "
              f"(+{row['peak_above_before_mb']:.1f} MB), {row['error']['type'] if row['error'] else 'loaded'}")
    return results


if __name__ == "__main__":
    main()
