"""The pieces compose: synthetic data -> reader -> torch datasets -> losses and metrics."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import petl_tpr.tpr as tpr


def test_tiny_pipeline_end_to_end(tmp_path):
    root = tpr.write_synthetic(tmp_path, domain=0, identities=8, images_per_id=2, captions_per_image=2,
                               test_fraction=0.25, seed=1)
    data = tpr.build_dataset("cuhk-pedes", root)
    tokenizer = tpr.ClipTokenizer()
    size = tpr.TransformConfig(height=32, width=16)
    train = tpr.ImageTextDataset(data.train, transform=tpr.build_train_transform(size), tokenizer=tokenizer,
                                 masking=tpr.MaskingConfig())
    batch = next(iter(DataLoader(train, batch_size=8, shuffle=False)))

    torch.manual_seed(0)
    image_head = torch.nn.Linear(3 * 32 * 16, 32)
    text_embed = torch.nn.EmbeddingBag(tpr.VOCAB_SIZE, 32)
    id_loss = tpr.IdentityLoss(num_ids=data.num_train_ids, feature_dim=32)
    image_features = image_head(batch["image"].flatten(1))
    text_features = text_embed(batch["caption_ids"])
    loss = tpr.sdm_loss(image_features, text_features, batch["pid"]) + id_loss(image_features, text_features,
                                                                               batch["pid"])
    loss.backward()
    assert torch.isfinite(loss) and image_head.weight.grad is not None

    with torch.no_grad():
        gallery = tpr.ImageDataset.from_split(data.test, transform=tpr.build_test_transform(size))
        queries = tpr.CaptionDataset.from_split(data.test, tokenizer=tokenizer)
        g = next(iter(DataLoader(gallery, batch_size=len(gallery))))
        q = next(iter(DataLoader(queries, batch_size=len(queries))))
        metrics = tpr.retrieval_metrics(text_embed(q["caption_ids"]), image_head(g["image"].flatten(1)),
                                        q["pid"], g["pid"])
    assert metrics.num_queries == 2 * 2 * 2 and metrics.num_gallery == 2 * 2
    assert 0 < metrics.mINP <= 100 and 0 < metrics.mAP <= 100 and metrics.r1 <= metrics.r5 <= metrics.r10 == 100
