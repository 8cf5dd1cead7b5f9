"""Masked captions for the MLM objective (`--MLM` in the reference scripts).

Each token with 0 < id < MASK_ID (so not padding, mask, SOT or EOT) is picked with probability
`probability` (0.15). A picked token becomes `<|mask|>` with probability `mask_fraction` (0.8),
a random id in 1..MASK_ID-1 (1..49404) with probability `random_fraction` (0.1), and stays as it
is otherwise (0.1). A caption where nothing was picked gets its first eligible token masked
(the reference masks position 1, the first token after SOT), so every caption with at least one
eligible token has a target. A caption without eligible tokens is returned unchanged.

Labels hold the original id at every picked position (including the unchanged 10%) and
IGNORE_INDEX = -100 elsewhere, the default `ignore_index` of `F.cross_entropy`. (The reference
uses 0 there; 0 is the id of "!", so -100 is the unambiguous choice.)

All randomness comes from the `torch.Generator` passed in, so the result is a function of the
generator's state: `masked_caption_generator(seed, epoch, index)` gives a per-sample generator
that is independent of data-loader workers and sample order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TaskInputError
from ..training.losses import IGNORE_INDEX
from .tokenizer import MASK_ID


@dataclass(frozen=True)
class MaskingConfig:
    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("probability", "mask_fraction", "random_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise TaskInputError(f"MaskingConfig.{name} must be a number in [0, 1], got {value!r}")
        if self.probability == 0.0:
            raise TaskInputError("MaskingConfig.probability must be > 0")
        if self.mask_fraction + self.random_fraction > 1.0:
            raise TaskInputError(f"MaskingConfig: mask_fraction + random_fraction must be <= 1, got "
                                 f"{self.mask_fraction} + {self.random_fraction}")


def masked_caption_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, index): the same sample in the same epoch is always
    masked the same way, whichever worker loads it."""
    mixed = (seed * 1_000_003 + epoch) * 1_000_000_007 + index
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def mask_caption_ids(ids: torch.Tensor, *, generator: torch.Generator,
                     config: MaskingConfig = MaskingConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """ids `(L,)` or `(N, L)` int64 token ids -> (masked ids, labels), both the shape of `ids`.

    Labels are the original ids at picked positions and IGNORE_INDEX (-100) elsewhere.
    """
    if ids.dtype != torch.long or ids.dim() not in (1, 2):
        raise TaskInputError(f"ids must be an int64 tensor of shape (L,) or (N, L), got {ids.dtype} {tuple(ids.shape)}")
    rows = ids.reshape(1, -1) if ids.dim() == 1 else ids
    rows = rows.cpu()
    eligible = (rows > 0) & (rows < MASK_ID)
    draw = torch.rand(rows.shape, generator=generator)
    random_ids = torch.randint(1, MASK_ID, rows.shape, generator=generator)
    picked = eligible & (draw < config.probability)
    action = draw / config.probability  # uniform in [0, 1) given picked
    to_mask = picked & (action < config.mask_fraction)
    to_random = picked & ~to_mask & (action < config.mask_fraction + config.random_fraction)

    none_picked = ~picked.any(dim=1) & eligible.any(dim=1)
    if bool(none_picked.any()):
        first = eligible.to(torch.int8).argmax(dim=1)
        forced = torch.zeros_like(picked)
        forced[torch.arange(rows.shape[0]), first] = True
        forced &= none_picked[:, None]
        picked |= forced
        to_mask |= forced
        to_random &= ~forced

    masked = torch.where(to_mask, torch.full_like(rows, MASK_ID), rows)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(picked, rows, torch.full_like(rows, IGNORE_INDEX))
    return masked.reshape(ids.shape).to(ids.device), labels.reshape(ids.shape).to(ids.device)
