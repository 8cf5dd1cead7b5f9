"""Block-size sweep of the routed-adapter Triton kernels (`petl_tpr.kernels.triton`), per kernel.

Every candidate launch configuration (BM rows per tile, BD columns per step, num_warps) of each of
the three kernels (forward, token-side backward, weight-side backward) at DM-Adapter's batch-128
shapes, the other two kernels left at their defaults (`launch.blocks`).

    python benchmarks/moa_block_sweep.py --static [--arch 90]     # any machine, no GPU
    python benchmarks/moa_block_sweep.py --device cuda             # times them on the GPU

`--static` compiles every candidate ahead of time for `sm_<arch>` (`compile_report`) and records
registers, spills, shared memory and occupancy: `moa_block_sweep_static_sm<arch>.json` and `.png`.
`--device cuda` times each candidate's op call (`triton.testing.do_bench`, L2 flushed between
runs) and reports the fastest per kernel against the default: `moa_block_sweep_cuda.json`/`.png`,
with the device name. Candidates the static sweep found spilling or over the shared-memory limit
are left out of the timing when its JSON is in benchmarks/results/. The op call includes the small plan (sort,
tile tables), the same for every candidate, so the ratios understate a kernel's own spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402
from moa_routing import make_inputs  # noqa: E402

CANDIDATES = [dict(BM=bm, BD=bd, num_warps=warps) for bm in (32, 64, 128) for bd in (32, 64, 128) for warps in (4, 8)]
QUICK = [dict(BM=32, BD=64, num_warps=8), dict(BM=32, BD=32, num_warps=8)]


def _key(row: dict) -> tuple:
    return row["shape"], row["dtype"], row["kernel"], tuple(sorted(row["config"].items()))


def static_sweep(arch: int, shapes: list[str], dtypes: list[str], candidates: list[dict], progress=print) -> list[dict]:
    """One row per (shape, dtype, kernel, candidate): registers, spills, shared KB, occupancy, fits."""
    from petl_tpr.kernels.triton import compile_report, launch

    limits = compile_report.ARCHS[arch]
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for kernel in launch.KERNELS:
                for config in candidates:
                    row = {"shape": shape, "dtype": dtype, "kernel": kernel, "config": config}
                    try:
                        passes = compile_report.kernel_stats(shape, dtype, arch=arch, overrides={kernel: config},
                                                             kernels=(kernel,), forward=_FORWARD.get(kernel, "auto"))
                        stats = max(passes, key=lambda s: (s.spill_bytes, s.registers))   # the worst slot pass
                    except Exception as error:   # noqa: BLE001 - a candidate that does not compile is a result
                        row.update(fits=False, error=f"{type(error).__name__}: {str(error)[:200]}")
                    else:
                        row.update(registers=stats.registers, spill_bytes=stats.spill_bytes,
                                   shared_kb=round(stats.shared_bytes / 1024, 1), occupancy=stats.occupancy,
                                   blocks_per_sm=stats.blocks_per_sm, waves=stats.waves,
                                   tensor_core=sum(stats.tensor_core.values()),
                                   fits=stats.spill_bytes == 0 and stats.shared_bytes <= limits.shared_per_block)
                    rows.append(row)
                    progress(f"{shape} {dtype} {kernel} {config}: "
                             + (f"regs {row['registers']} spill {row['spill_bytes']} smem {row['shared_kb']} KB"
                                if "registers" in row else row["error"]))
    return rows


# the forward kind (pair tiles or slot passes, which also sets the token backward's) that launches each kernel
_FORWARD = {"fwd": "slots", "fwd_pairs": "pairs", "bwd_token": "slots", "bwd_token_pairs": "pairs"}


def _op_call(kernel: str, shape: str, dtype: str, device: str):
    """A no-argument function running the op piece that launches `kernel` on `device`."""
    from petl_tpr.kernels.triton import compile_report, launch

    x, ids, gates, w_down, b_down, w_up, b_up = [t.detach() for t in make_inputs(
        **compile_report.SHAPES[shape], device=torch.device(device), dtype=compile_report.DTYPES[dtype])]
    if kernel.startswith("fwd"):
        def forward():
            with launch.forward_override(_FORWARD[kernel]):
                return launch.moa_routed_fwd(x, ids, gates, w_down, b_down, w_up, b_up, "relu")
        return forward
    _, h, order, bounds = launch.moa_routed_fwd(x, ids, gates, w_down, b_down, w_up, b_up, "relu")
    dy = torch.randn_like(x)

    def backward():
        with launch.forward_override(_FORWARD.get(kernel, "auto")):
            return launch.moa_routed_bwd(dy, x, ids, gates, w_down, w_up, b_up, h, order, bounds, "relu")
    return backward


def timed_sweep(device: str, shapes: list[str], dtypes: list[str], candidates: list[dict], skip: set,
                progress=print, on_row=None) -> list[dict]:
    """One row per candidate with its median ms (do_bench), the default config's ms and the ratio;
    `on_row(rows)` after each row (the caller saves partial results: a time limit loses nothing)."""
    import triton.testing

    from petl_tpr.kernels.triton import compile_report, launch

    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for kernel in launch.KERNELS:
                fn = _op_call(kernel, shape, dtype, device)
                default_ms = triton.testing.do_bench(fn, warmup=10, rep=50)
                dims = compile_report.SHAPES[shape]
                default = launch.blocks(kernel, dims["d"], dims["r"], compile_report.DTYPES[dtype])
                for config in candidates:
                    row = {"shape": shape, "dtype": dtype, "kernel": kernel, "config": config,
                           "default_config": {"BM": default.BM, "BD": default.BD, "num_warps": default.num_warps}}
                    if _key(row) in skip:
                        continue
                    try:
                        with launch.block_overrides(**{kernel: config}):
                            ms = triton.testing.do_bench(fn, warmup=10, rep=50)
                    except Exception as error:   # noqa: BLE001 - out of resources at launch is a result
                        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    else:
                        row.update(ms=round(ms, 4), default_ms=round(default_ms, 4),
                                   speedup_vs_default=round(default_ms / ms, 3))
                    rows.append(row)
                    progress(f"{shape} {dtype} {kernel} {config}: {row.get('ms', row.get('error'))}")
                    if on_row:
                        on_row(rows)
    return rows


def best_per_kernel(rows: list[dict]) -> dict[str, dict]:
    """'shape/dtype/kernel' -> the fastest row."""
    best: dict[str, dict] = {}
    for row in rows:
        if "ms" in row:
            key = f"{row['shape']}/{row['dtype']}/{row['kernel']}"
            if key not in best or row["ms"] < best[key]["ms"]:
                best[key] = row
    return best


def plot(rows: list[dict], value: str, path: Path, title: str) -> None:
    """One panel per (shape, dtype, kernel): `value` per candidate, candidates in CANDIDATES order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for row in rows:
        if value in row:
            groups.setdefault(f"{row['shape']} {row['dtype']} {row['kernel']}", []).append(row)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 2.4 * len(groups)), squeeze=False)
    for ax, (name, group) in zip(axes[:, 0], groups.items()):
        labels = [f"{c['BM']}/{c['BD']}/{c['num_warps']}" for c in (row["config"] for row in group)]
        colours = ["tab:blue" if row.get("fits", True) else "tab:red" for row in group]
        ax.bar(range(len(group)), [row[value] for row in group], color=colours)
        ax.set_xticks(range(len(group)), labels, rotation=90, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(value, fontsize=8)
    axes[-1, 0].set_xlabel("BM / BD / num_warps (red: spills or over the shared-memory limit)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", action="store_true", help="compile ahead of time for --arch (no GPU needed)")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["vision", "text"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    parser.add_argument("--quick", action="store_true", help="two candidates (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    candidates = QUICK if args.quick else CANDIDATES
    start = time.perf_counter()
    if args.static:
        import triton
        rows = static_sweep(args.arch, args.shapes, args.dtypes, candidates)
        name = f"moa_block_sweep_static_sm{args.arch}"
        result = {"mode": "static", "arch": args.arch, "triton": triton.__version__, "rows": rows,
                  "machine": machine("cpu"), "seconds": round(time.perf_counter() - start, 1)}
        value, title = "registers", f"registers per thread when compiled for sm_{args.arch} (no GPU)"
    else:
        if not (args.device.startswith("cuda") and torch.cuda.is_available()):
            raise SystemExit("the timed sweep needs a CUDA device (use --static on a machine without one)")
        static_file = RESULTS / f"moa_block_sweep_static_sm{''.join(map(str, torch.cuda.get_device_capability()))}.json"
        skip = set()
        if static_file.exists():
            skip = {_key(row) for row in json.loads(static_file.read_text())["rows"] if not row["fits"]}
        name = "moa_block_sweep_cuda"
        info = machine(args.device)

        def timed_result(rows, complete):
            return {"mode": "timed", "complete": complete, "rows": rows, "best": best_per_kernel(rows),
                    "machine": info, "skipped_by_static": len(skip), "seconds": round(time.perf_counter() - start, 1)}

        rows = timed_sweep(args.device, args.shapes, args.dtypes, candidates, skip,
                           on_row=lambda rows: write_json(name, timed_result(rows, False), args.out))
        result = timed_result(rows, True)
        value, title = "ms", f"op time per candidate, {result['machine']['device_name']}"
        for key, row in result["best"].items():
            print(f"best {key}: {row['config']} {row['ms']} ms ({row['speedup_vs_default']}x the default "
                  f"{row['default_config']})")
    path = write_json(name, result, args.out)
    if not args.no_plot:
        plot(rows, value, path.with_suffix(".png"), title)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
