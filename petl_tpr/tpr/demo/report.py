"""The demo's report: a table (trainable parameters, percent, R@1, R@5, mAP, mINP on the target
domain, R@1 and mAP on the unseen domain, train time, memory), the results as JSON, and the papers'
plot of R@1 against trainable parameters (one panel for the target domain, one for the unseen one).

`write_report(results, pretrain, out_dir, unseen=...)` writes `demo_results.json`, `demo_table.txt`
and `demo_r1_vs_params.png` (skipped without matplotlib) and returns the table text. A result row
may carry `spread` ({key: standard deviation over seeds}, from `seeds.py`): the table then prints
"mean ± sd" and the plot draws error bars.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import re
from pathlib import Path

import torch

from ...atomic import write_atomic

COLUMNS = (("method", "{:<17}", "{:<17}"), ("trainable", "{:>11}", "{:>11,.0f}"), ("%", "{:>7}", "{:>7.2f}"),
           ("R@1", "{:>6}", "{:>6.1f}"), ("R@5", "{:>6}", "{:>6.1f}"), ("mAP", "{:>6}", "{:>6.1f}"),
           ("mINP", "{:>6}", "{:>6.1f}"), ("unseen R@1", "{:>10}", "{:>10.1f}"),
           ("unseen mAP", "{:>10}", "{:>10.1f}"), ("train s", "{:>8}", "{:>8.1f}"),
           ("step MB", "{:>8}", "{:>8.1f}"), ("peak RSS MB", "{:>12}", "{:>12.0f}"))
KEYS = ("method", "trainable", "percent", "R@1", "R@5", "mAP", "mINP", "unseen_R@1", "unseen_mAP", "train_s",
        "train_mb", "peak_mb")
PANELS = (("R@1", "Transfer to synthetic domain 1 (trained on)"),
          ("unseen_R@1", "Synthetic domain 2 (unseen, evaluation only)"))


def _cell(fmt: str, value, spread: float | None) -> str:
    """`fmt` of `value`; with a spread, "mean±sd" at the format's precision."""
    if spread is None:
        return fmt.format(value).strip()
    digits = int(re.search(r"\.(\d)f", fmt).group(1))
    return f"{value:.{digits}f}±{spread:.{digits}f}"


def format_table(results: list[dict]) -> str:
    """One row per method, then a line with the seed(s) and versions. `step MB`: the memory one
    training step needs by account (weights, gradients, Adam state, activations autograd saves;
    `petl_tpr.memory.training_memory_mb`), exact and the same on any machine. `peak RSS MB`: the
    process peak while that method trained (allocated tensors on CUDA), which on the CPU includes the
    interpreter, libraries and memory the allocator kept from earlier methods. `unseen`: domain 2."""
    spread = any("spread" in r for r in results)
    columns = []
    for (name, head, fmt), key in zip(COLUMNS, KEYS):
        fixed = key in ("method", "trainable")
        cells = [_cell(fmt, r[key], None if fixed or not spread else r.get("spread", {}).get(key, 0.0))
                 for r in results]
        width = max([len(head.format(name))] + [len(c) for c in cells])
        align = str.ljust if key == "method" else str.rjust
        columns.append([align(name, width)] + [align(c, width) for c in cells])
    rows = [" ".join(cells) for cells in zip(*columns)]
    lines = [rows[0], "-" * len(rows[0]), *rows[1:]]
    seeds = sorted({s for r in results for s in (r.get("seeds") or [r.get("seed")]) if s is not None})
    if seeds:
        names = versions_line(results[0].get("versions") or {})
        lines.append(("seeds " + ", ".join(map(str, seeds)) + " (mean ± sample sd)" if len(seeds) > 1
                      else f"seed {seeds[0]}") + (f"; {names}" if names else ""))
    return "\n".join(lines)


