"""Contract: `Method.param_shapes` reports exactly the parameters `build` creates, without allocating.

Checkpoint loading trusts these shapes to refuse a tampered file before anything is built, and
`targeting.plan` sums them to refuse a spec that cannot fit, so they are checked against the built
modules for every method example on every family.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import petl_tpr as pt
from petl_tpr.backbones import discover
from petl_tpr.methods.base import Method
from petl_tpr.registry import FAMILIES
from petl_tpr.sizes import planned_shapes
from petl_tpr.targeting import plan

from conftest import applicable_cases, family_example, method_cases

CASES = method_cases()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_planned_shapes_equal_built_parameters(family):
    model, _ = family_example(family)
    for case, entries in applicable_cases(family).items():
        spec = pt.Spec.from_dict({"entries": entries})
        expected = planned_shapes(plan(model, spec, discover(model), []))
        pt.inject(model, spec)
        built = {k: tuple(p.shape) for k, p in pt.api.adapter_parameters(model).items()}
        pt.eject(model)
        assert list(expected) == list(built), f"{case}: keys differ"
        assert expected == built, f"{case}: shapes differ"


def test_every_registered_method_overrides_param_shapes():
    """The formulas, not the meta-device fallback, serve every built-in method."""
    from petl_tpr.registry import METHODS

    for name, method in METHODS.items():
        assert method.param_shapes.__func__ is not Method.param_shapes.__func__, name


class _Toy(nn.Module):
    def __init__(self, width: int, d: int) -> None:
        super().__init__()
        self.inner = nn.Linear(d, width)
        self.gain = nn.Parameter(torch.ones(width))


class _ToyMethod(Method):
    """Not registered: only the base class's meta-device fallback is under test."""

    name = "toy"

    @classmethod
    def build(cls, config, *, in_dim, out_dim, branch):
        return _Toy(config, in_dim)


def test_default_param_shapes_builds_on_meta_without_storage():
    width = 10**7   # 10**7 x 4096 float32 would be 160 GB if it were allocated
    shapes = _ToyMethod.param_shapes(width, in_dim=4096, out_dim=4096, branch="x")
    assert shapes == {"gain": (width,), "inner.weight": (width, 4096), "inner.bias": (width,)}
    assert list(shapes) == [k for k, _ in _Toy(3, 5).named_parameters()]
