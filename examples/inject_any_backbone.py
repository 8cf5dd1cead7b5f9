"""Inject one spec into models of several families and show what went where.

Run: python examples/inject_any_backbone.py
Every model is built from a config with random weights (no download). With your own pretrained
model, call `pt.inject(model, spec)` the same way.
"""

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers/timm/open_clip on CPU-only torch

import open_clip  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

import petl_tpr as pt  # noqa: E402

spec = pt.Spec.from_dict({"entries": [
    {"method": "lora", "config": {"rank": 8, "alpha": 16, "roles": ["q", "v"]}},
    {"method": "l-adapter", "config": {"reduction": 8}, "where": {"layers": "-4:"}},   # last four blocks only
]})

models = {
    "open_clip ViT-B-16": open_clip.create_model("ViT-B-16", pretrained=None),
    "timm vit_small": timm.create_model("vit_small_patch16_224", pretrained=False),
    "transformers BERT-base": BertModel(BertConfig()),
}
for name, model in models.items():
    report = pt.inject(model, spec)
    s = pt.summary(model)
    print(f"== {name}: {pt.backbones.discover(model).describe()}")
    print(report.describe())
    print(f"trainable {s.trainable:,} of {s.total:,} ({s.percent:.2f}%)\n")
    pt.eject(model)   # back to the original model, bit for bit
