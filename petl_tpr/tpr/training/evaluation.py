"""Text -> image evaluation of a `DualEncoder` on an `EvalSplit`.

`encode_split` runs the queries (captions) and the gallery (images) through the model in
batches, in eval mode and without gradients, and returns L2-normalised float32 features;
`evaluate` then ranks them with `retrieval_metrics` and returns the table keys
{"R@1", "R@5", "R@10", "mAP", "mINP"} (percent) plus "num_queries" and "num_gallery".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.datasets import EvalSplit
from ..errors import check_int
from .metrics import retrieval_metrics
from ..model.dual_encoder import DualEncoder
from ..data.tokenizer import ClipTokenizer
from ..data.torch_data import CaptionDataset, ImageDataset


@dataclass(frozen=True)
class SplitFeatures:
    """text `(Q, E)`, text_pids `(Q,)`, images `(G, E)`, image_pids `(G,)`; features L2-normalised, on CPU."""

    text: torch.Tensor
    text_pids: torch.Tensor
    images: torch.Tensor
    image_pids: torch.Tensor


def _progress(iterable: Iterable, *, total: int, desc: str, enabled: bool | None) -> Iterable:
    """Wrap in a tqdm bar when tqdm is installed and enabled (default: only when stderr is a TTY)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _encode(loader: DataLoader, encode: Callable[[torch.Tensor], torch.Tensor], key: str, device: torch.device,
            *, desc: str, progress: bool | None, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    features, pids = [], []
    for batch in _progress(loader, total=len(loader), desc=desc, enabled=progress):
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            out = encode(batch[key].to(device, non_blocking=True))
        features.append(F.normalize(out.float(), dim=1).cpu())
        pids.append(batch["pid"])
    return torch.cat(features), torch.cat(pids)


@torch.no_grad()
def encode_split(model: DualEncoder, split: EvalSplit, *, tokenizer: ClipTokenizer, transform: Callable,
                 batch_size: int = 64, num_workers: int = 0, amp: bool = False,
                 progress: bool | None = None) -> SplitFeatures:
    """Features of every caption and gallery image of `split` (see `SplitFeatures`).

    The model is put in eval mode for the pass and its previous mode restored. `transform` is the
    test transform (PIL -> `(3, H, W)`); `amp` runs the encoders under float16 autocast (CUDA only).
    """
    check_int("batch_size", batch_size)
    device = _device_of(model)
    autocast = bool(amp) and device.type == "cuda"
    loader_args = dict(batch_size=batch_size, shuffle=False, num_workers=num_workers,
                       pin_memory=device.type == "cuda")
    queries = DataLoader(CaptionDataset.from_split(split, tokenizer=tokenizer), **loader_args)
    gallery = DataLoader(ImageDataset.from_split(split, transform=transform), **loader_args)
    was_training = model.training
    model.eval()
    try:
        text, text_pids = _encode(queries, model.encode_text, "caption_ids", device, desc="captions",
                                  progress=progress, autocast=autocast)
        images, image_pids = _encode(gallery, model.encode_image, "image", device, desc="images",
                                     progress=progress, autocast=autocast)
    finally:
        model.train(was_training)
    return SplitFeatures(text, text_pids, images, image_pids)


def evaluate(model: DualEncoder, split: EvalSplit, *, tokenizer: ClipTokenizer, transform: Callable,
             batch_size: int = 64, num_workers: int = 0, amp: bool = False,
             progress: bool | None = None) -> dict[str, float | int]:
    """Text -> image metrics of `model` on `split`: {"R@1", "R@5", "R@10", "mAP", "mINP",
    "num_queries", "num_gallery"} (the five scores in percent). Arguments as in `encode_split`."""
    feats = encode_split(model, split, tokenizer=tokenizer, transform=transform, batch_size=batch_size,
                         num_workers=num_workers, amp=amp, progress=progress)
    metrics = retrieval_metrics(feats.text, feats.images, feats.text_pids, feats.image_pids)
    return {**metrics.as_dict(), "num_queries": metrics.num_queries, "num_gallery": metrics.num_gallery}
