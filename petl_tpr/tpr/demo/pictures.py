"""What retrieval looks like: for fixed target test captions, the top-5 gallery images of each
method, the caption's identity framed green and other identities red.

`write_pictures(results, split, out_dir)` reads each result's `examples` ([{"query": caption index,
"top5": [gallery index, ...]}], the same captions for every method, from `run._evaluate`) and writes

- `retrieval/<method>.png`: one row per example caption (the caption, then its top 5 in rank order);
- `demo_retrieval.png`: every method side by side, one row per method, for two of the captions.

It draws from the stored indices, so a re-run that reuses finished steps draws the same pictures.
Returns the paths written (none without matplotlib or examples).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from ...atomic import write_atomic

GREEN, RED = "#1a9641", "#d7191c"
TOP = 5


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _show(axes, path: Path, correct: bool, rank: int | None = None) -> None:
    """One gallery image in a frame: green when it shows the caption's identity, red otherwise."""
    from PIL import Image

    with Image.open(path) as image:
        axes.imshow(image.convert("RGB"), aspect="auto")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(GREEN if correct else RED)
        spine.set_linewidth(4)
    if rank is not None:
        axes.set_title(str(rank), fontsize=9)


def _save(figure, path: Path, dpi: int = 80) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))


def method_picture(result: dict, split, path: Path) -> Path:
    """One method's picture: per example caption, the caption and its top 5."""
    examples = result["examples"]
    figure = _figure(2.6 + TOP * 0.75, 0.65 + 1.8 * len(examples))
    grid = figure.add_gridspec(len(examples), TOP + 1, width_ratios=[3.4] + [1] * TOP, wspace=0.12, hspace=0.3,
                               left=0.02, right=0.98, bottom=0.02, top=1 - 0.6 / (0.65 + 1.8 * len(examples)))
    for row, example in enumerate(examples):
        q = example["query"]
        text = figure.add_subplot(grid[row, 0])
        text.axis("off")
        text.text(0, 0.5, textwrap.fill(split.captions[q], 30), va="center", ha="left", fontsize=8)
        for k, g in enumerate(example["top5"]):
            _show(figure.add_subplot(grid[row, k + 1]), split.image_paths[g],
                  split.image_pids[g] == split.caption_pids[q], rank=k + 1 if row == 0 else None)
    figure.suptitle(f"{result['method']}: top {TOP} of the target test gallery (R@1 {result['R@1']:.1f}); "
                    "green: the caption's identity, red: another", fontsize=9)
    return _save(figure, path)


def overview_picture(results: list[dict], split, path: Path, *, captions: int = 2) -> Path:
    """Every method side by side (one row each) for `captions` of the example captions, spread over them."""
    count = min(len(r["examples"]) for r in results)
    picked = sorted({round(i * count / min(captions, count)) for i in range(min(captions, count))})
    columns = [None] + [c for n, i in enumerate(picked) for c in ([None] if n else []) + [(i, k) for k in range(TOP)]]
    ratios = [2.0] + [1 if c else 0.3 for c in columns[1:]]
    height = 1.6 + 1.45 * len(results)
    figure = _figure(1.3 + 0.62 * (len(columns) - 1), height)
    grid = figure.add_gridspec(len(results), len(columns), width_ratios=ratios, wspace=0.1, hspace=0.15,
                               left=0.02, right=0.99, bottom=0.3 / height, top=1 - 1.2 / height)
    for row, result in enumerate(results):
        label = figure.add_subplot(grid[row, 0])
        label.axis("off")
        label.text(0, 0.5, f"{result['method']}\nR@1 {result['R@1']:.1f}", va="center", fontsize=8)
        for col, cell in enumerate(columns):
            if cell is None:
                continue
            example = result["examples"][cell[0]]
            g, q = example["top5"][cell[1]], example["query"]
            axes = figure.add_subplot(grid[row, col])
            _show(axes, split.image_paths[g], split.image_pids[g] == split.caption_pids[q])
            if cell[1] == 0 and row == 0:
                axes.set_title(textwrap.fill(split.captions[q], 55), fontsize=7.5, loc="left")
            if row == len(results) - 1:
                axes.set_xlabel(str(cell[1] + 1), fontsize=8)
    figure.suptitle(f"Top {TOP} of the target test gallery for two captions; green: the caption's identity, "
                    "red: another", fontsize=9, y=1 - 0.2 / height)
    return _save(figure, path, dpi=64)


def write_pictures(results: list[dict], split, out_dir: Path) -> list[Path]:
    """The per-method pictures and the side-by-side one (see the module docstring)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    results = [r for r in results if r.get("examples")]
    if not results:
        return []
    paths = [method_picture(r, split, out_dir / "retrieval" / f"{r['method'].replace(' ', '-')}.png")
             for r in results]
    return paths + [overview_picture(results, split, out_dir / "demo_retrieval.png")]
