"""Run configs (TOML): a paper's recipe on a dataset, runnable with `petl-tpr train`.

```toml
[run]
preset = "up-person:cuhk-pedes"     # any preset name (petl_tpr.presets)
dataset = "cuhk-pedes"             # cuhk-pedes | icfg-pedes | rstpreid
[model]
image_size = [384, 128]
[data]
val_fraction = 0.0                 # carve a validation split from train where the dataset has none
[train]                            # any TrainConfig field except out_dir
lr = 1e-3
```

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import SpecError

SECTIONS = {"run": {"preset", "dataset", "paper"}, "model": {"image_size"}, "data": {"val_fraction"}, "train": None}


@dataclass(frozen=True)
class RunConfig:
    """A parsed run config; `train` holds TrainConfig keyword arguments (validated by TrainConfig)."""

    preset: str
    dataset: str
    paper: str = ""
    image_size: tuple[int, int] = (384, 128)
    val_fraction: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)


def _train_fields() -> set[str]:
    from .trainer import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig) if f.init and f.name != "out_dir"}


def load_run_config(path: str | Path) -> RunConfig:
    """Read and check a run config file; raises SpecError naming the file and the bad key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SpecError(f"{path}: cannot read the run config: {error}") from None
    for section, keys in data.items():
        if section not in SECTIONS:
            raise SpecError(f"{path}: unknown section [{section}]; sections: {', '.join(SECTIONS)}")
        allowed = SECTIONS[section] if SECTIONS[section] is not None else _train_fields()
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise SpecError(f"{path}: [{section}] has no key(s) {unknown}; keys: {', '.join(sorted(allowed))}")
    run = data.get("run", {})
    for key in ("preset", "dataset"):
        if key not in run:
            raise SpecError(f"{path}: [run] needs {key!r}")
    train = dict(data.get("train", {}))
    if "betas" in train:
        train["betas"] = tuple(train["betas"])
    size = tuple(data.get("model", {}).get("image_size", (384, 128)))
    return RunConfig(preset=run["preset"], dataset=run["dataset"], paper=run.get("paper", ""), image_size=size,
                     val_fraction=float(data.get("data", {}).get("val_fraction", 0.0)), train=train)


def run_training(config: RunConfig, *, data_root: str | Path, backbone: str | Path, out_dir: str | Path,
                 pretrained: str | None = None, resume: bool = False, overrides: dict[str, Any] | None = None,
                 stop_after: int | None = None, device: str | None = None):
    """Load the dataset and the backbone, inject the preset into both towers, train; returns the history.

    `device`: where to train (default: "cuda" when available, else "cpu"; under torchrun each
    process takes `cuda:LOCAL_RANK`)."""
    import petl_tpr as pt

    from ..data.datasets import build_dataset
    from ..model.dual_encoder import load_clip
    from ..data.tokenizer import ClipTokenizer
    from .trainer import TrainConfig, train
    from ..data.transforms import TransformConfig, build_test_transform, build_train_transform

    data = build_dataset(config.dataset, data_root, val_fraction=config.val_fraction)
    model = load_clip(backbone, pretrained=pretrained, image_size=config.image_size)
    pt.inject(model.clip, config.preset)
    settings = TrainConfig(out_dir=Path(out_dir), **{**config.train, **(overrides or {})})
    size = TransformConfig(height=config.image_size[0], width=config.image_size[1])
    return train(model, data, settings, tokenizer=ClipTokenizer(), train_transform=build_train_transform(size),
                 eval_transform=build_test_transform(size), resume=resume, stop_after=stop_after,
                 device=default_device(device))


def default_device(device: str | None) -> str:
    """`device`, or "cuda" when a GPU is visible, else "cpu"."""
    import torch

    return device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def run_evaluation(config: RunConfig, *, data_root: str | Path, backbone: str | Path, adapters: str | Path,
                   pretrained: str | None = None, split: str = "test", batch_size: int = 64,
                   device: str | None = None) -> dict:
    """Text -> image metrics of a trained adapter file (e.g. a run's `best.safetensors`) on a split
    ("test" or "val") of the run config's dataset, with the backbone it was trained on; `device`
    as in `run_training`."""
    import petl_tpr as pt

    from ..data.datasets import build_dataset
    from ..errors import TaskInputError
    from .evaluation import evaluate
    from ..model.dual_encoder import load_clip
    from ..data.tokenizer import ClipTokenizer
    from ..data.transforms import TransformConfig, build_test_transform

    if split not in ("test", "val"):
        raise TaskInputError(f"split must be 'test' or 'val', got {split!r}")
    data = build_dataset(config.dataset, data_root, val_fraction=config.val_fraction)
    target = data.test if split == "test" else data.val
    if target is None:
        raise TaskInputError(f"{config.dataset} under {data_root} has no {split} split "
                             f"(set [data] val_fraction in the run config to carve one)")
    model = load_clip(backbone, pretrained=pretrained, image_size=config.image_size)
    pt.load_adapters(model.clip, adapters)
    model.to(default_device(device))
    size = TransformConfig(height=config.image_size[0], width=config.image_size[1])
    return evaluate(model, target, tokenizer=ClipTokenizer(), transform=build_test_transform(size),
                    batch_size=batch_size)

