"""Masked captions: eligibility, proportions, at-least-one rule, determinism."""

from __future__ import annotations

import pytest
import torch

from petl_tpr.tpr.errors import TaskInputError
from petl_tpr.tpr.training.losses import IGNORE_INDEX
from petl_tpr.tpr.data.masking import MaskingConfig, mask_caption_ids, masked_caption_generator
from petl_tpr.tpr.data.tokenizer import EOT_ID, MASK_ID, SOT_ID


def caption_batch(n: int, body: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, 77, dtype=torch.long)
    ids[:, 0] = SOT_ID
    ids[:, 1:body + 1] = torch.randint(1, MASK_ID, (n, body), generator=gen)
    ids[:, body + 1] = EOT_ID
    return ids


def test_only_eligible_tokens_change_and_labels_mark_them():
    ids = caption_batch(300, 20)
    ids[0, 3] = MASK_ID  # an existing mask token is not eligible
    masked, labels = mask_caption_ids(ids, generator=torch.Generator().manual_seed(1))
    eligible = (ids > 0) & (ids < MASK_ID)
    picked = labels != IGNORE_INDEX
    assert not (picked & ~eligible).any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])  # SOT, EOT, padding, unpicked untouched
    assert ((masked[picked] >= 1) & (masked[picked] <= MASK_ID)).all()
    assert picked.any(dim=1).all()


def test_proportions():
    ids = caption_batch(1000, 60)
    masked, labels = mask_caption_ids(ids, generator=torch.Generator().manual_seed(2))
    picked = labels != IGNORE_INDEX
    rate = picked.sum().item() / (1000 * 60)
    assert 0.14 < rate < 0.16
    n = picked.sum().item()
    as_mask = (masked[picked] == MASK_ID).sum().item() / n
    unchanged = (masked[picked] == ids[picked]).sum().item() / n
    assert 0.78 < as_mask < 0.82
    assert 0.08 < unchanged < 0.12  # the random 10% rarely hit the original id by chance
    assert 0.08 < 1 - as_mask - unchanged < 0.12


def test_at_least_one_and_empty_captions():
    one = caption_batch(50, 1)
    masked, labels = mask_caption_ids(one, generator=torch.Generator().manual_seed(3))
    # Always a target; masked unless it was picked by chance and drew "random" or "unchanged".
    assert torch.equal(labels[:, 1], one[:, 1]) and (labels[:, 2:] == IGNORE_INDEX).all()
    assert (masked[:, 1] == MASK_ID).sum() >= 45
    empty = caption_batch(4, 0)
    masked, labels = mask_caption_ids(empty, generator=torch.Generator().manual_seed(3))
    assert torch.equal(masked, empty) and (labels == IGNORE_INDEX).all()
    single, single_labels = mask_caption_ids(one[0], generator=torch.Generator().manual_seed(0))
    assert single.shape == (77,) and single_labels.shape == (77,)


def test_deterministic_per_generator_state():
    ids = caption_batch(20, 30)
    a = mask_caption_ids(ids, generator=masked_caption_generator(1, 2, 3))
    b = mask_caption_ids(ids, generator=masked_caption_generator(1, 2, 3))
    c = mask_caption_ids(ids, generator=masked_caption_generator(1, 3, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_config_and_input_validation():
    with pytest.raises(TaskInputError, match="probability"):
        MaskingConfig(probability=0.0)
    with pytest.raises(TaskInputError, match="<= 1"):
        MaskingConfig(mask_fraction=0.95, random_fraction=0.1)
    with pytest.raises(TaskInputError, match="int64"):
        mask_caption_ids(torch.zeros(3, 77, dtype=torch.int32), generator=torch.Generator())
    everything = MaskingConfig(probability=1.0, mask_fraction=1.0, random_fraction=0.0)
    masked, _ = mask_caption_ids(caption_batch(2, 5), generator=torch.Generator(), config=everything)
    assert (masked[:, 1:6] == MASK_ID).all()
