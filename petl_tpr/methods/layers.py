"""Small building blocks shared by methods: activations and a bottleneck MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


class Bottleneck(nn.Module):
    """`z -> s * (W_up act(W_down z + b_down) + b_up)`, with parameters named `<prefix>_...`.

    Shapes: input `(..., d)`, down `(width, d)`, up `(d_out, width)`, output `(..., d_out)`.
    Init: W_down kaiming_uniform(a=sqrt(5)), b_down 0, W_up 0, b_up 0, so the output starts at 0.
    The scale `s` is a learnable Parameter `<prefix>_scale` or a fixed float.
    """

    def __init__(self, *, prefix: str, d_in: int, width: int, d_out: int, activation: str,
                 bias: bool, scale: float, learnable_scale: bool) -> None:
        super().__init__()
        self.prefix = prefix
        self.activation = activation
        down = torch.empty(width, d_in)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.register_parameter(f"{prefix}_down_weight", nn.Parameter(down))
        self.register_parameter(f"{prefix}_up_weight", nn.Parameter(torch.zeros(d_out, width)))
        if bias:
            self.register_parameter(f"{prefix}_down_bias", nn.Parameter(torch.zeros(width)))
            self.register_parameter(f"{prefix}_up_bias", nn.Parameter(torch.zeros(d_out)))
        if learnable_scale:
            self.register_parameter(f"{prefix}_scale", nn.Parameter(torch.tensor(float(scale))))
        else:
            self.fixed_scale = float(scale)

    @staticmethod
    def shapes(*, prefix: str, d_in: int, width: int, d_out: int, bias: bool,
               learnable_scale: bool) -> dict[str, tuple[int, ...]]:
        """The parameter shapes `__init__` creates with these arguments, by name, without allocating."""
        out = {f"{prefix}_down_weight": (width, d_in), f"{prefix}_up_weight": (d_out, width)}
        if bias:
            out |= {f"{prefix}_down_bias": (width,), f"{prefix}_up_bias": (d_out,)}
        if learnable_scale:
            out[f"{prefix}_scale"] = ()
        return out

    def _p(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{self.prefix}_{name}", None)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        weight = self._p("down_weight")
        h = F.linear(z.to(weight.dtype), weight, self._p("down_bias"))
        h = ACTIVATIONS[self.activation](h)
        out = F.linear(h, self._p("up_weight"), self._p("up_bias"))
        scale = self._p("scale")
        out = out * (scale if scale is not None else self.fixed_scale)
        return out.to(z.dtype)

    def extra_repr(self) -> str:
        d_out, width = self._p("up_weight").shape
        return f"{self._p('down_weight').shape[1]} -> {width} ({self.activation}) -> {d_out}"
