"""Shared benchmark helpers: machine description, interleaved timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: str) -> dict[str, object]:
    """What the numbers were measured on."""
    device = str(device)
    info: dict[str, object] = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
                               "platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "threads": torch.get_num_threads(), "processor": _cpu_name()}
    if device.startswith("cuda"):
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"{info['processor']} ({os.cpu_count()} cores)"
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(cases: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                     device: str = "cpu", progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Median and spread of each case's wall time (ms), the cases run round-robin in every repeat.

    Interleaving keeps slow drifts of the machine (thermal, other load) out of the ratios.
    """
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
        if progress:
            progress(f"repeat {r + 1}/{repeats}")
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "repeats": len(v)}
            for name, v in samples.items()}


def write_json(name: str, data: dict, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def timing_arguments(parser, *, batch: int, repeats: int, quick: str) -> None:
    """The options every timing benchmark takes: --batch, --repeats, --device (the GPU when there is one),
    --quick (`quick` says what its smoke run does) and --out (the results folder)."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=RESULTS)


def time_bars(ax, times: dict[str, dict[str, float]], *, reference: str, grey: set[str], xlabel: str,
              title: str) -> None:
    """Horizontal bars of each case's median time (ms), labelled with the time and its ratio to `reference`;
    the cases in `grey` are drawn grey (baselines), the others blue."""
    names = list(times)
    values = [times[n]["median_ms"] for n in names]
    base = times[reference]["median_ms"]
    bars = ax.barh(names, values, color=["#888" if n in grey else "#3b7dd8" for n in names])
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.0f} ms ({value / base:.2f}x)",
                va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.4)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
