"""Bottleneck adapters after attention and/or the MLP, sequential (Houlsby) or parallel (He et al.).

sequential: y <- y + s * Ad(y), on the branch output before the residual addition.
parallel:   y <- y + s * Ad(x), x the branch input (the normed stream on pre-norm blocks).
Ad(z) = W_up act(W_down z + b_down) + b_up with W_up = 0 at init, so the block starts unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones.layout import BRANCH_ROLES
from ..errors import SpecError
from ..registry import register_method
from .base import Method, check_choice, check_fields, check_positive, check_roles
from .layers import ACTIVATIONS, Bottleneck


@dataclass(frozen=True)
class AdapterConfig:
    width: int | None = None
    reduction: int | None = None
    activation: str = "relu"
    mode: str = "sequential"
    scale: float = 1.0
    learnable_scale: bool = False
    bias: bool = True
    roles: tuple[str, ...] = ("attn", "mlp")

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "width", "reduction")
        if self.width is not None and self.reduction is not None:
            raise SpecError("AdapterConfig: give width or reduction, not both")
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_choice(self, "mode", ("sequential", "parallel"))
        check_roles(self, BRANCH_ROLES)

    def width_for(self, d: int) -> int:
        """Bottleneck width at model width d: `width`, or d // reduction (default reduction 8)."""
        return self.width if self.width is not None else max(1, d // (self.reduction or 8))


def _build(config: AdapterConfig, d: int, prefix: str) -> Bottleneck:
    return Bottleneck(prefix=prefix, d_in=d, width=config.width_for(d), d_out=d, activation=config.activation,
                      bias=config.bias, scale=config.scale, learnable_scale=config.learnable_scale)


def _shapes(config: AdapterConfig, d: int, prefix: str) -> dict[str, tuple[int, ...]]:
    return Bottleneck.shapes(prefix=prefix, d_in=d, width=config.width_for(d), d_out=d, bias=config.bias,
                             learnable_scale=config.learnable_scale)


@register_method
class BottleneckAdapter(Method):
    """Registered as `adapter`; `mode` picks the sequential (post) or parallel mechanism."""

    name = "adapter"
    config_cls = AdapterConfig
    mechanism = "post"
    roles = BRANCH_ROLES

    @classmethod
    def mechanism_for(cls, config: AdapterConfig) -> str:
        return "post" if config.mode == "sequential" else "parallel"

    @classmethod
    def build(cls, config: AdapterConfig, *, in_dim: int, out_dim: int, branch: str) -> nn.Module:
        return _build(config, in_dim, "adapter")

    @classmethod
    def param_shapes(cls, config: AdapterConfig, *, in_dim: int, out_dim: int, branch: str) -> dict[str, tuple]:
        return _shapes(config, in_dim, "adapter")

    @classmethod
    def examples(cls):
        return [
            {"method": "adapter", "config": {"width": 8}},
            {"method": "adapter", "config": {"reduction": 4, "mode": "parallel", "activation": "gelu",
                                             "scale": 0.5, "learnable_scale": True}},
        ]
