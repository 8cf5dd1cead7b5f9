"""transformers decoder-style blocks (Llama, Mistral, Qwen2 and look-alikes): RMSNorm, gated MLP, GQA.

`self_attn.{q,k,v,o}_proj` (k and v may be narrower: grouped-query heads), a gated MLP
`mlp.{gate,up,down}_proj` (roles fc1 = up_proj, fc2 = down_proj; the gate gets no adapter),
`input_layernorm` / `post_attention_layernorm`, pre-norm. The attention applies rotary position
embeddings handed in by the model; the `hf_rotary` convention reproduces it (attention/rotary.py),
so prefixes sit after the rotation.
These models do not pool: a side network (UniPT) corrects every position, each reading earlier positions only
(their attention says `is_causal`).
"""

from __future__ import annotations

import torch

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef

LAYOUT = BlockLayout(
    attn="self_attn",
    q=ProjectionRef("self_attn.q_proj"),
    k=ProjectionRef("self_attn.k_proj"),
    v=ProjectionRef("self_attn.v_proj"),
    o=ProjectionRef("self_attn.o_proj"),
    fc1=ProjectionRef("mlp.up_proj"),
    fc2=ProjectionRef("mlp.down_proj"),
    norm1="input_layernorm",
    norm2="post_attention_layernorm",
    attn_in="self_attn",
    attn_out="self_attn",
    mlp_in="mlp",
    mlp_out="mlp",
    attention="hf_rotary",
)


def tiny_example():
    """A 2-layer Llama (width 32, 4 query heads over 2 key/value heads); `run` returns the hidden states."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=32)
    model = LlamaModel(config).eval()

    def run(m):
        ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
        return m(input_ids=ids).last_hidden_state.flatten()

    return model, run


FAMILY = register_family(Family(
    name="hf_decoder",
    layouts=(LAYOUT,),
    description="transformers Llama-style decoder layer: self_attn.{q,k,v,o}_proj (GQA), mlp.{gate,up,down}_proj, RMSNorm",
    example=tiny_example,
    global_token=lambda branch: "none",
))
