"""`save_pretrained` / `from_pretrained` for an injected transformers model.

`save_pretrained(model, folder)` writes the base model as transformers would (config and weights
via the class's own `save_pretrained`) but **without the adapter tensors**, plus the adapter files
and manifest of `checkpoint.py`. `from_pretrained(CLIPModel, folder)` loads the base with the
class's `from_pretrained` (no unexpected keys, so no warning table) and then the adapters, giving
the injected model back.

transformers' own `model.save_pretrained` on an injected model writes the adapter tensors into the
weights file under their live names with no spec, and `CLIPModel.from_pretrained` drops them as
UNEXPECTED keys. `patch_save_pretrained(model)` makes the model's own method do the split save
instead; `from_pretrained` here refuses a folder written the unpatched way (`spec=` rebuilds it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..api import get_injection, inject
from ..attach import adapter_module
from ..errors import CheckpointError, InputError
from ..spec import Spec
from .checkpoint import MANIFEST, injected_modules, is_checkpoint, load_adapter_folder, save_adapter_folder


def adapter_state_keys(model: nn.Module) -> list[str]:
    """The keys of `model.state_dict()` that belong to adapter modules (their live paths)."""
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    prefixes = set()
    for path, injected in injected_modules(model).items():
        for att in get_injection(injected).attachments:
            live = names.get(id(adapter_module(injected, att)))
            if live is None:
                raise CheckpointError(f"adapter {att.state_prefix} of {path or 'the model'} is not a submodule of it")
            prefixes.add(live + ".")
    keys = [k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)]
    base = {f"{p}.{name}" if p else name for p, m in injected_modules(model).items()
            for name in get_injection(m).requires_grad}
    if base & set(keys):
        raise CheckpointError(f"base parameters sit under adapter modules: {sorted(base & set(keys))[:3]}")
    return keys


def save_pretrained(model: nn.Module, folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Base weights without adapter tensors (the class's `save_pretrained`) + adapter files + manifest.

    `kwargs` go to the class's `save_pretrained` (`safe_serialization`, `max_shard_size`, ...);
    `state_dict=` is refused, since the state dict is what this function decides. A model with
    nothing injected is saved by the class's method alone.
    """
    if not hasattr(type(model), "save_pretrained"):
        raise InputError(f"{type(model).__name__} has no save_pretrained (not a transformers model); use "
                         f"pt.save_adapters, or save the transformers model inside it")
    if "state_dict" in kwargs:
        raise InputError("save_pretrained of an injected model decides the state dict itself; do not pass state_dict=")
    folder = Path(folder)
    if not injected_modules(model):
        type(model).save_pretrained(model, folder, **kwargs)
        return folder
    drop = set(adapter_state_keys(model))
    base = {k: v for k, v in model.state_dict().items() if k not in drop}
    type(model).save_pretrained(model, folder, state_dict=base, **kwargs)
    if kwargs.get("is_main_process", True):
        save_adapter_folder(model, folder, trainables=False)
    return folder


class _SplitSavePretrained:
    """Stands in for `model.save_pretrained` after `patch_save_pretrained` (an object, so it pickles
    and deep-copies with the model)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        return save_pretrained(self.model, save_directory, **kwargs)


def patch_save_pretrained(model: nn.Module) -> nn.Module:
    """Make `model.save_pretrained(folder)` (and `push_to_hub`, which calls it) do `save_pretrained` above.

    The patch lives on this model object only (its `__dict__`); a model ejected later saves normally.
    Calling it again changes nothing. Returns the model.
    """
    if not hasattr(type(model), "save_pretrained"):
        raise InputError(f"{type(model).__name__} has no save_pretrained to patch")
    if not isinstance(model.__dict__.get("save_pretrained"), _SplitSavePretrained):
        model.__dict__["save_pretrained"] = _SplitSavePretrained(model)
    return model


def is_patched(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("save_pretrained"), _SplitSavePretrained)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / shard for shard in shards]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def _read_tensors(folder: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    found = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in keys & set(handle.keys()):
                found[key] = handle.get_tensor(key)
    return found


def _rebuild_unpatched(model: nn.Module, folder: Path, unexpected: list[str], spec: Spec | str | None) -> None:
    """A folder from an unpatched `model.save_pretrained`: the adapter tensors sit in the weights under
    their live names and the spec is lost. Refuse, or re-inject `spec` and copy them in (strict)."""
    if spec is None:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise CheckpointError(
            f"{folder} has no {MANIFEST} but its weights hold {len(unexpected)} tensor(s) this "
            f"{type(model).__name__} does not have ({shown}): it was most likely written by model.save_pretrained "
            f"on an injected model without pt.integrations.hf.patch_save_pretrained, which drops the spec. "
            f"Pass spec= (the spec it was injected with) to rebuild it, and save with pt.save_pretrained from now on")
    inject(model, spec)
    live = set(adapter_state_keys(model))
    tensors = _read_tensors(folder, live | set(unexpected))
    missing, stray = sorted(live - set(tensors)), sorted(set(unexpected) - live)
    if missing or stray:
        raise CheckpointError(f"{folder}: the weights do not fit the given spec: "
                              f"{len(missing)} adapter tensor(s) missing (e.g. {missing[:2]}), "
                              f"{len(stray)} unexplained (e.g. {stray[:2]})")
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key in live:
            if tuple(tensors[key].shape) != tuple(state[key].shape):
                raise CheckpointError(f"{folder}: {key!r} has shape {tuple(tensors[key].shape)} in the weights "
                                      f"but {tuple(state[key].shape)} in the model")
        for key in live:
            state[key].copy_(tensors[key].to(dtype=state[key].dtype, device=state[key].device))


def from_pretrained(cls: Any, folder: str | os.PathLike, *args: Any, target: str = "",
                    spec: Spec | str | None = None, **kwargs: Any) -> nn.Module:
    """The injected model saved in `folder` by `save_pretrained`.

    `cls` is a transformers class (`CLIPModel`; its `from_pretrained(folder, *args, **kwargs)` loads
    the base) or any callable `loader(folder, *args, **kwargs) -> nn.Module` (e.g. `tpr.load_clip`);
    `target` names the submodule of what it returns that was saved (`"clip"` for a `DualEncoder`).
    A folder without adapters (no manifest) is refused with `CheckpointError`; with `spec=` a folder
    written by an unpatched `model.save_pretrained` is rebuilt instead.
    """
    folder = Path(folder)
    loader = getattr(cls, "from_pretrained", cls)
    with_info = hasattr(cls, "from_pretrained") and not is_checkpoint(folder)
    loaded = loader(str(folder), *args, **({"output_loading_info": True} if with_info else {}), **kwargs)
    model, info = loaded if with_info else (loaded, None)
    try:
        root = model.get_submodule(target)
    except AttributeError:
        raise InputError(f"target {target!r} is not a submodule of the loaded {type(model).__name__}") from None
    if is_checkpoint(folder):
        load_adapter_folder(root, folder, trainables=False)
        return model
    unexpected = list((info or {}).get("unexpected_keys", []))
    if not unexpected:
        raise CheckpointError(f"{folder} holds no adapters (no {MANIFEST}, no adapter tensors in its weights); "
                              f"load it with {getattr(cls, '__name__', 'the class')}.from_pretrained")
    _rebuild_unpatched(root, folder, unexpected, spec)
    return model
