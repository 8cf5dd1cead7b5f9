"""Text-based person retrieval (TPR): data, tokenizer, transforms, losses, metrics, evaluation, training.

Four rooms: `data/` (readers, tokenizer, masking, transforms, synthetic domains), `model/` (CLIP
loading, position resize, the dual encoder), `training/` (trainer, schedule, losses, distributed,
run files, run configs, evaluation, metrics) and `demo/` (`petl-tpr demo` and its report); the task's
errors are in `errors.py`. Import the public names from here. The modules' old flat paths
(`petl_tpr.tpr.trainer`, ...) still import, as the same module objects (`_moved.py`).

Importing this package needs torch only; Pillow is needed to read or draw images, torchvision for
the transforms (imported on first use) and open_clip's BPE file for the tokenizer (located, not
imported). The synthetic-dataset names load on first access, so that import needs no Pillow.
See docs/tpr.md.
"""

from __future__ import annotations

import importlib

from . import _moved  # noqa: F401  (the old flat module paths)
from .data.datasets import EvalSplit, PersonRetrievalData, TrainSample, build_dataset, dataset_names
from .data.masking import MaskingConfig, mask_caption_ids, masked_caption_generator
from .data.tokenizer import CONTEXT_LENGTH, EOT_ID, MASK_ID, SOT_ID, VOCAB_SIZE, ClipTokenizer
from .data.torch_data import CaptionDataset, ImageDataset, ImageTextDataset, load_image
from .data.transforms import (CLIP_MEAN, CLIP_STD, TransformConfig, build_test_transform, build_train_transform,
                              build_transform)
from .errors import DatasetError, TaskInputError, TokenizerError
from .training.losses import IGNORE_INDEX, SDM_EPSILON, SDM_TEMPERATURE, IdentityLoss, masked_token_loss, sdm_loss
from .training.metrics import RetrievalMetrics, metrics_from_similarity, rank_scores, retrieval_metrics

_LAZY = {"SyntheticConfig": "data.synthetic", "synthetic_records": "data.synthetic",
         "write_synthetic": "data.synthetic",
         "DualEncoder": "model.dual_encoder", "build_clip": "model.dual_encoder", "load_clip": "model.dual_encoder",
         "resolve_source": "model.dual_encoder",
         "GridVisionEmbeddings": "model.position", "resize_grid_embedding": "model.position",
         "resize_position_embedding": "model.position",
         "SplitFeatures": "training.evaluation", "encode_split": "training.evaluation",
         "evaluate": "training.evaluation",
         "OptimConfig": "training.schedule", "build_optimizer": "training.schedule",
         "build_scheduler": "training.schedule", "lr_factor": "training.schedule", "param_groups": "training.schedule",
         "TrainConfig": "training.trainer", "TrainingError": "training.trainer", "train": "training.trainer",
         "plot_history": "training.run_files"}

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
