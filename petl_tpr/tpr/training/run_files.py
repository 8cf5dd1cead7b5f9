"""One run directory of the trainer: its files (checkpoints, pointer, metrics log, curves) and the
RNG states a checkpoint stores so that a resumed run draws exactly what an uninterrupted one would.

See `trainer.py` for the layout of the files.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

from ...atomic import write_atomic
from ...errors import CheckpointError


# ------------------------------------------------------------------------------------ RNG state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of the shuffling generator of (0-based) `epoch`."""
    return seed * 1_000_003 + epoch


# ------------------------------------------------------------------------------ weight files

WEIGHTS_FORMAT = "petl-tpr-full-weights"


def save_weights(clip: torch.nn.Module, path: Path, *, full: bool, epoch: int) -> Path:
    """Write the adapters of `clip` (`pt.save_adapters`) or, with `full`, its whole state dict
    (safetensors, atomically; metadata names the format and the epoch)."""
    import petl_tpr as pt

    if not full:
        return pt.save_adapters(clip, path, extra={"epoch": str(epoch)})
    from safetensors.torch import save_model

    metadata = {"format": WEIGHTS_FORMAT, "epoch": str(epoch)}
    return write_atomic(path, lambda tmp: save_model(clip, tmp, metadata=metadata))


def load_weights(clip: torch.nn.Module, path: Path, *, full: bool) -> None:
    """Load what `save_weights` wrote into `clip` (every key and shape checked)."""
    import petl_tpr as pt

    if not full:
        pt.load_adapters(clip, path, overwrite=True)   # resume: the run's sets are injected already
        return
    from safetensors import safe_open
    from safetensors.torch import load_model

    try:
        with safe_open(str(path), framework="pt") as handle:
            fmt = (handle.metadata() or {}).get("format")
        if fmt != WEIGHTS_FORMAT:
            raise CheckpointError(f"{path} is not a whole-model checkpoint (format {fmt!r})")
        load_model(clip, str(path), strict=True)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - wrong keys, shapes or a damaged file
        raise CheckpointError(f"cannot load {path} into {type(clip).__name__}: {error}") from None


# ------------------------------------------------------------------------------------- run files

STATE_FORMAT = "petl-tpr-train-state"
STATE_VERSION = 1


class RunFiles:
    """Paths and atomic writers of one run directory (see the module docstring)."""

    def __init__(self, out_dir: Path) -> None:
        self.root = Path(out_dir)
        self.checkpoints = self.root / "checkpoints"
        self.latest = self.checkpoints / "latest.json"
        self.metrics = self.root / "metrics.jsonl"
        self.best = self.root / "best.safetensors"
        self.curves = self.root / "curves.png"

    def adapters(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.safetensors"

    def state(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:03d}.state.pt"

    def read_state(self, epoch: int) -> dict:
        """The training state saved after `epoch` (format and version checked)."""
        path = self.state(epoch)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is a checkpoint problem
            raise CheckpointError(f"cannot read {path}: {error}") from None
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path} is not a {STATE_FORMAT} v{STATE_VERSION} file")
        return state

    def write_state(self, epoch: int, state: dict) -> None:
        """Write `state` (plus format, version and epoch) atomically as the state file of `epoch`."""
        state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, **state}
        write_atomic(self.state(epoch), lambda tmp: torch.save(state, tmp))

    def read_latest(self) -> dict | None:
        if not self.latest.exists():
            return None
        try:
            latest = json.loads(self.latest.read_text(encoding="utf-8"))
            epoch = int(latest["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{self.latest}: unreadable checkpoint pointer: {error}") from None
        for path in (self.adapters(epoch), self.state(epoch)):
            if not path.exists():
                raise CheckpointError(f"{self.latest} names epoch {epoch} but {path} is missing")
        return {"epoch": epoch}

    def write_latest(self, epoch: int) -> None:
        text = json.dumps({"epoch": epoch, "adapters": self.adapters(epoch).name, "state": self.state(epoch).name})
        write_atomic(self.latest, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def prune(self, keep_from: int) -> None:
        """Delete epoch checkpoints older than epoch `keep_from`."""
        for path in self.checkpoints.glob("epoch_*"):
            try:
                epoch = int(path.name[len("epoch_"):].split(".")[0])
            except ValueError:
                continue
            if epoch < keep_from:
                path.unlink(missing_ok=True)

    def rewrite_metrics(self, history: list[dict]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in history)
        write_atomic(self.metrics, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def plot_history(history: list[dict], path: str | os.PathLike) -> Path | None:
    """Loss and eval-metric curves per epoch as a PNG (matplotlib's Agg canvas, no global backend
    change). Returns the path, or None when matplotlib is not installed or there is nothing to draw."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not history:
        return None
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    losses, scores = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    epochs = [r["epoch"] for r in history]
    for key in ("loss", "sdm", "id", "aux"):
        if any(r.get(key) for r in history):
            losses.plot(epochs, [r[key] for r in history], marker="o", label=key)
    losses.set(xlabel="epoch", title="training loss")
    losses.legend()
    for split in ("val", "test"):
        points = [(r["epoch"], r[split]) for r in history if split in r]
        for metric in ("R@1", "R@5", "mAP"):
            if points:
                scores.plot([e for e, _ in points], [m[metric] for _, m in points], marker="o",
                            label=f"{split} {metric}")
    scores.set(xlabel="epoch", ylabel="%", title="text -> image")
    if scores.lines:
        scores.legend()
    figure.tight_layout()
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
