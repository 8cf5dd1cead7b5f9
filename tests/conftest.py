"""Shared test helpers. Models are built from configs with random weights; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

from petl_tpr.compat import ensure_torchvision_importable

ensure_torchvision_importable()

import petl_tpr as pt  # noqa: E402
from petl_tpr.attention import is_taken_over  # noqa: E402
from petl_tpr.registry import FAMILIES, METHODS  # noqa: E402


def family_example(name: str):
    """(model, run) for a registered family; skips when its third-party package is missing."""
    try:
        return FAMILIES[name].build_example()
    except ImportError as error:
        pytest.skip(f"{name} needs a package that is not installed: {error}")


def method_cases() -> dict[str, list[dict]]:
    """Every method's declared examples, plus one spec that composes all of them at once."""
    cases: dict[str, list[dict]] = {}
    combined = []
    for name, method in METHODS.items():
        for i, entry in enumerate(method.examples()):
            cases[f"{name}-{i}"] = [entry]
            combined.append({**entry, "name": f"{name.replace('-', '_')}_{i}", "compose": "add"})
    cases["all"] = combined
    return cases


def applicable_cases(family: str) -> dict[str, list[dict]]:
    """`method_cases()` less the cases using a method the family refuses by design (Family.refuses)."""
    refused = set(FAMILIES[family].refuses)
    return {c: entries for c, entries in method_cases().items() if not {e["method"] for e in entries} & refused}


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter parameter random non-zero values, so adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    for key, param in sorted(pt.api.adapter_parameters(model).items()):
        noise = torch.randn(param.shape, generator=g) * 0.05
        param.copy_(1.0 + noise if param.dim() == 0 else noise)


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert list(before) == list(after), "state-dict keys changed"
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed"


def assert_no_petl_traces(model: torch.nn.Module) -> None:
    """No hooks, parametrizations or injection record left anywhere in the model."""
    assert pt.api.get_injection(model) is None
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name}"
        assert not module._forward_pre_hooks, f"pre-hook left on {name}"
        assert not hasattr(module, "parametrizations"), f"parametrization left on {name}"
        assert not is_taken_over(module) and not hasattr(type(module), "_petl_original_class"), \
            f"attention takeover left on {name}"
        assert not hasattr(type(module), "_petl_weight_original") and "_petl_weight_deltas" not in module.__dict__, \
            f"weight delta left on {name}"
