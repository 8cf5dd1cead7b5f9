"""Key/value prefixes: vanilla prefix tuning and UP-Person's S-Prefix (REFERENCE.md section 1).

Both attach to a block's attention by takeover (mechanism `kv`): the module's `forward()` returns
`(key (L, d), value (L, d))` in the post-projection space (after the projection and its bias); the
takeover splits them into heads like ordinary tokens and lets every query see every prefix slot.

- `prefix` (Li & Liang): learnable P_k, P_v per layer, or with `reparam` an embedding `(L, d)`
  passed through a per-layer MLP `d -> hidden (tanh) -> 2d` that yields both (the MLP can be
  dropped after training by storing its output).
- `s-prefix`: P_k, P_v init uniform(0, init_range), each times its own learnable scalar (init 1),
  and the post-softmax boost S_p (one learnable scalar, init 10) on the prefix columns, with no
  renormalisation. Scaling the prefix columns of the attention by S_p equals scaling the prefix
  value rows by S_p, so the returned value is `S_p * s_v * P_v` and the fused SDPA kernel serves.
Neither starts as the identity: the prefixes take attention mass from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention import MAX_PREFIX_LENGTH
from ..errors import SpecError
from ..registry import register_method
from .base import Method, check_fields, check_positive, check_roles


def _check_length(config) -> None:
    check_positive(config, "length")
    if not isinstance(config.length, int) or config.length > MAX_PREFIX_LENGTH:
        raise SpecError(f"{type(config).__name__}.length must be an int in 1..{MAX_PREFIX_LENGTH}, got {config.length!r}")


@dataclass(frozen=True)
class PrefixConfig:
    length: int = 10
    reparam: bool = False
    reparam_hidden: int = 512
    init_std: float = 0.02
    roles: tuple[str, ...] = ("attn",)

    def __post_init__(self) -> None:
        check_fields(self)
        _check_length(self)
        check_positive(self, "reparam_hidden", "init_std")
        check_roles(self, ("attn",))


class KVPrefix(nn.Module):
    """Vanilla prefix: `forward() -> (key (L, d), value (L, d))`."""

    def __init__(self, config: PrefixConfig, d: int) -> None:
        super().__init__()
        self.d = d
        if config.reparam:
            self.prefix_embedding = nn.Parameter(torch.randn(config.length, d) * config.init_std)
            self.prefix_mlp = nn.Sequential(nn.Linear(d, config.reparam_hidden), nn.Tanh(),
                                            nn.Linear(config.reparam_hidden, 2 * d))
        else:
            self.prefix_key = nn.Parameter(torch.randn(config.length, d) * config.init_std)
            self.prefix_value = nn.Parameter(torch.randn(config.length, d) * config.init_std)

    @staticmethod
    def shapes(config: PrefixConfig, d: int) -> dict[str, tuple[int, ...]]:
        """The parameter shapes `__init__` creates, by name, without allocating."""
        L, h = config.length, config.reparam_hidden
        if config.reparam:
            return {"prefix_embedding": (L, d), "prefix_mlp.0.weight": (h, d), "prefix_mlp.0.bias": (h,),
                    "prefix_mlp.2.weight": (2 * d, h), "prefix_mlp.2.bias": (2 * d,)}
        return {"prefix_key": (L, d), "prefix_value": (L, d)}

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self, "prefix_mlp"):
            key, value = self.prefix_mlp(self.prefix_embedding).split(self.d, dim=-1)
            return key, value
        return self.prefix_key, self.prefix_value


@dataclass(frozen=True)
class SPrefixConfig:
    length: int = 10
    init_range: float = 0.01
    scale_init: float = 1.0
    boost_init: float = 10.0
    roles: tuple[str, ...] = ("attn",)

    def __post_init__(self) -> None:
        check_fields(self)
        _check_length(self)
        check_positive(self, "init_range")
        check_roles(self, ("attn",))


class SPrefix(nn.Module):
    """S-Prefix: `forward() -> (s_k P_k (L, d), S_p s_v P_v (L, d))`."""

    def __init__(self, config: SPrefixConfig, d: int) -> None:
        super().__init__()
        self.sprefix_key = nn.Parameter(torch.rand(config.length, d) * config.init_range)
        self.sprefix_value = nn.Parameter(torch.rand(config.length, d) * config.init_range)
        self.sprefix_key_scale = nn.Parameter(torch.tensor(float(config.scale_init)))
        self.sprefix_value_scale = nn.Parameter(torch.tensor(float(config.scale_init)))
        self.sprefix_boost = nn.Parameter(torch.tensor(float(config.boost_init)))

    @staticmethod
    def shapes(config: SPrefixConfig, d: int) -> dict[str, tuple[int, ...]]:
        """The parameter shapes `__init__` creates, by name, without allocating."""
        return {"sprefix_key": (config.length, d), "sprefix_value": (config.length, d), "sprefix_key_scale": (),
                "sprefix_value_scale": (), "sprefix_boost": ()}

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.sprefix_key * self.sprefix_key_scale
        value = self.sprefix_value * (self.sprefix_value_scale * self.sprefix_boost)
        return key, value


class _KVMethod(Method):
    """Shared declaration of the prefix methods: key/value slot of the attention, not identity at init."""

    mechanism = "kv"
    roles = ("attn",)
    identity_at_init = False
    module: type[nn.Module]

    @classmethod
    def build(cls, config, *, in_dim: int, out_dim: int, branch: str) -> nn.Module:
        return cls.module(config, in_dim)

    @classmethod
    def param_shapes(cls, config, *, in_dim: int, out_dim: int, branch: str) -> dict[str, tuple]:
        return cls.module.shapes(config, in_dim)


@register_method
class Prefix(_KVMethod):
    name, config_cls, module = "prefix", PrefixConfig, KVPrefix

    @classmethod
    def examples(cls):
        return [{"method": "prefix", "config": {"length": 3}},
                {"method": "prefix", "config": {"length": 2, "reparam": True, "reparam_hidden": 8}}]


@register_method
class SPrefixMethod(_KVMethod):
    name, config_cls, module = "s-prefix", SPrefixConfig, SPrefix

    @classmethod
    def examples(cls):
        return [{"method": "s-prefix", "config": {"length": 3}}]
