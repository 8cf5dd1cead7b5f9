"""Image transforms of the reference pipeline (torchvision), PIL image -> `(3, H, W)` float tensor.

train: Resize((H, W)), RandomHorizontalFlip(0.5), Pad(10), RandomCrop((H, W)), ToTensor,
       Normalize(CLIP mean, std), RandomErasing(scale=(0.02, 0.4), value=mean)
test:  Resize((H, W)), ToTensor, Normalize(CLIP mean, std)

Resize uses bilinear interpolation (torchvision's default, with antialiasing on PIL images).
RandomErasing runs after Normalize, so its fill value `mean` is the normalised value of a pixel
brighter than the mean colour, as in the reference. All random draws come from torch's global
generator: seed it (and the data-loader worker seeds) for reproducible augmentation.

torchvision is imported on first use, after `petl_tpr.compat.ensure_torchvision_importable()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import TaskInputError, check_int

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TransformConfig:
    """Sizes and augmentation settings; defaults are the reference values (384 x 128)."""

    height: int = 384
    width: int = 128
    flip_probability: float = 0.5
    padding: int = 10
    erasing: bool = True
    erasing_probability: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            check_int(f"TransformConfig.{name}", getattr(self, name))
        check_int("TransformConfig.padding", self.padding, 0)
        for name in ("flip_probability", "erasing_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TaskInputError(f"TransformConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        low, high = self.erasing_scale
        if not 0.0 < low <= high < 1.0:
            raise TaskInputError(f"TransformConfig.erasing_scale must satisfy 0 < low <= high < 1, "
                                 f"got {self.erasing_scale!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise TaskInputError("TransformConfig.mean and std need three values each, std > 0")

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return (self.height, self.width)


def _torchvision_transforms():
    from ...compat import ensure_torchvision_importable

    if not ensure_torchvision_importable():
        raise ImportError("the image transforms need torchvision (pip install torchvision)")
    import torchvision.transforms as T

    return T


def build_train_transform(config: TransformConfig = TransformConfig()) -> Callable:
    """The training augmentation: PIL image -> `(3, height, width)` float32 tensor."""
    T = _torchvision_transforms()
    steps = [
        T.Resize(config.size),
        T.RandomHorizontalFlip(config.flip_probability),
        T.Pad(config.padding),
        T.RandomCrop(config.size),
        T.ToTensor(),
        T.Normalize(config.mean, config.std),
    ]
    if config.erasing:
        steps.append(T.RandomErasing(p=config.erasing_probability, scale=config.erasing_scale,
                                     value=list(config.mean)))
    return T.Compose(steps)


def build_test_transform(config: TransformConfig = TransformConfig()) -> Callable:
    """The evaluation transform: PIL image -> `(3, height, width)` float32 tensor."""
    T = _torchvision_transforms()
    return T.Compose([T.Resize(config.size), T.ToTensor(), T.Normalize(config.mean, config.std)])


def build_transform(*, train: bool, config: TransformConfig = TransformConfig()) -> Callable:
    return build_train_transform(config) if train else build_test_transform(config)
