"""A batch of size 0 through every method on every family, compared with the bare model.

Where the bare model returns an empty result, the injected one returns one of the same shapes.
Where the bare model raises (transformers' attention reshapes with -1 and fails on 0 elements,
as does nn.MultiheadAttention's fast path), the injected one raises the same exception class, or,
when an attention takeover replaced the failing code, returns the empty result the batch implies:
every output tensor has the shape of its batch-1 output with the batch dimension (the one that
changes between batch 1 and batch 2) set to 0. Nothing else is accepted: never another exception,
never a non-empty or wrongly shaped result.
"""

from __future__ import annotations

import pytest
import torch

import petl_tpr as pt
from petl_tpr.registry import FAMILIES

from conftest import applicable_cases, family_example, method_cases, perturb

CASES = method_cases()


def _inputs(family: str, batch: int):
    """A call of the family's example model on `batch` inputs."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    if family == "hf_clip":
        ids = torch.randint(1, 98, (batch, 9), generator=g)
        ids[:, -1] = 99
        return lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images)
    if family == "hf_bert":
        ids = torch.randint(1, 100, (batch, 10), generator=g)
        return lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    if family == "hf_decoder":
        ids = torch.randint(1, 100, (batch, 10), generator=g)
        return lambda m: m(input_ids=ids).last_hidden_state
    if family == "hf_vit":
        return lambda m: m(pixel_values=images).last_hidden_state
    if family == "open_clip":
        text = torch.randint(1, 99, (batch, 12), generator=g)
        text[:, 8], text[:, 9:] = 99, 0
        return lambda m: (m.encode_image(images), m.encode_text(text))
    if family == "torch_mha":
        x = torch.randn(7, batch, 32, generator=g)
        return lambda m: m(x, src_key_padding_mask=torch.zeros(batch, 7, dtype=torch.bool))
    return lambda m: m(images)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):   # transformers ModelOutput
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _call(model, family: str, batch: int):
    """(tensors, None) or (None, exception class)."""
    try:
        with torch.no_grad():
            return _tensors(_inputs(family, batch)(model)), None
    except Exception as error:   # noqa: BLE001  (compared with the bare model's)
        return None, type(error)


def _empty_shapes(model, family: str) -> list[tuple[int, ...]]:
    one, two = (_call(model, family, b)[0] for b in (1, 2))
    shapes = []
    for a, b in zip(one, two):
        assert a.dim() == b.dim()
        shapes.append(tuple(0 if x != y else x for x, y in zip(a.shape, b.shape)))
    return shapes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_empty_batch_like_the_bare_model(family):
    bare, _ = family_example(family)
    bare_out, bare_error = _call(bare, family, 0)
    model, _ = family_example(family)
    for case, entries in applicable_cases(family).items():
        pt.inject(model, pt.Spec.from_dict({"entries": entries}))
        perturb(model)
        out, error = _call(model, family, 0)
        shapes = _empty_shapes(model, family) if error is None and bare_error is not None else None
        pt.eject(model)
        if bare_error is None:
            assert error is None, f"{case}: bare model returns an empty result, injected raises {error}"
            assert [t.shape for t in out] == [t.shape for t in bare_out], case
        elif error is not None:
            assert error is bare_error, f"{case}: bare raises {bare_error.__name__}, injected {error.__name__}"
        else:   # a takeover served what the bare attention could not: the empty result the batch implies
            assert [tuple(t.shape) for t in out] == shapes, case
            assert all(t.numel() == 0 for t in out if t.dim() > 0), case
