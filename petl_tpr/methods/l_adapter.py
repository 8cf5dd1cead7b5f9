"""L-Adapter (UP-Person): a bottleneck adapter in parallel with each LayerNorm of a block.

x <- x + Attn(LN1(x) + s1 * Ad1(x));  x <- x + MLP(LN2(x) + s2 * Ad2(x)).
The adapter reads the un-normalised residual stream (the norm's input). Ad as in the bottleneck
adapter with ReLU, width d/8, biases; s learnable, init 1; W_up = b_up = 0 so it starts at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..backbones.layout import NORM_ROLES
from ..errors import SpecError
from ..registry import register_method
from .base import Method, check_choice, check_fields, check_positive, check_roles
from .layers import ACTIVATIONS, Bottleneck


@dataclass(frozen=True)
class LAdapterConfig:
    width: int | None = None
    reduction: int | None = None
    activation: str = "relu"
    init_scale: float = 1.0
    roles: tuple[str, ...] = ("norm1", "norm2")

    def __post_init__(self) -> None:
        check_fields(self)
        check_positive(self, "width", "reduction")
        if self.width is not None and self.reduction is not None:
            raise SpecError("LAdapterConfig: give width or reduction, not both")
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_roles(self, NORM_ROLES)


def _width(config: LAdapterConfig, d: int) -> int:
    return config.width if config.width is not None else max(1, d // (config.reduction or 8))


@register_method
class LAdapter(Method):
    name = "l-adapter"
    config_cls = LAdapterConfig
    mechanism = "parallel"
    roles = NORM_ROLES

    @classmethod
    def build(cls, config: LAdapterConfig, *, in_dim: int, out_dim: int, branch: str) -> nn.Module:
        return Bottleneck(prefix="ladapter", d_in=in_dim, width=_width(config, in_dim), d_out=out_dim,
                          activation=config.activation, bias=True, scale=config.init_scale, learnable_scale=True)

    @classmethod
    def param_shapes(cls, config: LAdapterConfig, *, in_dim: int, out_dim: int, branch: str) -> dict[str, tuple]:
        return Bottleneck.shapes(prefix="ladapter", d_in=in_dim, width=_width(config, in_dim), d_out=out_dim,
                                 bias=True, learnable_scale=True)

    @classmethod
    def examples(cls):
        return [{"method": "l-adapter", "config": {"reduction": 4}}]
