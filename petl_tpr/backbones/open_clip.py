"""open_clip and OpenAI CLIP ResidualAttentionBlock: nn.MultiheadAttention with in_proj_weight."""

from __future__ import annotations

import torch

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef, is_mha

LAYOUT = BlockLayout(
    attn="attn",
    q=ProjectionRef("attn", param="in_proj_weight", part=0),
    k=ProjectionRef("attn", param="in_proj_weight", part=1),
    v=ProjectionRef("attn", param="in_proj_weight", part=2),
    o=ProjectionRef("attn.out_proj", param="weight"),
    fc1=ProjectionRef("mlp.c_fc"),
    fc2=ProjectionRef("mlp.c_proj"),
    norm1="ln_1",
    norm2="ln_2",
    attn_in="attn",
    attn_out="attn",
    mlp_in="mlp",
    mlp_out="mlp",
    attn_check=is_mha,
    attention="mha",
    batch_first=lambda block: block.attn.batch_first,   # open_clip < 2.24 and OpenAI CLIP run (L, B, D)
)


def tiny_example():
    """A 2-layer open_clip CLIP (width 32 towers); `run` returns image and text features."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import open_clip

    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32, mlp_ratio=2.0),
        text_cfg=dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2, mlp_ratio=2.0),
    ).eval()

    def run(m):
        g = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, 32, 32, generator=g)
        text = torch.randint(1, 99, (2, 12), generator=g)
        text[:, 8] = 99
        text[:, 9:] = 0
        return torch.cat([m.encode_image(images).flatten(), m.encode_text(text).flatten()])

    return model, run


FAMILY = register_family(Family(
    name="open_clip",
    layouts=(LAYOUT,),
    description="open_clip / OpenAI CLIP ResidualAttentionBlock: attn (MultiheadAttention), ln_1, mlp.c_fc/c_proj, ln_2",
    example=tiny_example,
    global_token=lambda branch: "eot" if branch == "text" else "first",
))
