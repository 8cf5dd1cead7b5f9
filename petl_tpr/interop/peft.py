"""Export LoRA adapters in PEFT's on-disk adapter format, so `PeftModel.from_pretrained` can load them.

PEFT's directory holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` `(r, in)` and `.lora_B.weight` `(out, r)`; its forward is
`base(x) + lora_B(lora_A(x)) * lora_alpha / r`, the same delta as `LoRADelta` with a fixed scale.
Only LoRA on whole `nn.Linear` modules maps onto that; slices of a fused qkv Linear or of
MultiheadAttention's `in_proj_weight` have no PEFT LoRA equivalent and are refused. Module paths are
relative to the model passed in: export the same module you will later hand to PEFT.
Nothing here imports peft; the files are written by hand.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..api import _one_set, get_injection
from ..atomic import write_atomic
from ..attach import adapter_module
from ..errors import InjectionError
from ..methods.lora import LoRADelta

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class _Site:
    """One exportable LoRA: module path, A `(r, in)`, B `(out, r)` with any learnable scale folded in."""

    path: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    alpha: float
    dropout: float


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _collect(model: nn.Module, ignore_other_methods: bool, name: str | None = None) -> list[_Site]:
    injection = get_injection(model)
    if injection is None:
        raise InjectionError(f"this {type(model).__name__} has no adapters to export (call inject first)")
    name = _one_set(injection, name, "export_peft")      # a PEFT adapter directory holds one set
    adapter_set = injection.sets[name]
    if adapter_set.merged_entries:
        raise InjectionError(f"entries {adapter_set.merged_entries} were merged into the base weights; PEFT would load "
                             f"them onto an unmerged base, so export before merging")
    configs = {entry.name: entry.config for entry in adapter_set.spec.entries}
    sites: dict[str, _Site] = {}
    for att in injection.of_set(name):
        module = adapter_module(model, att)
        if not isinstance(module, LoRADelta):
            if ignore_other_methods:
                continue
            raise InjectionError(f"{att.state_prefix} is a {att.method!r} adapter, which PEFT's LoRA format cannot "
                                 f"hold; pass ignore_other_methods=True to export only the LoRA adapters")
        if att.param is not None or att.rows is not None:
            where = f"{att.owner}.{att.param}" if att.param else att.owner
            span = f" rows {att.rows[0]}:{att.rows[1]}" if att.rows else ""
            raise InjectionError(f"LoRA site {att.key} ({where}{span}) is a slice of a fused or raw weight; PEFT "
                                 f"LoRA only wraps whole nn.Linear modules")
        owner = model.get_submodule(att.owner)
        if not isinstance(owner, nn.Linear):  # the same rule PEFT uses to pick its lora.Linear
            raise InjectionError(f"LoRA site {att.key} is on a {type(owner).__name__}, not an nn.Linear")
        if att.owner in sites:
            raise InjectionError(f"{att.owner} carries more than one LoRA (entries sharing a site); PEFT holds one "
                                 f"LoRA per module in an adapter")
        config = configs[att.entry]
        a, b, scale = module.lora_a.detach(), module.lora_b.detach(), module.scale()
        rank = a.shape[0]
        if isinstance(scale, torch.Tensor):
            # PEFT has no learnable scale: fold it into B and make PEFT's scaling alpha / r exactly 1.
            b, alpha = b * scale.detach().to(b.dtype), float(rank)
        else:
            alpha = float(config.alpha if config.alpha is not None else rank)
        sites[att.owner] = _Site(att.owner, a, b, rank, alpha, float(config.dropout))
    if not sites:
        raise InjectionError("this model has no LoRA adapters to export")
    return list(sites.values())


def _patterns(sites: list[_Site], field: str) -> tuple[int | float, dict[str, int | float]]:
    """The most common value of `field` and a {escaped path: value} pattern for every other site."""
    default = Counter(getattr(s, field) for s in sites).most_common(1)[0][0]
    pattern = {re.escape(s.path): _number(getattr(s, field)) for s in sites if getattr(s, field) != default}
    return _number(default), pattern


def _check_patterns(sites: list[_Site], keys: set[str]) -> None:
    # PEFT matches a pattern key as `(.*\.)?key$`: a path that ends in another exported path would
    # take that path's rank or alpha.
    paths = [s.path for s in sites]
    for path in paths:
        for other in paths:
            if other != path and path.endswith("." + other) and re.escape(other) in keys:
                raise InjectionError(f"PEFT's rank/alpha patterns cannot tell {path} from {other}")


def peft_config(sites: list[_Site]) -> dict:
    """The `adapter_config.json` content for these sites."""
    dropouts = {s.dropout for s in sites}
    if len(dropouts) > 1:
        raise InjectionError(f"LoRA entries use different dropouts {sorted(dropouts)}; PEFT has one lora_dropout")
    rank, rank_pattern = _patterns(sites, "rank")
    alpha, alpha_pattern = _patterns(sites, "alpha")
    _check_patterns(sites, set(rank_pattern) | set(alpha_pattern))
    target = "(?:" + "|".join(re.escape(s.path) for s in sites) + ")"
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": rank, "lora_alpha": alpha, "target_modules": target,
        "lora_dropout": dropouts.pop(), "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
    }


def peft_state_dict(sites: list[_Site]) -> dict[str, torch.Tensor]:
    """PEFT keys -> CPU tensors: `lora_A.weight` `(r, in)`, `lora_B.weight` `(out, r)`."""
    out = {}
    for s in sites:
        out[f"{PREFIX}{s.path}.lora_A.weight"] = s.lora_a.to("cpu").contiguous().clone()
        out[f"{PREFIX}{s.path}.lora_B.weight"] = s.lora_b.to("cpu").contiguous().clone()
    return out


def export_peft(model: nn.Module, directory: str | os.PathLike, *, ignore_other_methods: bool = False,
                name: str | None = None) -> Path:
    """Write the LoRA adapters of `model` (of its adapter set `name`, which may be left out when it
    has one) as a PEFT LoRA adapter directory; returns the directory.

    Every check runs before anything is written. Each file is written to a temporary name beside it
    and renamed over the target, so a crash leaves the previous file whole. Raises InjectionError for
    LoRA on a fused or raw weight, for other methods (unless `ignore_other_methods`), for merged
    entries, and for anything PEFT's config cannot express.
    """
    sites = _collect(model, ignore_other_methods, name)
    config = peft_config(sites)
    tensors = peft_state_dict(sites)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    def write_config(tmp: str) -> None:
        Path(tmp).write_text(text)

    write_atomic(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_atomic(directory / CONFIG_NAME, write_config)
    return directory
