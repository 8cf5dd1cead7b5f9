"""torch `Dataset`s over the annotations of `datasets.py`: training pairs, gallery images, queries.

Items are dicts so a default `DataLoader` collates them into batches of tensors:

- `ImageTextDataset`: {"pid", "image_id", "image" `(3, H, W)`, "caption_ids" `(L,)`} and, with
  masking, "mlm_ids" `(L,)` and "mlm_labels" `(L,)` (-100 where not masked);
- `ImageDataset`:     {"pid", "image" `(3, H, W)`}      (the gallery of an `EvalSplit`);
- `CaptionDataset`:   {"pid", "caption_ids" `(L,)`}     (the queries of an `EvalSplit`).

Images are opened with PIL on access; a missing or unreadable file raises `DatasetError` naming
the path. Caption masking is drawn from a generator seeded by (seed, epoch, index), so it is the
same whichever worker loads a sample; call `set_epoch` at the start of every epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .datasets import EvalSplit, TrainSample
from ..errors import DatasetError
from .masking import MaskingConfig, mask_caption_ids, masked_caption_generator
from .tokenizer import ClipTokenizer


def load_image(path: str | Path):
    """Open an image file as an RGB `PIL.Image`, fully decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DatasetError(f"image not found: {path}") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


class ImageTextDataset(Dataset):
    """One item per training caption."""

    def __init__(self, samples: Sequence[TrainSample], *, transform: Callable, tokenizer: ClipTokenizer,
                 masking: MaskingConfig | None = None, seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.tokenizer = tokenizer
        self.masking = masking
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the masking draw of this epoch (data-loader workers see it when their iterator
        is created, i.e. call this before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        ids = self.tokenizer.tokenize(sample.caption)
        item = {
            "pid": torch.tensor(sample.pid, dtype=torch.long),
            "image_id": torch.tensor(sample.image_id, dtype=torch.long),
            "image": self.transform(load_image(sample.path)),
            "caption_ids": ids,
        }
        if self.masking is not None:
            generator = masked_caption_generator(self.seed, self.epoch, index)
            item["mlm_ids"], item["mlm_labels"] = mask_caption_ids(ids, generator=generator, config=self.masking)
        return item


class ImageDataset(Dataset):
    """The gallery images of an evaluation split."""

    def __init__(self, paths: Sequence[Path], pids: Sequence[int], *, transform: Callable) -> None:
        if len(paths) != len(pids):
            raise DatasetError(f"{len(paths)} image paths but {len(pids)} pids")
        self.paths, self.pids, self.transform = list(paths), list(pids), transform

    @classmethod
    def from_split(cls, split: EvalSplit, *, transform: Callable) -> "ImageDataset":
        return cls(split.image_paths, split.image_pids, transform=transform)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pid": torch.tensor(self.pids[index], dtype=torch.long),
                "image": self.transform(load_image(self.paths[index]))}


class CaptionDataset(Dataset):
    """The query captions of an evaluation split."""

    def __init__(self, captions: Sequence[str], pids: Sequence[int], *, tokenizer: ClipTokenizer) -> None:
        if len(captions) != len(pids):
            raise DatasetError(f"{len(captions)} captions but {len(pids)} pids")
        self.captions, self.pids, self.tokenizer = list(captions), list(pids), tokenizer

    @classmethod
    def from_split(cls, split: EvalSplit, *, tokenizer: ClipTokenizer) -> "CaptionDataset":
        return cls(split.captions, split.caption_pids, tokenizer=tokenizer)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pid": torch.tensor(self.pids[index], dtype=torch.long),
                "caption_ids": self.tokenizer.tokenize(self.captions[index])}