def versions(backbone: str) -> dict[str, str]:
    """Versions of what the numbers depend on: python, petl_tpr, torch and the backbone library."""
    import petl_tpr

    out = {"python": platform.python_version(), "petl_tpr": petl_tpr.__version__, "torch": torch.__version__}
    package = {"transformers": "transformers", "open_clip": "open_clip_torch"}.get(backbone)
    if package:
        try:
            out[backbone] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[backbone] = "not installed"
    return out


def versions_line(names: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in names.items() if k != "python")


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _panel(axes, results: list[dict], key: str, title: str, chance: float | None) -> None:
    from matplotlib.ticker import NullFormatter

    top = max(r[key] + r.get("spread", {}).get(key, 0.0) for r in results)
    ylim = min(100, top * 1.2 + 5)
    placed: list[tuple[float, float]] = []     # label corners (log10 x, y) so far
    colours = {r["method"]: f"C{i}" for i, r in enumerate(r for r in results if r["trainable"] > 0)}
    for result in sorted(results, key=lambda r: -r[key]):
        sd = result.get("spread", {}).get(key)
        if result["trainable"] == 0:
            axes.axhline(result[key], linestyle="--", color="grey", label=f"{result['method']} (no training)")
            continue
        axes.errorbar([result["trainable"]], [result[key]], yerr=None if sd is None else [sd], fmt="o",
                      markersize=7, capsize=4, color=colours[result["method"]])
        x, y = math.log10(result["trainable"]), result[key]
        # Above right, else below right, else above left: the first spot clear of earlier labels.
        for dx, dy, offset in ((0.0, 0.0, (6, 4)), (0.0, -0.08 * ylim, (6, -24)), (-0.35, 0.0, (-58, 4))):
            spot = (x + dx, y + dy)
            if all(abs(spot[0] - px) > 0.3 or abs(spot[1] - py) > 0.07 * ylim for px, py in placed):
                break
        placed.append(spot)
        axes.annotate(f"{result['method']}\n{result['percent']:.1f}%", (result["trainable"], result[key]),
                      textcoords="offset points", xytext=offset, fontsize=8)
    if chance is not None:
        axes.axhline(chance, linestyle=":", color="black", label="chance")
    trained = [r["trainable"] for r in results if r["trainable"] > 0]
    axes.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel="R@1 (%)", title=title, ylim=(0, ylim))
    if trained:
        axes.set_xlim(min(trained) / 2, max(trained) * 4)
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    if any(r["trainable"] == 0 for r in results) or chance is not None:
        axes.legend(loc="lower right", fontsize=8)


def plot_r1_vs_params(results: list[dict], path: Path, *, chance: float | None = None) -> Path | None:
    """R@1 (y) against trainable parameters (x, log scale), zero-shot as a dashed line: the target
    domain on the left, the unseen domain on the right (with its chance level, when given)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    panels = [p for p in PANELS if all(p[0] in r for r in results)]
    figure = Figure(figsize=(7.0 * len(panels), 4.8))
    FigureCanvasAgg(figure)
    for i, (key, title) in enumerate(panels, 1):
        _panel(figure.add_subplot(1, len(panels), i), results, key, title,
               chance if key.startswith("unseen") else None)
    figure.tight_layout()
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))


def write_report(results: list[dict], pretrain: dict | None, out_dir: Path, *, unseen: dict | None = None,
                 extra: dict | None = None) -> str:
    """Write the table, the JSON (machine, pre-training, unseen split with its chance level, rows,
    and `extra`) and the plot under `out_dir`; returns the table."""
    table = format_table(results)
    record = {"machine": machine(), "pretrain": pretrain, "unseen": unseen, **(extra or {}), "results": results}
    write_atomic(out_dir / "demo_results.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1), encoding="utf-8"))
    write_atomic(out_dir / "demo_table.txt", lambda tmp: Path(tmp).write_text(table + "\n", encoding="utf-8"))
    plot_r1_vs_params(results, out_dir / "demo_r1_vs_params.png",
                      chance=unseen.get("chance_R@1") if unseen else None)
    return table
