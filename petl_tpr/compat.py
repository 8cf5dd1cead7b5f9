"""Import helpers for optional third-party packages.

The only torchvision wheel matching CPU torch 2.13 is built for CUDA; importing it on a CPU-only
torch fails with "operator torchvision::nms does not exist" because its compiled extension cannot
load, while its Python half registers fake kernels for `torchvision::nms` and `torchvision::qnms`.
Defining those two schemas with `torch.library` lets the pure-Python parts (everything timm,
open_clip and transformers use) import. Nothing is defined when torchvision imports normally, so a
working CUDA install is never touched.
"""

from __future__ import annotations

import sys

import torch

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fallback_library: torch.library.Library | None = None


def ensure_torchvision_importable() -> bool:
    """Import torchvision, registering its two missing operator schemas if that is what fails.

    Returns True when torchvision is importable afterwards, False when it is not installed.
    """
    global _fallback_library
    try:
        import torchvision  # noqa: F401

        return True
    except ModuleNotFoundError:
        return False
    except RuntimeError as error:
        if "torchvision::nms" not in str(error) or _fallback_library is not None:
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _fallback_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _fallback_library.define(schema)
    import torchvision  # noqa: F401,F811

    return True
