"""PyTorch's own blocks: nn.TransformerEncoderLayer and torchvision's ViT EncoderBlock."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef, is_mha


def _mha_projections(attn: str) -> dict[str, ProjectionRef]:
    return {
        "q": ProjectionRef(attn, param="in_proj_weight", part=0),
        "k": ProjectionRef(attn, param="in_proj_weight", part=1),
        "v": ProjectionRef(attn, param="in_proj_weight", part=2),
        "o": ProjectionRef(f"{attn}.out_proj", param="weight"),
    }


# nn.TransformerEncoderLayer: the feed-forward is linear1 -> activation -> dropout -> linear2, with
# no module around it, so the MLP branch enters at linear1 and leaves at linear2.
ENCODER_LAYER = BlockLayout(
    attn="self_attn",
    **_mha_projections("self_attn"),
    fc1=ProjectionRef("linear1"),
    fc2=ProjectionRef("linear2"),
    norm1="norm1",
    norm2="norm2",
    attn_in="self_attn",
    attn_out="self_attn",
    mlp_in="linear1",
    mlp_out="linear2",
    attn_check=is_mha,
    attention="mha",
    pre_norm=lambda block: bool(block.norm_first),
    batch_first=lambda block: block.self_attn.batch_first,
)

# torchvision.models.vision_transformer.EncoderBlock: mlp is Sequential(Linear, GELU, Dropout, Linear, Dropout).
TORCHVISION_BLOCK = BlockLayout(
    attn="self_attention",
    **_mha_projections("self_attention"),
    fc1=ProjectionRef("mlp.0"),
    fc2=ProjectionRef("mlp.3"),
    norm1="ln_1",
    norm2="ln_2",
    attn_in="self_attention",
    attn_out="self_attention",
    mlp_in="mlp",
    mlp_out="mlp",
    attn_check=is_mha,
    attention="mha",
)


def tiny_example():
    """A 2-layer pre-norm nn.TransformerEncoder (sequence-first) with a padding mask."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, norm_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()

    def run(m):
        x = torch.randn(7, 2, 32, generator=torch.Generator().manual_seed(0))
        pad = torch.zeros(2, 7, dtype=torch.bool)
        pad[1, 5:] = True
        return m(x, src_key_padding_mask=pad)[~pad.T].flatten()

    return model, run


def tiny_torchvision_example():
    """A 2-layer torchvision ViT (width 32, 32x32 images); `run` returns the class-token features."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                              mlp_dim=64, num_classes=10).eval()
    model.heads = nn.Identity()  # torchvision zero-initialises its head, which would hide every change

    def run(m):
        return m(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))).flatten()

    return model, run


FAMILY = register_family(Family(
    name="torch_mha",
    layouts=(ENCODER_LAYER,),
    description="nn.TransformerEncoderLayer (pre- or post-norm, batch-first or not): self_attn, linear1/linear2",
    example=tiny_example,
))

TORCHVISION_FAMILY = register_family(Family(
    name="torchvision_vit",
    layouts=(TORCHVISION_BLOCK,),
    description="torchvision VisionTransformer EncoderBlock: ln_1, self_attention (MHA), ln_2, mlp.0/mlp.3",
    example=tiny_torchvision_example,
))
