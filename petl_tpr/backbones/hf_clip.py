"""transformers CLIP (vision and text towers) and other encoders with CLIP-style layers."""

from __future__ import annotations

import torch

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef

LAYOUT = BlockLayout(
    attn="self_attn",
    q=ProjectionRef("self_attn.q_proj"),
    k=ProjectionRef("self_attn.k_proj"),
    v=ProjectionRef("self_attn.v_proj"),
    o=ProjectionRef("self_attn.out_proj"),
    fc1=ProjectionRef("mlp.fc1"),
    fc2=ProjectionRef("mlp.fc2"),
    norm1="layer_norm1",
    norm2="layer_norm2",
    attn_in="self_attn",
    attn_out="self_attn",
    mlp_in="mlp",
    mlp_out="mlp",
    attention="hf",
)


# BLIP's vision tower: the same layer with one fused qkv Linear (rows q|k|v) and `projection`, attention
# computed in its own code (no SDPA call); the "hf_fused" convention reproduces it.
LAYOUT_FUSED = BlockLayout(
    attn="self_attn",
    q=ProjectionRef("self_attn.qkv", part=0),
    k=ProjectionRef("self_attn.qkv", part=1),
    v=ProjectionRef("self_attn.qkv", part=2),
    o=ProjectionRef("self_attn.projection"),
    fc1=ProjectionRef("mlp.fc1"),
    fc2=ProjectionRef("mlp.fc2"),
    norm1="layer_norm1",
    norm2="layer_norm2",
    attn_in="self_attn",
    attn_out="self_attn",
    mlp_in="mlp",
    mlp_out="mlp",
    attention="hf_fused",
)


def tiny_example():
    """A 2-layer CLIP with 32-wide towers; `run` returns image and text embeddings, padding included."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=98, eos_token_id=99,
                         pad_token_id=0),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()

    def run(m):
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        ids = torch.randint(1, 98, (2, 9), generator=g)
        ids[:, -1] = 99
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        ids[1, 5] = 99
        out = m(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        return torch.cat([out.image_embeds.flatten(), out.text_embeds.flatten()])

    return model, run


FAMILY = register_family(Family(
    name="hf_clip",
    layouts=(LAYOUT, LAYOUT_FUSED),
    description="transformers CLIPEncoderLayer (CLIP, SigLIP-style): self_attn.{q,k,v,out}_proj, mlp.fc1/fc2, pre-norm",
    example=tiny_example,
    global_token=lambda branch: "eot" if branch == "text" else "first",
))
