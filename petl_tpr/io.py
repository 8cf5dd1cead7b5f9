"""Adapter-only checkpoints in safetensors: only adapter tensors; spec, backbone and version in metadata.

Keys are `<site key>.<entry>.<param>`, e.g. `vision_model.encoder.layers.0.self_attn.k_proj.lora.lora_a`.
Loading checks format, version, backbone, every key and every shape before it copies anything; into a
model with no adapters it first injects the stored spec (and ejects it again if a check fails).
Saving writes a temporary file beside the target and renames it over the target, so a crash mid-save
leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .api import adapter_parameters, eject, get_injection, inject
from .atomic import write_atomic
from .backbones.discover import discover
from .errors import CheckpointError, SpecError
from .spec import Spec

FORMAT_NAME = "petl_tpr.adapters"
FORMAT_VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor, detached, under its checkpoint key."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def save_adapters(model: nn.Module, path: str | os.PathLike, *, extra: dict[str, str] | None = None) -> Path:
    """Write the adapters of `model` to `path` atomically; returns the path."""
    injection = get_injection(model)
    if injection is None:
        raise CheckpointError("this model has no adapters to save (call inject first)")
    if injection.spec is None:
        raise CheckpointError(f"every adapter ({', '.join(injection.merged_entries)}) was merged into the base "
                              f"weights; there is nothing adapter-only left to save")
    reserved = {"format", "format_version", "spec", "backbone", "merged_entries"}
    if extra and reserved & set(extra):
        raise CheckpointError(f"extra metadata may not use the reserved key(s) {sorted(reserved & set(extra))}")
    spec = injection.spec
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "spec": spec.to_json(),
        "backbone": json.dumps(injection.fingerprint, sort_keys=True),
        "merged_entries": json.dumps(injection.merged_entries),
        **(extra or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapters(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, with format and version checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or another format): {error}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is a safetensors file but not a petl_tpr adapter file "
                              f"(metadata format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has adapter format version {version!r}; this petl_tpr reads version {FORMAT_VERSION}")
    return tensors, metadata


def _check_backbone(model: nn.Module, stored: dict, path: Path) -> None:
    actual = discover(model).fingerprint()
    for name, info in stored.items():
        if name not in actual:
            raise CheckpointError(f"{path} was saved on a backbone with branch {name!r} ({info}); this model has "
                                  f"{json.dumps(actual)}")
        if actual[name] != info:
            raise CheckpointError(f"{path}: branch {name!r} was {info} when saved but is {actual[name]} in this model")


def _check_tensors(file: dict[str, torch.Tensor], live: dict[str, nn.Parameter], path: Path) -> None:
    for key in file:
        if key not in live:
            raise CheckpointError(f"{path}: tensor {key!r} has no matching adapter parameter in the model")
    for key, param in live.items():
        if key not in file:
            raise CheckpointError(f"{path}: adapter parameter {key!r} {tuple(param.shape)} is missing from the file")
        if tuple(file[key].shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(file[key].shape)} in the file "
                                  f"but {tuple(param.shape)} in the model")


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an adapter file into `model`, injecting its stored spec first if the model has no adapters."""
    path = Path(path)
    tensors, metadata = read_adapters(path)
    try:
        spec = Spec.from_json(metadata["spec"])
        stored_backbone = json.loads(metadata["backbone"])
    except (KeyError, SpecError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable spec or backbone metadata: {error}") from None
    _check_backbone(model, stored_backbone, path)
    injected_here = get_injection(model) is None
    if injected_here:
        inject(model, spec)
    try:
        live = adapter_parameters(model)
        _check_tensors(tensors, live, path)
    except BaseException:
        if injected_here:
            eject(model)
        raise
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
    return model
