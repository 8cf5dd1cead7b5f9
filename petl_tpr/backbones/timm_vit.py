"""timm Vision Transformer blocks: one fused qkv Linear."""

from __future__ import annotations

import torch

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef

LAYOUT = BlockLayout(
    attn="attn",
    q=ProjectionRef("attn.qkv", part=0),
    k=ProjectionRef("attn.qkv", part=1),
    v=ProjectionRef("attn.qkv", part=2),
    o=ProjectionRef("attn.proj"),
    fc1=ProjectionRef("mlp.fc1"),
    fc2=ProjectionRef("mlp.fc2"),
    norm1="norm1",
    norm2="norm2",
    attn_in="attn",
    attn_out="attn",
    mlp_in="mlp",
    mlp_out="mlp",
    attention="timm",
)


def tiny_example():
    """A 2-block timm ViT, width 32, 32x32 images; `run` returns the pre-logits features."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=4, num_classes=0).eval()

    def run(m):
        return m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).flatten()

    return model, run


FAMILY = register_family(Family(
    name="timm_vit",
    layouts=(LAYOUT,),
    description="timm Block: attn.qkv (fused, rows q|k|v), attn.proj, mlp.fc1/fc2, pre-norm",
    example=tiny_example,
))
