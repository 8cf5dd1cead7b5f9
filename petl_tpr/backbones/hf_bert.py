"""transformers BERT and BERT-shaped post-norm encoders (RoBERTa, ...)."""

from __future__ import annotations

import torch

from ..registry import register_family
from .layout import BlockLayout, Family, ProjectionRef

# Post-norm: attention.output applies dense -> dropout -> LayerNorm(h + input). The attention
# branch output before the residual is `attention.output.dense`'s output; the MLP branch output
# is `output.dense`'s. The "norms" are the two post-residual LayerNorms.
LAYOUT = BlockLayout(
    attn="attention.self",
    q=ProjectionRef("attention.self.query"),
    k=ProjectionRef("attention.self.key"),
    v=ProjectionRef("attention.self.value"),
    o=ProjectionRef("attention.output.dense"),
    fc1=ProjectionRef("intermediate.dense"),
    fc2=ProjectionRef("output.dense"),
    norm1="attention.output.LayerNorm",
    norm2="output.LayerNorm",
    attn_in="attention",
    attn_out="attention.output.dense",
    mlp_in="intermediate",
    mlp_out="output.dense",
    attention="hf",
    pre_norm=lambda block: False,
)


# DistilBERT: attention.{q,k,v,out}_lin inside one module (its output is the branch output), ffn.lin1/lin2,
# post-norm (sa_layer_norm, output_layer_norm). Its attention takes (query, key, value, mask): no takeover.
LAYOUT_DISTIL = BlockLayout(
    attn="attention",
    q=ProjectionRef("attention.q_lin"),
    k=ProjectionRef("attention.k_lin"),
    v=ProjectionRef("attention.v_lin"),
    o=ProjectionRef("attention.out_lin"),
    fc1=ProjectionRef("ffn.lin1"),
    fc2=ProjectionRef("ffn.lin2"),
    norm1="sa_layer_norm",
    norm2="output_layer_norm",
    attn_in="attention",
    attn_out="attention",
    mlp_in="ffn",
    mlp_out="ffn",
    pre_norm=lambda block: False,
)


def tiny_example():
    """A 2-layer BERT, width 32; `run` returns the last hidden state with a padded second sequence."""
    from ..compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=100, max_position_embeddings=32)
    model = BertModel(config, add_pooling_layer=False).eval()

    def run(m):
        ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        return m(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()].flatten()

    return model, run


FAMILY = register_family(Family(
    name="hf_bert",
    layouts=(LAYOUT, LAYOUT_DISTIL),
    description="transformers BertLayer: attention.self.{query,key,value}, attention.output.dense, post-norm",
    example=tiny_example,
))
