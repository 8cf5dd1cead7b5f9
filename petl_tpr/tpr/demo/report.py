"""The demo's report: a table (trainable parameters, percent, R@1, R@5, mAP, mINP, train time, peak
memory), the results as JSON, and the papers' plot of R@1 against trainable parameters.

`write_report(results, pretrain, out_dir)` writes `demo_results.json`, `demo_table.txt` and
`demo_r1_vs_params.png` (skipped without matplotlib) and returns the table text.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ...atomic import write_atomic

COLUMNS = (("method", "{:<17}", "{:<17}"), ("trainable", "{:>11}", "{:>11,}"), ("%", "{:>7}", "{:>7.2f}"),
           ("R@1", "{:>6}", "{:>6.1f}"), ("R@5", "{:>6}", "{:>6.1f}"), ("mAP", "{:>6}", "{:>6.1f}"),
           ("mINP", "{:>6}", "{:>6.1f}"), ("train s", "{:>8}", "{:>8.1f}"), ("step MB", "{:>8}", "{:>8.1f}"),
           ("peak RSS MB", "{:>12}", "{:>12.0f}"))
KEYS = ("method", "trainable", "percent", "R@1", "R@5", "mAP", "mINP", "train_s", "train_mb", "peak_mb")


def format_table(results: list[dict]) -> str:
    """One row per method. `step MB`: the memory one training step needs by account (weights, gradients,
    Adam state, activations autograd saves; `petl_tpr.memory.training_memory_mb`), exact and the same
    on any machine. `peak RSS MB`: the process peak while that method trained (allocated tensors on
    CUDA), which on the CPU includes the interpreter, libraries and memory the allocator kept from
    earlier methods."""
    header = " ".join(fmt.format(name) for name, fmt, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for result in results:
        lines.append(" ".join(fmt.format(result[key]) for (_, _, fmt), key in zip(COLUMNS, KEYS)))
    return "\n".join(lines)


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def plot_r1_vs_params(results: list[dict], path: Path) -> Path | None:
    """R@1 (y) against trainable parameters (x, log scale), zero-shot as a dashed line."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return None
    figure = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for result in results:
        if result["trainable"] == 0:
            axes.axhline(result["R@1"], linestyle="--", color="grey", label=f"{result['method']} (no training)")
            continue
        axes.scatter([result["trainable"]], [result["R@1"]], s=60)
        axes.annotate(f"{result['method']}\n{result['percent']:.1f}%", (result["trainable"], result["R@1"]),
                      textcoords="offset points", xytext=(6, 4), fontsize=8)
    trained = [r["trainable"] for r in results if r["trainable"] > 0]
    top = max(r["R@1"] for r in results)
    axes.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel="R@1 (%)",
             title="Transfer to synthetic domain 1: R@1 vs trainable parameters", ylim=(0, min(100, top * 1.2 + 5)))
    if trained:
        axes.set_xlim(min(trained) / 2, max(trained) * 4)
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    if any(r["trainable"] == 0 for r in results):
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def write_report(results: list[dict], pretrain: dict, out_dir: Path) -> str:
    """Write the table, the JSON and the plot under `out_dir`; returns the table."""
    table = format_table(results)
    record = {"machine": machine(), "pretrain": pretrain, "results": results}
    write_atomic(out_dir / "demo_results.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1), encoding="utf-8"))
    write_atomic(out_dir / "demo_table.txt", lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    plot_r1_vs_params(results, out_dir / "demo_r1_vs_params.png")
    return table
