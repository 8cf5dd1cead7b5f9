"""LoRA: a low-rank delta on any projection (q, k, v, o, fc1, fc2), whatever its storage.

delta(x) = s * (x A^T) B^T with A `(r, in)` kaiming_uniform(a=sqrt(5)) and B `(out, r)` zeros.
`scaling="alpha/r"` uses the fixed s = alpha / r of PEFT; `scaling="learnable"` uses one learnable
scalar per delta, initialised to `init_scale` (UP-Person: 1, no dropout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.layout import PROJECTION_ROLES
from ..errors import SpecError
from ..registry import register_method
from .base import Method, check_choice, check_fields, check_positive, check_roles


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float | None = None
    scaling: str = "alpha/r"
    init_scale: float = 1.0
    dropout: float = 0.0
    roles: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "rank", "alpha")
        check_choice(self, "scaling", ("alpha/r", "learnable"))
        check_roles(self, PROJECTION_ROLES)
        if self.scaling == "learnable" and self.alpha is not None:
            raise SpecError("LoRAConfig: alpha is unused with scaling='learnable' (the scale is a learnable scalar "
                            "starting at init_scale); leave alpha unset")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")


class LoRADelta(nn.Module):
    """Low-rank delta: input `(..., in_dim)` -> addition `(..., out_dim)`."""

    def __init__(self, config: LoRAConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        a = torch.empty(config.rank, in_dim)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(out_dim, config.rank))
        if config.scaling == "learnable":
            self.lora_scale = nn.Parameter(torch.tensor(float(config.init_scale)))
        else:
            self.fixed_scale = (config.alpha if config.alpha is not None else config.rank) / config.rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()

    def scale(self) -> torch.Tensor | float:
        return self.lora_scale if hasattr(self, "lora_scale") else self.fixed_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x.to(self.lora_a.dtype)), self.lora_a)
        return (F.linear(h, self.lora_b) * self.scale()).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The same delta as a weight: `(out_dim, in_dim)`."""
        return (self.lora_b @ self.lora_a) * self.scale()


@register_method
class LoRA(Method):
    name = "lora"
    config_cls = LoRAConfig
    mechanism = "delta"
    roles = PROJECTION_ROLES
    mergeable = True

    @classmethod
    def build(cls, config: LoRAConfig, *, in_dim: int, out_dim: int, branch: str) -> nn.Module:
        return LoRADelta(config, in_dim, out_dim)

    @classmethod
    def param_shapes(cls, config: LoRAConfig, *, in_dim: int, out_dim: int, branch: str) -> dict[str, tuple]:
        shapes = {"lora_a": (config.rank, in_dim), "lora_b": (out_dim, config.rank)}
        return shapes | ({"lora_scale": ()} if config.scaling == "learnable" else {})

    @classmethod
    def examples(cls):
        return [
            {"method": "lora", "config": {"rank": 4, "alpha": 8, "roles": list(PROJECTION_ROLES)}},
            {"method": "lora", "config": {"rank": 4, "scaling": "learnable", "roles": ["k", "v"]}},
        ]
