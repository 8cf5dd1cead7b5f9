"""Adapter-only checkpoint folders: what a training checkpoint of an injected model holds.

A folder holds one adapter file per injected module (`pt.save_adapters`, spec in its metadata),
`trainable.safetensors` with the trainable parameters that are not adapters (a task head trained
with the adapters, unfrozen norms; absent when there are none) and `petl_checkpoint.json`, the
manifest, written last so that a folder with a manifest is complete. No frozen base weight is
written: a checkpoint is loaded into a model built from the same base weights.

Manifest: `{"format": "petl_tpr.checkpoint", "format_version": 1, "adapters": {module path: file},
"trainable": file or null}`. The module path is relative to the model passed in (`""` for the model
itself, `"clip"` for a `DualEncoder`'s CLIP); the adapter keys inside each file are relative to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..api import adapter_parameters, get_injection
from ..atomic import write_atomic
from ..errors import CheckpointError
from ..io import load_adapters, save_adapters

MANIFEST = "petl_checkpoint.json"
TRAINABLE = "trainable.safetensors"
FORMAT_NAME = "petl_tpr.checkpoint"
TRAINABLE_FORMAT = "petl_tpr.trainable"
FORMAT_VERSION = 1


def injected_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of `model` (itself included) that holds an injection, by path."""
    return {path: module for path, module in model.named_modules() if get_injection(module) is not None}


def adapter_file_name(path: str) -> str:
    """`adapters.safetensors` for the model itself, `adapters.<path>.safetensors` for a submodule."""
    return "adapters.safetensors" if path == "" else f"adapters.{path}.safetensors"


def non_adapter_trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with requires_grad that belong to no adapter, under their `named_parameters` names."""
    adapters = {id(p) for module in injected_modules(model).values() for p in adapter_parameters(module).values()}
    return {name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in adapters}


def is_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def save_adapter_folder(model: nn.Module, folder: str | os.PathLike, *, trainables: bool = True) -> dict:
    """Write the adapter files (and, with `trainables`, the other trainable parameters) and the manifest.

    Raises CheckpointError when nothing is injected, or when an injected module has nothing
    adapter-only left to save (every entry merged: its deltas live in base weights that are not written).
    """
    folder = Path(folder)
    modules = injected_modules(model)
    if not modules:
        raise CheckpointError(f"nothing is injected in this {type(model).__name__} or its submodules; an "
                              f"adapter-only checkpoint would hold nothing (call pt.inject first)")
    extra = non_adapter_trainables(model) if trainables else {}
    adapters = {}
    for path, module in modules.items():
        adapters[path] = adapter_file_name(path)
        save_adapters(module, folder / adapters[path], extra={"module_path": path})
    if extra:
        tensors = {k: p.detach().to("cpu").contiguous().clone() for k, p in extra.items()}
        metadata = {"format": TRAINABLE_FORMAT, "format_version": str(FORMAT_VERSION)}
        write_atomic(folder / TRAINABLE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "adapters": adapters,
                "trainable": TRAINABLE if extra else None}
    write_atomic(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1), encoding="utf-8"))
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable checkpoint manifest: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a petl_tpr checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {manifest.get('format_version')!r}; this "
                              f"petl_tpr reads version {FORMAT_VERSION}")
    return manifest


def _read_trainables(path: Path, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, nn.Parameter]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("format") != TRAINABLE_FORMAT:
                raise CheckpointError(f"{path} is not a petl_tpr trainable-parameter file")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    params = dict(model.named_parameters())
    for key, tensor in tensors.items():
        if key not in params:
            raise CheckpointError(f"{path}: parameter {key!r} is not in this {type(model).__name__}")
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise CheckpointError(f"{path}: {key!r} has shape {tuple(tensor.shape)} in the file but "
                                  f"{tuple(params[key].shape)} in the model")
    return tensors, params


def load_adapter_folder(model: nn.Module, folder: str | os.PathLike, *, trainables: bool = True) -> nn.Module:
    """Load a folder written by `save_adapter_folder` into `model` (injecting stored specs where none is).

    Checked before anything is copied: the manifest, every module path, the trainable file's keys
    and shapes, and that no injected module of the model is missing from the folder (its adapters
    would keep their current values). Each adapter file is then checked by `pt.load_adapters`.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    targets = {}
    for path in manifest["adapters"]:
        try:
            targets[path] = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"{folder}: adapters were saved for submodule {path!r}, which this "
                                  f"{type(model).__name__} does not have") from None
    absent = sorted(set(injected_modules(model)) - set(targets))
    if absent:
        raise CheckpointError(f"{folder} holds no adapters for the injected module(s) {absent} of this model")
    extra = None
    if trainables and manifest.get("trainable"):
        extra = _read_trainables(folder / manifest["trainable"], model)
    for path, module in targets.items():
        load_adapters(module, folder / manifest["adapters"][path], overwrite=True)
    if extra is not None:
        tensors, params = extra
        with torch.no_grad():
            for key, tensor in tensors.items():
                params[key].copy_(tensor.to(dtype=params[key].dtype, device=params[key].device))
    return model
