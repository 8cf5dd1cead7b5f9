"""The structural family: blocks read from their structure when no family table fits (structural.py).

Registered last, so every table family is tried first. Its blocks have no takeover convention of their
own: prefixes are given to the attention's one `F.scaled_dot_product_attention` call while its own
forward runs (the `sdpa` convention, attention/intercept.py), and refused at inject where the probe
finds no such call.
"""

from __future__ import annotations

from ..registry import register_family
from .layout import Family
from .structural import STRUCTURAL, tiny_example

FAMILY = register_family(Family(
    name=STRUCTURAL,
    layouts=(),
    description="any block with two norms, q/k/v (separate or fused) + output projection and a 2- or 3-Linear MLP, "
                "read from its structure (names tell q from k from v); pre/post-norm from one probe call",
    example=tiny_example,
    # a ViT read by structure pools its class token; a text stack's pooling cannot be read (CLS for BERT-like
    # encoders, the last token for GPT-2, none for T5): side networks correct every position there
    global_token=lambda branch: "first" if branch == "vision" else "none",
))
