"""Named specs: the papers' settings. Each preset is plain data, checked when built.

A preset may name a method this version does not provide yet; building it then fails with a clear
message unless that method is left out with `without=(...)`.
"""

from __future__ import annotations

from typing import Any

from .errors import SpecError
from .registry import METHODS

# Presets name no branches, so they apply to every branch the model has: both towers of a CLIP,
# the one stack of a ViT or BERT.

# UP-Person (REFERENCE.md section 1): LoRA on k, v with a learnable scalar; S-Prefix after the first
# token; L-Adapter parallel to both norms. Per-dataset rank and prefix length.
_UP_PERSON = {"cuhk-pedes": (32, 10), "icfg-pedes": (32, 14), "rstpreid": (16, 2)}


def _up_person(dataset: str) -> list[dict[str, Any]]:
    rank, length = _UP_PERSON[dataset]
    return [
        {"method": "s-prefix", "config": {"length": length, "boost_init": 10.0}},
        {"method": "lora", "config": {"rank": rank, "scaling": "learnable", "roles": ["k", "v"]},},
        {"method": "l-adapter", "config": {"reduction": 8}},
    ]


PRESETS: dict[str, list[dict[str, Any]]] = {
    "lora": [{"method": "lora", "config": {"rank": 32, "alpha": 32, "roles": ["q", "v"]}}],
    "adapter": [{"method": "adapter", "config": {"reduction": 8, "mode": "sequential"}}],
    "l-adapter": [{"method": "l-adapter", "config": {"reduction": 8}}],
    "prefix": [{"method": "prefix", "config": {"length": 10}}],
    "s-prefix": [{"method": "s-prefix", "config": {"length": 10, "boost_init": 10.0}}],
    # DM-Adapter (REFERENCE.md section 2): 6 experts of width d/8, top-2, domain-aware router, in parallel
    # with every MLP of both towers; fixed output scale 0.1 (vision) and 4 (text); aux weight 0.5.
    "dm-adapter": [{"method": "moa", "config": {"experts": 6, "top_k": 2, "reduction": 8, "scale": 0.1,
                                                "branch_scale": {"text": 4.0}, "router": "domain", "lb_weight": 0.5}}],
    # UniPT (REFERENCE.md section 3): one side network per CLIP tower, width m = 512.
    "unipt": [{"method": "unipt", "config": {"width": 512}}],
    "up-person": _up_person("cuhk-pedes"),
    **{f"up-person:{dataset}": _up_person(dataset) for dataset in _UP_PERSON},
}


def build_preset(name: str, *, without: tuple[str, ...] = ()):
    from .spec import Spec

    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    entries = [e for e in PRESETS[name] if e["method"] not in without]
    missing = sorted({e["method"] for e in entries} - set(METHODS))
    if missing:
        raise SpecError(f"preset {name!r} needs method(s) {missing}, which this version does not provide yet; "
                        f"build it with without={tuple(missing)!r} to get the other parts")
    return Spec.from_dict({"entries": entries})
