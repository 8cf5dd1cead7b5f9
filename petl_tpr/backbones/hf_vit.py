"""transformers ViT, in both layer layouts transformers has used."""

from __future__ import annotations

import torch

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef

# transformers >= 5: attention.{q,k,v,o}_proj and mlp.fc1/fc2.
LAYOUT_V5 = BlockLayout(
    attn="attention",
    q=ProjectionRef("attention.q_proj"),
    k=ProjectionRef("attention.k_proj"),
    v=ProjectionRef("attention.v_proj"),
    o=ProjectionRef("attention.o_proj"),
    fc1=ProjectionRef("mlp.fc1"),
    fc2=ProjectionRef("mlp.fc2"),
    norm1="layernorm_before",
    norm2="layernorm_after",
    attn_in="attention",
    attn_out="attention",
    mlp_in="mlp",
    mlp_out="mlp",
    attention="hf",
)

# transformers 4.x: attention.attention.{query,key,value}, attention.output.dense, intermediate/output.
# Its self-attention takes (hidden_states, head_mask, output_attentions): no convention re-implements it;
# prefixes go through its own SDPA call where it makes one (the `sdpa` convention, probed at inject).
LAYOUT_V4 = BlockLayout(
    attn="attention.attention",
    q=ProjectionRef("attention.attention.query"),
    k=ProjectionRef("attention.attention.key"),
    v=ProjectionRef("attention.attention.value"),
    o=ProjectionRef("attention.output.dense"),
    fc1=ProjectionRef("intermediate.dense"),
    fc2=ProjectionRef("output.dense"),
    norm1="layernorm_before",
    norm2="layernorm_after",
    attn_in="attention",
    attn_out="attention.output.dense",
    mlp_in="intermediate",
    mlp_out="output.dense",
)

# Data2Vec-vision (and BEiT before transformers 5): the same paths as LAYOUT_V4, a self-attention
# with a relative position bias table, taken over by the "hf_relbias" convention.
LAYOUT_RELBIAS = BlockLayout(
    **{f: getattr(LAYOUT_V4, f) for f in ("attn", "q", "k", "v", "o", "fc1", "fc2", "norm1", "norm2", "attn_in",
                                          "attn_out", "mlp_in", "mlp_out")},
    attn_check=lambda module: hasattr(module, "has_relative_position_bias"),
    attention="hf_relbias",
)


# DINOv2 (with or without register tokens): norm1/norm2, a LayerScale after each branch. The branch
# output before the residual is the LayerScale's output, so parallel adapters are not scaled down by it.
LAYOUT_DINOV2 = BlockLayout(
    attn="attention",
    q=ProjectionRef("attention.q_proj"),
    k=ProjectionRef("attention.k_proj"),
    v=ProjectionRef("attention.v_proj"),
    o=ProjectionRef("attention.o_proj"),
    fc1=ProjectionRef("mlp.fc1"),
    fc2=ProjectionRef("mlp.fc2"),
    norm1="norm1",
    norm2="norm2",
    attn_in="attention",
    attn_out="layer_scale1",
    mlp_in="mlp",
    mlp_out="layer_scale2",
    attention="hf",
)


def tiny_example():
    """A 2-layer ViT, width 32, 32x32 images; `run` returns the last hidden state."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)
    model = ViTModel(config, add_pooling_layer=False).eval()

    def run(m):
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return m(pixel_values=pixels).last_hidden_state.flatten()

    return model, run


FAMILY = register_family(Family(
    name="hf_vit",
    layouts=(LAYOUT_V5, LAYOUT_RELBIAS, LAYOUT_V4, LAYOUT_DINOV2),
    description="transformers ViTLayer (v5 q/k/v/o_proj + mlp, and v4 attention.attention.query/... layout), and DINOv2 layers (norm1/norm2, LayerScale), pre-norm",
    example=tiny_example,
))
