"""Vision position embeddings on a rectangular patch grid (CLIP at 384 x 128).

Both CLIP builds keep one learned vector per position: the class token's first, then the patch
grid in row-major order (row 0 left to right, then row 1, ...).

- open_clip: `visual.positional_embedding`, an `nn.Parameter` of shape `(1 + gh * gw, width)`, with
  `visual.image_size` and `visual.grid_size` as `(H, W)` / `(gh, gw)` tuples, so a rectangular
  grid only needs the parameter and the two tuples changed.
- transformers: `vision_model.embeddings.position_embedding`, an `nn.Embedding(1 + g * g, hidden)`
  looked up with a `position_ids` buffer. `CLIPVisionEmbeddings` assumes a square image (an int
  `image_size`; other sizes need `interpolate_pos_encoding=True`, which re-interpolates bicubically
  at every forward), so the resize swaps in `GridVisionEmbeddings`, which has the same parameter
  names (`class_embedding`, `patch_embedding.weight`, `position_embedding.weight`) and a
  `(H, W)` image size.

The resize is bilinear with `align_corners=False` and no antialiasing: IRRA (the code base of
UP-Person and DM-Adapter) resizes the 14 x 14 grid of ViT-B/16 to 24 x 8 this way, and
`align_corners=False` treats every embedding as the centre of its patch cell, so the new grid
samples the same image area. open_clip's own loader resizes bicubically with antialiasing and
transformers' `interpolate_pos_encoding` bicubically, so neither is used. The class position is
copied unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TaskInputError

Size = tuple[int, int]


def pair(value) -> Size:
    """`(H, W)` from an int or a pair."""
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def square_grid(num_patches: int) -> Size:
    """The square grid of `num_patches` positions; refuses a count that is not a square."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise TaskInputError(f"cannot infer the grid of {num_patches} patch positions (not a square); "
                             "give the source grid explicitly")
    return side, side


def resize_grid_embedding(embedding: torch.Tensor, source: Size, target: Size) -> torch.Tensor:
    """Resize a `(1 + gh * gw, D)` position embedding from grid `source` to `target`, CLS kept.

    Bilinear, `align_corners=False`, no antialiasing (IRRA's resize), computed in float32 and
    returned in the input dtype. The same grid returns a copy.
    """
    source, target = pair(source), pair(target)
    if embedding.ndim != 2 or embedding.shape[0] != 1 + source[0] * source[1]:
        raise TaskInputError(f"position embedding of shape {tuple(embedding.shape)} does not hold a CLS "
                             f"position plus a {source[0]}x{source[1]} grid")
    if source == target:
        return embedding.detach().clone()
    cls, grid = embedding[:1], embedding[1:]
    dim = embedding.shape[1]
    grid = grid.detach().float().reshape(1, source[0], source[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=target, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(target[0] * target[1], dim).to(embedding.dtype)
    return torch.cat([cls.detach().clone(), grid], dim=0)


class GridVisionEmbeddings(nn.Module):
    """transformers' CLIP vision embeddings on a rectangular grid, with the same parameter names.

    `forward(pixel_values, interpolate_pos_encoding=False)` needs images of exactly `image_size`
    unless `interpolate_pos_encoding` is set, which resizes the grid bilinearly for that call.
    """

    def __init__(self, class_embedding: nn.Parameter, patch_embedding: nn.Conv2d, position: torch.Tensor,
                 image_size: Size, patch_size: int, config=None):
        super().__init__()
        self.config = config
        self.class_embedding = class_embedding
        self.patch_embedding = patch_embedding
        self.patch_size = patch_size
        self.image_size = pair(image_size)
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_positions = self.num_patches + 1
        self.embed_dim = position.shape[1]
        if position.shape[0] != self.num_positions:
            raise TaskInputError(f"{position.shape[0]} positions for a {self.grid_size} grid plus CLS")
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim,
                                               device=position.device, dtype=position.dtype)
        with torch.no_grad():
            self.position_embedding.weight.copy_(position)
        self.register_buffer("position_ids", torch.arange(self.num_positions, device=position.device)[None],
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        position = self.position_embedding(self.position_ids)
        if (height, width) != self.image_size:
            if not interpolate_pos_encoding:
                raise TaskInputError(f"input image size {height}x{width} does not match the model "
                                     f"({self.image_size[0]}x{self.image_size[1]})")
            grid = (height // self.patch_size, width // self.patch_size)
            position = resize_grid_embedding(position[0], self.grid_size, grid)[None]
        patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1)
        return torch.cat([cls, patches], dim=1) + position

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, patch_size={self.patch_size}, grid_size={self.grid_size}"


def _replace_parameter(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)


def resize_position_embedding(clip: nn.Module, image_size, source_grid: Size | None = None) -> nn.Module:
    """Give a CLIP (transformers `CLIPModel` or open_clip) the image size `(H, W)`, in place.

    The vision position embedding becomes a new parameter holding the bilinear resize of the old
    one (CLS kept); the configured image size follows (`visual.image_size` / `grid_size` in
    open_clip, `config.vision_config.image_size = [H, W]` in transformers). `source_grid` defaults
    to the model's current grid. Returns `clip`.
    """
    height, width = pair(image_size)
    if hasattr(clip, "vision_model"):                       # transformers CLIPModel
        old = clip.vision_model.embeddings
        patch = old.patch_size if isinstance(old.patch_size, int) else pair(old.patch_size)[0]
        if height % patch or width % patch:
            raise TaskInputError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
        weight = old.position_embedding.weight
        source = source_grid or getattr(old, "grid_size", None) or square_grid(weight.shape[0] - 1)
        position = resize_grid_embedding(weight, source, (height // patch, width // patch))
        new = GridVisionEmbeddings(old.class_embedding, old.patch_embedding, position, (height, width), patch,
                                   config=getattr(old, "config", None))
        new.position_embedding.weight.requires_grad_(weight.requires_grad)
        new.train(old.training)
        clip.vision_model.embeddings = new
        for config in {id(c): c for c in (clip.config.vision_config, clip.vision_model.config)}.values():
            config.image_size = [height, width]
        return clip
    visual = getattr(clip, "visual", None)
    if visual is None or not hasattr(visual, "positional_embedding"):
        raise TaskInputError(f"{type(clip).__name__} is neither a transformers CLIPModel nor an open_clip ViT CLIP")
    patch = pair(visual.patch_size)
    if height % patch[0] or width % patch[1]:
        raise TaskInputError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    target = (height // patch[0], width // patch[1])
    source = source_grid or pair(visual.grid_size)
    resized = resize_grid_embedding(visual.positional_embedding, source, target)
    visual.positional_embedding = _replace_parameter(visual.positional_embedding, resized)
    visual.image_size, visual.grid_size = (height, width), target
    preprocess = getattr(visual, "preprocess_cfg", None)
    if isinstance(preprocess, dict) and "size" in preprocess:
        preprocess["size"] = (height, width)
    return clip
