"""Train and test image transforms."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from petl_tpr.tpr.errors import TaskInputError
from petl_tpr.tpr.data.transforms import CLIP_MEAN, CLIP_STD, TransformConfig, build_test_transform, build_train_transform


def mean_colour_image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), tuple(round(255 * m) for m in CLIP_MEAN))


def test_test_transform_shape_and_normalisation():
    out = build_test_transform()(mean_colour_image(50, 140))
    assert out.shape == (3, 384, 128) and out.dtype == torch.float32
    assert out.abs().max() < 0.01  # the mean colour normalises to ~0
    white = build_test_transform(TransformConfig(height=32, width=16))(Image.new("RGB", (7, 9), (255, 255, 255)))
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert white.shape == (3, 32, 16)
    assert torch.allclose(white.mean(dim=(1, 2)), expected, atol=1e-5)


def test_train_transform_shape_randomness_and_seeding():
    transform = build_train_transform(TransformConfig(height=64, width=24))
    image = Image.linear_gradient("L").convert("RGB").resize((30, 70))
    torch.manual_seed(0)
    a = [transform(image) for _ in range(6)]
    torch.manual_seed(0)
    b = [transform(image) for _ in range(6)]
    assert all(x.shape == (3, 64, 24) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(a[0], x) for x in a[1:])


def test_erasing_fills_with_mean_value():
    config = TransformConfig(height=40, width=20, flip_probability=0.0, padding=0, erasing_probability=1.0)
    out = build_train_transform(config)(Image.new("RGB", (20, 40), (0, 0, 0)))
    black = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    erased = (out - torch.tensor(CLIP_MEAN)[:, None, None]).abs().amax(dim=0) < 1e-6
    assert erased.any()
    assert torch.allclose(out[:, ~erased], black[:, None].expand(3, int((~erased).sum())), atol=1e-5)


def test_config_validation():
    with pytest.raises(TaskInputError, match="height"):
        TransformConfig(height=0)
    with pytest.raises(TaskInputError, match="erasing_scale"):
        TransformConfig(erasing_scale=(0.5, 0.2))
    with pytest.raises(TaskInputError, match="flip_probability"):
        TransformConfig(flip_probability=2.0)
    assert TransformConfig().size == (384, 128)
    assert len(build_train_transform(TransformConfig(erasing=False)).transforms) == 6
