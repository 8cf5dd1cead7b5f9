"""Text-based person retrieval (TPR): data, tokenizer, transforms, losses, metrics, evaluation, training.

Importing this package needs torch only; Pillow is needed to read or draw images, torchvision for
the transforms (imported on first use) and open_clip's BPE file for the tokenizer (located, not
imported). The synthetic-dataset names load on first access, so that import needs no Pillow.
See docs/tpr.md.
"""

from __future__ import annotations

import importlib

from .datasets import EvalSplit, PersonRetrievalData, TrainSample, build_dataset, dataset_names
from .errors import DatasetError, TaskInputError, TokenizerError
from .losses import IGNORE_INDEX, SDM_EPSILON, SDM_TEMPERATURE, IdentityLoss, masked_token_loss, sdm_loss
from .masking import MaskingConfig, mask_caption_ids, masked_caption_generator
from .metrics import RetrievalMetrics, metrics_from_similarity, rank_scores, retrieval_metrics
from .tokenizer import CONTEXT_LENGTH, EOT_ID, MASK_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer
from .torch_data import CaptionDataset, ImageDataset, ImageTextDataset, load_image
from .transforms import (CLIP_MEAN, CLIP_STD, TransformConfig, build_test_transform, build_train_transform,
                         build_transform)

_LAZY = {"SyntheticConfig": "synthetic", "synthetic_records": "synthetic", "write_synthetic": "synthetic",
         "DualEncoder": "models", "build_clip": "models", "load_clip": "models", "resolve_source": "models",
         "GridVisionEmbeddings": "position", "resize_grid_embedding": "position",
         "resize_position_embedding": "position",
         "SplitFeatures": "evaluation", "encode_split": "evaluation", "evaluate": "evaluation",
         "OptimConfig": "schedule", "build_optimizer": "schedule", "build_scheduler": "schedule",
         "lr_factor": "schedule", "param_groups": "schedule",
         "TrainConfig": "trainer", "TrainingError": "trainer", "plot_history": "run_files", "train": "trainer"}

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "OptimConfig", "SplitFeatures", "TrainConfig", "TrainingError", "build_optimizer",
    "build_scheduler", "encode_split", "evaluate", "lr_factor", "param_groups", "plot_history", "train", "CONTEXT_LENGTH", "CaptionDataset", "ClipTokenizer", "DatasetError", "DualEncoder",
    "EOT_ID", "EvalSplit", "GridVisionEmbeddings", "IGNORE_INDEX", "IdentityLoss", "ImageDataset",
    "ImageTextDataset", "MASK_ID", "MaskingConfig", "PersonRetrievalData", "RetrievalMetrics", "SDM_EPSILON",
    "SDM_TEMPERATURE", "SOT_ID", "SyntheticConfig", "TaskInputError", "TokenizerError", "TrainSample",
    "TransformConfig", "VOCAB_SIZE", "build_clip", "build_dataset", "build_test_transform",
    "build_train_transform", "build_transform", "dataset_names", "load_clip", "load_image", "mask_caption_ids",
    "masked_caption_generator", "masked_token_loss", "metrics_from_similarity", "rank_scores",
    "resize_grid_embedding", "resize_position_embedding", "resolve_source", "retrieval_metrics", "sdm_loss",
    "synthetic_records", "write_synthetic",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
